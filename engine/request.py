"""A request: prompt and output token ids plus `num_computed_tokens`; everything else is derived.

There are no phases. Each step schedules tokens so that `num_computed_tokens` catches up with
`num_tokens`; that one rule covers chunked prefill, prefix-cache hits and resume after preemption.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams


PLACEHOLDER = -1  # an output token sampled by a step still in flight (async scheduling): not read yet


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens or the context limit
    STOP = "stop"  # stop string or stop token id
    EOS = "eos"
    ABORTED = "abort"
    PREFILLED = "prefilled"  # prefill role: prompt done, first token sampled, KV ready to export
    ERROR = "error"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: "SamplingParams"
    max_tokens: int  # effective limit on output tokens (already clipped to the context)
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    client_id: str = ""  # the id the caller used; an n > 1 request has several Requests under it
    # Set when this is sample i > 0 of an n > 1 request: waits for its parent's prompt, then forks.
    parent: "Request | None" = None
    sample_index: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 = not scheduled yet
    num_preemptions: int = 0
    detokenizer: Any = None
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full blocks (prefix cache memo)
    # Async scheduling: steps in flight that sampled for this request (their tokens are
    # PLACEHOLDERs in output_token_ids until read), and its row in the latest one's output.
    num_pending: int = 0
    pending_row: int = -1
    grammar: Any = None  # structured output: an engine.structured.GrammarState advanced per token
    # SamplingParams.prompt_logprobs (on the request that computes them; None = not asked):
    # entry i for prompt token i + 1, computed from the logits at position i.
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False

    def __post_init__(self):
        assert self.prompt_token_ids, "a request needs at least one prompt token"
        assert self.max_tokens >= 1, self.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs are asked and not all computed yet (the prefix cache is bypassed meanwhile)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def prompt_logits_span(self, start: int, end: int) -> tuple[int, int]:
        """(first position, count) of the positions in [start, end) whose logits give a prompt
        logprob not computed yet: position i predicts prompt token i + 1."""
        if self.prompt_logprobs is None:
            return (start, 0)
        lo = max(start, len(self.prompt_logprobs))
        hi = min(end, self.num_prompt_tokens - 1)
        return (lo, max(hi - lo, 0))

    def token_id_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def check_invariants(self, block_size: int) -> None:
        assert 0 <= self.num_computed_tokens <= self.num_tokens, (self.num_computed_tokens, self.num_tokens)
        assert len(self.block_table) * block_size >= self.num_computed_tokens
