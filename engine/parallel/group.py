"""One tensor-parallel group: its rank, size and the few collectives TP needs.

No `init_process_group` (the node may also hold torch.distributed KV pair groups): the group is
a ProcessGroupNCCL (CUDA) or ProcessGroupGloo (CPU) built on a FileStore that rank 0 creates in a
fresh private directory. Every collective is issued on the group object itself, so it is also
capturable in a CUDA graph once the group exists (NCCL).

Security: the TP ranks are child processes of one node on one host, so their rendezvous is a file
in a directory of mode 0700 (`host_store`, tested in tests/services/test_rel_rendezvous.py): no
port is opened for it, and only the node's own user account can open the store to read or write
its keys; that account is the trust boundary. Rank 0 removes the directory when the group closes.
Gloo's data sockets (their addresses swapped through the store) still bind loopback only, so no
other host can reach them. NCCL uses its own transports between the GPUs of one host (P2P / shared
memory); its bootstrap sockets listen on the interface NCCL picks (NCCL_SOCKET_IFNAME=lo keeps them
on loopback). Run a node under an account of its own on shared machines.
"""
from __future__ import annotations

from datetime import timedelta
import glob
import os
import shutil
import stat
import tempfile

import torch
import torch.distributed as dist

# A worker waits for rank 0's next step inside a broadcast, for as long as the node is idle, so
# the per-operation budget is long; a dead peer surfaces sooner: gloo fails on the closed socket,
# and rank 0 watches its worker processes (`RankProcesses`) and aborts the group when one exits.
OP_TIMEOUT_S = 24 * 3600.0
RENDEZVOUS_TIMEOUT_S = 120.0  # every rank imports torch and connects (not the weight load)
LOOPBACK = "127.0.0.1"  # gloo's data sockets
STORE_DIR_PREFIX = "pdserve-tp-"
OWNER_FILE = "owner"  # "<pid> <start time>" of the rank 0 that made the directory


class TPGroup:
    """Collectives of one TP group, on `device` tensors; each waits for its result (on CUDA,
    `wait()` only orders the current stream after the NCCL kernel, so it stays graph-safe)."""

    def __init__(self, pg, rank: int, size: int, device: torch.device):
        self.pg = pg
        self.rank = rank
        self.size = size
        self.device = device

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In place: x becomes the sum of every rank's x."""
        self.pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape everywhere), in rank order."""
        out = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.allgather([out], [x.contiguous()]).wait()
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: rank `src`'s x, on every rank (x must be contiguous)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([x], opts).wait()
        return x

    def gather(self, x: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's x onto rank `dst` (None elsewhere)."""
        opts = dist.GatherOptions()
        opts.rootRank = dst
        x = x.contiguous()
        out = [[torch.empty_like(x) for _ in range(self.size)]] if self.rank == dst else []
        self.pg.gather(out, [x], opts).wait()
        return out[0] if self.rank == dst else None

    def scatter(self, out: torch.Tensor, chunks: list[torch.Tensor] | None = None, src: int = 0) -> torch.Tensor:
        """Rank i receives chunks[i] (given on rank `src` only) into `out`."""
        opts = dist.ScatterOptions()
        opts.rootRank = src
        inputs = [[c.contiguous() for c in chunks]] if self.rank == src else []
        self.pg.scatter([out], inputs, opts).wait()
        return out

    def abort(self) -> None:
        """Makes every pending and later collective fail (a rank died)."""
        try:
            self.pg.abort()
        except (RuntimeError, AttributeError):
            pass


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc, clock ticks since boot), None if there is none:
    with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def sweep_stale_stores(tmp_dir: str | None = None) -> list[str]:
    """Removes the store directories of this user whose rank 0 is gone (killed with SIGKILL, it
    could not remove its own); returns them. A directory without an owner file yet (being made
    now) or of another user is left alone; so is everything where /proc is missing."""
    if _process_start(os.getpid()) is None:
        return []
    removed = []
    for path in glob.glob(os.path.join(tmp_dir or tempfile.gettempdir(), STORE_DIR_PREFIX + "*")):
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            with open(os.path.join(path, OWNER_FILE)) as f:
                pid, start = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue
        if _process_start(pid) != start:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class HostedStore:
    """Rank 0's rendezvous: a FileStore at `.path`, in a directory of its own that only this user
    can open; `close()` removes the directory (idempotent), so nothing is left in the temp dir.
    The directory names its maker (`OWNER_FILE`), so a later rank 0 removes it if its maker died
    without closing (`sweep_stale_stores`)."""

    def __init__(self, world_size: int):
        sweep_stale_stores()
        self.dir = tempfile.mkdtemp(prefix=STORE_DIR_PREFIX)  # a fresh name, created 0700
        try:
            os.chmod(self.dir, 0o700)  # whatever the umask
            start = _process_start(os.getpid())
            if start is not None:
                with open(os.path.join(self.dir, OWNER_FILE), "w") as f:
                    f.write(f"{os.getpid()} {start}")
            self.path = os.path.join(self.dir, "store")
            self.store = _file_store(self.path, world_size)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def close(self) -> None:
        """Removes the store's directory; a store object still held (the group's) sees no file
        and its destructor does nothing then. A store call made after this (NCCL's heartbeat
        monitor polls the store about once a second while the group lives) fails within about a
        second instead of retrying the open of the missing file for the whole rendezvous timeout
        (0 would mean no timeout at all)."""
        self.store.set_timeout(timedelta(seconds=0.001))
        shutil.rmtree(self.dir, ignore_errors=True)


def host_store(world_size: int) -> HostedStore:
    """Rank 0's rendezvous store; the other ranks open `.path` with `join_store`."""
    return HostedStore(world_size)


def join_store(path: str) -> dist.FileStore:
    """A rank > 0's handle on rank 0's store (rank 0 alone removes the file, with its directory)."""
    return _file_store(path, -1)


def _file_store(path: str, world_size: int) -> dist.FileStore:
    store = dist.FileStore(path, world_size)
    store.set_timeout(timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    return store


def make_group(store, rank: int, size: int, device: torch.device) -> TPGroup:
    """The TP group over `store` (blocks until every rank joined): NCCL on CUDA, gloo on CPU."""
    store = dist.PrefixStore("tp", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=OP_TIMEOUT_S)
        pg = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=OP_TIMEOUT_S)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
        pg = dist.ProcessGroupGloo(store, rank, size, opts)
    return TPGroup(pg, rank, size, device)
