"""Engine configuration: small frozen dataclasses validated at construction.

`EngineArgs` is what users pass (vLLM's names); `EngineConfig.create()` resolves it against the
model and the device into the frozen pieces each component takes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

Role = Literal["both", "prefill", "decode"]
ROLES = ("both", "prefill", "decode")
QUANTIZATIONS = (None, "fp8", "awq", "gptq", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8")
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


@dataclass(frozen=True)
class EngineArgs:
    """User-facing engine options (names as in vLLM)."""

    model: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None  # explicit KV block count (tests, or to override profiling)
    cpu_kv_cache_gb: float = 1.0  # KV cache size on CPU when num_gpu_blocks is not given
    role: Role = "both"
    attention_backend: str | None = None  # "torch" | "triton"; None = by device
    enforce_eager: bool = False  # CUDA: never capture / replay CUDA graphs
    # Schedule step N+1 while step N runs on the device. None = on for CUDA (where it pays);
    # True also on CPU (same logic, no overlap: for tests). Never for the prefill role.
    async_scheduling: bool | None = None
    seed: int = 0
    served_model_name: str | None = None
    # Ranks the model is split across (Megatron-style): one process per rank, rank 0 schedules.
    tensor_parallel_size: int = 1
    # Weight quantization (vLLM's names): fp8 | awq | gptq | gguf; None = as the checkpoint says.
    quantization: str | None = None
    # auto = the model dtype; fp8 = float8 e4m3 with one static scale for K and one for V (1.0, as
    # vLLM's default without checkpoint scales), writes saturate at +-448 (docs/PERFORMANCE.md).
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if not 1 <= self.max_num_seqs <= 4096:
            raise ValueError(f"max_num_seqs must be in [1, 4096], got {self.max_num_seqs}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in [0.05, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be >= 2 (block 0 is reserved), got {self.num_gpu_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(map(str, QUANTIZATIONS))}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int  # including the null block 0
    enable_prefix_caching: bool


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled")


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
