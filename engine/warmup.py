"""Warm-up: run every kernel shape class the engine will launch once, before a node serves.

Triton compiles a kernel the first time it sees a new specialization (its constexprs, and the
integer and pointer arguments it specializes: == 1, divisible by 16, 16-byte aligned), then
keeps it in memory (and on disk). A node that reports SERVING without having run a shape class
makes its first request of that class pay the compile: on an H200, 8 prompts of 7,000 tokens
waited 4.2 s for their first token in a fresh process, 1.2 s once Triton's disk cache was warm
(issue 18). What varies with the step, on CUDA:

* prefill attention (kernels/paged_prefill_attention.py): one kernel per tile class (a row's
  q_len x the padded GQA group picks the class; its lists are kept 16-byte aligned, so one
  variant each); the decode attention's split count (num_splits 1, 16 and others; its merge
  kernel per power of two), in eager decode steps;
* the skinny GEMM (kernels/skinny_gemm.py) for <= 16 rows: one kernel per (config, padded rows)
  that the device's table picks, for every linear and the LM head (whose rows = sampled rows);
* SiLU-and-mul's block (rows <= 16 or more); RMSNorm, rotary and the KV write do not vary;
* the sampler (torch): greedy, temperature, top-k, top-p, min-p, seeded generators, penalties,
  logit bias, min_tokens, logprobs, and xgrammar's bitmask kernel when xgrammar is installed.

Decode steps of up to `graph_max_batch` rows replay CUDA graphs, captured (and so compiled) at
engine start. The warm-up therefore runs, directly on the model runner (never through the
scheduler): single-row prefills of 1..16 tokens and of every power of two up to the step's token
budget (and the budget itself); steps of 2..16 sampled rows; a mixed step; eager decode steps over
the split counts when decode is not graphed; and the sampler's paths on synthetic logits.

What it leaves as it found it: no block is allocated (every row's table is the null block 0,
whose contents are saved and restored on this rank), nothing enters the prefix cache, no
scheduler, engine or node counter moves (the steps never pass through them), and the CPU and CUDA
random generators are restored. On CPU the torch paths compile nothing: `auto` is `minimal` there
(one step of each kind, the sampler paths), `full` on CUDA.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("pdserve.engine")

MODES = ("auto", "full", "minimal", "off")
SKINNY_ROWS = 16  # kernels.skinny_gemm.MAX_M: the rows the decode linears send to the skinny GEMM
SPLIT_TOKENS = 256  # kernels.paged_decode_attention.choose_num_splits' min_split_tokens
MAX_SPLITS = 16


def resolve_mode(mode: str, device: torch.device) -> str:
    """'auto' -> 'full' on CUDA, 'minimal' elsewhere."""
    if mode not in MODES:
        raise ValueError(f"warm-up mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "full" if device.type == "cuda" else "minimal"
    return mode


@dataclass(frozen=True)
class WarmupStep:
    """One forward pass: rows of (query tokens, context before them)."""

    kind: str  # prefill | rows | mixed | decode
    rows: tuple[tuple[int, int], ...]

    @property
    def num_tokens(self) -> int:
        return sum(q for q, _ in self.rows)


@dataclass
class WarmupReport:
    mode: str
    seconds: float = 0.0
    steps: list[WarmupStep] = field(default_factory=list)
    sampler_paths: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> int:
        return len(self.steps) + len(self.sampler_paths)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.kind] = out.get(s.kind, 0) + 1
        if self.sampler_paths:
            out["sampler"] = len(self.sampler_paths)
        return out

    def line(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in self.counts().items())
        return f"warm-up ({self.mode}): {self.shapes} shapes in {self.seconds:.2f} s" + (f" ({parts})" if parts else "")


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, p = [], 1 << max(0, (lo - 1).bit_length())
    while p <= hi:
        out.append(p)
        p *= 2
    return out


def _split_contexts(max_context: int) -> list[int]:
    """Contexts that make the decode kernel choose each split count it can (a short one unsplit,
    then SPLIT_TOKENS x 2^j: at most that many splits), up to `max_context`."""
    out = [min(16, max_context)]
    c = SPLIT_TOKENS * 2
    while c <= max_context and c // SPLIT_TOKENS <= MAX_SPLITS:
        out.append(c)
        c *= 2
    return out


def plan_steps(mode: str, *, budget: int, max_num_seqs: int, max_model_len: int, role: str = "both",
               graph_max_batch: int = 0, decode_splits: bool = True) -> list[WarmupStep]:
    """The forward passes of a warm-up (pure: no engine needed).

    budget: the step's token budget (max_num_batched_tokens); graph_max_batch: the largest batch a
    decode CUDA graph covers (0 = decode steps run eagerly); decode_splits: eager decode steps run
    at a context for each split count of the Triton decode kernel (else one short context: the
    torch backend does not split)."""
    if mode == "off":
        return []
    longest = max_model_len - 1  # a row's context stays below max_model_len
    seqs = max(1, max_num_seqs)

    def prefill(tokens: int) -> WarmupStep:
        rows, left = [], tokens  # rows of at most `longest` tokens each, at most `seqs` rows
        while left > 0 and len(rows) < seqs:
            q = min(left, longest)
            rows.append((q, 0))
            left -= q
        return WarmupStep("prefill", tuple(rows))

    decodes = role != "prefill"
    if mode == "minimal":
        steps = [prefill(min(budget, longest, 64))]
        if decodes:
            steps.append(WarmupStep("decode", ((1, min(16, longest - 1)),)))
        return steps

    sizes = sorted({*range(1, min(SKINNY_ROWS, budget) + 1), *_powers_of_two(32, budget), budget})
    steps = [prefill(t) for t in sizes]
    # 2..16 sampled rows of 2 tokens (the LM head's rows; the smallest tile class).
    q = min(2, longest)
    for r in range(2, min(SKINNY_ROWS, seqs, budget // q) + 1):
        steps.append(WarmupStep("rows", ((q, 0),) * r))
    # A chunk continuing a prompt beside decode rows: every tile class in one step.
    if decodes and seqs >= 2 and budget >= 3:
        d = min(seqs - 1, SKINNY_ROWS, budget // 2)
        chunk = min(budget - d, longest // 2, 2048)
        if chunk >= 1:
            context = min(15, longest - 1)
            steps.append(WarmupStep("mixed", ((chunk, min(chunk, longest - chunk)),) + ((1, context),) * d))
    # Eager decode (no graph for these batch sizes): each split count at each batch size.
    if decodes:
        batches = [b for b in sorted({*_powers_of_two(1, min(seqs, budget)), min(seqs, budget)})
                   if b > graph_max_batch]
        contexts = _split_contexts(longest) if decode_splits else [min(16, longest)]
        for b in batches:
            for c in contexts:
                steps.append(WarmupStep("decode", ((1, c - 1),) * b))
    return steps


class _AllowAll:
    """A grammar that allows every token: the sampler's structured path without a grammar."""

    is_terminated = False
    is_completed = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        pass  # allocate_bitmask starts with every token allowed


