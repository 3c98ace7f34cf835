"""KV over torch.distributed point-to-point between one prefill/decode pair.

No `init_process_group`: each pair is its own 2-rank group built on demand on a store the decode
node serves through its gRPC server (`rendezvous` "grpc" in ReserveResponse; engine.kv_transfer.
rendezvous), in the namespace of the pair's key:

    prefill (rank 0)                                   decode (rank 1)
    PushKV header-only frame (dtype, shape, crc)  ──►  validate header, allocate the declared size
    group.send(raw uint8 view)                    ──►  group.recv(buffer), check CRC32, stage
    ... one frame per layer per K/V ...
    done_writing                                  ──►  PushKVResponse once every block is staged

ProcessGroupGloo on CPU, ProcessGroupNCCL on CUDA (same code path). Every operation has a timeout;
a pair group that failed once is dropped on both sides (its store keys with it) and rebuilt under a
new generation. Transfers on one pair are serialized (the sender holds the pair until PushKV
answers), so send/recv order always matches, also for NCCL which ignores tags.

Rendezvous security. The pair's store is the decode node's `DecodeNode.KVRendezvous` RPC on the
node port: every store call carries the node key (checked like every other pdserve RPC) and runs
over TLS when configured, so only holders of the node key read or write store keys, and the KV path
has no listener of its own beside the data connections. Store keys live in the namespace of the
pair key `<instance>/<generation>/<secret>` (a 128-bit secret the prefill node draws for every pair
group and sends in the PushKV call's metadata): the decode side refuses pair keys without a
well-formed secret, and one pair cannot read or plant another's keys without its secret. Keys,
values and the number of keys are bounded, and a pair's keys are freed when its group is dropped.
Not covered: the NCCL / gloo data connections themselves are unauthenticated by those libraries
(every frame's dtype, shape and CRC32 still come over the authenticated gRPC call and are checked
before anything is staged; gloo's data sockets bind --kv-host); run cross-host KV on a trusted
network or use the gRPC transport there.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import uuid
import zlib
from dataclasses import dataclass

import grpc
import torch
import torch.distributed as dist

from engine.kv_transfer.base import K, T, V, KVLanding, KVReceiver, KVSender, KVSpec, Received, crc32, make_header, sum64
from engine.kv_transfer.grpc_transport import Channels, call_failure
from engine.kv_transfer.rendezvous import (PAIR_METADATA_KEY, PAIR_SECRET_BYTES, RENDEZVOUS_GRPC,  # noqa: F401
                                           GrpcPairStore, LocalPairStore, PairStores, new_pair_key, pair_instance,
                                           rendezvous_call, serve)
from engine.kv_transfer.staging import KVStaging, TransferError
from engine.rpc.errors import InvalidArgument, Unavailable
from protos.pdserve.v1 import node_pb2

logger = logging.getLogger("pdserve.kv_transfer")

SENDER_RANK, RECEIVER_RANK = 0, 1


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.5))


def make_pair_group(store, rank: int, timeout: float, device: torch.device, host: str):
    """A 2-rank group on `store` without init_process_group: NCCL on CUDA, gloo otherwise."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # ProcessGroupNCCL's heartbeat monitor would poll the store (dump-signal keys) from a C++
        # thread about once a second: a blocking gRPC call into Python that could also meet the
        # interpreter's shutdown. Our own stage deadlines bound a stuck transfer instead. Read when
        # the group is built; a value the user set wins.
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
        os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _timedelta(timeout)
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _timedelta(timeout)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def transfer_tag(reservation_id: str) -> int:
    return zlib.crc32(reservation_id.encode()) & 0x7FFFFFFF


