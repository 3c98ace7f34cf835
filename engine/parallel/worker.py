"""`python -m engine.parallel.worker`: one tensor-parallel rank > 0, spawned by rank 0 (ranks.py).

Joins the group, loads this rank's shard, then runs rank 0's commands until STOP. Exits non-zero
on any error (a failed collective included), and when its parent goes away.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import torch

from engine.config import EngineArgs
from engine.rpc.process import die_with_parent

logger = logging.getLogger("pdserve.engine")


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.parallel.worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store-path", required=True, help="rank 0's FileStore (in its private directory)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--engine-args", required=True, help="EngineArgs as a JSON object")
    return parser.parse_args(argv)


def run_rank(ns: argparse.Namespace) -> None:
    from engine.llm_engine import build_runner, resolve_max_model_len
    from engine.loader import load_model_source
    from engine.parallel.group import join_store, make_group
    from engine.parallel.step import TPFollower

    args = EngineArgs(**json.loads(ns.engine_args))
    device = torch.device(ns.device)
    group = make_group(join_store(ns.store_path), ns.rank, ns.world_size, device)
    source = load_model_source(args.model)
    torch.manual_seed(args.seed)
    runner = build_runner(args, source, device, resolve_max_model_len(source.config, args.max_model_len), group)
    TPFollower(runner, group).serve()


def main(argv=None) -> int:
    die_with_parent()
    _exit_with_parent()
    ns = _parse(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s tp-rank-{ns.rank} %(name)s: %(message)s")
    try:
        run_rank(ns)
    except Exception as exc:
        logger.critical("tensor-parallel rank %d failed: %s: %s", ns.rank, type(exc).__name__,
                        str(exc).splitlines()[0][:300] if str(exc) else "")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
