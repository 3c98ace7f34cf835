"""The CUDA IPC transport's exchange, validation and refusal logic on CPU (handles are protobuf
bytes, never pickle; another host is refused by name; a commit must match what was handed out),
`auto` on CPU picking gRPC, and on a GPU: the handles a process shares open in another one."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
import torch

from engine.kv_transfer import IpcKVReceiver, KVLanding, KVSpec, TransferError
from engine.kv_transfer import ipc
from engine.rpc.errors import FailedPrecondition
from protos.pdserve.v1 import node_pb2, node_pb2_grpc
from tests.services.test_nodes import REPO

SPEC = KVSpec(2, 16, 2, 8, torch.float16)


def share(host: str, uuid: str = "GPU-0000", layers: int = 2) -> node_pb2.KVShare:
    handle = node_pb2.CudaIpcHandle(device=0, handle=bytes(range(64)), storage_size_bytes=4096,
                                    ref_counter_handle=b"/torch_1_2", event_handle=bytes(64), event_sync_required=True)
    return node_pb2.KVShare(host_id=host, device_uuid=uuid, instance="abc", layout=SPEC.to_proto(), num_blocks=8,
                            k=[handle] * layers, v=[handle] * layers)


def test_share_travels_as_protobuf_bytes():
    msg = share(ipc.host_id())
    back = node_pb2.KVShare.FromString(msg.SerializeToString())
    assert back == msg and back.k[0].handle == bytes(range(64))


def test_host_id_names_this_host_and_boot():
    host = ipc.host_id()
    assert host.split("/")[0] and host == ipc.host_id()


def test_ipc_across_hosts_is_refused_by_name():
    with pytest.raises(FailedPrecondition, match="one host.*'other-box'.*use --kv-transport nccl or grpc"):
        ipc.check_share(share("other-box/1234"), ipc.host_id())
    assert not ipc.same_gpu_set(share("other-box/1234"), ipc.host_id())


def test_share_without_a_handle_per_layer_is_refused():
    with pytest.raises(FailedPrecondition, match="one K and one V handle per layer"):
        ipc.check_share(share(ipc.host_id(), layers=1), ipc.host_id())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_gpu_not_visible_here_is_not_the_same_gpu_set():
    """Same host, but the decode node's GPU is not visible to this process: `auto` does not pick
    ipc (an explicit ipc may still open it as a peer of our own GPU)."""
    assert ipc.check_share(share(ipc.host_id()), ipc.host_id()) is None
    assert not ipc.same_gpu_set(share(ipc.host_id()), ipc.host_id())


def test_cpu_cache_is_not_shared():
    caches = [(torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8))]
    with pytest.raises(FailedPrecondition, match="CUDA IPC needs a CUDA device"):
        ipc.share_cache(caches, SPEC)


def test_commit_must_match_the_handles_and_the_reservation():
    receiver = IpcKVReceiver([], SPEC)
    landing = KVLanding("r", SPEC, 3, progress=lambda: None, write=None)
    good = node_pb2.KVCommit(reservation_id="r", instance="abc", num_blocks=3, bytes=SPEC.transfer_bytes(3))

    def receive(commit):
        return asyncio.run(receiver.receive(landing, commit, None))
    with pytest.raises(TransferError, match="did not hand out"):  # nothing shared yet
        receive(good)
    receiver._share = share(ipc.host_id())  # as if ShareKV had answered
    for bad, match in ((dict(instance="old"), "did not hand out"), (dict(num_blocks=2), "covers 2 blocks"),
                       (dict(bytes=1), "reports 1 bytes")):
        msg = node_pb2.KVCommit()
        msg.CopyFrom(good)
        for k, v in bad.items():
            setattr(msg, k, v)
        with pytest.raises(TransferError, match=match):
            receive(msg)
    got = receive(good)
    assert (got.bytes, got.frames) == (SPEC.transfer_bytes(3), 1)


# ---- against real CPU nodes -----------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_ipc_rpcs_on_a_cpu_decode_node_refuse_clearly(nodes):
    prefill, decode = nodes
    with decode.channel() as dch, prefill.channel() as pch:
        d = node_pb2_grpc.DecodeNodeStub(dch)
        with pytest.raises(grpc.RpcError) as err:
            d.ShareKV(node_pb2.ShareKVRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CUDA" in err.value.details()
        res = d.Reserve(node_pb2.ReserveRequest(request_id="ipc-cpu", num_prompt_tokens=40, lease_ms=10_000),
                        timeout=5)
        assert not res.rendezvous  # auto on CPU offers no NCCL rendezvous
        with pytest.raises(grpc.RpcError) as err:
            d.RenewLease(node_pb2.RenewLeaseRequest(reservation_id=res.reservation_id, ipc_write=True), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ShareKV" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            d.CommitKV(node_pb2.KVCommit(reservation_id=res.reservation_id, instance="x", num_blocks=3), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "open CUDA IPC write" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            d.CommitKV(node_pb2.KVCommit(reservation_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # an explicit ipc transfer from a CPU prefill node fails with the reason; auto picks grpc
        target = node_pb2.KVTarget(decode_address=decode.address, reservation_id=res.reservation_id,
                                   layout=res.layout, transport=node_pb2.KV_TRANSPORT_IPC)
        p = node_pb2_grpc.PrefillNodeStub(pch)
        from engine.rpc import convert
        from engine.sampling_params import SamplingParams
        params = convert.params_to_proto(SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as err:
            list(p.Prefill(node_pb2.PrefillRequest(request_id="ipc-cpu", prompt_token_ids=list(range(10, 50)),
                                                   params=params, target=target), timeout=30))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CUDA" in err.value.details()
        target.transport = node_pb2.KV_TRANSPORT_AUTO
        events = list(p.Prefill(node_pb2.PrefillRequest(request_id="ipc-cpu", prompt_token_ids=list(range(10, 50)),
                                                        params=params, target=target), timeout=30))
        assert events[1].transfer_done.transport == node_pb2.KV_TRANSPORT_GRPC
        assert d.Abort(node_pb2.NodeAbortRequest(request_id="ipc-cpu"), timeout=5).found
    for node in nodes:
        load = node.wait_idle()
        assert load.free_blocks == load.total_blocks and not load.request_ids


# ---- GPU ----------------------------------------------------------------------------------------------
CHILD = """
import sys, torch
from engine.kv_transfer import ipc
from protos.pdserve.v1 import node_pb2
msg = node_pb2.KVShare.FromString(sys.stdin.buffer.read())
cache = ipc.open_cache(msg, torch.device("cuda", 0))
ipc.scatter_into(cache, [1, 3], torch.full((2, 2, 16, 2, 8), 7.0, device="cuda", dtype=torch.float16),
                 torch.full((2, 2, 16, 2, 8), 9.0, device="cuda", dtype=torch.float16))
print("ok", cache.device)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_cache_is_written_by_another_process():
    caches = [(torch.zeros(8, 16, 2, 8, device="cuda", dtype=torch.float16),
               torch.zeros(8, 16, 2, 8, device="cuda", dtype=torch.float16)) for _ in range(2)]
    msg = ipc.share_cache(caches, SPEC)
    out = subprocess.run([sys.executable, "-c", CHILD], input=msg.SerializeToString(), capture_output=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    torch.cuda.synchronize()
    for k, v in caches:
        assert torch.all(k[[1, 3]] == 7) and torch.all(v[[1, 3]] == 9)
        assert torch.all(k[[0, 2, 4, 5, 6, 7]] == 0) and torch.all(v[[0, 2]] == 0)
