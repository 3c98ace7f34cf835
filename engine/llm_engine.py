"""The engine: add requests, `step()` them forward, get per-step outputs.

One engine serves three roles:
- `both`: prompts and generation in one process (the offline `LLM` API, single-node serving);
- `prefill`: runs the prompt, samples the first token, then keeps the request's KV blocks until
  `export_kv()` hands them out (or `release()` drops them);
- `decode`: `import_request()` takes a request's KV plus its first token and continues decoding.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import (CacheConfig, EngineArgs, ModelShape, ResolvedConfig, SchedulerConfig, resolve_device,
                           resolve_dtype, resolve_kv_cache_dtype)
from engine.kv_sizing import check_weights_fit, size_kv_cache
from engine.loader import ModelSource, load_model_source
from engine.model_info import resolve_max_model_len
from engine.model_runner import ModelRunner, PendingStep
from engine.models import get_model_class
from engine.quant import QuantConfig, load_checkpoint, resolve_quant_config
from engine.quant.config import gguf_packed_by_default
from engine.parallel.group import TPGroup
from engine.parallel.ranks import RankProcesses, rank_devices
from engine.parallel.sharding import check_tp_size, make_shard
from engine.parallel.step import TPLeaderRunner
from engine.outputs import StepOutput
from engine.output_processor import OutputProcessor
from engine.request import PLACEHOLDER, FinishReason, Request
from engine.sampler import RowSpec
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from engine.structured import GrammarCache, GrammarState

logger = logging.getLogger("pdserve.engine")
STEP_TOKENS_KEPT = 1 << 16


@dataclass
class _Launched:
    """A step queued on the device whose tokens are not read yet (async scheduling)."""

    pending: PendingStep
    rows: list[tuple[Request, int] | None]  # per sampled row: (request, index of its placeholder) or None
    chunks: tuple[ScheduledChunk, ...]


@dataclass(frozen=True)
class KVExport:
    """A prefilled request's KV, ready to move to a decode node."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    num_tokens: int  # tokens whose KV is in the blocks (= prompt length)
    k: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor


def model_shape(config, max_model_len: int) -> ModelShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_position_embeddings=max_model_len,
    )


def max_batched_tokens(args: EngineArgs, max_model_len: int) -> int:
    if args.max_num_batched_tokens:
        return args.max_num_batched_tokens
    return max(2048, args.max_num_seqs) if args.enable_chunked_prefill else max_model_len


def build_model(source: ModelSource, device: torch.device, dtype: torch.dtype, max_model_len: int,
                tp: TPGroup | None = None, quant: QuantConfig | None = None) -> torch.nn.Module:
    """Builds the model (this rank's shard under TP) directly in the target dtype on the target
    device (no fp32 copy of the weights on the way) and loads the checkpoint into it."""
    cls = get_model_class(source.config.model_type)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(source.config, max_positions=max_model_len, tp=tp)
    except torch.cuda.OutOfMemoryError as e:
        raise MemoryError(f"the model does not fit on {device}: {e}") from None
    finally:
        torch.set_default_dtype(previous)
    load_checkpoint(model, source, quant)  # quantized layers swapped in as the weights load (engine/quant)
    return model.eval()


def build_runner(args: EngineArgs, source: ModelSource, device: torch.device, max_model_len: int,
                 tp: TPGroup | None = None) -> ModelRunner:
    """The model runner of one rank (rank 0 of a TP group: the one that drives the others); its
    KV cache is allocated later."""
    dtype = resolve_dtype(args.dtype, device)
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype, device)
    packed = gguf_packed_by_default(device.type, dtype, 1 if tp is None else tp.size)
    quant = resolve_quant_config(args.quantization, source, gguf_packed=packed)
    if args.quantization is None and quant is not None and quant.method == "gguf" and (tp is None or tp.rank == 0):
        logger.info("GGUF weights kept packed (the default on CPU in bf16; --quantization none dequantizes them)")
    model = build_model(source, device, dtype, max_model_len, tp, quant)
    shard = model.shard
    shape = dataclasses.replace(model_shape(source.config, max_model_len), num_heads=shard.num_heads,
                                num_kv_heads=shard.num_kv_heads)
    backend = args.attention_backend or ("triton" if device.type == "cuda" else "torch")
    runner_args = (model, shape, 0, args.block_size, device, dtype, backend)
    kwargs = dict(max_num_batched_tokens=max_batched_tokens(args, max_model_len), max_num_seqs=args.max_num_seqs,
                  enforce_eager=args.enforce_eager or args.role == "prefill",  # prefill never decodes
                  kv_dtype=kv_dtype)
    if tp is None or tp.rank != 0:
        return ModelRunner(*runner_args, **kwargs)
    kv_starts = [make_shard(source.config, r, tp.size).kv_start for r in range(tp.size)]
    return TPLeaderRunner(*runner_args, group=tp, kv_starts=kv_starts, total_kv_heads=shard.total_kv_heads,
                          **kwargs)


