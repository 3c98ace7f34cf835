"""Greedy output token-identical to HF transformers on the same weights (fp32, CPU)."""
from __future__ import annotations

import pytest

from engine import LLM
from tests.engine.helpers import greedy, hf_greedy, hf_model, random_prompts, token_ids

NEW_TOKENS = 24


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "smollm2", "llama"])
def test_tiny_models_match_hf(make_tiny_model, arch):
    path = make_tiny_model(arch)
    prompts = random_prompts(16, 49152, seed=hash(arch) % 1000)
    prompts[3] = prompts[3][:1]  # a one-token prompt
    ref = hf_greedy(hf_model(path), prompts, NEW_TOKENS)
    llm = LLM(str(path), dtype="float32", max_num_seqs=16, num_gpu_blocks=256)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW_TOKENS), use_tqdm=False)
    assert token_ids(out) == ref
    llm.engine.check_invariants()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_total_blocks


def test_llama3_rope_scaling_matters(make_tiny_model):
    """The llama3 variant's long prompts pass the original context (64), so the scaling is exercised:
    a model without it must disagree somewhere, or the parity test above proves nothing about it."""
    from engine.models.llama import rope_inv_freq
    from tests.conftest import tiny_config

    scaled, _ = rope_inv_freq(tiny_config("llama3"), 16)
    plain, _ = rope_inv_freq(tiny_config("llama3", rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), 16)
    assert not (scaled == plain).all()


def test_default_model_matches_hf(default_model_path):
    llm = LLM(str(default_model_path), dtype="float32", max_num_seqs=16, num_gpu_blocks=512)
    tok = llm.get_tokenizer()
    texts = [
        "The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
        "List three colors:", "1, 2, 3, 4,", "Translate to French: I love cheese.",
        "What is the boiling point of water?", "The quick brown fox", "import numpy as np\n",
        "Dear Sir or Madam,", "In 1492,", "A haiku about autumn:\n", "The meaning of life is",
        "Q: Why is the sky blue?\nA:", "Write a SQL query that counts rows.", "Hello",
    ]
    prompts = [tok.encode(t) for t in texts]
    prompts[5] = llm.apply_chat_template([{"role": "user", "content": texts[5]}])
    prompts[6] = llm.apply_chat_template([{"role": "user", "content": texts[6] * 3}])
    ref_model = hf_model(default_model_path.parent, gguf_file=default_model_path.name)
    ref = hf_greedy(ref_model, prompts, NEW_TOKENS)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW_TOKENS), use_tqdm=False)
    assert token_ids(out) == ref
