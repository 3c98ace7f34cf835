"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2), written like the paper.

Fused QKV and gate/up projections; GQA; RoPE with HF's scaling variants (llama3, linear, yarn, ...);
optional QKV bias (Qwen2); tied embeddings. Attention goes through the step's attention backend,
which reads and writes the paged KV cache.

Tensor parallel (`tp` given): each rank builds and loads only its `Shard` (engine/parallel/
sharding.py): whole heads of QKV and rows of gate/up, the matching columns of o/down (one
all-reduce each), 1/N of the vocabulary for the embedding and LM head (logits gathered).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import AttentionBackend
from engine.parallel.group import TPGroup
from engine.parallel.layers import Linear, RowParallelLinear, VocabParallelEmbedding, gather_vocab, linear
from engine.parallel.sharding import Shard, make_shard
from kernels.activation import silu_and_mul
from kernels.rms_norm import fused_add_rms_norm, rms_norm
from kernels.rotary import apply_rotary


def rope_parameters(config) -> dict:
    """Rope settings across transformers versions (`rope_parameters` in v5, `rope_theta` +
    `rope_scaling` before)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default") if "type" in params else "default")
    return params


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # HF's scaling variants

    if params["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {params['rope_type']!r}")
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by position (HF's rotate-half convention)."""

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scaling = rope_inv_freq(config, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # fp32 tables whatever the model dtype; cast to q's dtype at use, as HF does.
        self.register_buffer("cos", (emb.cos() * scaling).float(), persistent=False)  # [max_positions, head_dim]
        self.register_buffer("sin", (emb.sin() * scaling).float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotates q `[T, Hq, D]` and k `[T, Hk, D]`; on CUDA in place, in one kernel."""
        if q.is_cuda:
            apply_rotary(positions, q, k, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """HF's RMSNorm (normalize in fp32, cast back, then scale). With `residual`: adds x to it
        first and returns (normed, new residual); on CUDA that is one kernel, in place."""
        if x.is_cuda:
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, config, shard: Shard, bias: bool, tp: TPGroup | None):
        super().__init__()
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = shard.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, tp)

    def forward(self, x, positions, rotary, attn: AttentionBackend, kv_cache):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        out = attn.forward(q, k, v, kv_cache[0], kv_cache[1])
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config, shard: Shard, tp: TPGroup | None):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (only silu)")
        self.gate_up_proj = Linear(config.hidden_size, 2 * shard.intermediate_size, bias=False)
        self.down_proj = RowParallelLinear(shard.intermediate_size, config.hidden_size, tp)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda:
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, shard: Shard, bias: bool, tp: TPGroup | None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, shard, bias, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, shard, tp)

    def forward(self, x, residual, positions, rotary, attn, kv_cache):
        """x: the previous layer's output (or the embeddings, with residual None); returns this
        layer's output and the residual stream before it (HF's `residual + out`, deferred so
        that the add fuses with the next norm)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rotary, attn, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


# HF checkpoint names that load into a slice of one of our fused parameters.
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, max_positions: int | None = None, tp: TPGroup | None = None):
        super().__init__()
        self.config = config
        self.tp = tp
        self.shard = make_shard(config, tp.rank if tp else 0, tp.size if tp else 1)
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.head_dim = head_dim = self.shard.head_dim
        vocab_rows, hidden = self.shard.vocab_per_rank, config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(vocab_rows, hidden, self.shard.vocab_start, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, self.shard, bias, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(hidden, vocab_rows, bias=False)
        self.rotary = RotaryEmbedding(config, head_dim, max_positions or config.max_position_embeddings)

    def forward(self, input_ids, positions, kv_caches, attn: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.rotary, attn, kv_cache)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits `[T, vocab_size]` (gathered from every rank under TP)."""
        packed_head = getattr(self, "packed_head", None)  # an LM head kept quantized (engine/quant/gguf.py)
        if packed_head is not None:
            return gather_vocab(packed_head(hidden), self.config.vocab_size, self.tp)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return gather_vocab(linear(hidden, weight), self.config.vocab_size, self.tp)

    # ---- weights ---------------------------------------------------------------------------
    def weight_slice(self, hf_name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of checkpoint tensor `hf_name` that this rank loads; None = all."""
        return self.shard.slice_of(hf_name.removeprefix("model."))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors, each already cut to `weight_slice(name)`."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            target, offset, size = self._target(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
            param = params[target]
            if hasattr(param, "weight_loader"):  # quantized layers place their own tensors (engine/quant)
                param.weight_loader(tensor, offset, size)
                loaded.add(f"{target}@{offset}")
                continue
            dst = param.data if size is None else param.data.narrow(0, offset, size)
            if name in ("embed_tokens.weight", "lm_head.weight"):
                dst = dst[:self.shard.vocab_rows]  # the last rank's padding rows stay zero
            if dst.shape != tensor.shape:
                raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(f"{target}@{offset}")
        expected = self._expected_loads(params)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _target(self, name: str) -> tuple[str, int, int | None]:
        parts = name.split(".")
        proj = parts[-2] if len(parts) >= 2 else ""
        if proj not in _FUSED:
            return name, 0, None
        fused, index = _FUSED[proj]
        target = ".".join(parts[:-2] + [fused, parts[-1]])
        sizes = self._fused_sizes(fused)
        return target, sum(sizes[:index]), sizes[index]

    def _fused_sizes(self, fused: str) -> list[int]:
        attn = self.layers[0].self_attn
        if fused == "qkv_proj":
            return [attn.q_size, attn.kv_size, attn.kv_size]
        n = self.shard.intermediate_size
        return [n, n]

    def _expected_loads(self, params: dict) -> set[str]:
        out = set()
        for name in params:
            fused = name.split(".")[-2]
            if fused in ("qkv_proj", "gate_up_proj"):
                sizes = self._fused_sizes(fused)
                out.update(f"{name}@{sum(sizes[:i])}" for i in range(len(sizes)))
            else:
                out.add(f"{name}@0")
        return out
