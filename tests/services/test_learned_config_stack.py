"""pdserve serve with --dtype auto: the nodes register with the stack's router, which reports the
dtype they resolved (here bf16, forced on this CPU), not a guess, and refuses a node that disagrees."""
from __future__ import annotations

import time

import grpc
import pytest

from engine.rpc.convert import NODE_PROTOCOL
from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import generation_pb2_grpc as gg
from protos.pdserve.v1 import router_pb2, router_pb2_grpc
from tests.services.helpers import greedy_request
from tests.services.stack import start_stack

NODE = (("authorization", "Bearer learned-config-key"),)


@pytest.mark.timeout(300)
def test_the_router_reports_the_registered_nodes_dtype_and_refuses_another(make_tiny_model):
    env = {"PDSERVE_NODE_KEY": NODE[0][1].split()[1], "PDSERVE_CPU_AUTO_DTYPE": "bfloat16"}
    with start_stack(make_tiny_model("llama"), extra_args=("--dtype", "auto"), env=env) as stack:
        stub = gg.GenerationStub(stack.channel())
        deadline = time.monotonic() + 30
        while (info := stub.ModelInfo(g.ModelInfoRequest(), timeout=5)).dtype == "auto":
            assert time.monotonic() < deadline, "no node registered within 30 s"
            time.sleep(0.2)
        assert (info.dtype, info.block_size, info.max_model_len) == ("bfloat16", 16, 256)
        assert stub.Generate(greedy_request("Hello", 4), timeout=60).completions[0].completion_tokens >= 1
        control = router_pb2_grpc.RouterControlStub(stack.channel())
        other = router_pb2.RegisterNodeRequest(
            node_id="decode-fp32", address="127.0.0.1:9", role="decode", model=info.model, dtype="float32",
            max_model_len=256, load=g.NodeLoad(protocol=NODE_PROTOCOL))
        with pytest.raises(grpc.RpcError) as err:
            control.Register(other, metadata=NODE, timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "dtype is float32" in err.value.details() and "is bfloat16" in err.value.details()
        older = router_pb2.RegisterNodeRequest(node_id="decode-old", address="127.0.0.1:9", role="decode",
                                               model=info.model, dtype="bfloat16", max_model_len=256)
        with pytest.raises(grpc.RpcError) as err:  # NodeLoad.protocol unset: a node from an older pdserve
            control.Register(older, metadata=NODE, timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "same pdserve version" in err.value.details()
