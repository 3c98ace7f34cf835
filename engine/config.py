"""Engine configuration: small frozen dataclasses validated at construction.

`EngineArgs` is what users pass (vLLM's names); `EngineConfig.create()` resolves it against the
model and the device into the frozen pieces each component takes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

# The torch-free part (what users configure) lives in engine.args; re-exported here.
from engine.args import (DTYPE_CHOICES, KV_CACHE_DTYPES, KV_TRANSPORT_NAMES, QUANTIZATIONS, ROLES,  # noqa: F401
                         WARMUP_MODES, CacheConfig, EngineArgs, Flag, NodeArgs, Role, SchedulerConfig, flag,
                         not_a_flag, optional_int)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# CPU flags (/proc/cpuinfo) of native bf16 arithmetic: AVX-512 BF16 (dot products in bf16) and AMX
# (bf16 tiles). Without them torch emulates bf16 through fp32 conversions, slower than fp32 itself.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_AUTO_DTYPE_ENV = "PDSERVE_CPU_AUTO_DTYPE"  # float32 | bfloat16: what auto means on CPU, no detection
_logged_auto: set[str] = set()


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags of this CPU (`cpuinfo`: /proc/cpuinfo's text; read when None; no
    file, as off Linux: none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def cpu_auto_dtype(cpuinfo: str | None = None, env: dict | None = None) -> tuple[torch.dtype, str]:
    """What 'auto' is on CPU, and why: bf16 where the processor has native bf16, else fp32;
    `PDSERVE_CPU_AUTO_DTYPE` (float32 | bfloat16) overrides the detection."""
    import os

    env = os.environ if env is None else env
    forced = env.get(CPU_AUTO_DTYPE_ENV, "").strip().lower()
    if forced:
        if forced not in ("float32", "fp32", "bfloat16", "bf16"):
            raise ValueError(f"{CPU_AUTO_DTYPE_ENV}={forced!r}: choose float32 or bfloat16")
        return _DTYPES[forced], f"{CPU_AUTO_DTYPE_ENV}={forced}"
    found = cpu_bf16_flags(cpuinfo)
    if found:
        return torch.bfloat16, f"native bf16 on this CPU ({', '.join(found)})"
    return torch.float32, f"no native bf16 on this CPU (none of {', '.join(CPU_BF16_FLAGS)})"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA; on CPU bf16 where the processor has native bf16 (AVX-512 BF16 or
    AMX), else fp32 (`cpu_auto_dtype`). The choice on CPU is logged once."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        chosen, why = cpu_auto_dtype()
        name = str(chosen).removeprefix("torch.")
        if name not in _logged_auto:
            _logged_auto.add(name)
            logging.getLogger("pdserve.engine").info("dtype auto on CPU: %s (%s)", name, why)
        return chosen
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's storage dtype: 'auto' -> the model dtype, 'fp8' -> float8 e4m3 (e4m3fn:
    finite, +-448). On CUDA fp8 needs compute capability 8.9+ (Ada, Hopper), where Triton
    converts e4m3 in registers; the CPU (torch) path takes it anywhere."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype != "fp8":
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"this one is {major}.{minor}: use --kv-cache-dtype auto")
    return torch.float8_e4m3fn


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module: "bfloat16", "float8_e4m3fn"."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ResolvedConfig:
    """What one engine's `EngineArgs` came to on its model and device, built once by `LLMEngine`
    (`engine.resolved`) once the KV cache is sized: what the node reports (registration, KV layout)
    rather than deriving it again."""

    device: torch.device
    dtype: torch.dtype  # weights and activations ("auto" resolved)
    kv_dtype: torch.dtype  # the KV cache's storage: dtype, or float8_e4m3fn under --kv-cache-dtype fp8
    max_model_len: int  # prompt + output tokens
    max_num_batched_tokens: int  # the token budget of one step
    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks, the null block 0 included

    def __post_init__(self):
        if self.max_model_len < 2 or self.max_num_batched_tokens < 1 or self.num_blocks < 2:
            raise ValueError(f"unusable resolved config: {self}")

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def kv_dtype_name(self) -> str:
        return dtype_name(self.kv_dtype)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that the cache and runner need."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem
