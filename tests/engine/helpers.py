"""Reference helpers shared by engine tests: HF greedy generation and prompt makers."""
from __future__ import annotations

import random

import torch
import transformers


def hf_model(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF `generate` one prompt at a time (no padding), eos disabled: the reference output."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outs = []
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False)
        outs.append(y[0, len(ids):].tolist())
    return outs


def random_prompts(n: int, vocab: int, lo: int = 2, hi: int = 70, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy(max_tokens: int, **kw):
    from engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@torch.inference_mode()
def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """HF's log-softmax at every prompt position ([len(ids), vocab], fp32): row i predicts token i + 1."""
    x = torch.tensor([ids], device=model.device)
    return torch.log_softmax(model(x, attention_mask=torch.ones_like(x)).logits[0].float(), dim=-1)


def check_prompt_logprobs(entries, ids: list[int], ref: torch.Tensor, num_top: int, atol: float = 1e-3) -> None:
    """`entries[i]` = (token id, logprob, rank, [(top id, top logprob), ...]) for prompt token i + 1,
    against HF's log-softmax `ref`: the token's logprob, its rank (up to ties within `atol`), and the
    top `num_top` logprobs best first."""
    assert len(entries) == len(ids) - 1, (len(entries), len(ids))
    for i, (token_id, logprob, rank, top) in enumerate(entries):
        row, want = ref[i], ids[i + 1]
        assert token_id == want, (i, token_id, want)
        assert abs(logprob - row[want].item()) < atol, (i, logprob, row[want].item())
        lo = int((row > row[want] + atol).sum()) + 1
        hi = int((row > row[want] - atol).sum()) + 1
        assert lo <= rank <= hi, (i, rank, lo, hi)
        best = row.topk(num_top)
        assert len(top) == num_top
        for (t, lp), v in zip(top, best.values.tolist()):
            assert abs(lp - v) < atol and abs(row[t].item() - v) < atol, (i, t, lp, v)
