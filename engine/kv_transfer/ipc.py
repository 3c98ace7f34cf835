"""KV over CUDA IPC, for a prefill and a decode node on one host (same GPU or peer GPUs).

    prefill (IpcKVSender)                               decode (IpcKVReceiver + servicer)
    ShareKV, once per decode node                 ──►  CUDA IPC handles of every layer's K and V
      check host id, find the GPU by UUID,               cache tensor (bytes in a KVShare message,
      open the handles                                   with host id, device UUID, instance)
    RenewLease(ipc_write) per transfer            ──►  the reservation's block ids; its blocks stay
                                                         out of reuse until CommitKV (or the lease)
    one scatter per layer and K/V, straight into
      the decode node's reserved blocks, on a side
      stream; synchronize
    CommitKV(instance, blocks, bytes)             ──►  validated; the reservation is complete

No host memory on the way and no pickle: the handles are the raw bytes that
`torch.UntypedStorage._share_cuda_()` returns, opened with `_new_shared_cuda`.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from dataclasses import dataclass

import grpc
import torch

from engine.kv_transfer.base import T, KVLanding, KVReceiver, KVSender, KVSpec, Received
from engine.kv_transfer.grpc_transport import Channels
from engine.kv_transfer.staging import TransferError
from engine.rpc.errors import FailedPrecondition, Unavailable
from protos.pdserve.v1 import node_pb2

logger = logging.getLogger("pdserve.kv_transfer")
SHARE_TIMEOUT_S = 10.0


def host_id() -> str:
    """This host's identity: hostname plus the kernel's boot id (a rebooted or cloned host differs)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def local_device_for(uuid_text: str) -> int | None:
    """The index of the visible CUDA device with this UUID, or None."""
    if not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", i)) == uuid_text:
            return i
    return None


# ---- decode side ------------------------------------------------------------------------------------
def share_tensor(t: torch.Tensor) -> node_pb2.CudaIpcHandle:
    if t.storage_offset() != 0 or not t.is_contiguous():
        raise ValueError("only whole contiguous cache tensors are shared")
    (device, handle, size, offset, ref_handle, ref_offset, event_handle,
     event_sync) = t.untyped_storage()._share_cuda_()
    return node_pb2.CudaIpcHandle(device=device, handle=handle, storage_size_bytes=size, storage_offset_bytes=offset,
                                  ref_counter_handle=ref_handle, ref_counter_offset=ref_offset,
                                  event_handle=event_handle or b"", event_sync_required=bool(event_sync))


def share_cache(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], spec: KVSpec) -> node_pb2.KVShare:
    """The KVShare of a CUDA KV cache (one K and one V tensor per layer)."""
    k0 = kv_caches[0][0]
    if k0.device.type != "cuda":
        raise FailedPrecondition(f"the decode node's KV cache is on {k0.device.type}; CUDA IPC needs a CUDA device")
    return node_pb2.KVShare(host_id=host_id(), device_uuid=device_uuid(k0.device), instance=uuid.uuid4().hex,
                            layout=spec.to_proto(), num_blocks=k0.shape[0],
                            k=[share_tensor(kc) for kc, _ in kv_caches], v=[share_tensor(vc) for _, vc in kv_caches])


class IpcKVReceiver(KVReceiver):
    """Decode side: hands out the cache's handles (once built, the same every time) and validates
    commits. The bytes were written into the reservation's blocks by the prefill node."""

    transport = T.KV_TRANSPORT_IPC

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], spec: KVSpec):
        self._kv_caches = kv_caches
        self.spec = spec
        self._share: node_pb2.KVShare | None = None

    @property
    def shared(self) -> bool:
        return self._share is not None

    def share(self) -> node_pb2.KVShare:
        if self._share is None:
            self._share = share_cache(self._kv_caches, self.spec)
        return self._share

    async def receive(self, landing: KVLanding, commit: node_pb2.KVCommit, context) -> Received:
        if self._share is None or commit.instance != self._share.instance:
            raise TransferError("the commit names KV handles this decode node did not hand out (restarted?)")
        if commit.num_blocks != landing.num_blocks:
            raise TransferError(f"the commit covers {commit.num_blocks} blocks; the reservation has "
                                f"{landing.num_blocks}")
        expected = landing.spec.transfer_bytes(landing.num_blocks)
        if commit.bytes != expected:
            raise TransferError(f"the commit reports {commit.bytes} bytes; the reservation holds {expected}")
        landing.progress()
        return Received(commit.bytes, 1)


# ---- prefill side -----------------------------------------------------------------------------------
def check_share(share: node_pb2.KVShare, local_host: str) -> int | None:
    """Validates a decode node's KVShare for use from this process; returns the local device index
    to open it on (None: the GPU is not visible here, open it on our own device as a peer).
    Raises FailedPrecondition across hosts."""
    if share.host_id != local_host:
        raise FailedPrecondition(f"CUDA IPC needs the prefill and decode nodes on one host: the decode node runs "
                                 f"on {share.host_id.split('/')[0]!r}, this prefill node on "
                                 f"{local_host.split('/')[0]!r}; use --kv-transport nccl or grpc")
    if len(share.k) != share.layout.num_layers or len(share.v) != share.layout.num_layers:
        raise FailedPrecondition("the decode node's KVShare does not have one K and one V handle per layer")
    return local_device_for(share.device_uuid)


def same_gpu_set(share: node_pb2.KVShare, local_host: str) -> bool:
    """`auto`: ipc only when the decode node's GPU is visible to this process on this host."""
    return share.host_id == local_host and local_device_for(share.device_uuid) is not None


