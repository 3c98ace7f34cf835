"""Every `SamplingParams` <-> proto mapping, in both directions, from one table (`FIELDS`).

Two wire forms carry a request's sampling and stopping parameters:
- the public request, `generation_pb2.GenerateRequest` (its `sampling` and `stopping` messages plus
  `n`, `logprobs`, `prompt_logprobs`, `skip_special_tokens` and `structured` on the request itself):
  a field the client leaves unset takes the model's default at the router (`from_request`); the
  gateway writes only what its client gave (`to_request`);
- the resolved form between the router and the nodes, `node_pb2.ResolvedParams`: every value
  final, one sequence (n == 1), plus the completion's `sample_index` (`to_resolved`, `from_resolved`).

Adding a sampling field: the `SamplingParams` field, the proto fields, one row of `FIELDS`.
No torch here: the router and the gateway import this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

from engine.sampling_params import SamplingParams
from engine.structured.spec import spec_from_proto, spec_to_proto
from protos.pdserve.v1 import generation_pb2, node_pb2

_UNSET = object()  # a proto field that is not set: the parameter keeps its default


@dataclass(frozen=True)
class _Kind:
    """How one proto field holds a value: `read(msg, name)` -> value or _UNSET; `write(msg, name, value)`."""

    read: Callable[[Any, str], Any]
    write: Callable[[Any, str, Any], None]


def _read_optional(msg, name):
    return getattr(msg, name) if msg.HasField(name) else _UNSET


def _write_optional(msg, name, value):
    if value is not None:
        setattr(msg, name, value)


def _message_kind(to_proto, from_proto) -> _Kind:
    def read(msg, name):
        value = from_proto(getattr(msg, name)) if msg.HasField(name) else None
        return _UNSET if value is None else value

    def write(msg, name, value):
        if value is not None:
            getattr(msg, name).CopyFrom(to_proto(value))

    return _Kind(read, write)


def _checked_spec(msg):
    """The request's output constraint, its schema / regex / grammar parsed here, so a bad one is
    refused where the request enters (INVALID_ARGUMENT before any node sees it)."""
    spec = spec_from_proto(msg)
    if spec is not None:
        spec.check()
    return spec


VALUE = _Kind(getattr, setattr)  # a plain proto3 field: always read and written
OPTIONAL = _Kind(_read_optional, _write_optional)  # `optional`: unset <-> None
LIST = _Kind(lambda m, n: list(getattr(m, n)) or _UNSET,  # repeated: empty <-> None
             lambda m, n, v: getattr(m, n).extend(v or ()))
MAP = _Kind(lambda m, n: dict(getattr(m, n)) or _UNSET,  # map: empty <-> None
            lambda m, n, v: getattr(m, n).update(v or {}))
ZERO_IS_NONE = _Kind(lambda m, n: getattr(m, n) or None,  # 0 on the wire = None (max_tokens: the context limit)
                     lambda m, n, v: setattr(m, n, v or 0))
OFF_IS_ZERO = _Kind(getattr, lambda m, n, v: setattr(m, n, max(v, 0)))  # top_k: -1 and 0 both mean off, 0 on the wire
STRUCTURED = _message_kind(spec_to_proto, spec_from_proto)
CHECKED_STRUCTURED = _message_kind(spec_to_proto, _checked_spec)


@dataclass(frozen=True)
class Field:
    attr: str  # the SamplingParams attribute
    part: str  # where GenerateRequest holds it: "sampling", "stopping" or "" (on the request itself)
    name: str  # its name there
    kind: _Kind  # how GenerateRequest holds it
    resolved: str  # its name in ResolvedParams
    resolved_kind: _Kind
    unset: Any = _UNSET  # an unset request field means this (_UNSET: the SamplingParams default)
    model_default: bool = False  # unset in a request: the model's generation default applies


FIELDS = (
    Field("temperature", "sampling", "temperature", OPTIONAL, "temperature", VALUE, model_default=True),
    Field("top_p", "sampling", "top_p", OPTIONAL, "top_p", VALUE, model_default=True),
    Field("top_k", "sampling", "top_k", OPTIONAL, "top_k", OFF_IS_ZERO, model_default=True),
    Field("min_p", "sampling", "min_p", OPTIONAL, "min_p", VALUE, model_default=True),
    Field("seed", "sampling", "seed", OPTIONAL, "seed", OPTIONAL),
    Field("repetition_penalty", "sampling", "repetition_penalty", OPTIONAL, "repetition_penalty", VALUE,
          model_default=True),
    Field("presence_penalty", "sampling", "presence_penalty", OPTIONAL, "presence_penalty", VALUE),
    Field("frequency_penalty", "sampling", "frequency_penalty", OPTIONAL, "frequency_penalty", VALUE),
    Field("logit_bias", "sampling", "logit_bias", MAP, "logit_bias", MAP),
    Field("max_tokens", "stopping", "max_new_tokens", OPTIONAL, "max_tokens", ZERO_IS_NONE, unset=None),
    Field("min_tokens", "stopping", "min_new_tokens", VALUE, "min_tokens", VALUE),
    Field("stop", "stopping", "stop", LIST, "stop", LIST),
    Field("stop_token_ids", "stopping", "stop_token_ids", LIST, "stop_token_ids", LIST),
    Field("include_stop_str_in_output", "stopping", "include_stop_str", VALUE, "include_stop_str", VALUE),
    Field("ignore_eos", "stopping", "ignore_eos", VALUE, "ignore_eos", VALUE),
    Field("logprobs", "", "logprobs", OPTIONAL, "logprobs", OPTIONAL),
    Field("prompt_logprobs", "", "prompt_logprobs", OPTIONAL, "prompt_logprobs", OPTIONAL),
    Field("skip_special_tokens", "", "skip_special_tokens", OPTIONAL, "skip_special_tokens", VALUE),
    Field("structured", "", "structured", CHECKED_STRUCTURED, "structured", STRUCTURED),
)

# The `SamplingParameters` fields a client may leave unset (the OpenAI body's names are the same).
SAMPLING_FIELDS = tuple(f.attr for f in FIELDS if f.part == "sampling" and f.kind is OPTIONAL)
MODEL_DEFAULT_FIELDS = tuple(f.attr for f in FIELDS if f.model_default)


def _part(msg, part: str):
    return getattr(msg, part) if part else msg


# ---- the public request ----------------------------------------------------------------------------
def from_request(request: generation_pb2.GenerateRequest, defaults: Mapping[str, Any]) -> SamplingParams:
    """The request's parameters; an unset field takes `defaults` (the model's generation defaults,
    for MODEL_DEFAULT_FIELDS). Raises ValueError naming a bad field."""
    kwargs = {}
    for f in FIELDS:
        value = f.kind.read(_part(request, f.part), f.name)
        if value is _UNSET:
            value = defaults.get(f.attr, f.unset) if f.model_default else f.unset
        if value is not _UNSET:
            kwargs[f.attr] = value
    return SamplingParams(n=request.n or 1, **kwargs)


def to_request(params: SamplingParams, request: generation_pb2.GenerateRequest,
               unset: Collection[str] = ()) -> generation_pb2.GenerateRequest:
    """Writes `params` into `request`, but not the fields named in `unset` (the client did not
    give them: the router applies the model's defaults) nor the ones that are None."""
    for f in FIELDS:
        if f.attr not in unset:
            f.kind.write(_part(request, f.part), f.name, getattr(params, f.attr))
    request.n = params.n
    return request


# ---- between nodes ---------------------------------------------------------------------------------
def to_resolved(params: SamplingParams, sample_index: int = 0) -> node_pb2.ResolvedParams:
    if params.n != 1:
        raise ValueError("only single-sequence parameters (n == 1) cross nodes; split n first")
    msg = node_pb2.ResolvedParams(sample_index=sample_index)
    for f in FIELDS:
        f.resolved_kind.write(msg, f.resolved, getattr(params, f.attr))
    return msg


def from_resolved(msg: node_pb2.ResolvedParams) -> tuple[SamplingParams, int]:
    """-> (SamplingParams, sample_index). Raises ValueError on invalid values."""
    kwargs = {}
    for f in FIELDS:
        value = f.resolved_kind.read(msg, f.resolved)
        if value is not _UNSET:
            kwargs[f.attr] = value
    return SamplingParams(n=1, **kwargs), msg.sample_index
