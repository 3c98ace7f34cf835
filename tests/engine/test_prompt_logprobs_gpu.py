"""Prompt logprobs on a GPU (skipped without CUDA): the CUDA default path, i.e. async scheduling,
CUDA graphs for the pure-decode steps and the Triton attention backend, with prompt-logprob rows
mixed into steps that also decode other requests; equal to HF's log-softmax on the same GPU.

    .venv/bin/python -m pytest -q tests/engine/test_prompt_logprobs_gpu.py
"""
from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import build_tiny_model, tiny_config
from tests.engine.helpers import check_prompt_logprobs, hf_model, hf_prompt_logprobs, random_prompts
from tests.engine.test_gpu_engine import word_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
ATOL = 3e-2  # Triton's fp32 dots may run in TF32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-prompt-logprobs")
    build_tiny_model("llama").save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    word_tokenizer(tiny_config("llama").vocab_size).save_pretrained(path)
    return path


def _entries(out, num_top: int):
    assert out.prompt_logprobs[0] is None
    rows = []
    for entry in out.prompt_logprobs[1:]:
        (token_id, lp), *_ = entry.items()
        top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:num_top]
        rows.append((token_id, lp.logprob, lp.rank, [(t, c.logprob) for t, c in top]))
    return rows


def test_prompt_logprobs_on_cuda_match_hf(model_dir):
    prompts = random_prompts(12, 49152, lo=2, hi=200, seed=31)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                             prompt_logprobs=4 if i % 3 == 0 else None) for i in range(len(prompts))]
    llm = LLM(str(model_dir), device="cuda", dtype="float32", num_gpu_blocks=512, max_num_batched_tokens=64)
    assert llm.engine._async and llm.engine.runner.graphs is not None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = hf_model(model_dir).cuda()
    for ids, p, out in zip(prompts, params, outs):
        assert len(out.outputs[0].token_ids) == 24
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert len(out.prompt_logprobs) == len(ids) and out.num_cached_tokens == 0
        check_prompt_logprobs(_entries(out, 4), ids, hf_prompt_logprobs(hf, ids), 4, atol=ATOL)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
