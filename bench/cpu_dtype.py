"""bf16 vs fp32 on CPU for one model (the default one unless --model): prefill and decode speed,
and what bf16 does to its output (greedy agreement with fp32, perplexity on the same text).

    python bench/cpu_dtype.py [--model PATH] [--json bench/results/cpu_dtype.json]

Per dtype, one engine (`LLM`, prefix caching off so every prompt is computed):
  prefill  one prompt of --prefill-tokens tokens, max_tokens 1 (time to its token), best of 3;
  decode   --batch prompts of ~16 tokens, --new-tokens each, greedy, eos ignored: output tok/s;
  quality  16 short prompts, 32 greedy tokens: sequences / tokens equal to fp32's (up to the first
           difference); perplexity of the model on a fixed English text (prompt logprobs via one
           forward of the engine's model, teacher-forced).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

TEXT = ("The history of the Roman Empire spans more than a thousand years. It began when Augustus became the "
        "first emperor in 27 BC and ended in the West in 476 AD, when the last emperor was deposed. During this "
        "time, Rome built roads, aqueducts and cities across Europe, North Africa and the Middle East. Latin "
        "spread as the language of government and law, and it later gave rise to Italian, French, Spanish, "
        "Portuguese and Romanian. The empire was divided into provinces, each ruled by a governor who collected "
        "taxes and commanded troops. Trade flourished along the Mediterranean, which the Romans called our sea.")
QUALITY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
                   "List three colors:", "1, 2, 3, 4,", "The quick brown fox", "import numpy as np\n",
                   "Dear Sir or Madam,", "In 1492,", "A haiku about autumn:\n", "The meaning of life is",
                   "Q: Why is the sky blue?\nA:", "Write a SQL query that counts rows.", "Hello",
                   "The three laws of motion are", "My favourite recipe for bread is"]


def perplexity(llm, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] given the prefix, from the engine's own model (one prefill)."""
    from engine.scheduler import ScheduledChunk, SchedulerOutput

    eng = llm.engine
    model, runner = eng.runner.model, eng.runner

    bs = runner.block_size
    blocks = tuple(range(1, 1 + -(-len(ids) // bs)))
    chunk = ScheduledChunk(None, tuple(ids), 0, blocks, True)
    with torch.inference_mode():
        inputs = runner.prepare_inputs(SchedulerOutput((chunk,)))
        runner.attn.plan(inputs.metadata)
        hidden = model(inputs.input_ids, inputs.positions, runner.kv_caches, runner.attn)
        logits = model.compute_logits(hidden).float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return math.exp(-logp.mean().item())


def run(model: str | None, dtype: str, args) -> dict:
    from engine import LLM, SamplingParams

    t0 = time.perf_counter()
    # dense in both dtypes (a .gguf would otherwise stay packed in bf16): this compares dtypes
    llm = LLM(model, device="cpu", dtype=dtype, quantization="none", max_num_seqs=max(args.batch, 16),
              enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, args.prefill_tokens))
    load_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    vocab = llm.engine.shape.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    base = tok.encode(TEXT)
    long_prompt = (base * (args.prefill_tokens // len(base) + 1))[: args.prefill_tokens]
    llm.generate([{"prompt_token_ids": long_prompt[:64]}], greedy, use_tqdm=False)  # first-use costs
    prefill = []
    for i in range(3):
        p = [(t + i) % vocab for t in long_prompt]  # distinct prompts (prefix caching is off anyway)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p}], greedy, use_tqdm=False)
        prefill.append(time.perf_counter() - t)
    prompts = [tok.encode(QUALITY_PROMPTS[i % len(QUALITY_PROMPTS)] + " and" * (i % 5)) for i in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    decode_s = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    quality = llm.generate([{"prompt_token_ids": tok.encode(p)} for p in QUALITY_PROMPTS],
                           SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    return {
        "dtype": dtype, "load_s": load_s,
        "prefill_tokens": len(long_prompt), "prefill_s": min(prefill), "prefill_tok_s": len(long_prompt) / min(prefill),
        "decode_batch": args.batch, "decode_new_tokens": args.new_tokens, "decode_s": decode_s,
        "decode_output_tok_s": n_out / decode_s,
        "quality_tokens": [o.outputs[0].token_ids for o in quality],
        "quality_text": [o.outputs[0].text for o in quality],
        "perplexity": perplexity(llm, base),
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    same_seq = sum(x == y for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u != v:
                break
            prefix += 1
    return same_seq, prefix / sum(len(x) for x in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the bundled default model)")
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    from engine.config import cpu_bf16_flags

    results = {name: run(args.model, name, args) for name in ("float32", "bfloat16")}
    fp32, bf16 = results["float32"], results["bfloat16"]
    same, frac = agreement(fp32["quality_tokens"], bf16["quality_tokens"])
    summary = {
        "prefill_speedup_bf16": bf16["prefill_tok_s"] / fp32["prefill_tok_s"],
        "decode_speedup_bf16": bf16["decode_output_tok_s"] / fp32["decode_output_tok_s"],
        "greedy_sequences_equal": f"{same}/{len(QUALITY_PROMPTS)}", "greedy_prefix_token_agreement": frac,
        "perplexity_fp32": fp32["perplexity"], "perplexity_bf16": bf16["perplexity"],
    }
    print(f"{'dtype':9} {'prefill tok/s':>14} {'decode tok/s':>13} {'perplexity':>11}")
    for r in (fp32, bf16):
        print(f"{r['dtype']:9} {r['prefill_tok_s']:14.1f} {r['decode_output_tok_s']:13.1f} {r['perplexity']:11.3f}")
    print(f"bf16/fp32: prefill {summary['prefill_speedup_bf16']:.2f}x, decode {summary['decode_speedup_bf16']:.2f}x; "
          f"greedy sequences equal {same}/{len(QUALITY_PROMPTS)}, tokens before the first difference {frac:.0%}")
    if args.json:
        report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": args.model or "default",
                  "cpu": platform.processor() or platform.machine(), "cpu_bf16_flags": cpu_bf16_flags(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "summary": summary,
                  "results": results}
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
