"""Every `SamplingParams` <-> proto mapping, in both directions, from one table (`FIELDS`).

Two wire forms carry a request's sampling and stopping parameters:
- the public request, `generation_pb2.GenerateRequest` (its `sampling` and `stopping` messages plus
  `n`, `logprobs`, `prompt_logprobs`, `skip_special_tokens` and `structured` on the request itself):
  a field the client leaves unset takes the model's default at the router (`from_request`, which
  is the validation); the gateway writes only what its client gave (`write_given`), checking no
  more than that each value fits its proto field;
- the resolved form between the router and the nodes, `node_pb2.ResolvedParams`: every value
  final, one sequence (n == 1), plus the completion's `sample_index` (`to_resolved`, `from_resolved`).

Adding a sampling field: the `SamplingParams` field, the proto fields, one row of `FIELDS`.
No torch here: the router and the gateway import this module.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from google.protobuf.descriptor import FieldDescriptor

from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredSpec, spec_from_proto, spec_to_proto
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
    Field("structured", "", "structured", STRUCTURED, "structured", STRUCTURED),
)

# The `SamplingParameters` fields a client may leave unset (the OpenAI body's names are the same).
SAMPLING_FIELDS = tuple(f.attr for f in FIELDS if f.part == "sampling" and f.kind is OPTIONAL)
# Every parameter `write_given` takes; a refusal's message starts with one (SamplingParams' messages do).
PARAM_NAMES = frozenset(f.attr for f in FIELDS) | {"n"}
MODEL_DEFAULT_FIELDS = tuple(f.attr for f in FIELDS if f.model_default)


def _part(msg, part: str):
    return getattr(msg, part) if part else msg


# ---- the public request ----------------------------------------------------------------------------
def from_request(request: generation_pb2.GenerateRequest, defaults: Mapping[str, Any],
                 check_spec: Callable[[StructuredSpec], None] | None = StructuredSpec.check) -> SamplingParams:
    """The request's parameters; an unset field takes `defaults` (the model's generation defaults,
    for MODEL_DEFAULT_FIELDS). Raises ValueError naming a bad field. The output constraint's
    schema / regex / grammar is parsed here by `check_spec`, so a bad one is refused where the
    request enters; None leaves that to the caller (the router parses constraints in child
    processes, off its tokenizer thread: xgrammar loads torch, and a parse may take seconds)."""
    kwargs = {}
    for f in FIELDS:
        value = f.kind.read(_part(request, f.part), f.name)
        if value is _UNSET:
            value = defaults.get(f.attr, f.unset) if f.model_default else f.unset
        if value is not _UNSET:
            kwargs[f.attr] = value
    params = SamplingParams(n=request.n or 1, **kwargs)
    if params.structured is not None and check_spec is not None:
        check_spec(params.structured)
    return params


def write_given(values: Mapping[str, Any],
                request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
    """Writes what a client gave (SamplingParams attribute names, plus `n`) into `request`; a None
    value is not written, so the router applies the model's default. Normalised as SamplingParams
    does where the wire would differ (a stop string -> [it], top_k -1 -> 0). The only check is the
    wire's: a value its proto field cannot hold raises ValueError naming the field and the range
    the field holds. Every other rule is the router's (`from_request`)."""
    for f in FIELDS:
        value = values.get(f.attr)
        if value is not None:
            msg = _part(request, f.part)
            wire = _on_wire(f.attr, msg.DESCRIPTOR.fields_by_name[f.name], _normalised(f.attr, value))
            f.kind.write(msg, f.name, wire)
    if values.get("n") is not None:  # 0 on the wire is "unset" (1), so it cannot be sent
        request.n = _wire_int("n must be", values["n"], FieldDescriptor.TYPE_UINT32, lo=1)
    return request


def _normalised(attr: str, value):
    if attr == "stop" and isinstance(value, str):
        return [value]
    if attr == "top_k" and value == -1:
        return 0
    return value


_INT_RANGES = {FieldDescriptor.TYPE_INT32: ("int32", -2**31, 2**31 - 1),
               FieldDescriptor.TYPE_UINT32: ("uint32", 0, 2**32 - 1),
               FieldDescriptor.TYPE_INT64: ("int64", -2**63, 2**63 - 1),
               FieldDescriptor.TYPE_UINT64: ("uint64", 0, 2**64 - 1)}
FLOAT32_MAX = 3.4028234663852886e38


def _on_wire(attr: str, fd, value):
    """`value` as field `fd` holds it, or a ValueError naming `attr` and the range that fits."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key, val = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        return {_scalar(f"{attr} keys must be", key, k): _scalar(f"{attr} values must be", val, v)
                for k, v in value.items()}
    if fd.is_repeated:
        return [_scalar(f"{attr} must hold values", fd, v) for v in value]
    return _scalar(f"{attr} must be", fd, value)


def _scalar(subject: str, fd, value):
    if fd.type in _INT_RANGES:
        return _wire_int(subject, value, fd.type)
    if fd.type == FieldDescriptor.TYPE_FLOAT:
        return _float32(subject, value)
    return value


def _wire_int(subject: str, value: int, proto_type: int, lo: int | None = None) -> int:
    name, type_lo, hi = _INT_RANGES[proto_type]
    lo = type_lo if lo is None else lo
    if not lo <= value <= hi:
        raise ValueError(f"{subject} in [{lo}, {hi}] ({name}), got {value}")
    return value


def _float32(subject: str, x: float) -> float:
    """The float32 nearest `x`, but never a nonzero integer that `x` is not, nor 0 from below: the
    router's bounds (temperature >= 0, top_p <= 1, penalties within +-2, logit_bias within +-100)
    are integers, and rounding must not move a refused value onto one (top_p 1.0000000001 stays
    refused). A positive value too small for a float32 still becomes 0, as it always has."""
    try:
        y = _f32(x)
    except OverflowError:
        raise ValueError(f"{subject} in [-{FLOAT32_MAX:.8g}, {FLOAT32_MAX:.8g}] (float32), got {x}") from None
    if math.isfinite(y) and y != x and y.is_integer() and (y != 0 or x < 0):
        if y == 0:
            return -_f32(1e-45)  # the negative float32 nearest 0
        bits = struct.unpack("<I", struct.pack("<f", y))[0]
        bits += 1 if (x > y) == (y > 0) else -1  # one float32 step from y toward x
        y = struct.unpack("<f", struct.pack("<I", bits))[0]
    return y


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ---- between nodes ---------------------------------------------------------------------------------
def to_resolved(params: SamplingParams, sample_index: int = 0) -> node_pb2.ResolvedParams:
    if params.n != 1:
        raise ValueError("only single-sequence parameters (n == 1) cross nodes; split n first")
    msg = node_pb2.ResolvedParams(sample_index=sample_index)
    for f in FIELDS:
        f.resolved_kind.write(msg, f.resolved, getattr(params, f.attr))
    return msg


def from_resolved(msg: node_pb2.ResolvedParams) -> tuple[SamplingParams, int]:
    """-> (SamplingParams, sample_index), trusted as the router resolved them (not validated again:
    `SamplingParams.resolved`)."""
    kwargs = {}
    for f in FIELDS:
        value = f.resolved_kind.read(msg, f.resolved)
        if value is not _UNSET:
            kwargs[f.attr] = value
    return SamplingParams.resolved(n=1, **kwargs), msg.sample_index
