"""The default model (SmolLM2-135M Q4_1 gguf) on CPU: weights kept packed (--quantization gguf)
vs dequantized to dense fp32 and bf16. Memory (parameter bytes, process RSS after load), decode tok/s at batch 1
and 32, greedy agreement over the parity prompts (tests/engine/test_parity.py) and perplexity on
a fixed text. Each mode runs in its own process (clean RSS); prints a table, writes JSON.

    .venv/bin/python -m bench.cpu_gguf [--out results.json] [--tokens 32] [--modes fp32,bf16,gguf]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

PARITY_TEXTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
    "List three colors:", "1, 2, 3, 4,", "Translate to French: I love cheese.",
    "What is the boiling point of water?", "The quick brown fox", "import numpy as np\n",
    "Dear Sir or Madam,", "In 1492,", "A haiku about autumn:\n", "The meaning of life is",
    "Q: Why is the sky blue?\nA:", "Write a SQL query that counts rows.", "Hello",
]
FIXED_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from those used to make "
    "wine. Before his invention, books were copied by hand, which made them rare and expensive. "
    "Within fifty years presses were running in more than two hundred cities across Europe, and "
    "millions of books had been printed. Cheaper books spread literacy, helped scientists share "
    "their results, and allowed new religious and political ideas to travel faster than any "
    "government could control. Historians still debate how much the press changed society, but "
    "few doubt that it was one of the most important inventions of the modern age."
)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


MODES = {"fp32": ("none", "float32"), "bf16": ("none", "bfloat16"), "gguf": ("gguf", "auto")}  # (quantization, dtype)


def run_mode(quantization: str, tokens: int, dtype: str) -> dict:
    import torch

    from engine import LLM, SamplingParams

    torch.manual_seed(0)
    t0 = time.perf_counter()
    llm = LLM(quantization=quantization, dtype=dtype, max_num_seqs=32, num_gpu_blocks=1024)
    load_s = time.perf_counter() - t0
    model = llm.engine.runner.model
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss = rss_mib()
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [tok.encode(t) for t in PARITY_TEXTS]
    parity = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)]
    speed = {}
    for batch in (1, 32):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        batch_prompts = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(batch)]
        llm.generate(batch_prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        t0 = time.perf_counter()
        llm.generate(batch_prompts, params)
        speed[batch] = batch * tokens / (time.perf_counter() - t0)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return {"quantization": quantization, "dtype_arg": dtype, "param_dtypes": dtypes,
            "load_s": load_s, "param_mib": param_bytes / 2**20,
            "rss_mib": rss, "tok_s_bs1": speed[1], "tok_s_bs32": speed[32], "parity_tokens": parity}


def perplexity(quantization: str | None) -> float:
    """Teacher-forced perplexity of FIXED_TEXT through HF's Llama forward with our layers swapped in
    (gguf) or the fp32-dequantized weights (None)."""
    import torch

    from engine.default_model import default_model_path
    from engine.quant.gguf import GGUFEmbedding, GGUFLinear
    from engine.gguf_loader import GGUFFile
    from tests.engine.helpers import hf_model

    path = default_model_path()
    model = hf_model(path.parent, gguf_file=path.name)
    if quantization == "gguf":
        checkpoint = GGUFFile(path)
        packed = dict(checkpoint.iter_packed(model.config))
        for name, module in list(model.named_modules()):
            for attr, child in list(module.named_children()):
                full = f"{name}.{attr}".lstrip(".")
                if isinstance(child, torch.nn.Linear) and f"{full}.weight" in packed:
                    layer = GGUFLinear(child.in_features, child.out_features)
                    layer.weight.weight_loader(packed[f"{full}.weight"], 0, None)
                    layer.finalize()
                    setattr(module, attr, layer)
        emb = GGUFEmbedding(model.config.vocab_size, model.config.hidden_size, torch.float32)
        emb.weight.weight_loader(packed["model.embed_tokens.weight"], 0, None)
        emb.finalize()
        model.model.embed_tokens = emb
        model.lm_head = _head(emb)
    tok = checkpoint_tokenizer(path)
    ids = torch.tensor([tok.encode(FIXED_TEXT)])
    with torch.inference_mode():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(nll.item())


def _head(emb):
    import torch

    class TiedHead(torch.nn.Module):
        def forward(self, hidden):
            return emb.logits(hidden)

    return TiedHead()


def checkpoint_tokenizer(path):
    from engine.loader import load_model_source

    return load_model_source(str(path)).tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per sequence in the speed runs")
    parser.add_argument("--modes", default="fp32,bf16,gguf",
                        help="fp32 and bf16: dense (dequantized at load) in that dtype; gguf: kept packed, --dtype "
                             "auto (bf16 activations for the packed layers either way); agreement is against the first")
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.mode:
        quantization, dtype = MODES[args.mode]
        result = run_mode(quantization, args.tokens, dtype)
        result["perplexity"] = perplexity(quantization)
        print(json.dumps(result))
        return
    results = {}
    modes = args.modes.split(",")
    for mode in modes:
        out = subprocess.run([sys.executable, "-m", "bench.cpu_gguf", "--mode", mode, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": "."})
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results[modes[0]]["parity_tokens"]
    summary = {}
    for mode in modes[1:]:
        got = results[mode]["parity_tokens"]
        same_seq = sum(a == b for a, b in zip(ref, got))
        same_tok = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ref, got)]
        summary[mode] = {"identical_sequences": f"{same_seq}/{len(ref)}", "token_agreement": same_tok / sum(map(len, ref)),
                         "mean_tokens_before_first_difference": sum(first_diff) / len(first_diff)}
    print(f"{'mode':<14} {'params MiB':>10} {'RSS MiB':>8} {'bs1 tok/s':>9} {'bs32 tok/s':>10} {'ppl':>7}")
    for mode, r in results.items():
        print(f"{mode:<14} {r['param_mib']:10.1f} {r['rss_mib']:8.0f} {r['tok_s_bs1']:9.1f} {r['tok_s_bs32']:10.1f} "
              f"{r['perplexity']:7.3f}")
    for mode, agreement in summary.items():
        print(f"greedy {mode} vs {modes[0]} over {len(ref)} parity prompts x 24 tokens: {agreement}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "agreement": summary, "load_average": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
