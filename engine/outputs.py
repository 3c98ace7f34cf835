"""What the engine hands back: per-step deltas (`StepOutput`) and vLLM-shaped final results."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    """One candidate of a prompt position (vLLM's shape): its log probability under the model's raw
    distribution, its rank there (1 = the most likely token) and its text (offline API only)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# Prompt logprobs of one prompt: entry i is prompt token i + 1 (the first token has no context),
# a dict with that token first, then the top candidates best first.
PromptLogprobs = list[dict[int, Logprob]]


@dataclass
class StepOutput:
    """New tokens of one sequence (sample `index` of request `request_id`) from one step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    text_delta: str  # never splits a character; a stop string only with include_stop_str_in_output
    finished: bool
    finish_reason: str | None = None  # FinishReason value
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    new_logprobs: list[dict[int, float]] | None = None  # per new token: {token id: logprob}
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # once, with the request's first token (when asked)
    held_text: str = ""  # text held back after this step (released if the request is ended from outside)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (as vLLM)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
