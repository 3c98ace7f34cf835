"""Engine on the GPU, in one run: Triton backend == torch backend (greedy), and decode speed.

    python bench/gpu_engine.py --tokenizer DIR [--out bench/results/gpu_engine.json]

1. Parity: a small random Llama (fp32 and bf16) generates greedily with the Triton attention
   backend and with the torch reference backend on the same GPU: fp32 must be token-identical
   (also with chunked prefill + prefix caching, i.e. mixed decode/prefill steps); bf16 reports the
   fraction of identical tokens.
2. Speed: a SmolLM2-135M-shaped model (random weights, bf16, Triton backend): decode tok/s at
   batch 1 and 64 (128 new tokens, eos ignored), next to HF `generate` on the same weights.
The tokenizer dir comes from `load_model_source(None).tokenizer.save_pretrained(DIR)` (no hub there).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def build_model(dst: pathlib.Path, tokenizer_dir: str, **config) -> str:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(dst)
    for f in pathlib.Path(tokenizer_dir).iterdir():
        shutil.copy(f, dst / f.name)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return str(dst)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 49152, (k,), generator=g).tolist() for k in lens]


def run(model: str, backend: str, dtype: str, ps, new: int, **kw) -> list[list[int]]:
    from engine import LLM, SamplingParams

    llm = LLM(model, device="cuda", dtype=dtype, attention_backend=backend, **kw)
    out = llm.generate([{"prompt_token_ids": p} for p in ps],
                       SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True), use_tqdm=False)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in out]


def parity(model: str) -> dict:
    ps = prompts(32)
    res = {}
    ref = run(model, "torch", "float32", ps, 32, num_gpu_blocks=2048)
    res["fp32_identical"] = run(model, "triton", "float32", ps, 32, num_gpu_blocks=2048) == ref
    res["fp32_chunked_prefix_identical"] = run(
        model, "triton", "float32", ps + ps[:8], 32, num_gpu_blocks=2048, max_num_batched_tokens=200,
        enable_prefix_caching=True)[:32] == ref
    a = run(model, "torch", "bfloat16", ps, 32, num_gpu_blocks=2048)
    b = run(model, "triton", "bfloat16", ps, 32, num_gpu_blocks=2048)
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    res["bf16_token_match_frac"] = same / sum(len(r) for r in a)
    return res


def speed(model: str, batch: int, new: int = 128) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(model, device="cuda", dtype="bfloat16", max_num_seqs=max(batch, 8))
    ps = prompts(batch, seed=1, lo=64, hi=65)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    torch.cuda.synchronize()
    ours = batch * new / (time.perf_counter() - t)
    del llm
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    x = torch.tensor(ps, device="cuda")
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
    theirs = batch * new / (time.perf_counter() - t)
    del hf
    torch.cuda.empty_cache()
    return {"pdserve_tok_s": ours, "hf_tok_s": theirs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    small = build_model(tmp / "small", args.tokenizer, hidden_size=1024, intermediate_size=2816,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                        max_position_embeddings=2048, initializer_range=0.05)
    smol = build_model(tmp / "smol", args.tokenizer, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    res = {"parity": parity(small)}
    res["smollm2_bs1"] = speed(smol, 1)
    res["smollm2_bs64"] = speed(smol, 64)
    print("\nparity (small random Llama, 32 prompts x 32 tokens):", res["parity"])
    print(f"{'SmolLM2-135M shape, bf16':<28}{'pdserve tok/s':>15}{'HF tok/s':>12}")
    for b in ("bs1", "bs64"):
        r = res[f"smollm2_{b}"]
        print(f"{'decode ' + b:<28}{r['pdserve_tok_s']:>15.1f}{r['hf_tok_s']:>12.1f}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "command": "python bench/gpu_engine.py --tokenizer .devcache/tokenizer",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "metrics": {"triton_vs_torch_fp32_identical": res["parity"]["fp32_identical"],
                        "triton_vs_torch_fp32_chunked_prefix_identical": res["parity"]["fp32_chunked_prefix_identical"],
                        "triton_vs_torch_bf16_token_match_frac": res["parity"]["bf16_token_match_frac"],
                        "smollm2_bs1_decode_tok_s": res["smollm2_bs1"]["pdserve_tok_s"],
                        "smollm2_bs64_decode_tok_s": res["smollm2_bs64"]["pdserve_tok_s"],
                        "hf_smollm2_bs1_tok_s": res["smollm2_bs1"]["hf_tok_s"],
                        "hf_smollm2_bs64_tok_s": res["smollm2_bs64"]["hf_tok_s"]}}, indent=2) + "\n")
    ok = res["parity"]["fp32_identical"] and res["parity"]["fp32_chunked_prefix_identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
