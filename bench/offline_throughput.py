"""Offline throughput: pdserve `LLM.generate` vs HF transformers `generate`, side by side in one run.

    python bench/offline_throughput.py [--model PATH] [--num-prompts 64] [--new-tokens 128]
                                       [--hf-batch-sizes 8,32] [--json bench/results/offline_cpu.json]

Same prompts, greedy, eos ignored, fp32 on CPU (bf16 on CUDA). Output tokens per second of
each; HF is timed at every batch size given and its best is the reference.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    seeds = ["The history of the Roman empire", "Write a Python function that", "Explain why the sky is blue",
             "A recipe for bread:", "The best way to learn a language", "Once upon a time",
             "Summarize the plot of Hamlet", "List the planets of the solar system"]
    return [tokenizer.encode(seeds[i % len(seeds)] + " and then" * (i % 7)) for i in range(n)]


def bench_pdserve(model: str, prompts, new_tokens: int, device: str, dtype: str) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(model, device=device, dtype=dtype, quantization="none", max_num_seqs=256)  # dense, as HF's
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(max_tokens=4), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    return {"seconds": dt, "output_tok_s": n_out / dt, "total_tok_s": (n_in + n_out) / dt}


def bench_hf(model_path, gguf_file, prompts, new_tokens: int, batch: int, device: str, dtype: str) -> dict:
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    m = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **kwargs).to(device).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    n_out = n_in = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            group = prompts[i:i + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
            y = m.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
            n_out += (y.shape[1] - width) * len(group)
            n_in += sum(len(p) for p in group)
    dt = time.perf_counter() - t
    return {"batch": batch, "seconds": dt, "output_tok_s": n_out / dt, "total_tok_s": (n_in + n_out) / dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2-135M gguf)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="8,32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="both engines' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)

    from engine.default_model import default_model_path
    from engine.loader import load_model_source

    model = args.model or str(default_model_path())
    prompts = make_prompts(load_model_source(model).tokenizer, args.num_prompts)
    path = pathlib.Path(model)
    hf_path, gguf = (str(path.parent), path.name) if path.suffix == ".gguf" else (model, None)

    ours = bench_pdserve(model, prompts, args.new_tokens, args.device, args.dtype)
    hf = [bench_hf(hf_path, gguf, prompts, args.new_tokens, int(b), args.device, args.dtype)
          for b in args.hf_batch_sizes.split(",")]
    best = max(hf, key=lambda r: r["output_tok_s"])
    ratio = ours["output_tok_s"] / best["output_tok_s"]
    print(f"\n{args.num_prompts} prompts x {args.new_tokens} new tokens, greedy, eos ignored, device {args.device}, dtype {args.dtype}")
    print(f"{'engine':<22}{'seconds':>10}{'output tok/s':>15}{'total tok/s':>14}")
    print(f"{'pdserve LLM.generate':<22}{ours['seconds']:>10.1f}{ours['output_tok_s']:>15.1f}{ours['total_tok_s']:>14.1f}")
    for r in hf:
        name = f"HF generate bs={r['batch']}"
        print(f"{name:<22}{r['seconds']:>10.1f}{r['output_tok_s']:>15.1f}{r['total_tok_s']:>14.1f}")
    print(f"pdserve / best HF (output tok/s): {ratio:.2f}x")
    if args.json:
        device = args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
        result = {"device": device, "dtype": args.dtype, "date": datetime.date.today().isoformat(),
                  "command": "python " + " ".join(sys.argv),
                  "metrics": {"offline_output_tok_s": ours["output_tok_s"], "offline_total_tok_s": ours["total_tok_s"],
                              "hf_output_tok_s": best["output_tok_s"], "hf_total_tok_s": best["total_tok_s"],
                              "hf_best_batch": best["batch"], "offline_vs_hf_ratio": ratio}}
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
