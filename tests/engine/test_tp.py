"""Tensor parallelism on CPU (gloo, fp32): sharded weights, TP=N greedy == TP=1 through `LLM`,
KV export / import across TP sizes, and a rank that dies."""
from __future__ import annotations

import asyncio
import os
import signal
import types

import pytest
import torch

from engine import LLM
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loader import load_model_source
from engine.parallel.ranks import RankDied, rank_devices
from engine.parallel.sharding import MAX_CPU_TP_SIZE, check_tp_size, make_shard
from tests.conftest import tiny_config
from tests.engine.helpers import greedy, random_prompts, token_ids

NEW = 10
ENGINE = dict(num_gpu_blocks=64, max_model_len=256, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def prompts():
    return [{"prompt_token_ids": p} for p in random_prompts(5, 49152, lo=3, hi=40, seed=3)]


def _generate(path, prompts, tp: int) -> list[list[int]]:
    with LLM(path and str(path), tensor_parallel_size=tp, **ENGINE) as llm:
        out = token_ids(llm.generate(prompts, greedy(NEW), use_tqdm=False))
        llm.engine.check_invariants()
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_total_blocks, "KV blocks leaked"
        ranks = llm.engine.ranks
    if ranks is not None:
        assert all(p.poll() is not None for p in ranks.procs), "a rank outlived close()"
        assert not os.path.exists(ranks.store_dir), "the TP store's directory outlived close()"
    return out


# ---- shards (no processes) --------------------------------------------------------------------

@pytest.mark.parametrize("arch,overrides,size", [
    ("qwen2", {}, 2),                              # bias, KV heads split
    ("llama", {"num_key_value_heads": 1}, 2),      # KV head replicated
    ("smollm2", {}, 4),                            # tied embeddings, no GQA
])
def test_rank_shards_rebuild_the_full_weights(make_tiny_model, arch, overrides, size):
    """Every rank's slices, read through safe_open get_slice, put back together give the
    checkpoint: column shards along dim 0, row shards along dim 1, replicated KV once per head."""
    source = load_model_source(str(make_tiny_model(arch, **overrides)))
    full = dict(source.iter_weights())
    shards = [make_shard(source.config, r, size) for r in range(size)]
    parts = [dict(source.iter_weights(lambda n, s=s: s.slice_of(n.removeprefix("model.")))) for s in shards]
    for name, tensor in full.items():
        cut = shards[0].slice_of(name.removeprefix("model."))
        if cut is None:
            assert all(torch.equal(p[name], tensor) for p in parts), name
            continue
        dim = cut[0]
        pieces = [p[name] for p in parts]
        if ".k_proj." in name or ".v_proj." in name:  # replicated heads: keep one copy each
            starts = [s.kv_start for s in shards]
            pieces = [pieces[starts.index(k)] for k in sorted(set(starts))]
        assert torch.equal(torch.cat(pieces, dim=dim), tensor), name
        replicated = len(pieces) < size
        assert replicated or all(p[name].shape[dim] < tensor.shape[dim] for p in parts), f"{name} is not cut"


@pytest.mark.parametrize("arch,size", [("qwen2", 2), ("smollm2", 4)])
def test_each_rank_holds_its_share_of_the_parameters(make_tiny_model, arch, size):
    """A rank's model (built and loaded as a worker does) holds 1/N of every sharded weight: its
    parameter bytes are the full model's / N plus only the replicated norms."""
    from engine.llm_engine import build_model

    source = load_model_source(str(make_tiny_model(arch)))
    cpu = torch.device("cpu")

    def param_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    full = build_model(source, cpu, torch.float32, 256)
    norms = sum(p.numel() * p.element_size() for n, p in full.named_parameters() if "norm" in n)
    for rank in range(size):
        shard = build_model(source, cpu, torch.float32, 256, types.SimpleNamespace(rank=rank, size=size))
        assert param_bytes(shard) == (param_bytes(full) - norms) // size + norms


def test_vocab_shards_pad_the_last_rank():
    config = tiny_config("llama", vocab_size=10)
    shards = [make_shard(config, r, 4) for r in range(4)]
    assert [s.vocab_per_rank for s in shards] == [3] * 4
    assert [(s.vocab_start, s.vocab_rows) for s in shards] == [(0, 3), (3, 3), (6, 3), (9, 1)]


def test_replicated_kv_heads_follow_the_query_heads():
    config = tiny_config("llama", num_attention_heads=8, num_key_value_heads=2)
    shards = [make_shard(config, r, 4) for r in range(4)]
    assert [(s.num_heads, s.num_kv_heads) for s in shards] == [(2, 1)] * 4
    assert [s.kv_start for s in shards] == [0, 0, 1, 1]  # q heads 0-3 read kv 0, 4-7 read kv 1


@pytest.mark.parametrize("overrides,size,message", [
    ({"num_attention_heads": 4, "num_key_value_heads": 2}, 3, "does not divide the model's 4 attention heads"),
    ({"num_attention_heads": 12, "num_key_value_heads": 4, "hidden_size": 96}, 6, "KV heads"),
    ({"intermediate_size": 130}, 4, "intermediate size"),
])
def test_sizes_that_do_not_split_the_model_are_refused(overrides, size, message):
    with pytest.raises(ValueError, match=message):
        check_tp_size(tiny_config("llama", **overrides), size)


def test_bad_tensor_parallel_size_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineArgs(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="exceeds the cap"):
        rank_devices(torch.device("cpu"), MAX_CPU_TP_SIZE + 1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="exceeds the .* visible GPU"):
            rank_devices(torch.device("cuda"), torch.cuda.device_count() + 1)


def test_engine_refuses_a_size_that_does_not_divide_the_heads(make_tiny_model):
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLM(str(make_tiny_model("llama")), tensor_parallel_size=3, **ENGINE)


# ---- TP=N == TP=1 through LLM -------------------------------------------------------------------

# Each TP engine starts N-1 fresh Python processes (~10 s each on a busy 2-core box): one case
# runs by default, the others are marked slow.
@pytest.mark.parametrize("arch,overrides,size", [
    ("qwen2", {"num_key_value_heads": 1}, 2),  # bias; fewer KV heads than ranks: replicated
    pytest.param("llama3", {}, 2, marks=pytest.mark.slow),
    pytest.param("qwen2", {}, 2, marks=pytest.mark.slow),
    pytest.param("mistral", {}, 2, marks=pytest.mark.slow),
    pytest.param("llama", {"num_key_value_heads": 1}, 4, marks=pytest.mark.slow),  # replicated on 4
    pytest.param("qwen2", {}, 4, marks=pytest.mark.slow),  # 2 KV heads on 4 ranks: replicated
])
def test_tp_greedy_matches_tp1(make_tiny_model, prompts, arch, overrides, size):
    path = make_tiny_model(arch, **overrides)
    assert _generate(path, prompts, size) == _generate(path, prompts, 1)


def test_default_model_cannot_split_in_two():
    """SmolLM2-135M has 9 query and 3 KV heads: TP=2 is refused up front, TP=3 is the split."""
    config = load_model_source(None).config
    with pytest.raises(ValueError, match="does not divide the model's 9 attention heads"):
        check_tp_size(config, 2)
    check_tp_size(config, 3)


@pytest.mark.slow
def test_tp3_default_gguf_model_matches_tp1():
    prompts = [{"prompt_token_ids": p} for p in random_prompts(2, 49152, lo=5, hi=30, seed=5)]
    assert _generate(None, prompts, 3) == _generate(None, prompts, 1)


# ---- KV across TP sizes ---------------------------------------------------------------------------

def _engine(path, role, tp):
    return LLMEngine(EngineArgs(model=str(path), role=role, tensor_parallel_size=tp, **ENGINE))


def _disaggregated(prefill: LLMEngine, decode: LLMEngine, prompts) -> list[list[int]]:
    """Each prompt prefilled on one engine, its KV exported and imported into the other."""
    outs = []
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        prefill.add_request(rid, params=greedy(NEW), prompt_token_ids=p["prompt_token_ids"])
        while prefill.has_unfinished_requests():
            prefill.step()
        kv = prefill.export_kv(rid)
        decode.import_request(rid, kv.prompt_token_ids, kv.first_token_id, greedy(NEW), kv.k, kv.v)
        tokens = [kv.first_token_id]
        while decode.has_unfinished_requests():
            for out in decode.step():
                tokens += out.new_token_ids
        outs.append(tokens)
    for engine in (prefill, decode):
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_total_blocks, "KV blocks leaked"
    return outs


def test_kv_moves_between_tp_sizes(make_tiny_model, prompts):
    """P TP=2 -> D TP=1 and P TP=1 -> D TP=2 == TP=1 colocated; the export holds every KV head."""
    path = make_tiny_model("qwen2")
    colocated = _generate(path, prompts, 1)
    p1, d1 = _engine(path, "prefill", 1), _engine(path, "decode", 1)
    p2, d2 = _engine(path, "prefill", 2), _engine(path, "decode", 2)
    dirs = [p2.ranks.store_dir, d2.ranks.store_dir]  # two groups in one process: a store each
    try:
        assert dirs[0] != dirs[1] and all(os.path.isdir(d) for d in dirs)
        assert _disaggregated(p2, d1, prompts) == colocated
        assert _disaggregated(p1, d2, prompts) == colocated
        p2.add_request("x", params=greedy(NEW), prompt_token_ids=prompts[0]["prompt_token_ids"])
        p1.add_request("x", params=greedy(NEW), prompt_token_ids=prompts[0]["prompt_token_ids"])
        for engine in (p1, p2):
            while engine.has_unfinished_requests():
                engine.step()
        a, b = p1.export_kv("x"), p2.export_kv("x")
        assert a.k.shape == b.k.shape and a.k.shape[3] == 2  # full-head KV from the TP=2 node
        torch.testing.assert_close(b.k, a.k)
        torch.testing.assert_close(b.v, a.v)
    finally:
        p2.close()
        d2.close()
    assert not any(os.path.exists(d) for d in dirs)


def test_a_failed_start_removes_the_store_directory(make_tiny_model, monkeypatch):
    """Rank 0 failing to build the group: the ranks are killed and the store's directory removed."""
    from engine.parallel import ranks as ranks_mod

    hosted, real = [], ranks_mod.host_store

    def make_group(*args):
        raise RuntimeError("no group today")

    monkeypatch.setattr(ranks_mod, "host_store", lambda size: hosted.append(real(size)) or hosted[-1])
    monkeypatch.setattr(ranks_mod, "make_group", make_group)
    args = EngineArgs(model=str(make_tiny_model("llama")), tensor_parallel_size=2, **ENGINE)
    with pytest.raises(RuntimeError, match="did not join: no group today"):
        ranks_mod.RankProcesses(args, [torch.device("cpu")] * 2)
    assert len(hosted) == 1 and not os.path.exists(hosted[0].dir)


# ---- a rank that dies ---------------------------------------------------------------------------------

def test_a_rank_that_dies_while_idle_fails_the_engine_and_no_rank_survives(make_tiny_model, prompts):
    """No step running: the rank watcher still makes the AsyncEngine fatal (a node then reports
    NOT_SERVING and exits; mid-stream deaths are in tests/services/test_tp_stack.py)."""
    from engine.async_engine import AsyncEngine
    from engine.rpc.errors import Unavailable

    llm = LLMEngine(EngineArgs(model=str(make_tiny_model("llama")), tensor_parallel_size=2, **ENGINE))
    procs, store_dir = list(llm.ranks.procs), llm.ranks.store_dir

    async def scenario():
        fatal = asyncio.Event()
        engine = AsyncEngine(llm, on_fatal=lambda exc: fatal.set())
        engine.start()
        try:
            stream = await engine.add_request("a", prompts[0]["prompt_token_ids"], greedy(NEW))
            assert len([out async for out in stream]) == NEW  # it works before the kill
            os.kill(procs[0].pid, signal.SIGKILL)
            await asyncio.wait_for(fatal.wait(), 10)
            assert not engine.healthy and isinstance(engine.error, RankDied)
            with pytest.raises(Unavailable):
                await engine.add_request("b", prompts[1]["prompt_token_ids"], greedy(NEW))
        finally:
            await engine.stop()

    try:
        asyncio.run(scenario())
    finally:
        llm.close()
    assert all(p.poll() is not None for p in procs)
    assert not os.path.exists(store_dir)
