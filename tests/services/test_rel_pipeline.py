"""Issue 14, in process and fast: the pipeline and the registry against scripted node stubs.

F3: a prefill node failing mid-transfer after the first token -> a fresh attempt, never a hang or a
    CancelledError out of Pipeline.run; a decode node that stalls after tokens were sent -> UNAVAILABLE
    within the inter-token budget.
F4: a reservation that expired before the second token -> retried, never NOT_FOUND to the client.
F6: a slow poll is a miss, not a death; consecutive misses or a broken connection mark a node down;
    a node serving another role or model is never placed on; Register never moves a node.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from engine.rpc import convert
from engine.rpc.errors import FailedPrecondition, RpcError
from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import node_pb2, router_pb2
from router.pipeline import PipelineConfig
from router.registry import MISSES_DOWN, NodeRegistry
from tests.router.fakes import FR, HANG, Cluster, collect, first_token, make_registry, pipeline, rpc_error, tokens, \
    transfer_done


@pytest.mark.timeout(60)
def test_prefill_failing_mid_transfer_after_first_token_is_retried(default_tokenizer):
    async def main():
        cluster = Cluster(
            tokenizer=default_tokenizer,
            prefill_scripts=[[first_token(), rpc_error(grpc.StatusCode.UNAVAILABLE, "PushKV: Socket closed")],
                             [first_token(99), transfer_done()]],  # the retry's first token is not sent again
            decode_scripts=[[HANG],  # waits for KV that never comes; the router cancels it
                            [tokens(8), tokens(9), tokens(10, finish=FR.FINISH_REASON_LENGTH)]])
        registry = make_registry(cluster)
        chunks = await collect(pipeline(registry))
        assert [c.token_ids for c in chunks] == [[7], [8], [9], [10]]
        assert chunks[-1].finish_reason == FR.FINISH_REASON_LENGTH
        assert all(call.cancelled or not call.script for call in cluster.calls)
        assert "decode-0" in cluster.aborts  # the first reservation was freed before the retry
        await asyncio.sleep(0.05)  # the re-polls the failure triggered
        assert all(n.healthy for n in registry.nodes.values())  # nobody is blamed while its poll answers
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_expired_reservation_before_second_token_is_retried_not_404(default_tokenizer):
    async def main():
        cluster = Cluster(
            tokenizer=default_tokenizer,
            prefill_scripts=[[first_token(), transfer_done()], [first_token(), transfer_done()]],
            decode_scripts=[[rpc_error(grpc.StatusCode.NOT_FOUND, "unknown or expired reservation")],
                            [tokens(8, 9), tokens(10, finish=FR.FINISH_REASON_LENGTH)]])
        chunks = await collect(pipeline(make_registry(cluster)))
        assert [c.token_ids for c in chunks] == [[7], [8], [9], [10]]
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_decode_stalling_after_tokens_ends_unavailable_within_the_gap_budget(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[[first_token(), transfer_done()]],
                          decode_scripts=[[tokens(8), HANG]])
        pipe = pipeline(make_registry(cluster), max_tokens=10, token_gap_s=0.5,
                        max_failovers=0)
        got = []
        start = time.monotonic()
        with pytest.raises(RpcError) as err:
            async for chunk in pipe.run():
                got.append(chunk.token_ids)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "sent nothing" in err.value.message
        assert got == [[7], [8]]
        assert time.monotonic() - start < 5.0
        assert "decode-0" in cluster.aborts
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_node_cancelled_is_unavailable_not_cancelled(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[[first_token(), transfer_done()]] * 3,
                          decode_scripts=[[rpc_error(grpc.StatusCode.CANCELLED)]] * 3)
        with pytest.raises(RpcError) as err:
            await collect(pipeline(make_registry(cluster)))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE  # never reported as a client disconnect
    asyncio.run(main())


# ---- registry (F6, F1) -------------------------------------------------------------------------------

def _scripted_poll(outcomes):
    async def poll():
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    return poll


@pytest.mark.timeout(30)
def test_poll_misses_and_broken_connections():
    async def main():
        cluster = Cluster([], [])
        registry = make_registry(cluster, prefills=(), decodes=("decode-0",))
        node = registry.nodes["decode-0"]
        late = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)
        ok = g.NodeLoad(free_blocks=60, total_blocks=64, protocol=convert.NODE_PROTOCOL)
        node.stub = cluster.stub("decode-0", poll=_scripted_poll(
            [late, ok] + [late] * MISSES_DOWN + [ok, rpc_error(grpc.StatusCode.UNAVAILABLE), ok,
                                                 rpc_error(grpc.StatusCode.UNIMPLEMENTED)]))
        assert not await registry.poll(node) and node.healthy  # one late answer: still serving
        assert await registry.poll(node) and node.misses == 0
        for _ in range(MISSES_DOWN - 1):
            await registry.poll(node)
        assert node.healthy
        await registry.poll(node)
        assert not node.healthy  # MISSES_DOWN in a row: frozen
        assert await registry.poll(node) and node.healthy
        await registry.poll(node)
        assert not node.healthy  # connection refused: down at once
        await registry.poll(node)
        await registry.poll(node)
        assert not node.healthy  # it does not serve the decode role
    asyncio.run(main())


@pytest.mark.timeout(30)
def test_register_never_moves_a_node_and_checks_model_and_layout():
    async def main():
        registry = NodeRegistry(block_size=16)
        layout = node_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")
        first = registry.register(router_pb2.RegisterNodeRequest(
            node_id="decode-a", address="127.0.0.1:9001", role="decode", model="m", layout=layout))
        assert not first.healthy  # not placed on before a poll answered
        for node_id, address, role in (("decode-a", "127.0.0.1:9002", "decode"),  # move an id
                                       ("decode-a", "127.0.0.1:9001", "prefill"),  # flip a role
                                       ("other", "127.0.0.1:9001", "prefill")):  # take an address
            with pytest.raises(FailedPrecondition):
                registry.register(router_pb2.RegisterNodeRequest(node_id=node_id, address=address, role=role,
                                                                 model="m", layout=layout))
        assert (first.address, first.role) == ("127.0.0.1:9001", "decode")
        assert registry.register(router_pb2.RegisterNodeRequest(
            node_id="decode-a", address="127.0.0.1:9001", role="decode", model="m", layout=layout)) is first
        with pytest.raises(FailedPrecondition, match="block size is 32, this router's --block-size is 16"):
            registry.register(router_pb2.RegisterNodeRequest(
                node_id="decode-b", address="127.0.0.1:9003", role="decode", model="m",
                layout=node_pb2.KVLayout(num_layers=2, block_size=32, num_kv_heads=2, head_dim=8, dtype="float32")))
        assert "decode-b" not in registry.nodes
        first.stub = Cluster([], []).stub("decode-a", model="another-model")
        assert not await registry.poll(first) and not first.healthy  # serves another model: never placed
        await registry.close()
    asyncio.run(main())


def _register(registry, node_id, port, *, layout=None, dtype="bfloat16", max_model_len=256, role="decode"):
    layout = layout or node_pb2.KVLayout(num_layers=2, block_size=32, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    return registry.register(router_pb2.RegisterNodeRequest(
        node_id=node_id, address=f"127.0.0.1:{port}", role=role, model="m", layout=layout, dtype=dtype,
        max_model_len=max_model_len))


def test_the_pool_config_is_learned_from_registration_and_disagreeing_nodes_are_refused():
    """No --block-size / --dtype / --max-model-len on the router: the first node's values are the
    pool's; a node that disagrees is refused with FAILED_PRECONDITION naming both values."""
    async def main():
        registry = NodeRegistry()
        learned = []
        registry.on_pool = learned.append
        assert registry.pool is None
        _register(registry, "decode-a", 9001)
        pool = registry.pool
        assert (pool.node_id, pool.block_size, pool.dtype, pool.max_model_len) == ("decode-a", 32, "bfloat16", 256)
        assert pool.layout.num_kv_heads == 2 and learned == [pool]
        refusals = [
            (dict(dtype="float32"), "dtype is float32, node decode-a's is bfloat16: every node of a pool needs the same --dtype"),
            (dict(max_model_len=512), "max_model_len is 512, node decode-a's is 256"),
            (dict(layout=node_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=8, dtype="bfloat16")),
             "KV block size is 16, node decode-a's is 32"),
            (dict(layout=node_pb2.KVLayout(num_layers=2, block_size=32, num_kv_heads=2, head_dim=8,
                                           dtype="float8_e4m3fn")),
             "KV cache dtype is float8_e4m3fn, node decode-a's is bfloat16"),
            (dict(layout=node_pb2.KVLayout(num_layers=3, block_size=32, num_kv_heads=2, head_dim=8, dtype="bfloat16")),
             r"KV layout \(3 layers.*differs from node decode-a's \(2 layers"),
        ]
        for port, (kwargs, message) in enumerate(refusals, start=9100):
            with pytest.raises(FailedPrecondition, match=message) as err:
                _register(registry, f"prefill-{port}", port, role="prefill", **kwargs)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"prefill-{port}" not in registry.nodes
        assert registry.pool is pool and learned == [pool]
        same = _register(registry, "prefill-a", 9002, role="prefill")
        old = _register(registry, "prefill-b", 9003, role="prefill", dtype="", max_model_len=0)  # an older node
        assert same.healthy is False and old.node_id == "prefill-b" and registry.pool is pool
        await registry.close()
    asyncio.run(main())


