"""Command-line flags shared by every process that runs an engine (names as in `vllm serve`).

Every flag has an environment-variable twin `PDSERVE_<FLAG_NAME>` (e.g. `--max-model-len` ->
`PDSERVE_MAX_MODEL_LEN`), read once, when the flags are added to the parser; a flag given on the
command line wins over its variable.

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(argv)
    engine_args = engine_args_from(args, role="decode")
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # engine.config imports torch; the router and gateway use these flags without it
    from engine.config import EngineArgs

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def env_name(flag: str) -> str:
    return "PDSERVE_" + flag.lstrip("-").replace("-", "_").upper()


def _env_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SystemExit(f"{name}={value!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}")


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *,
             env: Mapping[str, str] | None = None, **kwargs) -> argparse.Action:
    """`parser.add_argument(flag, ...)` whose default comes from `PDSERVE_<FLAG>` when that is set."""
    env = os.environ if env is None else env
    name = env_name(flag)
    kwargs["help"] = f"{kwargs.get('help', '')} [env: {name}]".strip()
    if name in env:
        raw = env[name]
        if kwargs.get("action") in (argparse.BooleanOptionalAction, "store_true"):
            kwargs["default"] = _env_bool(name, raw)
        else:
            convert = kwargs.get("type", str)
            try:
                kwargs["default"] = convert(raw)
            except (TypeError, ValueError) as exc:
                raise SystemExit(f"{name}={raw!r}: {exc}") from None
            if "choices" in kwargs and kwargs["default"] not in kwargs["choices"]:
                raise SystemExit(f"{name}={raw!r}: choose from {', '.join(map(str, kwargs['choices']))}")
    if "default" in kwargs and kwargs.get("default") is not None and "%(default)" not in kwargs["help"]:
        kwargs["help"] += " (default: %(default)s)"
    return parser.add_argument(flag, **kwargs)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "auto") else int(text)


def add_server_args(parser: argparse.ArgumentParser, *, default_port: int, default_host: str = "127.0.0.1",
                    env: Mapping[str, str] | None = None) -> None:
    add_flag(parser, "--host", env=env, default=default_host,
             help="address to listen on; internal services bind loopback unless told otherwise")
    add_flag(parser, "--port", env=env, type=int, default=default_port, help="port to listen on (0 = any free port)")


def add_engine_args(parser: argparse.ArgumentParser, *, env: Mapping[str, str] | None = None,
                    default_port: int = 0, default_host: str = "127.0.0.1") -> argparse.ArgumentParser:
    """Adds the engine flags plus --host/--port/--kv-transport; returns the parser."""
    g = parser.add_argument_group("engine")
    add_flag(g, "--model", env=env, default=None,
             help="HF repo id, local HF directory or .gguf file (default: the bundled small model)")
    add_flag(g, "--served-model-name", env=env, default=None, help="model name reported to clients")
    add_flag(g, "--dtype", env=env, default="auto", choices=["auto", "float32", "bfloat16", "float16"],
             help="weights and KV cache dtype; auto = bfloat16 on CUDA; on CPU bfloat16 where the processor has "
                  "native bf16 (avx512_bf16 or amx_bf16), else float32")
    add_flag(g, "--device", env=env, default="auto", choices=["auto", "cpu", "cuda"],
             help="device to run on (default: cuda when available)")
    add_flag(g, "--max-model-len", env=env, type=_optional_int, default=None,
             help="context length (prompt + output tokens); default: the model's")
    add_flag(g, "--gpu-memory-utilization", env=env, type=float, default=0.9,
             help="fraction of GPU memory the process may use (weights + KV cache)")
    add_flag(g, "--cpu-kv-cache-gb", env=env, type=float, default=1.0,
             help="KV cache size on CPU, in GiB (ignored on CUDA or with --num-gpu-blocks)")
    add_flag(g, "--max-num-seqs", env=env, type=int, default=256, help="most sequences in one batch")
    add_flag(g, "--max-num-batched-tokens", env=env, type=_optional_int, default=None,
             help="most tokens in one step (chunked prefill budget)")
    add_flag(g, "--block-size", env=env, type=int, default=16, choices=[8, 16, 32, 64, 128],
             help="tokens per KV cache block")
    add_flag(g, "--enable-prefix-caching", env=env, action=argparse.BooleanOptionalAction, default=True,
             help="reuse KV blocks of shared prompt prefixes")
    add_flag(g, "--num-gpu-blocks", env=env, type=_optional_int, default=None,
             help="explicit number of KV blocks (overrides memory profiling)")
    add_flag(g, "--enforce-eager", env=env, action="store_true", default=False,
             help="CUDA: never capture CUDA graphs for decode steps (slower; for debugging)")
    add_flag(g, "--warmup", env=env, default="auto", choices=["auto", "full", "minimal", "off"],
             help="before a node reports SERVING, run every kernel shape class it will launch (prefill chunk "
                  "sizes up to the token budget, sampled-row counts, eager decode splits, the sampler's paths), so "
                  "no request pays a Triton compile: full; minimal = one step of each kind; auto = full on CUDA, "
                  "minimal on CPU (whose torch paths compile nothing)")
    add_flag(g, "--async-scheduling", env=env, action=argparse.BooleanOptionalAction, default=None,
             help="schedule step N+1 while step N runs (default: on with CUDA)")
    add_flag(g, "--seed", env=env, type=int, default=0, help="random seed of the engine")
    add_flag(g, "--tensor-parallel-size", env=env, type=int, default=1,
             help="split the model across this many ranks (one process per rank; CUDA: one GPU each)")
    add_flag(g, "--quantization", env=env, default=None, choices=["fp8", "awq", "gptq", "gguf"],
             help="weight quantization: fp8 (e4m3, quantized at load or a pre-quantized fp8 checkpoint), awq / gptq "
                  "(4-bit checkpoints), gguf (keep a .gguf's quantized weights packed); default: as the checkpoint's "
                  "quantization_config says")
    add_flag(g, "--kv-cache-dtype", env=env, default="auto", choices=["auto", "fp8"],
             help="KV cache dtype: auto = the model dtype; fp8 = float8 e4m3 (1 byte an element: twice the "
                  "blocks of bf16, half the KV transfer bytes; static scales 1.0, writes saturate at +-448; CUDA "
                  "needs compute capability 8.9+). Every node of a P/D pool needs the same value")
    add_flag(g, "--kv-transport", env=env, default="auto", choices=["auto", "ipc", "nccl", "grpc"],
             help="how KV blocks move from prefill to decode nodes: ipc (CUDA IPC, same host: straight into the "
                  "decode node's blocks), nccl (torch.distributed point-to-point: NCCL on CUDA, gloo on CPU), "
                  "grpc (chunked frames, works everywhere) or auto (ipc when both share a host and GPU set, "
                  "else nccl when both are on CUDA, else grpc)")
    add_server_args(parser, default_port=default_port, default_host=default_host, env=env)
    return parser


def engine_args_from(ns: argparse.Namespace, role: str) -> EngineArgs:
    """EngineArgs for `role` ('both' | 'prefill' | 'decode') from parsed flags."""
    from engine.config import EngineArgs

    return EngineArgs(
        model=ns.model, served_model_name=ns.served_model_name, dtype=ns.dtype,
        device=None if ns.device == "auto" else ns.device, max_model_len=ns.max_model_len,
        gpu_memory_utilization=ns.gpu_memory_utilization, cpu_kv_cache_gb=ns.cpu_kv_cache_gb,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size, enable_prefix_caching=ns.enable_prefix_caching,
        num_gpu_blocks=ns.num_gpu_blocks, seed=ns.seed, role=role, enforce_eager=ns.enforce_eager,
        async_scheduling=ns.async_scheduling, tensor_parallel_size=ns.tensor_parallel_size,
        quantization=ns.quantization, kv_cache_dtype=ns.kv_cache_dtype)
