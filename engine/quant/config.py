"""Which quantization a model runs with: `--quantization` (vLLM's names) resolved against the
checkpoint's `quantization_config`.

    fp8   e4m3 weights with per-output-channel scales, per-token dynamic activation scales;
          quantized at load from a bf16/fp16/fp32 checkpoint, or read pre-quantized from the
          compressed-tensors or fbgemm_fp8 layouts.
    awq   4-bit, AutoAWQ "gemm" packing (qweight/qzeros/scales), zero points.
    gptq  4-bit, AutoGPTQ v1 packing (qweight/qzeros/scales/g_idx), desc_act false or true.
    gguf  a .gguf checkpoint's quantized tensors kept packed (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
    none  run dense: a .gguf's tensors dequantized at load (the default on CUDA, on CPUs without
          native bf16 and under tensor parallelism).

Unset (None), a .gguf checkpoint is kept packed where `gguf_packed_by_default` says so: on CPU
when the model runs in bf16 (the packed layers' CPU kernels take bf16 activations; with fp32 ones
torch's int4 kernel has no fast path), one rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Method = Literal["fp8", "awq", "gptq", "gguf"]
METHODS = ("fp8", "awq", "gptq", "gguf")
# How the weights are stored in the checkpoint.
Layout = Literal["dense", "compressed-tensors", "fbgemm_fp8", "fp8", "awq", "gptq", "gguf"]


@dataclass(frozen=True)
class QuantConfig:
    method: Method
    layout: Layout
    bits: int = 4
    group_size: int = 128  # input features per scale (awq / gptq); -1 = the whole row
    desc_act: bool = False  # gptq: g_idx is an activation-order permutation, not k // group_size
    sym: bool = True  # gptq: zero point fixed at 2**(bits-1)
    static_input_scale: bool = False  # fp8: one activation scale per layer from the checkpoint
    activation_scale_ub: float | None = None  # fp8 (fbgemm): upper bound of a token's scale * 448
    ignore: tuple[str, ...] = ()  # module names (HF names) left unquantized by the checkpoint

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in ("awq", "gptq"):
            if self.bits != 4:
                raise ValueError(f"{self.method}: only 4-bit weights are supported, the checkpoint has {self.bits}")
            if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
                raise ValueError(f"{self.method}: group_size must be -1 or a multiple of 8, got {self.group_size}")

    @property
    def pre_quantized(self) -> bool:
        """The checkpoint already holds the quantized tensors (else: quantize at load)."""
        return self.layout != "dense"

    def is_ignored(self, hf_module: str) -> bool:
        name = hf_module.removeprefix("model.")
        return any(name == i.removeprefix("model.") or name.endswith("." + i) for i in self.ignore)


def gguf_packed_by_default(device_type: str, dtype, tp_size: int = 1) -> bool:
    """Whether a .gguf checkpoint stays packed when --quantization is not given."""
    import torch

    return device_type == "cpu" and dtype == torch.bfloat16 and tp_size == 1


def resolve(requested: str | None, hf_config, *, is_gguf: bool = False,
            gguf_packed: bool = False) -> QuantConfig | None:
    """`requested` (the --quantization flag, None = as the checkpoint says) against the checkpoint's
    `quantization_config`. None: run unquantized. `gguf_packed`: what None means for a .gguf
    checkpoint (`gguf_packed_by_default`)."""
    found = checkpoint_quant_config(hf_config)
    if requested is not None and requested not in METHODS + ("none",):
        raise ValueError(f"unknown quantization {requested!r}; choose one of {', '.join(METHODS + ('none',))}")
    if requested == "none":
        if found is not None:
            raise ValueError(f"--quantization none: the checkpoint is quantized ({found.method}, {found.layout}) "
                             "and cannot run dense; leave --quantization unset")
        return None
    if requested == "gguf" and not is_gguf:
        raise ValueError("--quantization gguf needs a .gguf checkpoint")
    if requested == "gguf" or (requested is None and is_gguf and gguf_packed):
        return QuantConfig("gguf", "gguf")
    if found is None:
        if requested in ("awq", "gptq"):
            raise ValueError(f"--quantization {requested} needs a checkpoint quantized with {requested} "
                             "(its config.json has no quantization_config)")
        return None if requested is None else QuantConfig("fp8", "dense")
    if requested is not None and requested != found.method:
        raise ValueError(f"--quantization {requested} does not match the checkpoint, which is "
                         f"{found.method} ({found.layout})")
    return found


def checkpoint_quant_config(hf_config) -> QuantConfig | None:
    """QuantConfig from a config's `quantization_config` (HF hub conventions); None when absent."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = str(qc.get("quant_method", "")).lower()
    parse = _PARSERS.get(method)
    if parse is None:
        raise ValueError(f"unsupported checkpoint quantization {method!r}; supported: "
                         f"{', '.join(_PARSERS)}")
    return parse(qc)


