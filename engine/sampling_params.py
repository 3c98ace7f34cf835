"""Per-request sampling and stopping parameters (vLLM's field names and defaults).

Everything a client can send is checked here, at construction, so that a bad value becomes a
`ValueError` naming the field and its limit and never reaches the sampler. Checks that need the
model (vocabulary size, context length) are in `verify()`, called where a request enters (the
router, the offline `LLM`). A node rebuilds the router's resolved parameters with `resolved()`,
which checks nothing: the engine is total over every value the fields can hold.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

from engine.structured.spec import StructuredSpec

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_LEN = 1024
MAX_TOP_K = 1 << 20  # larger than any vocabulary; top_k >= vocab size means "off"
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0  # presence / frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY]
GREEDY_EPS = 1e-5

__all__ = [
    "SamplingParams",
    "MAX_N", "MAX_LOGPROBS", "MAX_STOP_STRINGS", "MAX_STOP_LEN", "MAX_TOP_K",
    "MAX_TOKENS_LIMIT", "MAX_SEED", "MAX_LOGIT_BIAS", "MAX_PENALTY", "GREEDY_EPS",
]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(name: str, x) -> float:
    """`x` as a finite float, or a ValueError naming `name`."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _int(name: str, x) -> int:
    if not _is_int(x):
        raise ValueError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
    return x


def _in_range(name: str, x, lo, hi) -> None:
    if not lo <= x <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")


def _token_id(name: str, t) -> int:
    if not _is_int(t) or t < 0:
        raise ValueError(f"{name} must hold non-negative integer token ids, got {t!r}")
    return t


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    logprobs: int | None = None  # top candidates returned besides the sampled token
    # Logprob and rank of every prompt token (after the first) plus this many top candidates;
    # None = off. The prompt's positions are computed, never read from the prefix cache.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured: StructuredSpec | None = None  # output constraint (JSON schema, regex, choice, grammar)

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_lengths()
        self._check_stops()
        self._check_token_maps()
        if self.structured is not None and not isinstance(self.structured, StructuredSpec):
            raise ValueError(f"structured must be a StructuredSpec, got {type(self.structured).__name__}")

    @classmethod
    def resolved(cls, **values) -> SamplingParams:
        """Parameters another process already validated (the router: `from_request` + `verify`),
        rebuilt without checking them again. A value the router would have refused (only a client
        reaching a node port directly can send one) changes that request's own output and nothing
        else: out-of-vocabulary ids are ignored, NaN logits count as -inf, max_tokens is capped by
        the context (tests/engine/test_resolved_params.py runs such values beside a bystander)."""
        params = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(params, f.name, values.pop(f.name, f.default))
        if values:
            raise TypeError(f"unknown sampling parameters: {', '.join(sorted(values))}")
        params.stop = list(params.stop or ())
        params.stop_token_ids = list(params.stop_token_ids or ())
        params.logit_bias = dict(params.logit_bias) if params.logit_bias else None
        params.top_k = max(params.top_k, 0)
        return params

    # -- validation ------------------------------------------------------------------------

    def _check_sampling(self) -> None:
        self.n = _int("n", self.n)
        _in_range("n", self.n, 1, MAX_N)
        self.temperature = _real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k)
        _in_range("top_k", self.top_k, -1, MAX_TOP_K)
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _real("min_p", self.min_p)
        _in_range("min_p", self.min_p, 0.0, 1.0)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            _in_range(name, value, -MAX_PENALTY, MAX_PENALTY)
            setattr(self, name, value)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
            _in_range("seed", self.seed, 0, MAX_SEED)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _int(name, value))
                _in_range(name, value, 0, MAX_LOGPROBS)

    def _check_lengths(self) -> None:
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens)
            _in_range("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT)
        self.min_tokens = _int("min_tokens", self.min_tokens)
        _in_range("min_tokens", self.min_tokens, 0, MAX_TOKENS_LIMIT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must hold strings, got {type(s).__name__}")
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_LEN:
                raise ValueError(
                    f"stop strings must be at most {MAX_STOP_LEN} characters, got {len(s)}")
        self.stop = stop
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError("stop_token_ids must be a list of integers")
        self.stop_token_ids = [_token_id("stop_token_ids", t) for t in self.stop_token_ids]

    def _check_token_maps(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must map token ids to numbers")
        bias = {}
        for token, value in self.logit_bias.items():
            value = _real("logit_bias values", value)
            if abs(value) > MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {value}")
            bias[_token_id("logit_bias keys", token)] = value
        self.logit_bias = bias or None

    # -- derived -----------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """Any of repetition / presence / frequency penalty set (they read the token history)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def max_stop_len(self) -> int:
        """Length in characters of the longest stop string (0 when there is none)."""
        return max((len(s) for s in self.stop), default=0)

    def verify(self, vocab_size: int, max_model_len: int, prompt_len: int) -> int:
        """Checks against the model; returns the effective max_tokens."""
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias keys", self.logit_bias or ())):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(
                    f"{name} must be < vocab size {vocab_size}, got {bad[0]}")
        if self.max_tokens is None:
            if prompt_len >= max_model_len:
                raise ValueError(
                    f"prompt length {prompt_len} leaves no room to generate within the "
                    f"max model length {max_model_len}")
            effective = max_model_len - prompt_len
            if self.min_tokens > effective:
                raise ValueError(
                    f"min_tokens {self.min_tokens} exceeds the {effective} tokens left by "
                    f"prompt length {prompt_len} within the max model length {max_model_len}")
            return effective
        if prompt_len + self.max_tokens > max_model_len:
            raise ValueError(
                f"prompt length {prompt_len} + max_tokens {self.max_tokens} = "
                f"{prompt_len + self.max_tokens} exceeds the max model length {max_model_len}")
        return self.max_tokens

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
