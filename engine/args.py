"""What users configure, torch-free: `EngineArgs` (vLLM's names) and `NodeArgs`, each field
declaring its CLI flag (help, type, choices, env twin), and the small frozen configs the scheduler
takes. The router and the gateway import this without torch; `engine.config` resolves these
against the device and the model (and re-exports every name here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

Role = Literal["both", "prefill", "decode"]
ROLES = ("both", "prefill", "decode")
QUANTIZATIONS = (None, "none", "fp8", "awq", "gptq", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8")


def optional_int(text: str) -> int | None:
    """A flag's integer that may be left to the engine: '', 'none' and 'auto' mean None."""
    return None if text.lower() in ("", "none", "auto") else int(text)


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line: `--<field-name>` with env twin
    `PDSERVE_<FIELD_NAME>` (engine/cli_args.py builds the parser and the forwarded argv from these)."""

    help: str
    type: Callable[[str], object] | None = None  # None: the text itself (or a boolean flag)
    choices: tuple | None = None
    negatable: bool = False  # boolean: --x / --no-x (argparse.BooleanOptionalAction); else --x alone


def flag(help: str, **kwargs) -> dict:
    """A dataclass field's metadata: its command-line flag."""
    return {"flag": Flag(help, **kwargs)}


def not_a_flag(why: str) -> dict:
    """A dataclass field's metadata: no command-line flag, and why."""
    return {"flag": None, "why": why}


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineArgs:
    """User-facing engine options (names as in vLLM). Each field's metadata declares its flag
    (help, type, choices): the CLI, the env twins and `pdserve serve`'s forwarding derive from it."""

    model: str | None = field(default=None, metadata=flag(
        "HF repo id, local HF directory or .gguf file (default: the bundled small model)"))
    served_model_name: str | None = field(default=None, metadata=flag("model name reported to clients"))
    dtype: str = field(default="auto", metadata=flag(
        "weights and KV cache dtype; auto = bfloat16 on CUDA; on CPU bfloat16 where the processor has native "
        "bf16 (avx512_bf16 or amx_bf16), else float32", choices=DTYPE_CHOICES))
    device: str | None = field(default="auto", metadata=flag(  # None means auto too
        "device to run on (default: cuda when available)", choices=("auto", "cpu", "cuda")))
    max_model_len: int | None = field(default=None, metadata=flag(
        "context length (prompt + output tokens); default: the model's", type=optional_int))
    gpu_memory_utilization: float = field(default=0.9, metadata=flag(
        "fraction of GPU memory the process may use (weights + KV cache)", type=float))
    cpu_kv_cache_gb: float = field(default=1.0, metadata=flag(  # when num_gpu_blocks is not given
        "KV cache size on CPU, in GiB (ignored on CUDA or with --num-gpu-blocks)", type=float))
    max_num_seqs: int = field(default=256, metadata=flag("most sequences in one batch", type=int))
    max_num_batched_tokens: int | None = field(default=None, metadata=flag(
        "most tokens in one step (chunked prefill budget)", type=optional_int))
    block_size: int = field(default=16, metadata=flag(
        "tokens per KV cache block", type=int, choices=(8, 16, 32, 64, 128)))
    enable_prefix_caching: bool = field(default=True, metadata=flag(
        "reuse KV blocks of shared prompt prefixes", negatable=True))
    num_gpu_blocks: int | None = field(default=None, metadata=flag(  # tests, or to override profiling
        "explicit number of KV blocks (overrides memory profiling)", type=optional_int))
    enforce_eager: bool = field(default=False, metadata=flag(  # CUDA: never capture / replay CUDA graphs
        "CUDA: never capture CUDA graphs for decode steps (slower; for debugging)"))
    # Schedule step N+1 while step N runs on the device. None = on for CUDA (where it pays);
    # True also on CPU (same logic, no overlap: for tests). Never for the prefill role.
    async_scheduling: bool | None = field(default=None, metadata=flag(
        "schedule step N+1 while step N runs (default: on with CUDA)", negatable=True))
    seed: int = field(default=0, metadata=flag("random seed of the engine", type=int))
    # Ranks the model is split across (Megatron-style): one process per rank, rank 0 schedules.
    tensor_parallel_size: int = field(default=1, metadata=flag(
        "split the model across this many ranks (one process per rank; CUDA: one GPU each)", type=int))
    # Weight quantization (vLLM's names): fp8 | awq | gptq | gguf | none; None = as the checkpoint
    # says (a .gguf: packed on CPU in bf16, engine/quant/config.py).
    quantization: str | None = field(default=None, metadata=flag(
        "weight quantization: fp8 (e4m3, quantized at load or a pre-quantized fp8 checkpoint), awq / gptq "
        "(4-bit checkpoints), gguf (keep a .gguf's quantized weights packed), none (dense: a .gguf "
        "dequantized at load); default: as the checkpoint's quantization_config says, and a .gguf kept "
        "packed on CPU when the model runs in bf16", choices=QUANTIZATIONS[1:]))
    # auto = the model dtype; fp8 = float8 e4m3 with one static scale for K and one for V (1.0, as
    # vLLM's default without checkpoint scales), writes saturate at +-448 (docs/PERFORMANCE.md).
    kv_cache_dtype: str = field(default="auto", metadata=flag(
        "KV cache dtype: auto = the model dtype; fp8 = float8 e4m3 (1 byte an element: twice the blocks of "
        "bf16, half the KV transfer bytes; static scales 1.0, writes saturate at +-448; CUDA needs compute "
        "capability 8.9+). Every node of a P/D pool needs the same value", choices=KV_CACHE_DTYPES))
    role: Role = field(default="both", metadata=not_a_flag("the process decides: prefill_node, decode_node"))
    enable_chunked_prefill: bool = field(default=True, metadata=not_a_flag("always on in the servers"))
    attention_backend: str | None = field(default=None, metadata=not_a_flag(  # "torch" | "triton"
        "chosen by device; tests and benchmarks set it"))

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