def _awq(qc: dict) -> QuantConfig:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq: only the 'gemm' packing is supported, the checkpoint uses {version!r}")
    if not qc.get("zero_point", True):
        raise ValueError("awq: checkpoints without zero points are not supported")
    return QuantConfig("awq", "awq", bits=int(qc.get("bits", qc.get("w_bit", 4))),
                       group_size=int(qc.get("group_size", qc.get("q_group_size", 128))),
                       ignore=tuple(qc.get("modules_to_not_convert") or ()))


def _gptq(qc: dict) -> QuantConfig:
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt != "gptq":
        raise ValueError(f"gptq: only checkpoint_format 'gptq' (v1 zero points) is supported, got {fmt!r}")
    return QuantConfig("gptq", "gptq", bits=int(qc.get("bits", 4)), group_size=int(qc.get("group_size", 128)),
                       desc_act=bool(qc.get("desc_act", False)), sym=bool(qc.get("sym", True)))


def _fbgemm_fp8(qc: dict) -> QuantConfig:
    ub = qc.get("activation_scale_ub")
    return QuantConfig("fp8", "fbgemm_fp8", activation_scale_ub=None if ub is None else float(ub),
                       ignore=tuple(qc.get("modules_to_not_convert") or ()))


def _compressed_tensors(qc: dict) -> QuantConfig:
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: expected one config group, found {len(groups)}")
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
        raise ValueError(f"compressed-tensors: only fp8 weights (type float, 8 bits) are supported, got {weights}")
    if weights.get("strategy") not in ("channel", "tensor"):
        raise ValueError(f"compressed-tensors: weight strategy {weights.get('strategy')!r} is not supported "
                         "(channel or tensor)")
    if not acts or acts.get("type") != "float" or int(acts.get("num_bits", 0)) != 8:
        raise ValueError("compressed-tensors: only fp8 activations (w8a8) are supported")
    static = not acts.get("dynamic", True)
    if static and acts.get("strategy") != "tensor":
        raise ValueError(f"compressed-tensors: static activation strategy {acts.get('strategy')!r} "
                         "is not supported (tensor)")
    if not static and acts.get("strategy", "token") != "token":
        raise ValueError(f"compressed-tensors: dynamic activation strategy {acts.get('strategy')!r} "
                         "is not supported (token)")
    return QuantConfig("fp8", "compressed-tensors", static_input_scale=static, ignore=tuple(qc.get("ignore") or ()))


def _fp8(qc: dict) -> QuantConfig:
    if qc.get("weight_block_size"):
        raise ValueError("fp8: block-wise weight scales (weight_block_size) are not supported")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("fp8: only activation_scheme 'dynamic' is supported for quant_method fp8")
    return QuantConfig("fp8", "fp8", ignore=tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()))


_PARSERS = {"awq": _awq, "gptq": _gptq, "fbgemm_fp8": _fbgemm_fp8, "compressed-tensors": _compressed_tensors,
            "fp8": _fp8}
