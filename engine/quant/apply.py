"""The hook between a built model and its quantized weights.

`load_weights(model, weights, quant)` replaces `model.load_weights(weights)`:
1. pre-quantized checkpoints: every linear layer (not the LM head) becomes a layer whose
   parameters have the checkpoint's names and shapes (qweight / scales / ..., or an fp8 weight and
   its scales), each placing its own tensors (`weight_loader`, see params.py);
2. the model's own `load_weights` streams the checkpoint in (fused parts land side by side);
3. `finalize()` converts what was read into the kernels' layout; `--quantization fp8` on a
   dense checkpoint quantizes each loaded layer here instead.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from engine.quant.config import QuantConfig, resolve
from engine.quant.fp8 import Fp8Linear, check_fp8_device
from engine.quant.gguf import GGUFEmbedding, GGUFLinear
from engine.quant.int4 import Int4Linear

# Our fused layers and the checkpoint layers they hold (as engine/models/llama.py fuses them).
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def resolve_quant_config(requested: str | None, source, gguf_packed: bool = False) -> QuantConfig | None:
    """The quantization to run `source` (a ModelSource) with; `requested` is --quantization;
    `gguf_packed`: keep a .gguf checkpoint packed when it is unset (`gguf_packed_by_default`)."""
    return resolve(requested, source.config, is_gguf=getattr(source, "packed_weights", None) is not None,
                   gguf_packed=gguf_packed)


def load_checkpoint(model: nn.Module, source, quant: QuantConfig | None) -> None:
    """Streams `source`'s weights into `model`, quantized as `quant` says (None: as stored)."""
    if quant is not None and quant.method == "gguf":
        load_weights(model, source.packed_weights(), quant)
    else:
        load_weights(model, source.iter_weights(model.weight_slice), quant)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], quant: QuantConfig | None) -> None:
    if quant is None:
        model.load_weights(weights)
        return
    if getattr(model, "tp", None) is not None:
        raise ValueError(f"--quantization {quant.method} with tensor parallelism is not supported yet")
    device = next(model.parameters()).device
    if quant.method == "fp8":
        check_fp8_device(device)
    if quant.method == "gguf":
        _prepare_gguf(model)
    elif quant.pre_quantized:
        for parent, attr, layer, hf_names in quantizable_linears(model, quant):
            setattr(parent, attr, _checkpoint_layer(model, attr, layer, quant, device))
        weights = _drop_zero_biases(model, weights)
    model.load_weights(weights)
    finalize(model, quant)


def finalize(model: nn.Module, quant: QuantConfig) -> None:
    if quant.method == "gguf":
        _finalize_gguf(model)
        return
    for parent, attr, layer, _ in quantizable_linears(model, quant):
        if isinstance(layer, Int4Linear):
            layer.finalize()
        elif quant.method == "fp8" and not quant.pre_quantized:
            setattr(parent, attr, Fp8Linear.from_dense(layer))


def quantizable_linears(model: nn.Module, quant: QuantConfig) -> Iterator[tuple[nn.Module, str, nn.Module, list[str]]]:
    """(parent, attribute, layer, HF names of its checkpoint parts) of every linear layer in the
    decoder layers that the checkpoint does not leave unquantized."""
    for name, parent in list(model.named_modules()):
        if not name.startswith("layers."):
            continue
        for attr, layer in list(parent.named_children()):
            if not isinstance(layer, (nn.Linear, Int4Linear, Fp8Linear, GGUFLinear)):
                continue
            hf_names = [f"model.{name}.{part}" for part in FUSED_PARTS.get(attr, (attr,))]
            ignored = [quant.is_ignored(n) for n in hf_names]
            if all(ignored):
                continue
            if any(ignored):
                raise ValueError(f"the checkpoint leaves only some of {hf_names} unquantized; fused layers "
                                 "need all their parts quantized or none")
            yield parent, attr, layer, hf_names


def _checkpoint_layer(model: nn.Module, attr: str, layer: nn.Linear, quant: QuantConfig, device) -> nn.Module:
    parts = model._fused_sizes(attr) if attr in FUSED_PARTS else [layer.out_features]
    if quant.method == "fp8":
        return Fp8Linear(layer.in_features, layer.out_features, parts, bias=layer.bias,
                         static_input_scale=quant.static_input_scale, scale_ub=quant.activation_scale_ub,
                         device=device)
    return Int4Linear(layer.in_features, layer.out_features, quant, layer.weight.dtype, device, bias=layer.bias)


def _drop_zero_biases(model: nn.Module, weights) -> Iterator[tuple[str, torch.Tensor]]:
    """GPTQ exporters write an all-zero `.bias` for every layer; a layer without bias skips it."""
    modules = dict(model.named_modules())
    fused_of = {part: fused for fused, parts in FUSED_PARTS.items() for part in parts}
    for name, tensor in weights:
        if name.endswith(".bias"):
            path = name.removeprefix("model.").rsplit(".", 1)[0].split(".")
            path[-1] = fused_of.get(path[-1], path[-1])
            layer = modules.get(".".join(path))
            if layer is not None and getattr(layer, "bias", None) is None and not tensor.any():
                continue
        yield name, tensor


def _prepare_gguf(model: nn.Module) -> None:
    """Every linear layer, the embedding and the LM head take the gguf tensors as stored."""
    for parent, attr, layer, _ in quantizable_linears(model, QuantConfig("gguf", "gguf")):
        setattr(parent, attr, GGUFLinear(layer.in_features, layer.out_features, bias=layer.bias))
    rows, dim = model.embed_tokens.weight.shape
    model.embed_tokens = GGUFEmbedding(rows, dim, model.embed_tokens.weight.dtype)
    if model.lm_head is not None:
        model.lm_head = GGUFLinear(model.lm_head.in_features, model.lm_head.out_features)


def _finalize_gguf(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, GGUFLinear):
            layer.finalize()
    model.packed_head = model.embed_tokens.logits if model.lm_head is None else model.lm_head
