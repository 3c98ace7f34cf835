"""One tensor-parallel group: its rank, size and the few collectives TP needs.

No `init_process_group` (the node may also hold torch.distributed KV pair groups): the group is
a ProcessGroupNCCL (CUDA) or ProcessGroupGloo (CPU) built on a TCPStore that rank 0 hosts on
loopback. Every collective is issued on the group object itself, so it is also capturable in a
CUDA graph once the group exists (NCCL).

Security: the TP ranks are child processes of one node on one host, so the store is bound to
127.0.0.1 only (`host_store`, tested in tests/services/test_rel_rendezvous.py) and no other host
can reach it or the gloo / NCCL connections made from it (gloo's device is bound to loopback
too). The trust boundary is the host: local users are not authenticated by a TCPStore; run a
node's ranks under an account of their own on shared machines.
"""
from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

# A worker waits for rank 0's next step inside a broadcast, for as long as the node is idle, so
# the per-operation budget is long; a dead peer surfaces sooner: gloo fails on the closed socket,
# and rank 0 watches its worker processes (`RankProcesses`) and aborts the group when one exits.
OP_TIMEOUT_S = 24 * 3600.0
RENDEZVOUS_TIMEOUT_S = 120.0  # every rank imports torch and connects (not the weight load)
LOOPBACK = "127.0.0.1"


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


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


def host_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port bound to loopback only (`.port` tells the others)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(world_size)
    store = dist.TCPStore(LOOPBACK, sock.getsockname()[1], world_size, True, _timedelta(RENDEZVOUS_TIMEOUT_S),
                          wait_for_workers=False, master_listen_fd=sock.fileno())
    sock.detach()  # the store owns the listening socket now
    return store


def join_store(port: int) -> dist.TCPStore:
    return dist.TCPStore(LOOPBACK, port, None, False, _timedelta(RENDEZVOUS_TIMEOUT_S))


def make_group(store, rank: int, size: int, device: torch.device) -> TPGroup:
    """The TP group over `store` (blocks until every rank joined): NCCL on CUDA, gloo on CPU."""
    store = dist.PrefixStore("tp", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _timedelta(OP_TIMEOUT_S)
        pg = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _timedelta(OP_TIMEOUT_S)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
        pg = dist.ProcessGroupGloo(store, rank, size, opts)
    return TPGroup(pg, rank, size, device)