WARMUP_MODES = ("auto", "full", "minimal", "off")
KV_TRANSPORT_NAMES = ("auto", "ipc", "nccl", "grpc")  # engine.kv_transfer.TRANSPORTS' keys


@dataclass(frozen=True)
class NodeArgs:
    """The options of a node process beyond its engine's, declared like `EngineArgs`' (the node
    flags that `pdserve serve` forwards to every node)."""

    warmup: str = field(default="auto", metadata=flag(
        "before a node reports SERVING, run every kernel shape class it will launch (prefill chunk sizes up to "
        "the token budget, sampled-row counts, eager decode splits, the sampler's paths), so no request pays a "
        "Triton compile: full; minimal = one step of each kind; auto = full on CUDA, minimal on CPU (whose "
        "torch paths compile nothing)", choices=WARMUP_MODES))
    kv_transport: str = field(default="auto", metadata=flag(
        "how KV blocks move from prefill to decode nodes: ipc (CUDA IPC, same host: straight into the decode "
        "node's blocks), nccl (torch.distributed point-to-point: NCCL on CUDA, gloo on CPU), grpc (chunked "
        "frames, works everywhere) or auto (ipc when both share a host and GPU set, else nccl when both are on "
        "CUDA, else grpc)", choices=KV_TRANSPORT_NAMES))
    kv_stream_chunks: bool = field(default=False, metadata=flag(
        "prefill nodes, grpc transport: send each prefill chunk's KV while the next chunk computes (off by "
        "default: on an H200 it cut the 7k-token KV tail 950 -> 610 ms but slowed the prefill itself 3-4x, "
        "see docs/PERFORMANCE.md); decode nodes ignore it", negatable=True))
    kv_grpc_lanes: int = field(default=1, metadata=flag(
        "prefill nodes, grpc transport: concurrent PushKV streams per transfer, each on its own connection and "
        "carrying a range of layers (fewer when the decode node takes fewer; at most 4). 1 by default until "
        "measured on a GPU host: on a 2-core box two lanes were 0.9-1.1x one (docs/PERFORMANCE.md); decode "
        "nodes ignore it", type=int, choices=(1, 2, 3, 4)))


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
