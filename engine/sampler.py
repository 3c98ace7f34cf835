"""Batched sampling with per-request parameters (torch only; CPU and CUDA).

One step, for the rows being sampled:

    logits --fp32--> [raw logprobs] --> logit_bias --> min_tokens (-inf) --> grammar mask (-inf) --> penalties
        greedy rows: argmax
        random rows: / temperature --> top_k --> top_p --> softmax --> min_p --> argmax(probs / q)

`q ~ Exp(1)` per token (the exponential race, equivalent to drawing from `probs`). A seeded row
draws its `q` from its own generator, so its token depends only on its logits and its generator,
never on the other rows of the batch. NaN logits count as -inf; a row left with nothing to sample
falls back to the argmax of its raw logits.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.sampling_params import GREEDY_EPS, SamplingParams
from engine.structured import GrammarState, allocate_bitmask, apply_bitmask

_NEG_INF = float("-inf")


def make_generator(seed: int, step: int, device, index: int = 0) -> torch.Generator:
    """A generator for the token at `step` (tokens generated so far) of a seeded request.

    Derived by hashing, so any node that knows (seed, step) continues the same stream; `index`
    separates the n > 1 completions of one request.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return g


@dataclass(frozen=True)
class RowSpec:
    """What the caller knows about one row to sample."""
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None  # None: made from params.seed and the step
    index: int = 0  # which of the request's n completions (separates their seeded streams)
    grammar: GrammarState | None = None  # structured output: only tokens it allows may be sampled


@dataclass(frozen=True)
class SamplingMetadata:
    """Built fresh each step for the rows being sampled; tensors are on the logits' device."""
    # Per-row parameter columns on the device, each built only when a row uses it (None otherwise).
    temperature: Tensor | None  # [B] fp32; None when every row is greedy
    top_k: Tensor | None  # [B] int64; 0 = off
    top_p: Tensor | None  # [B] fp32
    min_p: Tensor | None  # [B] fp32
    presence_penalty: Tensor | None  # [B] fp32
    frequency_penalty: Tensor | None  # [B] fp32
    repetition_penalty: Tensor | None  # [B] fp32
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    prompt_token_ids: Tensor | None  # [B, Lp] int64 padded with vocab_size; None: no penalties
    output_token_ids: Tensor | None  # [B, Lo] int64 padded with vocab_size; None: no penalties
    logit_bias: list[dict[int, float] | None] | None
    min_tokens_mask: list[tuple[int, list[int]]] | None  # (row, token ids to forbid)
    generators: list[torch.Generator | None]  # per row; None = the global RNG
    max_num_logprobs: int | None  # None: no logprobs; 0: the sampled token's only; N: + top N
    grammar_bitmask: Tensor | None = None  # [B, ceil(V / 32)] int32 allowed-token bits (host); None: no grammar
    grammar_rows: list[int] | None = None  # the rows the bitmask constrains

    @staticmethod
    def build(rows: list[RowSpec], vocab_size: int, device) -> SamplingMetadata:
        """A greedy batch without extras (the common serving case) builds no tensors at all;
        otherwise the columns it needs go to the device in one copy."""
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        use_penalties = any(p.has_penalties for p in params)
        no_top_k = all(p.top_k == 0 or p.top_k >= vocab_size for p in params)
        no_top_p = all(p.top_p >= 1.0 for p in params)
        no_min_p = all(p.min_p <= 0.0 for p in params)
        random_cols = not all_greedy
        wanted = {
            "temperature": random_cols,
            "top_p": random_cols and not no_top_p,
            "min_p": random_cols and not no_min_p,
            "presence_penalty": use_penalties,
            "frequency_penalty": use_penalties,
            "repetition_penalty": use_penalties,
        }
        names = [name for name, on in wanted.items() if on]
        cols: dict[str, Tensor | None] = dict.fromkeys(wanted)
        if names:
            table = torch.tensor([[getattr(p, name) for name in names] for p in params], dtype=torch.float32)
            table = table.to(device, non_blocking=True).t()
            cols.update(zip(names, table))
        top_k = None
        if random_cols and not no_top_k:
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64).to(device, non_blocking=True)
        biases = [p.logit_bias for p in params]
        requested = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingMetadata(
            top_k=top_k,
            **cols,
            all_greedy=all_greedy,
            all_random=not any(greedy),
            no_penalties=not use_penalties,
            no_top_k=no_top_k,
            no_top_p=no_top_p,
            no_min_p=no_min_p,
            prompt_token_ids=_pad([r.prompt_token_ids for r in rows], vocab_size, device)
            if use_penalties else None,
            output_token_ids=_pad([r.output_token_ids for r in rows], vocab_size, device)
            if use_penalties else None,
            logit_bias=biases if any(biases) else None,
            min_tokens_mask=_min_tokens_mask(rows, vocab_size),
            generators=[_row_generator(r, device) for r in rows] if not all_greedy else [None] * len(rows),
            max_num_logprobs=max(requested) if requested else None,
            **_grammar_masks(rows, vocab_size),
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] fp32, raw logprob of the sampled token
    top_logprob_ids: Tensor | None  # [B, max_num_logprobs] int64, best first
    top_logprobs: Tensor | None  # [B, max_num_logprobs] fp32


