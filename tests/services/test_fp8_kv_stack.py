"""`--kv-cache-dtype fp8` across processes: a P/D stack (router + prefill + decode nodes on CPU)
gives the in-process fp8 engine's greedy output token for token (both sides quantize the same K/V
the same way, and the blocks travel as their bytes), and each transfer moves 1 byte an element:
half of a bf16 cache's bytes, a quarter of this fp32 model's. Nodes whose cache dtypes differ are
refused at registration; the transfer layer refuses frames of another dtype."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine.kv_transfer import KVSpec, KVStaging, TransferError
from engine.kv_transfer.grpc_transport import grpc_frames
from protos.pdserve.v1 import node_pb2, router_pb2
from tests.services.helpers import ENGINE_KW, assert_idle, greedy_request, prompts, stream_greedy
from tests.services.stack import start_stack

FP8 = torch.float8_e4m3fn
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def reference(tiny):
    """The in-process engine with an fp8 cache: (token ids, text) per prompt, and the model shape."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(str(tiny), kv_cache_dtype="fp8", **ENGINE_KW)
    texts = prompts(llm.get_tokenizer(), count=6)
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    tok = llm.get_tokenizer()
    lens = [len(tok.encode(t, add_special_tokens=True)) for t in texts]
    return texts, [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs], lens, llm.engine.shape


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["grpc", pytest.param("nccl", marks=pytest.mark.slow)])  # ~70 s a stack
def test_fp8_stack_matches_in_process_engine_and_moves_a_quarter_of_fp32(tiny, reference, transport):
    texts, expected, lens, shape = reference
    with start_stack(tiny, kv_transport=transport, extra_args=("--kv-cache-dtype", "fp8")) as stack:
        stub = stack.stub()
        for text, (ids, out_text), n in zip(texts, expected, lens):
            c = stub.Generate(greedy_request(text, MAX_TOKENS), timeout=60).completions[0]
            assert list(c.token_ids) == ids and c.text == out_text
            t = c.timings
            assert t.prefill_node.startswith("prefill-") and t.decode_node.startswith("decode-")
            blocks = -(-n // 16)
            elems = 2 * shape.num_layers * blocks * 16 * shape.num_kv_heads * shape.head_dim  # K and V
            assert t.kv_transfer_bytes == elems * 1  # fp32 would be 4 x, bf16 2 x
        s_ids, s_text, _ = stream_greedy(stub, texts[0], MAX_TOKENS)
        assert (s_ids, s_text) == tuple(expected[0])
        assert_idle(stub)


def test_fp8_frames_round_trip_and_other_dtypes_are_refused():
    spec = KVSpec(3, 16, 2, 8, FP8)
    assert spec.block_bytes == 16 * 2 * 8 and spec.to_proto().dtype == "float8_e4m3fn"
    assert KVSpec.from_proto(spec.to_proto()) == spec
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(3, 5, 16, 2, 8, generator=g).clamp(-448, 448).to(FP8) for _ in range(2))
    staging = KVStaging("r", spec, 5)
    for frame in grpc_frames("r", spec, k, v, 3000):
        staging.add_frame(frame)
    k2, v2 = staging.tensors()
    assert k2.dtype == FP8 and torch.equal(k2.view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(v2.view(torch.uint8), v.view(torch.uint8))
    assert staging.bytes_received == 2 * k.numel()  # 1 byte an element
    dense = KVSpec(3, 16, 2, 8, torch.float32)
    frame = next(iter(grpc_frames("r", dense, k.float(), v.float())))
    with pytest.raises(TransferError, match="dtype 'float32' differs from the receiver's 'float8_e4m3fn'"):
        KVStaging("r", spec, 5).add_frame(frame)
    with pytest.raises(ValueError, match="differs from the target's"):
        spec.check_tensors(k.float(), v.float())  # the prefill side, before anything is sent


def test_nodes_with_another_kv_cache_dtype_are_refused_at_registration():
    from engine.rpc.errors import RpcError
    from router.registry import NodeRegistry

    async def main():
        registry = NodeRegistry(block_size=16)
        fp8 = node_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=8, dtype="float8_e4m3fn")
        registry.register(router_pb2.RegisterNodeRequest(node_id="decode-0", address="127.0.0.1:9001",
                                                         role="decode", model="m", layout=fp8))
        dense = node_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")
        with pytest.raises(RpcError, match="KV cache dtype is float32, node decode-0's is float8_e4m3fn"):
            registry.register(router_pb2.RegisterNodeRequest(node_id="prefill-0", address="127.0.0.1:9002",
                                                             role="prefill", model="m", layout=dense))
        registry.register(router_pb2.RegisterNodeRequest(node_id="prefill-1", address="127.0.0.1:9003",
                                                         role="prefill", model="m", layout=fp8))
        await registry.close()
    asyncio.run(main())