def test_the_routers_own_flags_check_registrations():
    async def main():
        registry = NodeRegistry(block_size=32, dtype="float16", max_model_len=128)
        for kwargs, message in ((dict(dtype="bfloat16"), "dtype is bfloat16, this router's --dtype is float16"),
                                (dict(dtype="float16"), "max_model_len is 256, this router's --max-model-len is 128")):
            with pytest.raises(FailedPrecondition, match=message):
                _register(registry, "decode-a", 9001, **kwargs)
        assert registry.pool is None and not registry.nodes
        _register(registry, "decode-a", 9001, dtype="float16", max_model_len=128)
        assert (registry.pool.dtype, registry.pool.max_model_len) == ("float16", 128)
        await registry.close()
    asyncio.run(main())


def test_the_router_reports_and_checks_prompts_with_the_pools_config(default_tokenizer):
    """ModelInfo's dtype / block size / max_model_len and the prompt-length check follow the
    registered nodes (a bf16 GPU pool is reported as bf16, not as the router's guess)."""
    from router.policy import Placement
    from router.prompts import ModelLimits, PromptBuilder
    from router.servicer import GenerationServicer, ModelCard, Router

    async def main():
        registry = NodeRegistry()
        card = ModelCard(name="m", max_model_len=4096, vocab_size=len(default_tokenizer), block_size=16,
                         eos_token_ids=[0], dtype="auto")
        builder = PromptBuilder(default_tokenizer, ModelLimits(card.vocab_size, card.max_model_len))
        placement = Placement(16)
        router = Router(registry, builder, card, PipelineConfig(block_size=16, placement=placement))
        info = await GenerationServicer(router).ModelInfo(g.ModelInfoRequest(), None)
        assert (info.dtype, info.block_size, info.max_model_len) == ("auto", 16, 4096)
        _register(registry, "decode-a", 9001, max_model_len=8)
        info = await GenerationServicer(router).ModelInfo(g.ModelInfoRequest(), None)
        assert (info.dtype, info.block_size, info.max_model_len) == ("bfloat16", 32, 8)
        assert router.config.block_size == placement.block_size == placement.decode.block_size == 32
        assert builder.limits.max_model_len == 8
        with pytest.raises(ValueError, match="max_model_len is 8"):
            builder.build(g.GenerateRequest(token_ids=g.TokenIds(ids=list(range(1, 10)))))
        await registry.close()
    asyncio.run(main())