def _pad(seqs: list[Sequence[int]], pad: int, device) -> Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
    return out.to(device)


def _min_tokens_mask(rows: list[RowSpec], vocab_size: int):
    mask = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        if r.grammar is not None and r.grammar.is_completed:
            continue  # a complete grammar may allow nothing but the end: it wins over min_tokens
        ids = set(r.params.stop_token_ids or ())
        if not r.params.ignore_eos:
            ids.update(r.eos_token_ids)
        ids = sorted(t for t in ids if 0 <= t < vocab_size)
        if ids:
            mask.append((i, ids))
    return mask or None


def _grammar_masks(rows: list[RowSpec], vocab_size: int) -> dict:
    """The allowed-token bitmask of the rows under a grammar (filled on the host)."""
    # A grammar that has accepted its end token belongs to a request the previous step finished (async
    # scheduling queues the next step first); its row is discarded, and xgrammar refuses to mask it.
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None and not r.grammar.is_terminated]
    if not constrained:
        return {}
    bitmask = allocate_bitmask(len(rows), vocab_size)
    for i in constrained:
        rows[i].grammar.fill_bitmask(bitmask, i)
    return {"grammar_bitmask": bitmask, "grammar_rows": constrained}


def _row_generator(row: RowSpec, device) -> torch.Generator | None:
    if row.generator is not None or row.params.seed is None:
        return row.generator
    return make_generator(row.params.seed, len(row.output_token_ids), device, row.index)


