"""Model runner: turns a `SchedulerOutput` into one forward pass and one batched sample.

It owns the model, the paged KV cache (one K and one V tensor per layer shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`) and the attention backend. It never reaches
into the scheduler: everything it needs comes in the `SchedulerOutput`.

Step inputs live in persistent buffers: the host fills pinned staging arrays (numpy views, no
per-step allocation) and one non-blocking copy per tensor moves them to the device. On CUDA, a
step whose rows all decode one token replays a CUDA graph captured for the next padded batch
size (`CudaGraphs`): the whole forward pass plus the LM head is one launch, which is what keeps
a small model (or batch 1 of a large one) from being bound by kernel launches.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, get_backend_class
from engine.config import ModelShape
from engine.request import PLACEHOLDER  # an input token read from the step before's device output
from engine.sampler import PromptLogprobsOutput, RowSpec, Sampler, SamplerOutput, SamplingMetadata, prompt_logprobs
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.scheduler import PROMPT_LOGITS_PER_STEP, ScheduledChunk, SchedulerOutput

logger = logging.getLogger("pdserve.engine")


def cuda_graph_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8 up to `max_batch` (and it)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logits] int64; last token of each sampled row, then prompt-logprob positions
    sampled_rows: tuple[int, ...]  # row index (into chunks) of each sampled row


class _HostSet:
    """One set of host staging arrays (pinned on CUDA), with numpy views."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool):
        def make(shape, dtype):
            t = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return t, t.numpy()

        self.ids_h, self.ids = make(max_tokens, torch.int64)
        self.pos_h, self.pos = make(max_tokens, torch.int64)
        self.slots_h, self.slots = make(max_tokens, torch.int64)
        self.qsl_h, self.qsl = make(max_seqs + 1, torch.int32)
        self.lens_h, self.lens = make(max_seqs, torch.int32)
        self.tables_h, self.tables = make((max_seqs, max_blocks), torch.int32)
        # the sampled rows' last tokens, then prompt positions whose logits give prompt logprobs
        self.logits_idx_h, self.logits_idx = make(max(max_tokens, max_seqs), torch.int64)
        self.fix_dst_h, self.fix_dst = make(max_seqs, torch.int64)  # placeholder token slots ...
        self.fix_src_h, self.fix_src = make(max_seqs, torch.int64)  # ... and their rows in the previous step