def open_tensor(h: node_pb2.CudaIpcHandle, device: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared_cuda(device, h.handle, h.storage_size_bytes, h.storage_offset_bytes,
                                                    h.ref_counter_handle, h.ref_counter_offset,
                                                    h.event_handle or None, h.event_sync_required)
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    stride = torch.empty(shape, device="meta").stride()
    return torch._utils._rebuild_tensor(typed, 0, shape, stride)


@dataclass
class OpenedCache:
    """A decode node's KV cache, opened in this process."""

    share: node_pb2.KVShare
    spec: KVSpec
    device: torch.device
    k: list[torch.Tensor]
    v: list[torch.Tensor]


def open_cache(share: node_pb2.KVShare, own_device: torch.device) -> OpenedCache:
    index = check_share(share, host_id())
    device = torch.device("cuda", own_device.index or 0) if index is None else torch.device("cuda", index)
    spec = KVSpec.from_proto(share.layout)
    shape = (share.num_blocks, *spec.block_shape)
    with torch.cuda.device(device):
        k = [open_tensor(h, device.index, shape, spec.dtype) for h in share.k]
        v = [open_tensor(h, device.index, shape, spec.dtype) for h in share.v]
    return OpenedCache(share, spec, device, k, v)


@torch.inference_mode()
def scatter_into(cache: OpenedCache, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """Worker thread: K and V (`[layers, n, ...]`, on our GPU) into the decode node's blocks, on a
    side stream after what the engine queued so far; returns once the copies are done."""
    source = k.device
    stream = torch.cuda.Stream(cache.device)
    stream.wait_stream(torch.cuda.current_stream(source))
    with torch.cuda.stream(stream):
        idx = torch.tensor(block_ids, dtype=torch.int64).to(cache.device, non_blocking=True)
        k_dst, v_dst = k.to(cache.device, non_blocking=True), v.to(cache.device, non_blocking=True)
        if k_dst.dtype == torch.float8_e4m3fn:  # an fp8 cache: copy its bytes (index_copy_ may lack fp8 kernels)
            k_dst, v_dst = k_dst.view(torch.uint8), v_dst.view(torch.uint8)
        for layer in range(cache.spec.num_layers):
            cache.k[layer].view(k_dst.dtype).index_copy_(0, idx, k_dst[layer])
            cache.v[layer].view(v_dst.dtype).index_copy_(0, idx, v_dst[layer])
    stream.synchronize()


class IpcKVSender(KVSender):
    transport = T.KV_TRANSPORT_IPC

    def __init__(self, channels: Channels, device: torch.device | str):
        self.channels = channels
        self.device = torch.device(device)
        self._opened: dict[str, OpenedCache] = {}  # decode address -> its opened cache
        self._shares: dict[str, node_pb2.KVShare] = {}
        self._unshared: set[str] = set()  # decode addresses whose cache is not on CUDA (asked once)

    async def share(self, address: str) -> node_pb2.KVShare:
        """The decode node's KVShare (asked once; FailedPrecondition when its cache is not on CUDA)."""
        if address not in self._shares:
            try:
                self._shares[address] = await self.channels.stub(address).ShareKV(node_pb2.ShareKVRequest(),
                                                                                 timeout=SHARE_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise FailedPrecondition(exc.details()) from None
                raise Unavailable(f"ShareKV on the decode node failed: {exc.code().name}: {exc.details()}") from None
        return self._shares[address]

    async def usable(self, address: str) -> bool:
        """`auto`: whether ipc can reach this decode node (same host, its GPU visible here)."""
        if self.device.type != "cuda" or address in self._unshared:
            return False
        try:
            return same_gpu_set(await self.share(address), host_id())
        except FailedPrecondition:
            self._unshared.add(address)
            return False
        except Unavailable:
            return False

    async def _open(self, address: str) -> OpenedCache:
        if self.device.type != "cuda":
            raise FailedPrecondition(f"CUDA IPC needs the prefill node on CUDA (it runs on {self.device.type})")
        if address not in self._opened:
            share = await self.share(address)
            self._opened[address] = await asyncio.get_running_loop().run_in_executor(
                None, open_cache, share, self.device)
        return self._opened[address]

    def forget(self, address: str) -> None:
        self._opened.pop(address, None)
        self._shares.pop(address, None)
        self._unshared.discard(address)

    async def send(self, target: node_pb2.KVTarget, k: torch.Tensor, v: torch.Tensor, timeout: float) -> int:
        spec = KVSpec.from_proto(target.layout)
        num_blocks = spec.check_tensors(k, v)
        address = target.decode_address
        cache = await self._open(address)
        if cache.spec != spec:
            raise FailedPrecondition("the decode node's shared cache layout differs from the reservation's")
        stub = self.channels.stub(address)
        try:
            opened = await stub.RenewLease(node_pb2.RenewLeaseRequest(reservation_id=target.reservation_id,
                                                                      ipc_write=True), timeout=timeout)
            block_ids = list(opened.block_ids)
            if len(block_ids) != num_blocks or not all(0 < b < cache.share.num_blocks for b in block_ids):
                raise Unavailable("the decode node answered block ids that do not fit the reservation")
            await asyncio.get_running_loop().run_in_executor(None, scatter_into, cache, block_ids, k, v)
            nbytes = spec.transfer_bytes(num_blocks)
            await stub.CommitKV(node_pb2.KVCommit(reservation_id=target.reservation_id, instance=cache.share.instance,
                                                  num_blocks=num_blocks, bytes=nbytes), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self.forget(address)  # a restarted decode node hands out new handles
            raise Unavailable(f"KV transfer over CUDA IPC failed: {exc.code().name}: {exc.details()}") from None
        return nbytes