class LLMEngine:
    def __init__(self, args: EngineArgs, source: ModelSource | None = None):
        self.args = args
        self.source = source or load_model_source(args.model)
        self.tokenizer = self.source.tokenizer
        self.model_name = args.served_model_name or self.source.name
        config = self.source.config
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, self.dtype, self.device)  # fp8: 1 byte
        self.max_model_len = resolve_max_model_len(config, args.max_model_len)
        self.shape = model_shape(config, self.max_model_len)
        self.eos_token_ids = tuple(self.source.eos_token_ids)
        self.role = args.role
        torch.manual_seed(args.seed)

        batched = max_batched_tokens(args, self.max_model_len)
        self.scheduler_config = SchedulerConfig(args.max_num_seqs, batched, self.max_model_len,
                                                args.enable_chunked_prefill)
        self.ranks = self._start_ranks(config)
        try:
            self._build(config)
        except BaseException:
            self.close()
            raise

    def _build(self, config) -> None:
        args = self.args
        if self.device.type == "cuda":
            check_weights_fit(config, args, self.device, self.dtype)
        self.runner = build_runner(args, self.source, self.device, self.max_model_len,
                                   self.ranks.group if self.ranks else None)
        sizing = size_kv_cache(args, self.runner, self.scheduler_config, self.max_model_len)
        self.kv_blocks_fit = sizing.fit  # before the max_num_seqs cap (reported by bench/gpu_speed.py)
        num_blocks = sizing.num_blocks
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_cuda_graphs()
        self.cache_config = CacheConfig(args.block_size, num_blocks, args.enable_prefix_caching)
        self.resolved = ResolvedConfig(self.device, self.dtype, self.kv_dtype, self.max_model_len,
                                       self.scheduler_config.max_num_batched_tokens, args.block_size, num_blocks)
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.output_processor = OutputProcessor(self.tokenizer, self.role, self._finish)
        # Async scheduling: one step queued on the device ahead of the host (CUDA; not for the
        # prefill role, whose requests end after one token).
        wanted = self.device.type == "cuda" if args.async_scheduling is None else args.async_scheduling
        self._async = wanted and self.role != "prefill"
        self._inflight: _Launched | None = None
        self._groups: dict[str, list[Request]] = {}  # client request id -> its n sequences
        self._prefilled: dict[str, Request] = {}  # prefill role: done, KV held until exported
        self._ids = itertools.count()
        self._grammars: GrammarCache | None = None  # built on the first structured request
        # Tokens computed by each step, for the iteration_tokens histogram (the metrics exporter takes
        # them; bounded so an engine nobody scrapes keeps only the latest)
        self.step_tokens: collections.deque[int] = collections.deque(maxlen=STEP_TOKENS_KEPT)

    # ---- construction ------------------------------------------------------------------------
    def _start_ranks(self, config) -> RankProcesses | None:
        """Tensor parallel: spawns ranks 1..N-1 (rank 0 is this process); None for one rank."""
        size = self.args.tensor_parallel_size
        check_tp_size(config, size)
        if size == 1:
            return None
        devices = rank_devices(self.device, size)
        self.device = devices[0]
        return RankProcesses(self.args, devices)

    def close(self) -> None:
        """Stops the other tensor-parallel ranks (a no-op with one rank); idempotent."""
        ranks, self.ranks = getattr(self, "ranks", None), None
        if ranks is None:
            return
        grace = 0.0
        if ranks.died is None and isinstance(getattr(self, "runner", None), TPLeaderRunner):
            try:
                self.runner.stop_ranks()
                grace = 10.0
            except RuntimeError:
                pass
        ranks.close(grace)

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    sample_index: int = 0, output_token_ids: list[int] | None = None) -> None:
        """Queues a request. `sample_index` (n == 1 only) names which of a client's n completions
        this is when another process split them, so seeded streams stay distinct.
        `output_token_ids` (n == 1 only) resumes a completion another node started (failover): those
        tokens count as already generated (max_tokens, min_tokens, penalties, stop strings, the
        seeded stream's position, the grammar), their KV is recomputed with the prompt's, and the
        outputs continue after them; their text is not emitted again."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("the prompt is empty")
            prompt_token_ids = self.tokenize(prompt)
        prompt_token_ids = self._check_prompt(prompt_token_ids)
        max_tokens = self._max_new_tokens(params, len(prompt_token_ids))
        grammars = [self.grammar_state(params) for _ in range(params.n)]  # a bad spec raises before any state
        parent = None
        group = []
        for index in range(params.n):
            req = Request(f"{request_id}\x00{next(self._ids)}", list(prompt_token_ids), params, max_tokens,
                          eos_token_ids=self.eos_token_ids, priority=priority, prompt=prompt,
                          parent=parent, sample_index=index if params.n > 1 else sample_index)
            req.client_id = request_id
            req.grammar = grammars[index]
            self.output_processor.start(req)
            if params.prompt_logprobs is not None and parent is None and not output_token_ids:
                req.prompt_logprobs = []  # the first sequence computes them (a resumed one sent them already)
            parent = parent or req
            group.append(req)
        if output_token_ids:
            self._resume(group, output_token_ids)
        self._groups[request_id] = group
        for req in group:
            self.scheduler.add_request(req)

    def _resume(self, group: list[Request], output_token_ids: list[int]) -> None:
        """Replays tokens generated elsewhere into a fresh request (see `add_request`)."""
        if len(group) != 1:
            raise ValueError("a resumed request carries one sequence (n == 1)")
        req = group[0]
        vocab = self.shape.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in output_token_ids):
            raise ValueError(f"resumed output token ids must be integers in [0, {vocab})")
        if len(output_token_ids) >= req.max_tokens:
            raise ValueError(f"{len(output_token_ids)} resumed tokens leave nothing to generate "
                             f"(max_tokens {req.max_tokens})")
        for token_id in output_token_ids:
            if req.grammar is not None and not req.grammar.accept(token_id):
                raise ValueError(f"resumed token {token_id} is outside the request's grammar")
            req.output_token_ids.append(token_id)
        self.output_processor.replay(req, output_token_ids)  # that text reached the client already

    def grammar_state(self, params: SamplingParams) -> GrammarState | None:
        """A fresh grammar matcher for a structured request (None without a constraint)."""
        if params.structured is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCache(self.tokenizer, self.shape.vocab_size, self.eos_token_ids)
        return self._grammars.state(params.structured)

    def _check_prompt(self, ids) -> list[int]:
        if len(ids) == 0:
            raise ValueError("the prompt is empty")
        vocab = self.shape.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                             f"(prompt plus at least one new token must fit)")
        return list(ids)

    def _max_new_tokens(self, params: SamplingParams, prompt_len: int) -> int:
        """The request's max_tokens within the context left after its prompt (`_check_prompt` leaves
        room for one). The engine does not validate parameters: its callers did (the offline `LLM`
        and the router call `SamplingParams.verify`), and any value a field can hold is harmless to
        the other requests of a batch (tests/engine/test_resolved_params.py)."""
        room = self.max_model_len - prompt_len
        return room if params.max_tokens is None else max(1, min(params.max_tokens, room))

    def abort_request(self, request_id: str) -> bool:
        """Aborts every sequence of a request; returns False if it is unknown or finished."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return self.release(request_id)
        for req in group:
            if not req.is_finished:
                self.scheduler.finish(req, FinishReason.ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ---- the step loop ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Runs one step; returns the tokens it produced. With async scheduling (CUDA), returns the
        tokens of the step before, while this one runs on the device."""
        if self.ranks is not None:
            self.ranks.check()
        if self._async:
            return self._step_async()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self.step_tokens.append(out.num_scheduled_tokens)
        sampled = [c for c in out.chunks if c.sample]
        pending = self.runner.execute(out, [self._row_spec(c.request) for c in sampled])
        for chunk in out.chunks:
            self.scheduler.advance(chunk)
        self.output_processor.record_prompt_logprobs(out.chunks, pending.prompt)
        result = pending.output
        if result is None:
            return []
        token_ids = result.sampled_token_ids.tolist()
        return self.output_processor.process([(c.request, None) for c in sampled], token_ids, result)

    def _step_async(self) -> list[StepOutput]:
        """Async scheduling: step N+1 is scheduled and queued on the device before step N's tokens
        are read, so the host's bookkeeping (detokenizing, stop checks, scheduling) overlaps the
        device's work instead of leaving it idle.

        A row continuing from step N gets a PLACEHOLDER input token, read from step N's device
        output. Step N's tokens replace the placeholders when N completes; a request that N
        finishes (eos, stop string) has its row in N+1 ignored. Rows that need their token
        history on the host (penalties) wait for step N first."""
        prev, self._inflight = self._inflight, None
        out = self.scheduler.schedule()
        outputs: list[StepOutput] = []
        if prev is not None and not out.is_empty and self._needs_token_values(out):
            outputs += self._complete(prev)
            prev = None
            out = self.scheduler.resolve_placeholders(out)
        if not out.is_empty:
            self.step_tokens.append(out.num_scheduled_tokens)
            self._inflight = self._launch(out, prev)
        if prev is not None:
            outputs += self._complete(prev)
        return outputs

    @staticmethod
    def _needs_token_values(out: SchedulerOutput) -> bool:
        return any(c.sample and (c.request.sampling_params.has_penalties or c.request.grammar is not None)
                   for c in out.chunks)

    def _launch(self, out: SchedulerOutput, prev: _Launched | None) -> _Launched:
        sampled = [c for c in out.chunks if c.sample]
        pending = self.runner.launch(out, [self._row_spec(c.request) for c in sampled],
                                     prev.pending if prev is not None else None)
        for chunk in out.chunks:
            if not chunk.request.is_finished:
                self.scheduler.advance(chunk, register=False)  # blocks are registered at completion
        rows: list[tuple[Request, int] | None] = []
        for i, chunk in enumerate(sampled):
            req = chunk.request
            if req.is_finished:
                rows.append(None)
                continue
            rows.append((req, len(req.output_token_ids)))
            req.output_token_ids.append(PLACEHOLDER)
            req.pending_row = i
            req.num_pending += 1
        return _Launched(pending, rows, out.chunks)

    def _complete(self, launched: _Launched) -> list[StepOutput]:
        token_ids, result = launched.pending.result()
        for row in launched.rows:
            if row is not None:
                row[0].num_pending -= 1
        for chunk in launched.chunks:
            req = chunk.request
            if not req.is_finished:
                self.scheduler.register_blocks(chunk)
        self.output_processor.record_prompt_logprobs(launched.chunks, launched.pending.prompt)
        if result is None:
            return []
        return self.output_processor.process(launched.rows, token_ids, result)

    def take_step_tokens(self) -> list[int]:
        """The tokens of every step since the last call (any thread: deque pops are atomic)."""
        taken = []
        while self.step_tokens:
            taken.append(self.step_tokens.popleft())
        return taken

    @staticmethod
    def _row_spec(req: Request) -> RowSpec:
        return RowSpec(req.sampling_params, req.prompt_token_ids, req.output_token_ids, req.eos_token_ids,
                       index=req.sample_index, grammar=req.grammar)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        keep = reason == FinishReason.PREFILLED
        self.scheduler.finish(req, reason, free_blocks=not keep)
        if keep:
            self._prefilled[req.client_id] = req
        group = self._groups.get(req.client_id)
        if group is not None and all(r.is_finished for r in group):
            del self._groups[req.client_id]

    # ---- prefill role: export ---------------------------------------------------------------------
    def export_kv(self, request_id: str, from_block: int = 0) -> KVExport:
        """The KV blocks of a prefilled request from `from_block` on (the earlier ones went out with
        `export_computed_kv`); the blocks are freed once read."""
        req = self._prefilled.pop(request_id, None)
        if req is None:
            raise KeyError(f"no prefilled request {request_id!r}")
        try:
            n = req.num_prompt_tokens
            blocks = req.block_table[from_block: self.block_manager.blocks_needed(n)]
            k, v = self.runner.read_blocks(blocks)
            return KVExport(request_id, req.prompt_token_ids, req.output_token_ids[0], n, k, v)
        finally:
            self.scheduler.free_blocks(req)

    def export_computed_kv(self, request_id: str, from_block: int, min_blocks: int = 1):
        """Prefill role, while a prompt is still prefilling: `(from_block, k, v)` with the KV of its
        full blocks [from_block, done) that the steps so far computed (on CUDA, possibly still
        queued: the read is ordered after them on the stream); None while fewer than `min_blocks`
        new blocks are full, or once the request left the running set (finished, aborted: then
        `export_kv` takes the rest). The blocks stay the request's."""
        group = self._groups.get(request_id)
        if not group or len(group) != 1 or group[0].is_finished:
            return None
        req = group[0]
        done = min(req.num_computed_tokens, req.num_prompt_tokens) // self.cache_config.block_size
        if done - from_block < max(1, min_blocks):
            return None
        k, v = self.runner.read_blocks(req.block_table[from_block:done])
        return from_block, k, v

    def release(self, request_id: str) -> bool:
        """Drops a prefilled request's KV without exporting it."""
        req = self._prefilled.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.free_blocks(req)
        return True

    # ---- decode role: import ---------------------------------------------------------------------
    def import_request(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                       params: SamplingParams, k: torch.Tensor, v: torch.Tensor, priority: int = 0,
                       block_ids: list[int] | None = None, sample_index: int = 0) -> None:
        """Adds a request whose prompt KV was computed elsewhere; decoding continues from its
        first token. `block_ids` are blocks reserved earlier with `reserve_blocks` (else allocated
        here). `k` and `v` None: the KV is in `block_ids` already (`write_reserved`)."""
        if k is None and block_ids is None:
            raise ValueError("KV that was written in place needs the block ids it was written to")
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n != 1:
            raise ValueError("imported requests carry one sequence (n == 1)")
        prompt_token_ids = self._check_prompt(prompt_token_ids)
        max_tokens = self._max_new_tokens(params, len(prompt_token_ids))
        grammar = self.grammar_state(params)  # the prefill node sampled the first token under it
        if grammar is not None and not grammar.accept(first_token_id):
            raise ValueError(f"the first token {first_token_id} is outside the request's grammar")
        n = len(prompt_token_ids)
        need = self.block_manager.blocks_needed(n)
        if block_ids is None:
            block_ids = self.reserve_blocks(n)
            if block_ids is None:
                raise MemoryError(f"no room for {need} KV blocks ({self.block_manager.num_free_blocks} free)")
        if len(block_ids) != need:
            raise ValueError(f"{n} tokens need {need} blocks, got {len(block_ids)}")
        try:
            if k is not None:
                self.runner.write_blocks(block_ids, k, v)
        except Exception:
            self.block_manager.free(block_ids)
            raise
        req = Request(f"{request_id}\x00{next(self._ids)}", list(prompt_token_ids), params, max_tokens,
                      eos_token_ids=self.eos_token_ids, priority=priority, sample_index=sample_index)
        req.client_id = request_id
        req.block_table = list(block_ids)
        req.num_computed_tokens = n
        req.num_cached_tokens = 0
        req.grammar = grammar
        req.output_token_ids.append(first_token_id)
        self.output_processor.start(req)
        self.output_processor.replay(req, [first_token_id])  # the prefill side streamed its text
        self._groups[request_id] = [req]
        self.scheduler.add_running(req)
        # The imported prompt joins this node's prefix cache, so a follow-up turn reuses it here.
        self.block_manager.cache_full_blocks(req.block_table, req.prompt_token_ids, n, req.block_hashes)

    def reserve_blocks(self, num_tokens: int) -> list[int] | None:
        need = self.block_manager.blocks_needed(num_tokens)
        if not self.block_manager.can_allocate(need):
            return None
        return self.block_manager.allocate(need)

    def free_reserved(self, block_ids: list[int]) -> None:
        self.block_manager.free(block_ids)

    def write_reserved(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """A transfer's KV into blocks from `reserve_blocks`. Safe on any thread while steps run:
        no step reads a reserved block until `import_request` takes it."""
        self.runner.write_blocks(block_ids, k, v)

    @property
    def write_reserved_part(self):
        """`(block_ids, kind, layer, data)` -> part of a transfer into reserved blocks, on any thread;
        None where the KV lives in several processes (TP > 1: `write_reserved` scatters the heads)."""
        return None if isinstance(self.runner, TPLeaderRunner) else self.runner.write_block_range

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the K and V cache tensors (`[num_blocks, block_size, kv_heads, head_dim]`)."""
        return self.runner.kv_caches

    # ---- introspection -----------------------------------------------------------------------------
    def load(self) -> dict:
        bm = self.block_manager
        return {
            "num_waiting": len(self.scheduler.waiting), "num_running": len(self.scheduler.running),
            "free_blocks": bm.num_free_blocks, "total_blocks": bm.num_total_blocks,
            "num_prefilled_held": len(self._prefilled),
            "queued_prompt_tokens": sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
        }

    def request_ids(self) -> set[str]:
        return set(self._groups) | set(self._prefilled)

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