class _Buffers:
    """Persistent step inputs: host staging and the device tensors the forward pass reads.

    On CUDA there are two host sets used in turn: a step's non-blocking copies may still be
    queued when the next step is prepared (async scheduling keeps one step in flight), and the
    set a step fills is only reused after that step completed. On CPU the host set *is* the
    device buffer.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.sets = [_HostSet(max_tokens, max_seqs, max_blocks, self.cuda) for _ in range(2 if self.cuda else 1)]
        self.host = self.sets[0]
        h = self.host

        def dev(t):
            return torch.zeros_like(t, device=device) if self.cuda else t

        self.ids_d, self.pos_d, self.slots_d = dev(h.ids_h), dev(h.pos_h), dev(h.slots_h)
        self.qsl_d, self.lens_d, self.tables_d = dev(h.qsl_h), dev(h.lens_h), dev(h.tables_h)
        self.logits_idx_d = dev(h.logits_idx_h)
        self.fix_dst_d, self.fix_src_d = dev(h.fix_dst_h), dev(h.fix_src_h)
        self._turn = 0

    def next_set(self) -> _HostSet:
        self._turn = (self._turn + 1) % len(self.sets)
        self.host = self.sets[self._turn]
        return self.host

    def upload(self, num_tokens: int, num_seqs: int, table_width: int, num_logits: int, num_fixes: int) -> None:
        if not self.cuda:
            return
        h = self.host
        for src, dst, n in ((h.ids_h, self.ids_d, num_tokens), (h.pos_h, self.pos_d, num_tokens),
                            (h.slots_h, self.slots_d, num_tokens), (h.qsl_h, self.qsl_d, num_seqs + 1),
                            (h.lens_h, self.lens_d, num_seqs), (h.logits_idx_h, self.logits_idx_d, num_logits),
                            (h.fix_dst_h, self.fix_dst_d, num_fixes), (h.fix_src_h, self.fix_src_d, num_fixes)):
            if n:
                dst[:n].copy_(src[:n], non_blocking=True)
        if table_width:
            self.tables_d[:num_seqs, :table_width].copy_(h.tables_h[:num_seqs, :table_width], non_blocking=True)


@dataclass
class _Filled:
    num_tokens: int
    table_width: int
    sampled_rows: list[int]
    num_fixes: int  # placeholder tokens to read from the previous step's device output
    # prompt logprobs: the prompt token each extra logits row predicts, and the most top candidates asked
    prompt_targets: list[int]
    prompt_top: int = 0

    @property
    def num_logits(self) -> int:
        return len(self.sampled_rows) + len(self.prompt_targets)


class PendingStep:
    """A launched step: its sampled tokens are on their way to a pinned host buffer."""

    def __init__(self, output: SamplerOutput | None, host: torch.Tensor | None, event,
                 prompt: PromptLogprobsOutput | None = None):
        self.output = output  # device tensors
        self._host = host
        self._event = event
        self.prompt = prompt  # prompt logprobs of the step's `prompt_logits` spans, in chunk order

    @property
    def sampled_device(self) -> torch.Tensor:
        return self.output.sampled_token_ids

    def result(self) -> tuple[list[int], SamplerOutput | None]:
        """Waits for the step; returns its sampled token ids (host) and the device output."""
        if self.output is None:
            return [], None
        if self._event is not None:
            self._event.synchronize()
            return self._host.tolist(), self.output
        return self.output.sampled_token_ids.tolist(), self.output


class ModelRunner:
    def __init__(self, model: torch.nn.Module, shape: ModelShape, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, backend_name: str, *,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, enforce_eager: bool = False,
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        self.shape = shape
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # the cache's storage dtype: the model's, or float8 e4m3fn
        backend_cls = get_backend_class(backend_name)
        self.attn = backend_cls(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5)
        self.sampler = Sampler()
        self.max_blocks_per_seq = -(-shape.max_position_embeddings // block_size)
        graphs = not enforce_eager and device.type == "cuda" and self.attn.cuda_graph_safe
        self.graph_max_batch = min(max_num_seqs, 512) if graphs else 0
        self.buffers = _Buffers(max(max_num_batched_tokens, self.graph_max_batch, 1),
                                max(max_num_seqs, self.graph_max_batch, 1), self.max_blocks_per_seq, device)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs: CudaGraphs | None = None
        if device.type == "cuda":  # pinned landing slots for sampled ids (<= 2 steps in flight)
            self._sampled_host = [torch.zeros(self.buffers.max_seqs, dtype=torch.int64, pin_memory=True)
                                  for _ in range(3)]
            self._sampled_turn = 0
        if num_blocks:
            self.allocate_kv_cache(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = self.shape
        cache_shape = (num_blocks, self.block_size, shape.num_kv_heads, shape.head_dim)
        self.kv_caches = []
        self.kv_caches = [
            (torch.zeros(cache_shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(cache_shape, dtype=self.kv_dtype, device=self.device))
            for _ in range(shape.num_layers)
        ]
        self.num_blocks = num_blocks

    def capture_cuda_graphs(self) -> None:
        """Captures the decode graphs (CUDA, unless enforce_eager); needs the KV cache."""
        if self.graph_max_batch and self.kv_caches:
            self.graphs = CudaGraphs(self, cuda_graph_sizes(self.graph_max_batch))

    # ---- one step --------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput, rows: list[RowSpec]) -> PendingStep:
        """Runs the step; samples one token for every chunk with `sample` set (`rows` gives their
        sampling state, in chunk order). Its `output` (None: nothing sampled) and `prompt` (prompt
        logprobs) are device tensors: the caller's .tolist() waits for them."""
        return self.launch(out, rows, to_host=False)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, rows: list[RowSpec], prev: PendingStep | None = None,
               to_host: bool = True) -> PendingStep:
        """Queues the step on the device and returns at once (on CUDA). A row whose input token
        is PLACEHOLDER takes it from `prev`, the step before, on the device (async scheduling).
        `to_host`: also start the copy of the sampled ids to pinned memory that `result()` reads."""
        chunks = out.chunks
        self.buffers.next_set()
        filled = self.fill_rows(out)
        if (self.graphs is not None and len(chunks) <= self.graphs.max_batch and filled.num_tokens == len(chunks)
                and len(filled.sampled_rows) == len(chunks) and not filled.prompt_targets):
            logits = self.graphs.run(len(chunks), filled, prev)  # one token per row, every row sampled
        else:
            inputs = self._inputs(out, filled, prev)
            logits = self.forward(inputs)
            if logits is None:
                return PendingStep(None, None, None)
        num_sampled = len(filled.sampled_rows)
        prompt = None
        if filled.prompt_targets:
            targets = torch.tensor(filled.prompt_targets, dtype=torch.int64).to(self.device, non_blocking=True)
            prompt = prompt_logprobs(logits[num_sampled:], targets, filled.prompt_top)
        if not num_sampled:
            return PendingStep(None, None, None, prompt)
        meta = SamplingMetadata.build(rows, self.shape.vocab_size, self.device)
        output = self.sampler(logits[:num_sampled], meta)
        if self.device.type != "cuda" or not to_host:
            return PendingStep(output, None, None, prompt)
        host = self._sampled_host[self._sampled_turn][:len(rows)]
        self._sampled_turn = (self._sampled_turn + 1) % len(self._sampled_host)
        host.copy_(output.sampled_token_ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(output, host, event, prompt)

    def fill_rows(self, out: SchedulerOutput) -> _Filled:
        """Writes the step's rows into the current host staging set."""
        h = self.buffers.host
        bs = self.block_size
        ids, pos, slots, qsl, lens, tables, logits_idx = h.ids, h.pos, h.slots, h.qsl, h.lens, h.tables, h.logits_idx
        t = 0
        width = 0
        fixes = 0
        sampled: list[int] = []
        prompt_rows: list[int] = []  # flat token index of each prompt-logprob position
        prompt_targets: list[int] = []
        prompt_top = 0
        qsl[0] = 0
        for i, chunk in enumerate(out.chunks):
            table = chunk.block_table
            start, n = chunk.start_pos, len(chunk.token_ids)
            end = start + n
            if n == 1:
                token = chunk.token_ids[0]
                if token == PLACEHOLDER:
                    h.fix_dst[fixes] = t
                    h.fix_src[fixes] = chunk.input_row
                    fixes += 1
                    token = 0
                ids[t] = token
                pos[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                ids[t:t + n] = chunk.token_ids
                p = np.arange(start, end)
                pos[t:t + n] = p
                slots[t:t + n] = np.asarray(table)[p // bs] * bs + p % bs
            first, count = chunk.prompt_logits
            if count:
                prompt_rows.extend(range(t + first - start, t + first - start + count))
                prompt_targets.extend(chunk.prompt_targets)
                prompt_top = max(prompt_top, chunk.num_prompt_top)
            t += n
            qsl[i + 1] = t
            lens[i] = end
            used = -(-end // bs)
            tables[i, :used] = table[:used]
            width = max(width, used)
            if chunk.sample:
                logits_idx[len(sampled)] = t - 1
                sampled.append(i)
        if prompt_rows:
            logits_idx[len(sampled):len(sampled) + len(prompt_rows)] = prompt_rows
        return _Filled(t, width, sampled, fixes, prompt_targets, prompt_top)

    def upload(self, num_tokens: int, num_seqs: int, filled: _Filled, prev: PendingStep | None) -> None:
        """Moves the staged inputs to the device and patches in tokens still on the device."""
        b = self.buffers
        b.upload(num_tokens, num_seqs, filled.table_width, filled.num_logits, filled.num_fixes)
        if filled.num_fixes:
            if prev is None or prev.output is None:
                raise RuntimeError("a row's input token is still in flight but no previous step was given")
            n = filled.num_fixes
            b.ids_d[b.fix_dst_d[:n]] = prev.sampled_device[b.fix_src_d[:n]]

    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The forward pass of staged inputs; logits of the rows in `logits_indices` (the sampled
        rows, then prompt-logprob positions; None if there are none)."""
        self.attn.plan(inputs.metadata)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, self.attn)
        if not inputs.logits_indices.shape[0]:
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def publish_step(self, num_tokens: int, num_seqs: int, filled: _Filled, graph_size: int) -> None:
        """Called once the step's inputs are on the device, before the forward pass. One rank:
        nothing to do; rank 0 of a tensor-parallel group sends them to the others here
        (engine/parallel/step.py)."""

    def _inputs(self, out: SchedulerOutput, filled: _Filled, prev: PendingStep | None) -> StepInputs:
        num_seqs = len(out.chunks)
        self.upload(filled.num_tokens, num_seqs, filled, prev)
        self.publish_step(filled.num_tokens, num_seqs, filled, 0)
        query_lens = tuple(len(c.token_ids) for c in out.chunks)
        seq_lens = tuple(c.end_pos for c in out.chunks)
        return self.staged_inputs(filled.num_tokens, filled.table_width, tuple(filled.sampled_rows),
                                  query_lens, seq_lens, filled.num_logits)

    def staged_inputs(self, num_tokens: int, width: int, sampled_rows: tuple[int, ...],
                      query_lens: tuple[int, ...], seq_lens: tuple[int, ...],
                      num_logits: int | None = None) -> StepInputs:
        """StepInputs over the device buffers, for rows already staged there; `num_logits` rows of
        logits (default: one per sampled row)."""
        b = self.buffers
        num_seqs = len(query_lens)
        md = AttentionMetadata(
            slot_mapping=b.slots_d[:num_tokens],
            query_start_loc=b.qsl_d[:num_seqs + 1],
            seq_lens=b.lens_d[:num_seqs],
            block_tables=b.tables_d[:num_seqs, :max(width, 1)],
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=b.ids_d[:num_tokens],
            positions=b.pos_d[:num_tokens],
            metadata=md,
            logits_indices=b.logits_idx_d[:len(sampled_rows) if num_logits is None else num_logits],
            sampled_rows=sampled_rows,
        )

    def prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        """The step's device inputs (no placeholder tokens allowed)."""
        self.buffers.next_set()
        return self._inputs(out, self.fill_rows(out), None)

    # ---- memory profile ----------------------------------------------------------------------
    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int, max_model_len: int) -> int:
        """Bytes of activation memory the largest step needs beyond the weights: one forward of
        `num_tokens` tokens in `num_seqs` rows (each at most max_model_len), all rows sampled with
        top-p (the sampler's heaviest path) and as many prompt-logprob positions as a step may
        compute (`PROMPT_LOGITS_PER_STEP`, with the most top candidates). Runs on a scratch KV
        cache, freed afterwards."""
        bs = self.block_size
        num_seqs = max(1, min(num_seqs, num_tokens))
        per_row = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        per_row = [min(n, max_model_len - 1) for n in per_row if n > 0]
        need = sum(-(-n // bs) for n in per_row) + 1
        saved = (self.kv_caches, self.num_blocks)
        self.allocate_kv_cache(need)
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            chunks, next_block, logit_room = [], 1, PROMPT_LOGITS_PER_STEP
            for n in per_row:
                k = -(-n // bs)
                count = min(n - 1, logit_room)  # position i predicts token i + 1: n - 1 per row at most
                logit_room -= count
                chunks.append(ScheduledChunk(None, tuple([1] * n), 0, tuple(range(next_block, next_block + k)), True,
                                             (0, count), (1,) * count, MAX_LOGPROBS if count else 0))
                next_block += k
            params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, logprobs=5)
            rows = [RowSpec(params, (1,), ()) for _ in chunks]
            saved_graphs, self.graphs = self.graphs, None
            try:
                self.execute(SchedulerOutput(tuple(chunks)), rows)
            finally:
                self.graphs = saved_graphs
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        finally:
            self.kv_caches, self.num_blocks = [], 0
            torch.cuda.empty_cache()
            self.kv_caches, self.num_blocks = saved

    # ---- KV export / import (prefill and decode roles) ---------------------------------------
    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids`, each `[num_layers, len(block_ids), block_size, kv_heads, head_dim]`,
        in the cache's dtype (an fp8 cache exports its 1-byte elements as they are)."""
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        k = torch.stack([_raw(kc).index_select(0, idx) for kc, _ in self.kv_caches])
        v = torch.stack([_raw(vc).index_select(0, idx) for _, vc in self.kv_caches])
        return k.view(self.kv_dtype), v.view(self.kv_dtype)

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V (`[num_layers, len(block_ids), ...]`, any device; pinned host memory copies
        asynchronously) into `block_ids`: one copy of each to the device, one scatter per layer.
        On CUDA it runs on a side stream and returns once done, so it may run on any thread while
        steps run, as long as no step reads these blocks (reserved ones)."""
        expected = (self.shape.num_layers, len(block_ids), self.block_size, self.shape.num_kv_heads, self.shape.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KV shape {tuple(k.shape)} does not match the cache {expected}")
        check_kv_dtype(k, v, self.kv_dtype)
        if self.device.type != "cuda":
            self._scatter(block_ids, k, v)
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._scatter(block_ids, k, v)
        stream.synchronize()

    @torch.inference_mode()
    def write_block_range(self, block_ids: list[int], kind: int, layer: int, data: torch.Tensor) -> None:
        """Part of a transfer: `data` (`[layers, len(block_ids), ...]`, host or device) into layers
        [layer, layer + layers) of K (kind 0) or V (kind 1) at `block_ids`. The same rule as
        `write_blocks`: reserved blocks only, any thread, returns once the copy is done."""
        layers = data.shape[0]
        expected = (layers, len(block_ids), self.block_size, self.shape.num_kv_heads, self.shape.head_dim)
        if tuple(data.shape) != expected or layer + layers > self.shape.num_layers or kind not in (0, 1):
            raise ValueError(f"KV part {tuple(data.shape)} at layer {layer} does not match the cache {expected}")
        check_kv_dtype(data, data, self.kv_dtype)
        if self.device.type != "cuda":
            self._scatter_part(block_ids, kind, layer, data)
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._scatter_part(block_ids, kind, layer, data)
        stream.synchronize()

    def _scatter_part(self, block_ids: list[int], kind: int, layer: int, data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        data = _raw(data.to(device=self.device, dtype=self.kv_dtype, non_blocking=True))
        for i in range(data.shape[0]):
            _raw(self.kv_caches[layer + i][kind]).index_copy_(0, idx, data[i])

    def _scatter(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        k = _raw(k.to(device=self.device, dtype=self.kv_dtype, non_blocking=True))
        v = _raw(v.to(device=self.device, dtype=self.kv_dtype, non_blocking=True))
        for layer, (kc, vc) in enumerate(self.kv_caches):
            _raw(kc).index_copy_(0, idx, k[layer])
            _raw(vc).index_copy_(0, idx, v[layer])


def _raw(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as its bytes (index_copy_ has no fp8 kernel on CPU); others as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def check_kv_dtype(k: torch.Tensor, v: torch.Tensor, kv_dtype: torch.dtype) -> None:
    """Imported KV must be in the cache's dtype where fp8 is involved: an fp8 cache takes fp8
    blocks (with the same static scales) only, and its blocks never go into a dense cache
    (casting either way would skip the scales)."""
    fp8 = torch.float8_e4m3fn
    if (k.dtype == fp8 or v.dtype == fp8 or kv_dtype == fp8) and not k.dtype == v.dtype == kv_dtype:
        raise ValueError(f"KV dtype {k.dtype} does not match the cache's {kv_dtype} (an fp8 cache takes fp8 "
                         "blocks with the same scales only: both sides need the same --kv-cache-dtype)")


class CudaGraphs:
    """One CUDA graph per padded batch size for pure-decode steps: embedding -> layers -> norm ->
    LM head, reading the runner's persistent device buffers.

    Padding rows (batch n < graph size) get slot -1 (no KV write) and seq_len 0 (attention
    returns zeros); their logits are ignored. The attention backend is planned once per graph
    with a bound on the context (max_model_len), so the launch parameters baked into a graph
    hold for any context; the decode kernel splits each sequence's own context.
    """

    def __init__(self, runner: ModelRunner, sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        t0 = time.perf_counter()
        before = torch.cuda.mem_get_info(runner.device)[0]
        pool = torch.cuda.graph_pool_handle()
        b = runner.buffers
        b.slots_d.fill_(-1)  # warm-up and capture write no KV and attend to nothing
        b.lens_d.zero_()
        b.ids_d.zero_()
        b.pos_d.zero_()
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the others reuse its pool memory
                self.runner.attn.plan(self._metadata(size))
                for _ in range(2):  # compile / autotune outside the capture
                    self._forward(size)
                torch.cuda.synchronize(runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size)
                self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(runner.device)
        used = before - torch.cuda.mem_get_info(runner.device)[0]
        logger.info("captured %d CUDA graphs (batch 1..%d) in %.1f s, %.0f MiB", len(self.sizes),
                    self.max_batch, time.perf_counter() - t0, used / 2**20)

    def _metadata(self, size: int) -> AttentionMetadata:
        b, r = self.runner.buffers, self.runner
        return AttentionMetadata(
            slot_mapping=b.slots_d[:size], query_start_loc=b.qsl_d[:size + 1], seq_lens=b.lens_d[:size],
            block_tables=b.tables_d[:size], max_query_len=1, max_seq_len=r.shape.max_position_embeddings,
            query_lens_cpu=(1,) * size, seq_lens_cpu=(r.shape.max_position_embeddings,) * size)

    def _forward(self, size: int) -> torch.Tensor:
        r, b = self.runner, self.runner.buffers
        hidden = r.model(b.ids_d[:size], b.pos_d[:size], r.kv_caches, r.attn)
        return r.model.compute_logits(hidden)

    def run(self, n: int, filled: _Filled, prev: PendingStep | None) -> torch.Tensor:
        """Logits `[n, vocab]` of a pure-decode step of n rows already staged by fill_rows."""
        r = self.runner
        h = r.buffers.host
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        if size > n:  # padding rows
            h.ids[n:size] = 0
            h.pos[n:size] = 0
            h.slots[n:size] = -1
            h.lens[n:size] = 0
        r.upload(size, size, filled, prev)
        r.publish_step(size, size, filled, size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]