def test_a_slow_output_constraint_holds_up_no_other_requests_tokenization(default_tokenizer):
    """The router parses constraints on their own threads (`Router.check_spec`, children of a
    GrammarCheckerPool in the router process), not on its one tokenizer thread: while one
    request's constraint takes seconds, another request is tokenized at once; the slow one's
    verdict (here: refused) still reaches its caller, before any node is involved."""
    import threading

    from router.policy import Placement
    from router.prompts import ModelLimits, PromptBuilder
    from router.servicer import ModelCard, Router

    release = threading.Event()
    checked = []

    def slow_check(spec):
        checked.append(spec.kind)
        release.wait(10)
        raise ValueError("invalid structured regex: too slow to be true")

    async def main():
        registry = NodeRegistry()
        card = ModelCard(name="m", max_model_len=4096, vocab_size=len(default_tokenizer), block_size=16,
                         eos_token_ids=[0], dtype="auto")
        builder = PromptBuilder(default_tokenizer, ModelLimits(card.vocab_size, card.max_model_len), check_spec=None)
        router = Router(registry, builder, card, PipelineConfig(block_size=16, placement=Placement(16)),
                        check_spec=slow_check, check_threads=2)

        async def structured():
            request = g.GenerateRequest(text="hello", structured=g.StructuredOutput(regex="[ab]+"))
            async for _ in router.execute(request, None):
                pass
        slow = asyncio.ensure_future(structured())
        while not checked:
            await asyncio.sleep(0.01)
        t = time.monotonic()
        prompts = await router.off_loop(builder.build, g.GenerateRequest(text="a plain request"))
        assert time.monotonic() - t < 2.0 and prompts[0].token_ids
        assert not slow.done()
        release.set()
        with pytest.raises(ValueError, match="too slow to be true"):
            await slow
        assert checked == ["regex"]
        await registry.close()
    asyncio.run(main())
