"""`python -m router`: the public pdserve.v1.Generation API in front of prefill and decode nodes.

    python -m router --prefill 127.0.0.1:50061 --decode 127.0.0.1:50071 --port 50051 --model <model>

Prints `READY host:port` once listening; health turns SERVING when at least one prefill and one
decode node answer. SIGTERM/SIGINT: health NOT_SERVING and new calls refused at once; in-flight
streams get --grace-period seconds to finish, then end with UNAVAILABLE ("shutting down").
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from engine.rpc.process import hide_torch_from_transformers

if __name__ == "__main__":  # `python -m router`: transformers without torch (before anything imports it)
    hide_torch_from_transformers()

from engine.cli_args import add_flag, add_server_args, env_name
from engine.args import DTYPE_CHOICES, EngineArgs
from engine.metrics import PREFIX, Metrics, add_metrics_flags, start_metrics_server
from engine.model_info import load_model_info, resolve_max_model_len
from engine.rpc import process
from engine.rpc.convert import TRANSPORTS
from engine.rpc.security import Security, add_security_args
from engine.rpc.server import build_server, run
from engine.structured.checker import GrammarCheckerPool
from protos.pdserve.v1 import generation_pb2_grpc, router_pb2_grpc
from router.auth import Scopes, router_interceptor
from router.pipeline import PipelineConfig
from router.policy import DEFAULT_LOCAL_PREFILL_TOKENS, POLICIES, Placement, PlacementCollector
from router.prompts import ModelLimits, PromptBuilder
from router.registry import NodeRegistry
from router.servicer import GenerationServicer, ModelCard, Router, RouterControlServicer, RouterLimits

logger = logging.getLogger("pdserve.router")


def _list_flag(p, flag: str, **kwargs) -> None:
    """A repeatable flag whose env twin holds a comma-separated list."""
    name = env_name(flag)
    default = [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]
    p.add_argument(flag, action="append", default=None, help=f"{kwargs.pop('help')} [env: {name}, comma-separated]",
                   **kwargs)
    p.set_defaults(**{flag.lstrip("-").replace("-", "_") + "_env": default})


def _list_value(ns, name: str) -> list[str]:
    given = getattr(ns, name)
    values = given if given is not None else getattr(ns, name + "_env")
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _list_flag(p, "--prefill", metavar="HOST:PORT",
             help="a prefill node's address (repeatable; nodes may also Register themselves)")
    _list_flag(p, "--decode", metavar="HOST:PORT",
             help="a decode node's address (repeatable; nodes may also Register themselves)")
    add_flag(p, "--model", default=None,
             help="model whose tokenizer and config the router loads (never its weights); "
                  "must be the nodes' model (default: the bundled small model)")
    add_flag(p, "--served-model-name", default=None, help="model name clients use (default: from --model)")
    add_flag(p, "--max-model-len", type=int, default=None,
             help="context length; default: the registered nodes' (the model's until one registered); "
                  "nodes with another one are refused")
    add_flag(p, "--block-size", type=int, default=None,
             help=f"the nodes' KV block size, in tokens; default: the registered nodes' ({EngineArgs.block_size} "
                  "until one registered); nodes with another one are refused")
    add_flag(p, "--dtype", default="auto", choices=DTYPE_CHOICES,
             help="the nodes' dtype; auto: as the registered nodes report it (ModelInfo says auto until one "
                  "registered); otherwise nodes with another one are refused")
    add_flag(p, "--kv-transport", default="auto", choices=list(TRANSPORTS),
             help="how prefill nodes send KV to decode nodes: auto (ipc when both share a host and GPU set, else "
                  "nccl when both are on CUDA, else grpc), ipc (CUDA IPC), nccl (torch.distributed; gloo on CPU) "
                  "or grpc")
    _list_flag(p, "--api-key", help="accepted API key (repeatable); clients send 'authorization: Bearer <key>'")
    _list_flag(p, "--admin-key", help="accepted API key that also sees and aborts every client's requests "
                                      "(GetLoads, Abort); repeatable")
    add_flag(p, "--max-stream-buffer", type=int, default=RouterLimits.max_stream_buffer,
             help="chunks a stream may buffer for a client that reads slowly; past it the request is aborted")
    add_flag(p, "--kv-lease-ms", type=int, default=PipelineConfig.lease_ms,
             help="a decode reservation is freed after this long without progress (the prefill node renews it "
                  "while the prompt is queued or prefilled, every KV frame renews it)")
    add_flag(p, "--prefill-policy", default="prefix", choices=POLICIES,
             help="how a prefill node is chosen: round-robin, least-load (fewest queued prompt tokens) or "
                  "prefix (least queued + uncached tokens: prompts go where their prefix is cached)")
    add_flag(p, "--decode-policy", default="prefix", choices=POLICIES,
             help="how a decode node is chosen: round-robin, least-load (fewest requests) or prefix "
                  "(requests there, less the prompt tokens it has cached)")
    add_flag(p, "--local-prefill-tokens", type=int, default=DEFAULT_LOCAL_PREFILL_TOKENS,
             help="the chosen decode node prefills a prompt itself (no prefill node, no KV transfer) when at "
                  "most this many of its tokens are not in that node's prefix cache; 0 = always use the "
                  f"prefill pool (when there is one). Default {DEFAULT_LOCAL_PREFILL_TOKENS}, measured by "
                  "bench/local_prefill_bench.py (docs/PERFORMANCE.md)")
    add_flag(p, "--max-failovers", type=int, default=2,
             help="how often one completion may move to another decode node mid-stream (the tokens already "
                  "sent are resumed there); 0 = a decode failure after the second token ends it")
    add_flag(p, "--admission-wait-ms", type=int, default=2_000,
             help="how long a request waits for a decode node with room before RESOURCE_EXHAUSTED")
    add_flag(p, "--grace-period", type=float, default=30.0,
             help="seconds in-flight streams get to finish on SIGTERM before they end with UNAVAILABLE")
    add_metrics_flags(p)
    add_server_args(p, default_port=50051)
    add_security_args(p)
    return p


def _api_keys(ns) -> list[str]:
    return _list_value(ns, "api_key")


def build_router(ns) -> tuple[Router, NodeRegistry]:
    source = load_model_info(ns.model)
    max_len = resolve_max_model_len(source.config, ns.max_model_len)
    block_size = ns.block_size or EngineArgs.block_size  # until the nodes' is known (Router.adopt)
    card = ModelCard(name=ns.served_model_name or source.name, max_model_len=max_len,
                     vocab_size=source.config.vocab_size, block_size=block_size,
                     eos_token_ids=list(source.eos_token_ids), dtype=ns.dtype)
    # Output constraints parse in child processes (xgrammar loads torch), in Router.execute, off the
    # tokenizer thread: the builder leaves them alone
    builder = PromptBuilder(source.tokenizer, ModelLimits(card.vocab_size, max_len), source.generation_defaults,
                            check_spec=None)
    checkers = GrammarCheckerPool()
    placement = Placement(block_size, ns.prefill_policy, ns.decode_policy, ns.local_prefill_tokens)
    config = PipelineConfig(block_size=block_size, transport=TRANSPORTS[ns.kv_transport],
                            lease_ms=ns.kv_lease_ms, admission_wait_s=ns.admission_wait_ms / 1000.0,
                            max_failovers=ns.max_failovers, placement=placement)
    registry = NodeRegistry(Security.from_args(ns).client, block_size=ns.block_size,
                            dtype=None if ns.dtype == "auto" else ns.dtype, max_model_len=ns.max_model_len)
    for address in _list_value(ns, "prefill"):
        registry.add(address, "prefill")
    for address in _list_value(ns, "decode"):
        registry.add(address, "decode")
    return Router(registry, builder, card, config, RouterLimits(max_stream_buffer=ns.max_stream_buffer),
                  check_spec=checkers.check, check_threads=checkers.size), registry


async def serve(ns) -> None:
    stop = process.stop_signals()
    router, registry = build_router(ns)
    if ns.metrics_port is not None:
        router.metrics = Metrics(router.card.name, "router", prefix=ns.metrics_prefix,
                                 max_model_len=router.card.max_model_len)
        if router.config.placement is not None:
            router.metrics.registry.register(PlacementCollector(
                router.config.placement.stats, router.card.name, getattr(router.metrics, "prefix", PREFIX)))
        start_metrics_server(ns.metrics_port, ns.host, router.metrics)
    security = Security.from_args(ns)
    admin_keys = _list_value(ns, "admin_key")
    auth = router_interceptor(_api_keys(ns), admin_keys, security.node_key)
    server = build_server([(generation_pb2_grpc.add_GenerationServicer_to_server,
                            GenerationServicer(router, Scopes(admin_keys))),
                           (router_pb2_grpc.add_RouterControlServicer_to_server, RouterControlServicer(router))],
                          port=ns.port, host=ns.host, interceptors=[auth] if auth else (),
                          credentials=security.server_credentials())
    await server.start()
    registry.start()
    process.announce_ready(server.address)
    serving = False
    while not stop.is_set():
        if registry.ready != serving:
            serving = registry.ready
            await server.set_serving(serving)
            logger.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.2)
        except asyncio.TimeoutError:
            pass
    await shutdown(server, router, ns.grace_period)
    await registry.close()


async def shutdown(server, router: Router, grace: float) -> None:
    """New calls refused at once; running streams finish within `grace`, then end with UNAVAILABLE."""
    logger.info("shutting down: %d requests in flight, grace %.1fs", len(router.ledger), grace)
    stopping = asyncio.ensure_future(server.stop(grace + 1.0))
    loop = asyncio.get_running_loop()
    end = loop.time() + grace
    while len(router.ledger) and loop.time() < end:
        await asyncio.sleep(0.05)
    if len(router.ledger):
        logger.info("grace period over: ending %d requests", router.shutdown())
    await stopping


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    process.die_with_parent()
    run(lambda: serve(ns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