def sampler_paths(mode: str, max_num_seqs: int) -> list[tuple[str, int, list]]:
    """(name, rows, per-row SamplingParams keyword sets) of the sampler warm-up."""
    if mode == "off":
        return []
    random = dict(temperature=0.8)
    paths = [
        ("greedy", [dict(temperature=0.0)]),
        ("logprobs", [dict(temperature=0.0, logprobs=5)]),
        ("temperature", [random]),
        ("top_k", [dict(random, top_k=50)]),
        ("top_p", [dict(random, top_p=0.9)]),
        ("top_k_top_p_min_p", [dict(random, top_k=50, top_p=0.9, min_p=0.05)]),
        ("seeded", [dict(random, seed=1234)]),
        ("penalties", [dict(random, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)]),
        ("bias_min_tokens", [dict(temperature=0.0, logit_bias={5: 1.0}, min_tokens=4)]),
        ("greedy_and_random", [dict(temperature=0.0), dict(random, top_p=0.9)]),
    ]
    try:
        import xgrammar  # noqa: F401

        paths.append(("structured", [dict(temperature=0.0)]))
    except ImportError:
        pass
    if mode == "minimal":
        return [(name, 1, kws) for name, kws in paths]
    big = max(2, min(max_num_seqs, 64))  # the greedy argmax reduces differently from 64 rows
    return [(name, rows, kws) for name, kws in paths for rows in sorted({1, big})]


