"""Which slice of each weight one tensor-parallel rank holds (Megatron-style).

    q/k/v, gate/up   column-parallel: a rank holds whole heads / 1/N of the intermediate rows
    o, down          row-parallel: the matching input columns; one all-reduce sums the outputs
    embed, lm_head   vocab-parallel: ceil(V/N) rows per rank (the last one padded with zeros)

KV heads split across ranks when there are at least N of them; with fewer, each rank holds the
one KV head its query heads read (replicated on N / num_kv_heads ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_CPU_TP_SIZE = 8  # CPU ranks are processes on one box: a sane cap, not a hardware limit


@dataclass(frozen=True)
class Shard:
    """One rank's share of a model: `rank` of `size`, and the sizes that follow from the config."""

    rank: int
    size: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    total_heads: int
    total_kv_heads: int
    head_dim: int
    intermediate_size: int  # MLP rows on this rank
    vocab_size: int  # the model's full vocabulary
    vocab_per_rank: int  # ceil(vocab_size / size): rows of this rank's embedding / LM head

    @property
    def q_start(self) -> int:
        """Global index of this rank's first query head."""
        return self.rank * self.num_heads

    @property
    def kv_start(self) -> int:
        """Global index of this rank's first KV head."""
        return self.q_start // (self.total_heads // self.total_kv_heads)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def vocab_rows(self) -> int:
        """Vocabulary rows this rank loads (the last rank may hold fewer than vocab_per_rank)."""
        return max(0, min(self.vocab_per_rank, self.vocab_size - self.vocab_start))

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of HF tensor `name` on this rank; None = the whole tensor."""
        if self.size == 1:
            return None
        d = self.head_dim
        proj = name.split(".")[-2] if "." in name else ""
        if proj == "q_proj":
            return 0, self.q_start * d, (self.q_start + self.num_heads) * d
        if proj in ("k_proj", "v_proj"):
            return 0, self.kv_start * d, (self.kv_start + self.num_kv_heads) * d
        if proj == "o_proj" and name.endswith("weight"):
            return 1, self.q_start * d, (self.q_start + self.num_heads) * d
        n = self.intermediate_size
        if proj in ("gate_proj", "up_proj"):
            return 0, self.rank * n, (self.rank + 1) * n
        if proj == "down_proj" and name.endswith("weight"):
            return 1, self.rank * n, (self.rank + 1) * n
        if proj in ("embed_tokens", "lm_head"):
            return 0, self.vocab_start, self.vocab_start + self.vocab_rows
        return None


def model_dims(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of an HF decoder config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def check_tp_size(config, size: int) -> None:
    """ValueError unless `size` ranks can split this model's heads and MLP evenly."""
    heads, kv, _ = model_dims(config)
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {heads} attention heads")
    if kv % size and size % kv:
        raise ValueError(f"tensor_parallel_size {size} neither divides the model's {kv} KV heads nor is a "
                         f"multiple of them (KV heads are split, or replicated when fewer than the ranks)")
    if config.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's intermediate size "
                         f"{config.intermediate_size}")


def make_shard(config, rank: int, size: int) -> Shard:
    check_tp_size(config, size)
    heads, kv, head_dim = model_dims(config)
    return Shard(rank=rank, size=size, num_heads=heads // size, num_kv_heads=max(kv // size, 1),
                 total_heads=heads, total_kv_heads=kv,
                 head_dim=head_dim, intermediate_size=config.intermediate_size // size,
                 vocab_size=config.vocab_size, vocab_per_rank=-(-config.vocab_size // size))
