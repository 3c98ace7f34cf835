"""Quantized weights on one GPU (issue 16): AWQ int4 and FP8 against bf16, Llama-3-8B shape.

    python bench/gpu_quant.py [--out $OUT/gpu_quant.json] [--num-prompts 500] [--skip-offline]
    python bench/gpu_quant.py --tiny      # the same code path on CPU, tiny model and counts

Model: Llama-3-8B shape, bf16 random weights N(0, 0.02) (bench/gpu_speed.py's builder), saved to
/dev/shm; an AWQ (gemm, group 128 (tiny: 32), zero points) checkpoint of the same weights is packed by
engine/quant/packers.py on the GPU and saved next to it. Sections:

  cosine   logits of 4 prompts x 64 random ids through HF's forward: bf16 vs the same model with
           every decoder linear swapped for our Fp8Linear (quantized from the bf16 weights) and for
           our Int4Linear (loaded from the AWQ tensors): mean and min cosine over positions.
  decode   our engine, batch-1 decode tok/s: 128 in, t(129 new) - t(1 new) over 128, median of 3;
           bf16, awq (the W4A16 Triton kernel), fp8 (torch._scaled_mm).
  offline  our engine, offline throughput: --num-prompts x 1024 random ids in, 128 out, one
           generate call, bf16 vs fp8 (the issue's target: 1000 prompts, fp8 >= 1.4x bf16).

Targets (issue 16): awq decode >= 2.2x bf16, fp8 offline >= 1.4x bf16, cosine >= 0.99.
Prints a table; writes {"device", "date", "command", "metrics", "details"} to --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.gpu_speed import LLAMA3_8B, TINY, build_hf_model, random_prompts, save_model_dir  # noqa: E402

GPU = dict(cos_prompts=4, cos_len=64, p1_prompt=128, p1_new=128, repeats=3, offline_len=1024, offline_new=128,
           num_prompts=500, max_num_seqs=256, max_num_batched_tokens=8192, group=128)
CPU_TINY = dict(cos_prompts=2, cos_len=16, p1_prompt=16, p1_new=8, repeats=1, offline_len=32, offline_new=4,
                num_prompts=6, max_num_seqs=8, max_num_batched_tokens=256, group=32)


def log(msg: str) -> None:
    print(f"[gpu_quant] {msg}", flush=True)


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- logits cosine ---------------------------------------------------------------------------

def _decoder_linears(hf):
    """(parent, attribute, linear, HF name prefix) of every linear in the decoder layers."""
    out = []
    for i, layer in enumerate(hf.model.layers):
        for part, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    out.append((parent, name, child, f"model.layers.{i}.{part}.{name}"))
    return out


@torch.inference_mode()
def logits_cosine(hf, awq_tensors: dict, ids: torch.Tensor, dtype: torch.dtype, group: int) -> dict:
    from engine.quant.config import QuantConfig
    from engine.quant.fp8 import Fp8Linear
    from engine.quant.int4 import Int4Linear

    ref = hf(ids).logits.float()
    originals = _decoder_linears(hf)
    for parent, name, child, _ in originals:
        setattr(parent, name, Fp8Linear.from_dense(child))
    fp8 = hf(ids).logits.float()
    quant = QuantConfig("awq", "awq", group_size=group)
    for parent, name, child, prefix in originals:
        layer = Int4Linear(child.in_features, child.out_features, quant, dtype, child.weight.device)
        for suffix in ("qweight", "qzeros", "scales"):
            getattr(layer, suffix).weight_loader(awq_tensors[f"{prefix}.{suffix}"], 0, None)
        layer.finalize()
        setattr(parent, name, layer)
    awq = hf(ids).logits.float()
    for parent, name, child, _ in originals:
        setattr(parent, name, child)

    def cos(a, b):
        c = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
        return {"mean": round(c.mean().item(), 5), "min": round(c.min().item(), 5)}

    return {"fp8": cos(fp8, ref), "awq": cos(awq, ref)}


# ---- engine sections ---------------------------------------------------------------------------

def make_llm(path, dtype: str, quantization: str | None, sc: dict, device: str):
    from engine import LLM

    kw = dict(dtype=dtype, quantization=quantization, max_model_len=2048, max_num_seqs=sc["max_num_seqs"],
              max_num_batched_tokens=sc["max_num_batched_tokens"], enable_prefix_caching=False, device=device)
    if device == "cpu":
        kw["num_gpu_blocks"] = 512
    return LLM(str(path), **kw)


def greedy(n: int):
    from engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def timed(llm, prompts, new: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(new), use_tqdm=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def decode_tok_s(llm, sc: dict, vocab: int, device: str) -> float:
    L, new = sc["p1_prompt"], sc["p1_new"]
    timed(llm, random_prompts(1, L, vocab, 1), new + 1, device)  # warm-up
    rates = []
    for r in range(sc["repeats"]):
        tn = timed(llm, random_prompts(1, L, vocab, 10 + r), new + 1, device)
        t1 = timed(llm, random_prompts(1, L, vocab, 20 + r), 1, device)
        rates.append(new / max(tn - t1, 1e-9))
    return statistics.median(rates)


def offline_tok_s(llm, sc: dict, vocab: int, device: str) -> float:
    n, L, new = sc["num_prompts"], sc["offline_len"], sc["offline_new"]
    timed(llm, random_prompts(4, L, vocab, 30), 4, device)  # warm-up
    seconds = timed(llm, random_prompts(n, L, vocab, 31), new, device)
    return n * (L + new) / seconds


def weight_gib(llm) -> float:
    model = llm.engine.runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


# ---- main --------------------------------------------------------------------------------------

def save_awq(hf, shape: dict, dense_dir: pathlib.Path, group: int) -> tuple[pathlib.Path, dict]:
    from safetensors.torch import save_file

    from engine.quant.packers import awq_tensors, quantization_config

    state = {k: v for k, v in hf.state_dict().items()}
    tensors, _ = awq_tensors(state, group, reference=False)
    dense = {k: v for k, v in state.items() if not any(k.endswith(f"{p}.weight") for p in
                                                          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}
    dst = dense_dir.with_name(dense_dir.name + "_awq")
    dst.mkdir()
    if shape.get("tie_word_embeddings"):
        dense.pop("lm_head.weight", None)
    save_file({k: v.contiguous().cpu() for k, v in (dense | tensors).items()}, dst / "model.safetensors")
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config("awq", group_size=group)
    (dst / "config.json").write_text(json.dumps(config))
    for f in dense_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst, tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model and counts (tests the code path)")
    parser.add_argument("--num-prompts", type=int, default=None, help="offline prompts (default 500; tiny 6)")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--keep-models", action="store_true", help="leave the saved model dirs in place")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    sc = dict(CPU_TINY if args.tiny else GPU)
    if args.num_prompts:
        sc["num_prompts"] = args.num_prompts
    shape = TINY if args.tiny else LLAMA3_8B
    dtype, dtype_name = (torch.float32, "float32") if args.tiny else (torch.bfloat16, "bfloat16")
    t0 = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv), "metrics": {}, "details": {"scale": sc}}

    made: list[pathlib.Path] = []
    try:
        return run(args, device, sc, shape, dtype, dtype_name, results, t0, made)
    finally:
        if not args.keep_models:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)


def run(args, device, sc, shape, dtype, dtype_name, results, t0, made: list) -> int:
    metrics, vocab = results["metrics"], shape["vocab_size"]
    hf = build_hf_model(shape, device, dtype, seed=0)
    dense_dir, _ = save_model_dir(hf, shape, "quant_dense")
    made.append(dense_dir)
    log(f"dense model saved to {dense_dir} ({time.perf_counter() - t0:.0f} s)")
    awq_dir, awq = save_awq(hf, shape, dense_dir, sc["group"])
    made.append(awq_dir)
    log(f"awq checkpoint saved to {awq_dir} ({time.perf_counter() - t0:.0f} s)")
    ids = torch.tensor(random_prompts(sc["cos_prompts"], sc["cos_len"], vocab, 7), device=device)
    metrics["logits_cosine"] = logits_cosine(hf, awq, ids, dtype, sc["group"])
    log(f"cosine {metrics['logits_cosine']} ({time.perf_counter() - t0:.0f} s)")
    del hf, awq
    free(device)

    for name, path, quantization in (("bf16", dense_dir, None), ("awq", awq_dir, None), ("fp8", dense_dir, "fp8")):
        llm = make_llm(path, dtype_name, quantization, sc, device)
        row = {"weights_gib": round(weight_gib(llm), 4), "decode_bs1_tok_s": round(decode_tok_s(llm, sc, vocab, device), 2)}
        if name != "awq" and not args.skip_offline:
            row["offline_tok_s"] = round(offline_tok_s(llm, sc, vocab, device), 1)
        metrics[name] = row
        log(f"{name}: {row} ({time.perf_counter() - t0:.0f} s)")
        llm.close()
        del llm
        free(device)

    base = metrics["bf16"]
    metrics["awq_decode_speedup"] = round(metrics["awq"]["decode_bs1_tok_s"] / base["decode_bs1_tok_s"], 3)
    if "offline_tok_s" in base:
        metrics["fp8_offline_speedup"] = round(metrics["fp8"]["offline_tok_s"] / base["offline_tok_s"], 3)
    results["details"]["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n{'':6} {'weights GiB':>11} {'bs1 tok/s':>10} {'offline tok/s':>14}")
    for name in ("bf16", "awq", "fp8"):
        r = metrics[name]
        print(f"{name:6} {r['weights_gib']:11.3f} {r['decode_bs1_tok_s']:10.1f} {r.get('offline_tok_s', float('nan')):14.1f}")
    print(f"awq decode speedup {metrics['awq_decode_speedup']} (target >= 2.2); fp8 offline speedup "
          f"{metrics.get('fp8_offline_speedup')} (target >= 1.4); logits cosine vs bf16 {metrics['logits_cosine']} "
          "(target >= 0.99)")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