def warm_up(engine, mode: str = "auto") -> WarmupReport:
    """Runs the warm-up of `mode` on an idle engine (no request added yet, no step running);
    returns what it ran and how long it took (also logged)."""
    mode = resolve_mode(mode, engine.device)
    report = WarmupReport(mode)
    if mode == "off":
        logger.info(report.line())
        return report
    if engine.has_unfinished_requests():
        raise RuntimeError("warm-up needs an idle engine (requests are queued or running)")
    runner = engine.runner
    cfg = engine.scheduler_config
    graphs = runner.graphs.max_batch if runner.graphs is not None else 0
    steps = plan_steps(mode, budget=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                       max_model_len=engine.max_model_len, role=engine.role, graph_max_batch=graphs,
                       decode_splits=getattr(runner.attn, "name", "") == "triton")
    paths = sampler_paths(mode, cfg.max_num_seqs)
    t0 = time.perf_counter()
    cpu_rng = torch.random.get_rng_state()
    cuda = engine.device.type == "cuda"
    cuda_rng = torch.cuda.get_rng_state(engine.device) if cuda else None
    null_kv = [(_bytes(k[0]).clone(), _bytes(v[0]).clone()) for k, v in runner.kv_caches]
    try:
        for step in steps:
            _run_step(engine, step)
            report.steps.append(step)
        for name, rows, kws in paths:
            _run_sampler(engine, name, rows, kws)
            report.sampler_paths.append(f"{name}x{rows}")
        if cuda:
            torch.cuda.synchronize(engine.device)
    finally:
        with torch.inference_mode():
            for (k, v), (k0, v0) in zip(runner.kv_caches, null_kv):
                _bytes(k[0]).copy_(k0)
                _bytes(v[0]).copy_(v0)
        torch.random.set_rng_state(cpu_rng)
        if cuda:
            torch.cuda.set_rng_state(cuda_rng, engine.device)
    report.seconds = time.perf_counter() - t0
    logger.info(report.line())
    return report


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A cache block as raw bytes (any dtype, fp8 included, copies the same way)."""
    return t.view(torch.uint8)


def _run_step(engine, step: WarmupStep) -> None:
    from engine.sampler import RowSpec
    from engine.sampling_params import SamplingParams
    from engine.scheduler import ScheduledChunk, SchedulerOutput

    bs = engine.args.block_size
    vocab = engine.shape.vocab_size
    chunks = []
    for i, (q, start) in enumerate(step.rows):
        tokens = tuple((start + j) * 7 % (vocab - 1) + 1 for j in range(q))
        table = (0,) * math.ceil((start + q) / bs)  # the null block: no block of the cache is used
        chunks.append(ScheduledChunk(None, tokens, start, table, True))
    params = SamplingParams(temperature=0.0, max_tokens=1)
    rows = [RowSpec(params, (1,), ()) for _ in chunks]
    engine.runner.launch(SchedulerOutput(tuple(chunks)), rows, to_host=False).result()  # waits for the step


def _run_sampler(engine, name: str, rows: int, kws: list[dict]) -> None:
    from engine.sampler import RowSpec, SamplingMetadata
    from engine.sampling_params import SamplingParams

    vocab = engine.shape.vocab_size
    device, runner = engine.device, engine.runner
    specs = []
    for i in range(rows):
        params = SamplingParams(max_tokens=8, **kws[i % len(kws)])
        grammar = _AllowAll() if name == "structured" else None
        specs.append(RowSpec(params, (1, 2, 3), (4,), engine.eos_token_ids, index=i, grammar=grammar))
    with torch.inference_mode():
        logits = torch.randn(rows, vocab, device=device).to(runner.dtype)
        meta = SamplingMetadata.build(specs, vocab, device)
        runner.sampler(logits, meta).sampled_token_ids.tolist()