class Sampler:
    def __call__(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if (meta.all_greedy and meta.max_num_logprobs is None and meta.no_penalties
                and meta.logit_bias is None and meta.min_tokens_mask is None
                and meta.grammar_bitmask is None):
            return SamplerOutput(_greedy(logits), None, None, None)
        raw = logits.float()
        logprobs = None
        if meta.max_num_logprobs is not None:
            logprobs = torch.log_softmax(_nan_to_neg_inf(raw), dim=-1)
        x = self.process_logits(raw, meta)
        greedy = _safe_argmax(x, raw)
        sampled = greedy if meta.all_greedy else self._sample_random(x, meta, greedy)
        return _gather_logprobs(sampled, logprobs, meta.max_num_logprobs)

    def process_logits(self, raw: Tensor, meta: SamplingMetadata) -> Tensor:
        """fp32 logits after logit_bias, min_tokens, the grammar mask and penalties; never writes
        into `raw`."""
        x = raw = raw.float()
        if meta.logit_bias is not None or meta.min_tokens_mask is not None or meta.grammar_bitmask is not None:
            x = raw.clone()
            _apply_logit_bias(x, meta.logit_bias)
            _apply_min_tokens(x, meta.min_tokens_mask)
            if meta.grammar_bitmask is not None:
                apply_bitmask(x, meta.grammar_bitmask, meta.grammar_rows)
        if not meta.no_penalties:
            x = _apply_penalties(x, meta)
        return x

    def _sample_random(self, x: Tensor, meta: SamplingMetadata, greedy: Tensor) -> Tensor:
        temperature = meta.temperature
        if not meta.all_random:  # greedy rows are overwritten below; avoid dividing by 0
            temperature = torch.where(temperature < GREEDY_EPS, 1.0, temperature)
        x = _nan_to_neg_inf(x) / temperature.unsqueeze(1)
        if not (meta.no_top_k and meta.no_top_p):
            x = _apply_top_k_top_p(x, None if meta.no_top_k else meta.top_k,
                                   None if meta.no_top_p else meta.top_p)
        probs = torch.softmax(x, dim=-1)
        if not meta.no_min_p:
            threshold = probs.amax(dim=-1, keepdim=True) * meta.min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        q = _exponential(probs, meta.generators)
        sampled = (probs / q).argmax(dim=-1)
        # +inf logits or a row with nothing left give NaN / zero probabilities: take the argmax.
        sampled = torch.where(probs.sum(dim=-1) > 0, sampled, greedy)
        if not meta.all_random:
            sampled = torch.where(meta.temperature < GREEDY_EPS, greedy, sampled)
        if not meta.no_top_k:  # top_k = 1 is greedy exactly, ties included
            sampled = torch.where(meta.top_k == 1, greedy, sampled)
        return sampled


def _nan_to_neg_inf(x: Tensor) -> Tensor:
    return torch.where(torch.isnan(x), _NEG_INF, x)


def _greedy(logits: Tensor) -> Tensor:
    """argmax with NaN counted as -inf, in the logits' own dtype (exact: widening to fp32 changes
    no order) and without a host sync: one elementwise pass and one reduction instead of ~8
    passes over an fp32 copy. A few long rows (batch 1 over a 128k vocabulary) reduce in two
    stages, so the reduction is spread over many blocks instead of one per row."""
    x = torch.nan_to_num(logits, nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
    rows, vocab = x.shape
    groups = _argmax_groups(vocab) if rows < 64 else 1
    if groups == 1:
        return x.argmax(dim=-1)
    width = vocab // groups
    best, idx = x.view(rows, groups, width).max(dim=-1)  # first maximum of each group
    group = best.argmax(dim=-1)  # the first group holding the row's maximum
    return group * width + idx.gather(1, group.unsqueeze(1)).squeeze(1)


@functools.lru_cache(maxsize=None)
def _argmax_groups(vocab: int) -> int:
    """The largest divisor of `vocab` up to 256 leaving groups of >= 256 entries (1 if none)."""
    return max(g for g in range(1, 257) if vocab % g == 0 and vocab // g >= 256) if vocab >= 256 else 1


def _safe_argmax(x: Tensor, raw: Tensor) -> Tensor:
    """argmax with NaN counted as -inf; an all -inf row takes the argmax of its raw logits.
    Branch-free: no device-to-host sync."""
    idx = _greedy(x)
    if x is raw:
        return idx  # the raw fallback would give the same index
    best = x.gather(1, idx.unsqueeze(1)).squeeze(1)
    dead = torch.isnan(best) | (best == _NEG_INF)  # the row holds nothing above -inf
    return torch.where(dead, _greedy(raw), idx)


def _apply_logit_bias(x: Tensor, biases: list[dict[int, float] | None] | None) -> None:
    if biases is None:
        return
    vocab = x.shape[1]
    rows, cols, vals = [], [], []
    for i, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            if 0 <= token < vocab:
                rows.append(i)
                cols.append(token)
                vals.append(value)
    if rows:
        index = (torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device))
        x.index_put_(index, torch.tensor(vals, dtype=x.dtype, device=x.device), accumulate=True)


def _apply_min_tokens(x: Tensor, mask: list[tuple[int, list[int]]] | None) -> None:
    if mask is None:
        return
    vocab = x.shape[1]
    rows, cols = [], []
    for i, ids in mask:
        keep = [t for t in ids if 0 <= t < vocab]
        rows += [i] * len(keep)
        cols += keep
    if rows:
        x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = _NEG_INF


def _token_counts(ids: Tensor | None, batch: int, vocab: int, device) -> Tensor:
    """[B, V] fp32 occurrence counts; ids outside [0, vocab) are padding."""
    counts = torch.zeros(batch, vocab + 1, dtype=torch.float32, device=device)
    if ids is not None and ids.numel():
        ids = torch.where((ids < 0) | (ids > vocab), vocab, ids)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def _apply_penalties(x: Tensor, meta: SamplingMetadata) -> Tensor:
    """Repetition over prompt + output (HF/vLLM), then frequency and presence over the output
    (OpenAI). A neutral value is an exact no-op, so rows without penalties are unchanged."""
    batch, vocab = x.shape
    output_counts = _token_counts(meta.output_token_ids, batch, vocab, x.device)
    seen = (_token_counts(meta.prompt_token_ids, batch, vocab, x.device) + output_counts) > 0
    rep = meta.repetition_penalty.unsqueeze(1)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - meta.frequency_penalty.unsqueeze(1) * output_counts
    return x - meta.presence_penalty.unsqueeze(1) * (output_counts > 0).float()


def _apply_top_k_top_p(x: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Masks to -inf what falls outside each row's top_k (0 = off) and top_p nucleus."""
    vocab = x.shape[1]
    if top_p is None:
        return _apply_top_k_only(x, top_k)
    sorted_x, order = x.sort(dim=-1)  # ascending
    if top_k is not None:
        k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
        kth = sorted_x.gather(1, (vocab - k).unsqueeze(1))
        sorted_x = sorted_x.masked_fill(sorted_x < kth, _NEG_INF)
    cumulative = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the most likely token always stays
    sorted_x = sorted_x.masked_fill(drop, _NEG_INF)
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _apply_top_k_only(x: Tensor, top_k: Tensor) -> Tensor:
    """top_k without a full sort: one topk() of the largest k in the batch."""
    vocab = x.shape[1]
    on = (top_k > 0) & (top_k < vocab)
    k = torch.where(on, top_k, 1)
    kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    kth = torch.where(on.unsqueeze(1), kth, _NEG_INF)
    return x.masked_fill(x < kth, _NEG_INF)


def _exponential(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Exp(1) noise per token; a row with a generator draws only from it."""
    q = torch.empty_like(probs)
    if not all(g is not None for g in generators):
        q.exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return q.clamp_min_(torch.finfo(q.dtype).tiny)  # q = 0 would give 0/0 for masked tokens


def _gather_logprobs(sampled: Tensor, logprobs: Tensor | None, n: int | None) -> SamplerOutput:
    if logprobs is None:
        return SamplerOutput(sampled, None, None, None)
    chosen = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1).nan_to_num(nan=_NEG_INF)
    top_ids = top = None
    if n:
        top, top_ids = logprobs.topk(min(n, logprobs.shape[1]), dim=-1)
        top = top.nan_to_num(nan=_NEG_INF)
    return SamplerOutput(sampled, chosen, top_ids, top)


@dataclass
class PromptLogprobsOutput:
    """Prompt logprobs of one step's prompt positions (device tensors), in the step's row order."""
    logprobs: Tensor  # [R] fp32, raw logprob of the prompt token that follows each position
    ranks: Tensor  # [R] int64, its rank in the distribution (1 = the most likely)
    top_ids: Tensor | None  # [R, K] int64, best first (None when K = 0)
    top_logprobs: Tensor | None  # [R, K] fp32


PROMPT_LOGPROBS_ROWS = 512  # log_softmax over at most this many positions at a time (bounds the fp32 copies)


def prompt_logprobs(logits: Tensor, targets: Tensor, num_top: int) -> PromptLogprobsOutput:
    """Raw (unprocessed) logprobs of `targets[i]` under `logits[i]`, their ranks and the top
    `num_top` candidates of each row; NaN logits count as -inf."""
    parts = []
    for lo in range(0, logits.shape[0], PROMPT_LOGPROBS_ROWS):
        lp = torch.log_softmax(_nan_to_neg_inf(logits[lo:lo + PROMPT_LOGPROBS_ROWS].float()), dim=-1)
        target = targets[lo:lo + PROMPT_LOGPROBS_ROWS].unsqueeze(1)
        chosen = lp.gather(1, target)
        ranks = (lp > chosen).sum(dim=-1) + 1
        top = lp.topk(min(num_top, lp.shape[1]), dim=-1) if num_top else None
        parts.append((chosen.squeeze(1).nan_to_num(nan=_NEG_INF), ranks, top))
    top_ids = top_lps = None
    if num_top:
        top_lps = torch.cat([p[2].values for p in parts]).nan_to_num(nan=_NEG_INF)
        top_ids = torch.cat([p[2].indices for p in parts])
    return PromptLogprobsOutput(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                top_ids, top_lps)
