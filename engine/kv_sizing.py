"""How many KV blocks an engine gets: the weights must fit first, then the cache takes what
`gpu_memory_utilization` leaves after them, everything else on the GPU and the peak activations of
the largest step (measured by running it); on CPU, `cpu_kv_cache_gb`.

Plain functions over what they read, so the engine's constructor makes one call for each.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import EngineArgs, SchedulerConfig

logger = logging.getLogger("pdserve.engine")


@dataclass(frozen=True)
class KVSizing:
    num_blocks: int  # the cache's size: `fit`, capped at max_num_seqs full sequences (+ the null block)
    fit: int  # the blocks the memory budget holds before that cap (or --num-gpu-blocks as given)


def estimate_num_params(config) -> int:
    """Parameters of a Llama-family decoder (fused projections, untied or tied head)."""
    h, n = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * n + 2 * h
    head = 0 if getattr(config, "tie_word_embeddings", False) else config.vocab_size * h
    return config.num_hidden_layers * per_layer + config.vocab_size * h + head + h


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_weights_fit(config, args: EngineArgs, device: torch.device, dtype: torch.dtype) -> None:
    """Refuses, before loading, weights that `gpu_memory_utilization` of the GPU cannot hold (CUDA)."""
    free, total = torch.cuda.mem_get_info(device)
    elem = torch.empty((), dtype=dtype).element_size()
    need = estimate_num_params(config) * elem // args.tensor_parallel_size  # this rank's shard
    allowed = args.gpu_memory_utilization * total - (total - free)
    if need > allowed:
        raise MemoryError(
            f"the model's weights need {need / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')}, but "
            f"gpu_memory_utilization {args.gpu_memory_utilization} of {total / 2**30:.2f} GiB with "
            f"{(total - free) / 2**30:.2f} GiB already in use leaves {max(allowed, 0) / 2**30:.2f} GiB")


def size_kv_cache(args: EngineArgs, runner, sched: SchedulerConfig, max_model_len: int) -> KVSizing:
    """KV blocks for `runner` (its shape, KV dtype and device; on CUDA it runs the profiling step)."""
    per_block = runner.shape.kv_bytes_per_token(runner.kv_dtype) * args.block_size  # this rank's heads
    blocks_per_seq = -(-max_model_len // args.block_size)
    useful = args.max_num_seqs * blocks_per_seq + 1
    if args.num_gpu_blocks is not None:
        return KVSizing(args.num_gpu_blocks, args.num_gpu_blocks)
    if runner.device.type != "cuda":
        num = int(args.cpu_kv_cache_gb * 2**30 // per_block)
        if num < 2 + blocks_per_seq // 4:
            raise ValueError(
                f"not enough memory for the KV cache: cpu_kv_cache_gb {args.cpu_kv_cache_gb} fits {num} blocks of "
                f"{per_block / 2**20:.2f} MiB; raise cpu_kv_cache_gb or lower max_model_len")
        return KVSizing(min(num, useful), num)
    peak = runner.profile_peak_memory(sched.max_num_batched_tokens, sched.max_num_seqs, max_model_len)
    free, total = torch.cuda.mem_get_info(runner.device)
    in_use = total - free  # weights, CUDA context, other processes
    graph_reserve = 0 if runner.graph_max_batch == 0 else 256 * 2**20
    budget = args.gpu_memory_utilization * total - in_use - peak - graph_reserve
    num = int(budget // per_block)
    need = blocks_per_seq + 1
    weights = weight_bytes(runner.model) / 2**30
    if num < need:
        raise MemoryError(
            f"no room for the KV cache: gpu_memory_utilization {args.gpu_memory_utilization} of "
            f"{total / 2**30:.2f} GiB = {args.gpu_memory_utilization * total / 2**30:.2f} GiB; in use "
            f"{in_use / 2**30:.2f} GiB (weights {weights:.2f} GiB); activations peak "
            f"{peak / 2**30:.2f} GiB at max_num_batched_tokens {sched.max_num_batched_tokens}; that leaves "
            f"{max(budget, 0) / 2**30:.2f} GiB, but one sequence of max_model_len {max_model_len} needs "
            f"{need * per_block / 2**30:.2f} GiB ({per_block // args.block_size // 1024} KiB per token). Raise "
            "gpu_memory_utilization, or lower max_model_len or max_num_batched_tokens")
    kept = min(num, useful)
    logger.info("KV cache: %d blocks = %.2f GiB (%d tokens; the budget fits %d blocks); weights %.2f GiB, "
                "activation peak %.2f GiB", kept, kept * per_block / 2**30, kept * args.block_size, num,
                weights, peak / 2**30)
    return KVSizing(kept, num)
