"""Ranks 1..N-1 of a tensor-parallel group, as child processes of rank 0 (the engine's process).

    rank 0 (LLMEngine)                        rank r (python -m engine.parallel.worker)
    FileStore in a 0700 pdserve-tp-* dir  ◄──  opens the store file, builds its group, loads its shard
    TPLeaderRunner: header + tensors      ──►  TPFollower: same forward on its shard, same collectives

Children get only primitive arguments (rank, size, store path, device, the EngineArgs as JSON),
die with their parent (PR_SET_PDEATHSIG plus a parent watcher), and are watched by rank 0: when one
exits unasked, the group is aborted so that rank 0's next (or current) collective fails at once
and the engine goes fatal; `on_death` lets an idle engine's owner (AsyncEngine) fail it right away.
The store's directory is removed with the ranks (`close`, a failed start, or garbage collection).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
import weakref
from typing import Callable

import torch

from engine.config import EngineArgs
from engine.rpc.process import spawn_env
from engine.parallel.group import HostedStore, TPGroup, host_store, make_group
from engine.parallel.sharding import MAX_CPU_TP_SIZE

logger = logging.getLogger("pdserve.engine")

STOP_GRACE_S = 10.0
_WATCH_INTERVAL_S = 0.2


class RankDied(RuntimeError):
    """A tensor-parallel rank exited while the engine was running."""


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of every rank: cuda:0..N-1, or the CPU for all; ValueError when N GPUs are missing."""
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if size > count:
            raise ValueError(f"tensor_parallel_size {size} exceeds the {count} visible GPU(s)")
        return [torch.device("cuda", r) for r in range(size)]
    if size > MAX_CPU_TP_SIZE:
        raise ValueError(f"tensor_parallel_size {size} on CPU exceeds the cap of {MAX_CPU_TP_SIZE}")
    return [device] * size


class RankProcesses:
    """Spawns ranks 1..N-1 and builds rank 0's side of the group (blocks until all joined)."""

    def __init__(self, args: EngineArgs, devices: list[torch.device]):
        size = len(devices)
        store = host_store(size)
        spec = json.dumps(dataclasses.asdict(args))
        self.procs: list[subprocess.Popen] = []
        # kills the ranks, then removes the store's directory: on close, or if this is dropped
        self._finalizer = weakref.finalize(self, _release, self.procs, store)
        try:
            for rank in range(1, size):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "engine.parallel.worker", "--rank", str(rank),
                     "--world-size", str(size), "--store-path", store.path,
                     "--device", str(devices[rank]), "--engine-args", spec],
                    stdin=subprocess.DEVNULL, stdout=_stderr_fd(), env=spawn_env()))
        except BaseException:
            self._finalizer()
            raise
        self.died: str | None = None
        self.on_death: Callable[[str], None] | None = None  # called on the watcher thread, once
        self._closing = threading.Event()
        try:
            self.group: TPGroup = make_group(store.store, 0, size, devices[0])
        except Exception as exc:
            self.close(grace=0)
            raise RuntimeError(f"tensor-parallel ranks did not join: {exc}") from None
        self.store_dir = store.dir
        threading.Thread(target=self._watch, name="tp-rank-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._closing.wait(_WATCH_INTERVAL_S):
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and not self._closing.is_set():
                    self.died = f"tensor-parallel rank {rank} exited with code {code}"
                    logger.critical("%s; aborting the group", self.died)
                    self.group.abort()
                    if self.on_death is not None:
                        self.on_death(self.died)
                    return

    def check(self) -> None:
        """RankDied if a rank has exited."""
        if self.died is not None:
            raise RankDied(self.died)

    def close(self, grace: float = STOP_GRACE_S) -> None:
        """Waits up to `grace` seconds for the ranks to exit (after STOP), then kills them and
        removes the store's directory."""
        self._closing.set()
        for proc in self.procs:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._finalizer()


def _stderr_fd() -> int:
    """Where a rank's stdout goes: our stderr (stdout may carry a node's READY line)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a notebook's stderr has no descriptor
        return subprocess.DEVNULL


def _release(procs: list[subprocess.Popen], store: HostedStore) -> None:
    """The ranks first (they may still open the store while they live), then the store's directory."""
    try:
        _terminate(procs)
    finally:
        store.close()


def _terminate(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.error("tensor-parallel rank pid %d did not exit", proc.pid)