def _short(exc: BaseException) -> str:
    """A gloo/NCCL error without the source paths they carry."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "] " in text:
        text = text.split("] ", 1)[1]
    return text[:200]


@dataclass
class _Pair:
    key: str
    group: object
    store: object  # the Python store must outlive the group: c10d's C++ side does not keep it alive


def _payload(t: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, node_pb2.TensorHeader]:
    """Worker thread: one layer's K or V as raw bytes on the pair's device, and a header field of
    their checksum: on a GPU `sum64`, computed there (no payload byte goes to host memory for it);
    on the host (gloo) the CRC32, which is faster there."""
    payload = t.to(device).contiguous().view(torch.uint8).reshape(-1)
    if payload.is_cuda:
        return payload, node_pb2.TensorHeader(sum64=sum64(payload))
    return payload, node_pb2.TensorHeader(crc32=crc32(payload))


class TorchDistKVSender(KVSender):
    """Prefill side (rank 0 of every pair)."""

    transport = T.KV_TRANSPORT_NCCL

    def __init__(self, node_id: str, device: torch.device | str = "cpu", host: str = "127.0.0.1",
                 channels: Channels | None = None):
        self.instance = f"{node_id}-{uuid.uuid4().hex[:8]}"  # a restarted node never reuses old pair keys
        self.device = torch.device(device)
        self.host = host
        self.channels = channels or Channels()
        self._pairs: dict[str, _Pair] = {}  # decode node id -> pair
        self._locks: dict[str, asyncio.Lock] = {}
        self._generation = 0

    def _lock(self, decode_id: str) -> asyncio.Lock:
        return self._locks.setdefault(decode_id, asyncio.Lock())

    async def _build(self, target: node_pb2.KVTarget, key: str, timeout: float) -> _Pair:
        """Rank 0 of the pair group, on the pair's namespace of the decode node's store (blocking
        KVRendezvous calls with this node's key and TLS, from a worker thread)."""
        call = rendezvous_call(self.channels.sync_channel(target.decode_address), self.channels.metadata())
        store = GrpcPairStore(call, key, timeout)
        group = await asyncio.get_running_loop().run_in_executor(
            None, make_pair_group, store, SENDER_RANK, timeout, self.device, self.host)
        return _Pair(key, group, store)

    async def send(self, target: node_pb2.KVTarget, k: torch.Tensor, v: torch.Tensor, timeout: float) -> int:
        if not target.rendezvous:
            raise ValueError("the KV target has no torch.distributed rendezvous")
        if target.rendezvous != RENDEZVOUS_GRPC:
            raise ValueError(f"the decode node offers the torch.distributed rendezvous {target.rendezvous[:64]!r}, "
                             f"not {RENDEZVOUS_GRPC!r} (its KVRendezvous RPC): run the same pdserve version on both")
        spec = KVSpec.from_proto(target.layout)
        num_blocks = spec.check_tensors(k, v)
        decode_id = target.decode_node_id or target.decode_address
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._lock(decode_id):  # one transfer at a time per pair
            pair = self._pairs.get(decode_id)
            key = pair.key if pair else new_pair_key(self.instance, self._next_generation())
            call = self.channels.stub(target.decode_address).PushKV(
                timeout=timeout, metadata=((PAIR_METADATA_KEY, key),))
            plan = [(kind, layer) for layer in range(spec.num_layers) for kind in (K, V)]
            tag = transfer_tag(target.reservation_id)
            sent = 0
            answer = asyncio.ensure_future(_finish(call))  # completes early if the decode side refuses
            try:
                for seq, (kind, layer) in enumerate(plan):
                    payload, checksum = await loop.run_in_executor(None, _payload, (k if kind == K else v)[layer],
                                                                   self.device)
                    header = make_header(spec, kind, layer, 0, num_blocks, 0)
                    header.MergeFrom(checksum)
                    await call.write(node_pb2.KVFrame(reservation_id=target.reservation_id, seq=seq,
                                                      total_frames=len(plan), header=header))
                    if pair is None:  # the decode side joins when it sees the first header
                        pair = self._pairs[decode_id] = await _race(
                            answer, self._build(target, key, deadline - loop.time()))
                    await _race(answer, loop.run_in_executor(None, _send, pair.group, payload, tag,
                                                             deadline - loop.time()))
                    sent += payload.numel()
                await call.done_writing()
                await answer
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                self._drop(decode_id)
                raise Unavailable(f"KV transfer to the decode node failed: {await call_failure(call, exc)}") from None
            except asyncio.CancelledError:
                call.cancel()
                self._drop(decode_id)
                raise
            except RuntimeError as exc:  # gloo / NCCL / store errors, timeouts included
                call.cancel()
                self._drop(decode_id)
                raise Unavailable(f"KV transfer over torch.distributed failed: {_short(exc)}") from None
            finally:
                if not answer.done():
                    answer.cancel()
        return sent

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _drop(self, decode_id: str) -> None:
        pair = self._pairs.pop(decode_id, None)
        if pair is not None:
            logger.warning("dropping the KV pair group %s", pair.key)
            _abort(pair.group)

    async def close(self) -> None:
        for decode_id in list(self._pairs):
            self._drop(decode_id)
        await self.channels.close()


async def _finish(call):
    return await call


async def _race(answer: asyncio.Future, work):
    """Awaits `work` unless the PushKV call ends first (the decode side refused): then raises its
    error instead of waiting for a peer that will never join or receive."""
    work = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({answer, work}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        return work.result()
    work.cancel()  # the executor thread runs on until its own timeout; its result is dropped
    work.add_done_callback(lambda f: f.cancelled() or f.exception())
    answer.result()  # raises the call's error
    raise Unavailable("the decode node ended the KV transfer early")


def _send(group, payload: torch.Tensor, tag: int, timeout: float) -> None:
    group.send([payload], RECEIVER_RANK, tag).wait(_timedelta(timeout))


def _recv(group, buf: torch.Tensor, tag: int, timeout: float) -> None:
    group.recv([buf], SENDER_RANK, tag).wait(_timedelta(timeout))


def _abort(group) -> None:
    for name in ("abort", "shutdown"):
        fn = getattr(group, name, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception:  # best effort: the group is being thrown away
                continue


class TorchDistHost:
    """Decode side (rank 1 of every pair): serves the pairs' store (KVRendezvous) and receives into
    staging buffers."""

    rendezvous = RENDEZVOUS_GRPC  # what Reserve hands out: the store is this node's KVRendezvous RPC

    def __init__(self, host: str = "127.0.0.1", device: torch.device | str = "cpu", stores: PairStores | None = None):
        self.host = host  # gloo binds its data sockets here (--kv-host)
        self.device = torch.device(device)
        self.stores = stores or PairStores()
        self._groups: dict[str, _Pair] = {}  # pair key -> group
        self._building: dict[str, asyncio.Future] = {}

    async def serve_store(self, request: node_pb2.KVStoreRequest, context) -> node_pb2.KVStoreResponse:
        """One KVRendezvous call (on the event loop; a GET or WAIT waits without blocking it)."""
        return await serve(self.stores, request, context)

    async def _group(self, key: str, timeout: float):
        if key in self._groups:
            return self._groups[key].group
        if key not in self._building:
            instance = pair_instance(key)
            for old in [k for k in self._groups if pair_instance(k) == instance]:
                self.drop(old)  # the sender moved to a new generation: the old group is broken
            self.stores.drop_others(key)  # with the keys of generations that never got a group
            self.stores.hold(key)
            store = LocalPairStore(self.stores, key, timeout)
            loop = asyncio.get_running_loop()
            building = loop.run_in_executor(None, make_pair_group, store, RECEIVER_RANK, timeout, self.device,
                                            self.host)
            self._building[key] = asyncio.ensure_future(_paired(building, key, store))
        try:
            pair = await self._building[key]
        finally:
            self._building.pop(key, None)
        self._groups[key] = pair
        return pair.group

    async def receive(self, staging: KVStaging, frame: node_pb2.KVFrame, key: str, timeout: float) -> int:
        """Validates a header-only frame, receives its payload over the pair group, stages it."""
        buf, token = staging.receive_buffer(frame)  # raises TransferError before any allocation
        try:
            group = await self._group(key, timeout)
            await asyncio.get_running_loop().run_in_executor(
                None, _recv, group, buf, transfer_tag(staging.reservation_id), timeout)
        except RuntimeError as exc:
            self.drop(key)
            raise Unavailable(f"KV receive over torch.distributed failed: {_short(exc)}") from None
        except asyncio.CancelledError:  # the sender went away: a receive may still be pending on the group
            self.drop(key)
            raise
        await asyncio.get_running_loop().run_in_executor(None, staging.add_received, buf, token)  # CRC off the loop
        return buf.numel()

    def drop(self, key: str) -> None:
        """Drops the pair's group (if built) and frees its store keys."""
        pair = self._groups.pop(key, None)
        self.stores.drop(key)
        if pair is not None:
            logger.warning("dropping the KV pair group %s", key)
            _abort(pair.group)

    def close(self) -> None:
        for key in list(self._groups):
            self.drop(key)
        for key in self.stores.pairs():
            self.stores.drop(key)


async def _paired(building: asyncio.Future, key: str, store) -> _Pair:
    return _Pair(key, await building, store)


class TorchDistKVReceiver(KVReceiver):
    """Decode side: header-only PushKV frames (validated first), payloads over the pair group into a
    staging buffer on the cache's device, then one copy into the reserved blocks."""

    transport = T.KV_TRANSPORT_NCCL

    def __init__(self, host: TorchDistHost):
        self.host = host

    @staticmethod
    def announced(context) -> str:
        """The pair key a torch.distributed sender puts in the PushKV metadata ("" for gRPC frames)."""
        return dict(context.invocation_metadata() or ()).get(PAIR_METADATA_KEY, "")

    async def receive(self, landing: KVLanding, frames, context) -> Received:
        pair = self.announced(context)
        if not pair:
            raise InvalidArgument(f"torch.distributed KV frames need the {PAIR_METADATA_KEY} metadata")
        pair_instance(pair)  # a well-formed key with its secret, before any frame is read
        staging = KVStaging(landing.reservation_id, landing.spec, landing.num_blocks, self.host.device)
        async for frame in frames:
            remaining = context.time_remaining()
            await self.host.receive(staging, frame, pair, 60.0 if remaining is None else max(remaining, 0.0))
            landing.progress()
        if not staging.complete:
            raise TransferError(f"the transfer ended after {staging.frames} of {staging.total_frames} frames")
        await landing.write(staging.k, staging.v)
        return Received(staging.bytes_received, staging.frames)

    def close(self) -> None:
        self.host.close()
