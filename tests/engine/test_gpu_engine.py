"""The engine on a GPU: CUDA graphs, fused kernels, memory sizing (skipped without CUDA).

The GPU machine has no default model and no hub: tiny random-weight models get a word-level
tokenizer built in code.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import build_tiny_model, tiny_config
from tests.engine.helpers import greedy, hf_greedy, hf_model, random_prompts, token_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0")


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    built = {}

    def make(arch: str, **overrides):
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in built:
            path = tmp_path_factory.mktemp(f"gpu-{arch}")
            build_tiny_model(arch, **overrides).save_pretrained(path)
            (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
            word_tokenizer(tiny_config(arch, **overrides).vocab_size).save_pretrained(path)
            built[key] = path
        return built[key]

    return make


def _generate(path, prompts, params, **kw):
    llm = LLM(str(path), device="cuda", **kw)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    graphs = llm.engine.runner.graphs
    del llm
    torch.cuda.empty_cache()
    return out, graphs


def _varied_lengths(n: int, seed: int) -> list[SamplingParams]:
    """Rows finish at different steps, so later steps run (and pad) many graph sizes."""
    rng = random.Random(seed)
    return [greedy(rng.randint(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "smollm2"])
def test_graphs_match_eager_and_hf_fp32(gpu_model, arch):
    path = gpu_model(arch)
    prompts = random_prompts(37, 49152, seed=5)
    params = _varied_lengths(37, seed=6)
    eager, no_graphs = _generate(path, prompts, params, dtype="float32", enforce_eager=True, num_gpu_blocks=1024)
    graphed, graphs = _generate(path, prompts, params, dtype="float32", num_gpu_blocks=1024)
    assert no_graphs is None and graphs is not None and graphs.max_batch == 256
    assert token_ids(graphed) == token_ids(eager)
    assert [len(t) for t in token_ids(graphed)] == [p.max_tokens for p in params]
    # and both equal HF transformers on the same GPU, fp32 (first 8 prompts, 16 tokens)
    ref = hf_greedy(hf_model(path).cuda(), prompts[:8], 16)
    ours, _ = _generate(path, prompts[:8], greedy(16), dtype="float32", num_gpu_blocks=1024)
    assert token_ids(ours) == ref


def test_graphs_sampling_penalties_logprobs_fp32(gpu_model):
    """Seeded sampling, penalties and logprobs read the graph's logits like eager ones. (fp32: in
    bf16 a padded graph batch picks other GEMM kernels than the eager batch, and rounding differs.)"""
    path = gpu_model("llama")
    prompts = random_prompts(20, 49152, seed=9)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=i, max_tokens=12, ignore_eos=True,
                             repetition_penalty=1.1 if i % 2 else 1.0, logprobs=2 if i % 3 == 0 else None)
              for i in range(20)]
    a, _ = _generate(path, prompts, params, dtype="float32", enforce_eager=True, num_gpu_blocks=512)
    b, _ = _generate(path, prompts, params, dtype="float32", num_gpu_blocks=512)
    assert token_ids(a) == token_ids(b)
    for x, y in zip(a, b):
        assert (x.outputs[0].logprobs is None) == (y.outputs[0].logprobs is None)
        if x.outputs[0].logprobs:
            assert [sorted(d) for d in x.outputs[0].logprobs] == [sorted(d) for d in y.outputs[0].logprobs]


def test_async_equals_sync_on_gpu(gpu_model):
    path = gpu_model("llama3")
    prompts = random_prompts(24, 49152, seed=12)
    params = _varied_lengths(24, seed=13)
    a, _ = _generate(path, prompts, params, dtype="float32", num_gpu_blocks=1024, async_scheduling=False)
    b, _ = _generate(path, prompts, params, dtype="float32", num_gpu_blocks=1024)
    assert token_ids(a) == token_ids(b)


def test_graphs_with_chunked_prefill_and_prefix_hits(gpu_model):
    path = gpu_model("llama")
    base = random_prompts(12, 49152, lo=40, hi=120, seed=3)
    prompts = base + [p[:35] + [7, 8, 9] for p in base[:6]]  # shared prefixes hit the cache
    kw = dict(dtype="float32", num_gpu_blocks=512, max_num_batched_tokens=64, enable_prefix_caching=True)
    eager, _ = _generate(path, prompts, greedy(20), enforce_eager=True, **kw)
    graphed, _ = _generate(path, prompts, greedy(20), **kw)
    assert token_ids(graphed) == token_ids(eager)


def test_kv_cache_sized_from_memory_profile(gpu_model):
    path = gpu_model("llama")
    llm = LLM(str(path), device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=512)
    eng = llm.engine
    # the cache holds every sequence at full length (more would be useless) ...
    assert eng.cache_config.num_blocks == 8 * (512 // 16) + 1
    assert eng.runner.kv_caches[0][0].shape[0] == eng.cache_config.num_blocks
    del llm
    torch.cuda.empty_cache()


def test_clear_error_when_weights_do_not_fit(gpu_model):
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine
    from engine.loader import load_model_source

    path = gpu_model("llama")
    source = load_model_source(str(path))
    source.config = tiny_config("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    free, total = torch.cuda.mem_get_info()
    util = max(0.05, round((total - free) / total + 0.02, 3))  # ~2% of the GPU left: < 16 GB of weights
    with pytest.raises(MemoryError, match=r"weights need 14\.\d\d GiB in bfloat16.*gpu_memory_utilization"):
        LLMEngine(EngineArgs(device="cuda", dtype="bfloat16", gpu_memory_utilization=util), source=source)


def test_clear_error_when_kv_cache_does_not_fit(gpu_model, monkeypatch):
    from engine.model_runner import ModelRunner

    path = gpu_model("llama")
    _, total = torch.cuda.mem_get_info()
    monkeypatch.setattr(ModelRunner, "profile_peak_memory", lambda self, *a: int(total))
    with pytest.raises(MemoryError, match=r"no room for the KV cache.*activations peak.*max_model_len 512"):
        LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512)


def test_profile_measures_activation_peak(gpu_model):
    path = gpu_model("llama")
    llm = LLM(str(path), device="cuda", dtype="bfloat16", max_num_seqs=64, num_gpu_blocks=64)
    runner = llm.engine.runner
    small = runner.profile_peak_memory(64, 4, 512)
    large = runner.profile_peak_memory(2048, 64, 512)
    # logits of 64 sampled rows (fp32, 49152 vocab) alone are 12 MiB: the larger step must show it
    assert large > small and large > 12 * 2**20
    assert runner.kv_caches[0][0].shape[0] == 64  # the real cache is back in place
    del llm
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_linears_use_skinny_gemm_and_match_cublas(gpu_model, dtype):
    """Batches of <= 16 rows go through the skinny GEMM in 16-bit dtypes (fp32 keeps cuBLAS);
    every projection of a real model, bias included (Qwen2), matches F.linear to rounding."""
    import torch.nn.functional as F

    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine
    import engine.models.llama as llama
    import engine.parallel.layers as layers  # where the decode linears call the skinny GEMM

    calls = []
    real = layers.skinny_gemm

    def spy(x, w, *a, **k):
        calls.append(tuple(w.shape))
        return real(x, w, *a, **k)

    for arch in ("qwen2", "smollm2"):
        eng = LLMEngine(EngineArgs(model=str(gpu_model(arch)), device="cuda", dtype=str(dtype).removeprefix("torch."),
                                   num_gpu_blocks=64, enforce_eager=True))
        model = eng.runner.model
        g = torch.Generator(device="cuda").manual_seed(0)
        for m in (1, 3, 16, 17):
            for name, mod in model.named_modules():
                if isinstance(mod, llama.Linear):
                    x = torch.randn(m, mod.in_features, device="cuda", generator=g).to(dtype)
                    calls.clear()
                    layers.skinny_gemm = spy
                    try:
                        got = mod(x)
                    finally:
                        layers.skinny_gemm = real
                    assert calls == ([tuple(mod.weight.shape)] if m <= 16 else []), (name, m)
                    ref = F.linear(x.float(), mod.weight.float(), None if mod.bias is None else mod.bias.float())
                    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
        x = torch.randn(4, model.config.hidden_size, device="cuda", generator=g).to(dtype)
        w = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        torch.testing.assert_close(model.compute_logits(x).float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)
        del eng
        torch.cuda.empty_cache()
