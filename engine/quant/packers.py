"""Build quantized checkpoints from dense weights by each format's rules (for tests and benches):
AWQ gemm, GPTQ v1 (desc_act false / true, sym or not), fp8 in the compressed-tensors and
fbgemm_fp8 layouts. Each writer returns the dequantized weights the checkpoint encodes (what a
correct loader must reproduce), keyed by HF parameter name.
"""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import save_file

from engine.quant.fp8 import quantize_per_channel
from engine.quant.int4 import AWQ_ORDER, pack_cols, pack_rows

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Layers that read the same input (GPTQ's act order is a property of the input: they share g_idx).
_INPUT_SITE = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}


def quantize_int4(w: torch.Tensor, group_of: torch.Tensor, groups: int, *, sym: bool,
                  zero_min: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of w [N, K] with input k in group `group_of[k]`.
    Returns q [N, K] (0..15), scales [G, N] fp32, zeros [G, N] int (8 when sym, else in
    zero_min..15); w ~= (q - zeros[g]) * scales[g]."""
    w = w.float()
    N = w.shape[0]
    scales = torch.empty(groups, N, device=w.device)
    zeros = torch.empty(groups, N, dtype=torch.int64, device=w.device)
    for g in range(groups):
        cols = w[:, group_of == g]
        if sym:
            s = (2 * cols.abs().amax(1) / 15).clamp_min(1e-8)
            z = torch.full((N,), 8, dtype=torch.int64, device=w.device)
        else:
            lo, hi = cols.amin(1).clamp_max(0), cols.amax(1).clamp_min(0)
            s = ((hi - lo) / 15).clamp_min(1e-8)
            z = torch.round(-lo / s).to(torch.int64).clamp(zero_min, 15)
        scales[g], zeros[g] = s, z
    q = torch.round(w / scales[group_of].t()) + zeros[group_of].t()
    return q.clamp(0, 15).to(torch.int64), scales, zeros


def dequantize_int4(q, scales, zeros, group_of) -> torch.Tensor:
    """[N, K] fp32 from quantize_int4's output."""
    return (q - zeros[group_of].t()).float() * scales[group_of].t()


def _layer_weights(state: dict[str, torch.Tensor]):
    for name, w in state.items():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in LINEARS:
            yield name, parts[-2], w


def awq_tensors(state: dict[str, torch.Tensor], group_size: int, dtype=torch.float16, reference: bool = True):
    """(checkpoint tensors, dequantized weights or {} without `reference`) of an AWQ gemm checkpoint."""
    out, ref = {}, {}
    for name, proj, w in _layer_weights(state):
        K = w.shape[1]
        group_of = torch.arange(K, device=w.device) // group_size
        q, scales, zeros = quantize_int4(w, group_of, K // group_size, sym=False)
        scales = scales.to(dtype)
        if reference:
            ref[name] = dequantize_int4(q, scales.float(), zeros, group_of)
        prefix = name.removesuffix(".weight")
        out[f"{prefix}.qweight"] = pack_cols(q.t(), AWQ_ORDER)  # [K, N // 8]
        out[f"{prefix}.qzeros"] = pack_cols(zeros, AWQ_ORDER)  # [G, N // 8]
        out[f"{prefix}.scales"] = scales
    return out, ref


def gptq_tensors(state: dict[str, torch.Tensor], group_size: int, *, desc_act: bool, sym: bool,
                 dtype=torch.float16, seed: int = 0):
    """(checkpoint tensors, dequantized weights) of a GPTQ v1 checkpoint. desc_act: each input
    site gets a random activation order; g_idx[k] = (k's position in it) // group_size."""
    gen = torch.Generator().manual_seed(seed)
    orders: dict[tuple[str, str], torch.Tensor] = {}
    out, ref = {}, {}
    for name, proj, w in _layer_weights(state):
        K = w.shape[1]
        gs = K if group_size == -1 else group_size
        groups = -(-K // gs)
        site = (name.rsplit(".", 3)[0], _INPUT_SITE[proj])
        if desc_act and site not in orders:
            orders[site] = torch.randperm(K, generator=gen)
        position = torch.empty(K, dtype=torch.int64)
        order = orders.get(site, torch.arange(K))
        position[order] = torch.arange(K)
        group_of = position // gs
        # v1 stores zeros - 1 in 4 bits, so a zero point of 0 cannot be written: keep zeros >= 1.
        q, scales, zeros = quantize_int4(w, group_of, groups, sym=sym, zero_min=1)
        scales = scales.to(dtype)
        ref[name] = dequantize_int4(q, scales.float(), zeros, group_of)
        prefix = name.removesuffix(".weight")
        out[f"{prefix}.qweight"] = pack_rows(q.t())  # [K // 8, N]
        out[f"{prefix}.qzeros"] = pack_cols(zeros - 1)  # [G, N // 8]
        out[f"{prefix}.scales"] = scales
        out[f"{prefix}.g_idx"] = group_of.to(torch.int32)
        out[f"{prefix}.bias"] = torch.zeros(w.shape[0], dtype=dtype)  # as AutoGPTQ writes them
    return out, ref


def fp8_tensors(state: dict[str, torch.Tensor], *, strategy: str = "channel", input_scale: float | None = None):
    """(checkpoint tensors, dequantized weights) of an fp8 checkpoint (compressed-tensors /
    fbgemm names): weight e4m3 + weight_scale [N, 1] (channel) or [1] (tensor) (+ input_scale)."""
    out, ref = {}, {}
    for name, proj, w in _layer_weights(state):
        if strategy == "channel":
            q, scale = quantize_per_channel(w)
        else:
            scale = (w.float().abs().amax() / torch.finfo(torch.float8_e4m3fn).max).reshape(1)
            q = (w.float() / scale).to(torch.float8_e4m3fn)
        ref[name] = q.float() * (scale if strategy == "channel" else scale.reshape(1, 1))
        prefix = name.removesuffix(".weight")
        out[f"{prefix}.weight"] = q
        out[f"{prefix}.weight_scale"] = scale
        if input_scale is not None:
            out[f"{prefix}.input_scale"] = torch.tensor([input_scale])
    return out, ref


def quantization_config(method: str, **kw) -> dict:
    """The `quantization_config` a hub checkpoint of `method` carries."""
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": kw["group_size"], "zero_point": True, "version": "gemm"}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": kw["group_size"], "desc_act": kw["desc_act"],
                "sym": kw["sym"], "checkpoint_format": "gptq"}
    if method == "fbgemm_fp8":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    if method == "compressed-tensors":
        static = kw.get("static", False)
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": kw.get("strategy", "channel"),
                                "dynamic": False, "symmetric": True},
                    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                          "strategy": "tensor" if static else "token", "dynamic": not static}}}}
    raise ValueError(f"no quantization_config for {method!r}")


def write_checkpoint(src: pathlib.Path, dst: pathlib.Path, method: str, **kw) -> dict[str, torch.Tensor]:
    """Quantizes the HF model directory `src` (one model.safetensors) into `dst`, which gets the
    same config (plus quantization_config), tokenizer and generation config. Returns the
    dequantized weights, by HF name."""
    from safetensors.torch import load_file

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = load_file(src / "model.safetensors")
    if method == "awq":
        quantized, ref = awq_tensors(state, kw["group_size"])
    elif method == "gptq":
        quantized, ref = gptq_tensors(state, kw["group_size"], desc_act=kw["desc_act"], sym=kw["sym"])
    else:
        quantized, ref = fp8_tensors(state, strategy=kw.get("strategy", "channel"), input_scale=kw.get("input_scale"))
        kw.setdefault("static", kw.get("input_scale") is not None)
    tensors = {k: v.contiguous() for k, v in state.items() if k not in ref} | quantized
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(method, **kw)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return ref
