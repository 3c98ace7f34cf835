"""Why the quantized 8B-shape logits drift (issue 16): kernel error or quantization error amplified by depth?

    python bench/quant_diagnose.py [--out $OUT/quant_diagnose.json]     # GPU, Llama-3-8B shape
    python bench/quant_diagnose.py --tiny                               # CPU, the same code path

bench/gpu_quant.py measured logits cosine vs bf16 of 0.82 (FP8) and 0.43 (AWQ) on the random-weight
8B shape, against 0.99 on tiny CPU models. This script separates the two explanations:

  model    logits cosine vs an fp32 copy of the same weights, for: bf16 (the noise floor of bf16
           itself), FP8 through our Fp8Linear (torch._scaled_mm with and without fast accumulation),
           FP8 *fake-quant* (the same e4m3 weights and per-token activations, dequantized, matmul in
           fp32: what FP8 costs with an exact GEMM), AWQ through our Int4Linear (the W4A16 kernel) and
           AWQ fake-quant (the dequantized int4 weights in a plain fp32 Linear).
  layer    per linear of layers 0 / mid / last, on the activations the bf16 model really feeds it:
           output cosine of each kernel vs its own fake-quant reference (kernel error alone) and of the
           fake-quant reference vs the dense layer (quantization error alone).

If the kernels match their fake-quant references per layer (cosine ~1) and the model-level fake-quant
cosine is as low as the kernel's, the kernels are right and the drop is the quantization error of
random N(0, 0.02) weights amplified through 32 layers. Prints a table; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.gpu_speed import LLAMA3_8B, TINY, build_hf_model, random_prompts  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cos(a: torch.Tensor, b: torch.Tensor) -> dict:
    c = torch.nn.functional.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]), dim=-1)
    return {"mean": round(c.mean().item(), 6), "min": round(c.min().item(), 6)}


def decoder_linears(hf):
    for i, layer in enumerate(hf.model.layers):
        for part in (layer.self_attn, layer.mlp):
            for name, child in list(part.named_children()):
                if isinstance(child, torch.nn.Linear) and name in LINEARS:
                    yield i, part, name, child


class FakeFp8(torch.nn.Module):
    """Fp8Linear's arithmetic with an exact GEMM: e4m3 weights (per channel) and activations (per
    token), dequantized, matmul in fp32, cast to the input dtype."""

    def __init__(self, dense: torch.nn.Linear):
        super().__init__()
        from engine.quant.fp8 import quantize_per_channel
        q, s = quantize_per_channel(dense.weight.data)
        self.w = (q.float() * s)
        self.bias = dense.bias

    def forward(self, x):
        from engine.quant.fp8 import quantize_per_token
        rows = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_per_token(rows)
        y = (xq.float() * xs) @ self.w.t()
        y = y if self.bias is None else y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class DenseF32(torch.nn.Module):
    """A plain Linear in fp32 over given (dequantized) weights."""

    def __init__(self, w: torch.Tensor, bias):
        super().__init__()
        self.w, self.bias = w.float(), bias

    def forward(self, x):
        y = x.float() @ self.w.t()
        y = y if self.bias is None else y + self.bias.float()
        return y.to(x.dtype)


def make_int4(dense: torch.nn.Linear, tensors: dict, prefix: str, group: int, dtype):
    from engine.quant.config import QuantConfig
    from engine.quant.int4 import Int4Linear
    layer = Int4Linear(dense.in_features, dense.out_features, QuantConfig("awq", "awq", group_size=group), dtype,
                       dense.weight.device)
    for suffix in ("qweight", "qzeros", "scales"):
        getattr(layer, suffix).weight_loader(tensors[f"{prefix}.{suffix}"], 0, None)
    layer.finalize()
    return layer


@torch.inference_mode()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--group", type=int, default=None)
    args = p.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape = TINY if args.tiny else LLAMA3_8B
    group = args.group or (32 if args.tiny else 128)
    t0 = time.perf_counter()
    import engine.quant.fp8 as fp8mod
    from engine.quant.packers import awq_tensors

    hf = build_hf_model(shape, device, torch.bfloat16, seed=0)
    hf32 = copy.deepcopy(hf).float()
    ids = torch.tensor(random_prompts(2 if args.tiny else 4, 16 if args.tiny else 64, shape["vocab_size"], 7), device=device)
    ref = hf32(ids).logits.float()
    log(f"models built, fp32 reference done ({time.perf_counter() - t0:.0f} s)")
    state = {f"model.layers.{i}.{'self_attn' if name in LINEARS[:4] else 'mlp'}.{name}.weight": child.weight.data
             for i, _, name, child in decoder_linears(hf)}
    awq, awq_ref = awq_tensors(state, group, reference=True)
    log(f"awq tensors packed ({time.perf_counter() - t0:.0f} s)")

    originals = list(decoder_linears(hf))

    def prefix(i, name):
        return f"model.layers.{i}.{'self_attn' if name in LINEARS[:4] else 'mlp'}.{name}"

    def swap(make):
        for i, part, name, child in originals:
            setattr(part, name, make(i, name, child))

    def restore():
        for i, part, name, child in originals:
            setattr(part, name, child)

    def logits(make) -> torch.Tensor:
        swap(make)
        try:
            return hf(ids).logits.float()
        finally:
            restore()

    variants = {}
    variants["bf16"] = hf(ids).logits.float()
    variants["fp8 kernel (fast accum)"] = logits(lambda i, n, c: fp8mod.Fp8Linear.from_dense(c))
    if device == "cuda":
        real_gemm = fp8mod.fp8_gemm

        def exact_accum(xq, x_scale, wq, w_scale, bias, out_dtype):
            y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale.contiguous(), scale_b=w_scale.t().contiguous(),
                                 out_dtype=torch.bfloat16, use_fast_accum=False)
            y = y if out_dtype == torch.bfloat16 else y.to(out_dtype)
            return y if bias is None else y + bias
        fp8mod.fp8_gemm = exact_accum
        try:
            variants["fp8 kernel (exact accum)"] = logits(lambda i, n, c: fp8mod.Fp8Linear.from_dense(c))
        finally:
            fp8mod.fp8_gemm = real_gemm
    variants["fp8 fake-quant (fp32 GEMM)"] = logits(lambda i, n, c: FakeFp8(c))
    variants["awq kernel (W4A16)"] = logits(lambda i, n, c: make_int4(c, awq, prefix(i, n), group, torch.bfloat16))
    variants["awq fake-quant (fp32 GEMM)"] = logits(lambda i, n, c: DenseF32(awq_ref[prefix(i, n) + ".weight"], c.bias))
    # Depth: the same comparison when only the first layer is quantized.
    first = {(0, n) for n in LINEARS}
    variants["awq fake-quant, layer 0 only"] = logits(
        lambda i, n, c: DenseF32(awq_ref[prefix(i, n) + ".weight"], c.bias) if (i, n) in first else c)
    variants["fp8 fake-quant, layer 0 only"] = logits(lambda i, n, c: FakeFp8(c) if (i, n) in first else c)
    model_rows = {k: {"vs_fp32": cos(v, ref), "vs_bf16": cos(v, variants["bf16"])} for k, v in variants.items()}
    log(f"model-level cosines done ({time.perf_counter() - t0:.0f} s)")

    # Per layer, on real activations.
    n_layers = shape["num_hidden_layers"]
    watch = sorted({0, n_layers // 2, n_layers - 1})
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [child.register_forward_hook(lambda m, a, o, key=(i, name): inputs.__setitem__(key, a[0].detach()))
             for i, _, name, child in originals if i in watch]
    hf(ids)
    for h in hooks:
        h.remove()
    layer_rows = []
    for (i, name), x in sorted(inputs.items()):
        dense = dict(((li, n), c) for li, _, n, c in originals)[(i, name)]
        y = dense(x)
        fk, fr = fp8mod.Fp8Linear.from_dense(dense)(x), FakeFp8(dense)(x)
        ak = make_int4(dense, awq, prefix(i, name), group, torch.bfloat16)(x)
        ar = DenseF32(awq_ref[prefix(i, name) + ".weight"], dense.bias)(x)
        layer_rows.append({"layer": i, "linear": name, "K": dense.in_features, "N": dense.out_features,
                           "fp8_kernel_vs_fake": cos(fk, fr)["min"], "fp8_fake_vs_dense": cos(fr, y)["min"],
                           "awq_kernel_vs_fake": cos(ak, ar)["min"], "awq_fake_vs_dense": cos(ar, y)["min"]})

    print("\nmodel-level logits cosine (mean / min over positions)")
    print(f"| variant | vs fp32 | vs bf16 |\n|---|---:|---:|")
    for k, r in model_rows.items():
        print(f"| {k} | {r['vs_fp32']['mean']:.4f} / {r['vs_fp32']['min']:.4f} | "
              f"{r['vs_bf16']['mean']:.4f} / {r['vs_bf16']['min']:.4f} |")
    print("\nper-linear output cosine (min over rows) on the bf16 model's activations")
    print("| layer | linear | K | N | fp8 kernel vs fake | fp8 fake vs dense | awq kernel vs fake | awq fake vs dense |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in layer_rows:
        print(f"| {r['layer']} | {r['linear']} | {r['K']} | {r['N']} | {r['fp8_kernel_vs_fake']:.5f} | "
              f"{r['fp8_fake_vs_dense']:.5f} | {r['awq_kernel_vs_fake']:.5f} | {r['awq_fake_vs_dense']:.5f} |")
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "torch": torch.__version__, "group": group,
           "model": model_rows, "layers": layer_rows}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"done ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
