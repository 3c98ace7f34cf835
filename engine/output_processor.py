"""Sampled tokens -> `StepOutput`s: each token is recorded on its request, detokenized, checked
against the stop rules (stop token ids, eos, stop strings, max_tokens, the grammar's end) and
reported with its logprobs, text delta and finish reason. Prompt logprobs are collected here too.

The engine owns one `OutputProcessor`; a request that ends is handed back through `finish`
(the engine frees or keeps its blocks).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import Logprob, StepOutput
from engine.request import FinishReason, Request
from engine.sampler import PromptLogprobsOutput, SamplerOutput
from engine.scheduler import ScheduledChunk

logger = logging.getLogger("pdserve.engine")


class OutputProcessor:
    def __init__(self, tokenizer, role: str, finish: Callable[[Request, FinishReason], None]):
        self.tokenizer = tokenizer
        self.role = role
        self.finish = finish

    # ---- request setup -----------------------------------------------------------------------------
    def start(self, req: Request) -> None:
        """Gives a new request its detokenizer."""
        req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.sampling_params)

    @staticmethod
    def replay(req: Request, token_ids: Sequence[int]) -> None:
        """Feeds output tokens whose text reached the client from elsewhere (a prefill node's first
        token, a resumed completion) to the detokenizer, so only later text is emitted."""
        for token_id in token_ids:
            req.detokenizer.append(token_id)
        req.detokenizer.get_delta()

    # ---- one step's samples ------------------------------------------------------------------------
    def process(self, rows: Sequence, token_ids: list[int], result: SamplerOutput) -> list[StepOutput]:
        """Sampled row i gave token_ids[i] for rows[i]: (request, index of its placeholder in
        output_token_ids, or None to append), or None to skip (finished when the step launched)."""
        outputs = []
        for i, row in enumerate(rows):
            if row is None:
                continue
            req, index = row
            if req.is_finished:  # aborted, or finished by the step before (async)
                continue
            logprobs = _logprobs(result, i, token_ids[i]) if req.sampling_params.logprobs is not None else None
            outputs.append(self._append_token(req, token_ids[i], logprobs, index))
        return outputs

    def _append_token(self, req: Request, token_id: int, logprobs: dict[int, float] | None,
                      index: int | None = None) -> StepOutput:
        """Records a sampled token: appended, or written over its placeholder at `index`."""
        if index is None:
            req.output_token_ids.append(token_id)
            count = len(req.output_token_ids)
        else:
            req.output_token_ids[index] = token_id
            count = index + 1
        if req.grammar is not None and not req.grammar.accept(token_id):
            logger.warning("request %s: token %d is outside its grammar", req.client_id[:64], token_id)
        reason = check_stop(req, token_id, count)
        if reason is None and req.grammar is not None and req.grammar.is_terminated:
            reason = FinishReason.EOS  # min_tokens or ignore_eos kept it going, but the grammar ended
        if reason is None and self.role == "prefill":
            reason = FinishReason.PREFILLED
        if reason is not None:
            del req.output_token_ids[count:]  # placeholders of a step already queued after this one
            self.finish(req, reason)
        # a prefilled request goes on elsewhere: its text is streamed as if it went on here
        text = req.detokenizer.get_delta(finished=reason not in (None, FinishReason.PREFILLED))
        return StepOutput(
            request_id=req.client_id, index=req.sample_index, new_token_ids=[token_id], text_delta=text,
            finished=reason is not None, finish_reason=reason.value if reason else None,
            stop_reason=req.stop_reason, new_logprobs=[logprobs] if logprobs is not None else None,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=max(req.num_cached_tokens, 0),
            prompt_logprobs=_take_prompt_logprobs(req), held_text=req.detokenizer.held_back)

    # ---- prompt logprobs ---------------------------------------------------------------------------
    @staticmethod
    def record_prompt_logprobs(chunks: Sequence[ScheduledChunk], prompt: PromptLogprobsOutput | None) -> None:
        """Appends a step's prompt logprobs to their requests. Rows follow the chunks' `prompt_logits`
        spans in order; a position already recorded (recomputed after a preemption) is skipped."""
        if prompt is None:
            return
        logprobs, ranks = prompt.logprobs.tolist(), prompt.ranks.tolist()
        top_ids = prompt.top_ids.tolist() if prompt.top_ids is not None else None
        top_lps = prompt.top_logprobs.tolist() if prompt.top_logprobs is not None else None
        row = 0
        for chunk in chunks:
            first, count = chunk.prompt_logits
            req = chunk.request
            num_top = req.sampling_params.prompt_logprobs or 0
            for pos, r in zip(range(first, first + count), range(row, row + count)):
                if req.prompt_logprobs is None or pos != len(req.prompt_logprobs):
                    continue
                entry = {req.prompt_token_ids[pos + 1]: Logprob(logprobs[r], ranks[r])}
                for rank, (t, lp) in enumerate(zip(top_ids[r][:num_top], top_lps[r][:num_top]) if num_top else (), 1):
                    entry.setdefault(t, Logprob(lp, rank))
                req.prompt_logprobs.append(entry)
            row += count


def check_stop(req: Request, token_id: int, count: int) -> FinishReason | None:
    """The stop rules after `token_id` (detokenized here); count: output tokens so far, this one included."""
    params = req.sampling_params
    min_reached = count >= params.min_tokens  # as vLLM: stops count once min_tokens are out
    if min_reached and params.stop_token_ids and token_id in params.stop_token_ids:
        req.stop_reason = token_id
        if params.include_stop_str_in_output:
            req.detokenizer.append(token_id)
        return FinishReason.STOP
    if min_reached and not params.ignore_eos and token_id in req.eos_token_ids:
        return FinishReason.EOS
    stop = req.detokenizer.append(token_id)
    if min_reached and stop is not None:
        req.stop_reason = stop
        return FinishReason.STOP
    if count >= req.max_tokens:
        return FinishReason.LENGTH
    return None


def _logprobs(result: SamplerOutput, row: int, token_id: int) -> dict[int, float]:
    entry = {token_id: float(result.logprobs[row])}
    if result.top_logprob_ids is not None:
        for t, lp in zip(result.top_logprob_ids[row].tolist(), result.top_logprobs[row].tolist()):
            entry.setdefault(t, lp)
    return entry


def _take_prompt_logprobs(req: Request) -> list | None:
    """The request's prompt logprobs the first time they are asked for (they go out once)."""
    if req.prompt_logprobs is None or req.prompt_logprobs_sent:
        return None
    req.prompt_logprobs_sent = True
    if len(req.prompt_logprobs) != req.num_prompt_tokens - 1:
        logger.error("request %s: %d prompt logprobs for %d prompt tokens", req.client_id[:64],
                     len(req.prompt_logprobs), req.num_prompt_tokens)
    return req.prompt_logprobs
