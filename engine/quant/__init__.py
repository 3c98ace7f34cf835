"""Quantized weights: configs resolved from --quantization and the checkpoint's
`quantization_config`, fp8 / awq / gptq / gguf linear layers, and the loading hook."""
from engine.quant.apply import load_checkpoint, load_weights, resolve_quant_config
from engine.quant.config import QuantConfig, checkpoint_quant_config

__all__ = ["QuantConfig", "checkpoint_quant_config", "load_checkpoint", "load_weights", "resolve_quant_config"]
