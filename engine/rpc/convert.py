"""The one module of conversions between engine objects and pdserve.v1 protos.

- `SamplingParams` <-> `node_pb2.ResolvedParams` (n is always 1 across nodes; `max_tokens` 0 on the
  wire means "up to the context limit", i.e. None);
- logprob dicts `{token_id: logprob}` (sampled token first, then the top candidates) <-> `TokenLogprob`;
- prompt logprobs (`{token_id: Logprob}` per prompt position) -> `TokenLogprob` with its rank;
- finish-reason strings (engine/request.py FinishReason values) <-> the `FinishReason` enum;
- KV transport names (CLI `--kv-transport`, timings, docs) <-> the `KVTransport` enum;
- `StructuredSpec` <-> `generation_pb2.StructuredOutput`.
"""
from __future__ import annotations

from engine.sampling_params import SamplingParams
from engine.structured.spec import spec_from_proto as structured_from_proto
from engine.structured.spec import spec_to_proto as structured_to_proto
from protos.pdserve.v1 import generation_pb2, node_pb2

FR = generation_pb2.FinishReason

_FINISH_TO_PROTO = {
    None: FR.FINISH_REASON_UNSPECIFIED,
    "prefilled": FR.FINISH_REASON_UNSPECIFIED,  # not an end: decoding continues elsewhere
    "length": FR.FINISH_REASON_LENGTH,
    "stop": FR.FINISH_REASON_STOP,
    "eos": FR.FINISH_REASON_EOS,
    "abort": FR.FINISH_REASON_ABORTED,
    "time_limit": FR.FINISH_REASON_TIME_LIMIT,
    "error": FR.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items() if k != "prefilled"}

T = node_pb2.KVTransport
# One name per transport everywhere: CLI `--kv-transport`, the proto enum, timings, docs.
TRANSPORTS = {"auto": T.KV_TRANSPORT_AUTO, "ipc": T.KV_TRANSPORT_IPC, "nccl": T.KV_TRANSPORT_NCCL,
              "grpc": T.KV_TRANSPORT_GRPC}
TRANSPORT_NAMES = {v: k for k, v in TRANSPORTS.items()}


# ---- finish reasons ------------------------------------------------------------------------------
def finish_reason_to_proto(reason: str | None) -> int:
    try:
        return _FINISH_TO_PROTO[reason]
    except KeyError:
        raise ValueError(f"unknown finish reason {reason!r}") from None


def finish_reason_from_proto(value: int) -> str | None:
    try:
        return _FINISH_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown finish reason enum value {value}") from None


# ---- KV transports -------------------------------------------------------------------------------
def transport_name(transport: int) -> str:
    return TRANSPORT_NAMES.get(transport, "")


# ---- sampling parameters -------------------------------------------------------------------------
def params_to_proto(params: SamplingParams, sample_index: int = 0) -> node_pb2.ResolvedParams:
    if params.n != 1:
        raise ValueError("only single-sequence parameters (n == 1) cross nodes; split n first")
    msg = node_pb2.ResolvedParams(
        temperature=params.temperature, top_p=params.top_p, top_k=max(params.top_k, 0), min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, max_tokens=params.max_tokens or 0,
        min_tokens=params.min_tokens, stop=list(params.stop or ()), stop_token_ids=list(params.stop_token_ids or ()),
        include_stop_str=params.include_stop_str_in_output, ignore_eos=params.ignore_eos,
        skip_special_tokens=params.skip_special_tokens, sample_index=sample_index)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    for token_id, bias in (params.logit_bias or {}).items():
        msg.logit_bias[token_id] = bias
    if params.structured is not None:
        msg.structured.CopyFrom(structured_to_proto(params.structured))
    return msg


def params_from_proto(msg: node_pb2.ResolvedParams) -> tuple[SamplingParams, int]:
    """-> (SamplingParams, sample_index). Raises ValueError on invalid values."""
    params = SamplingParams(
        n=1, temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None, repetition_penalty=msg.repetition_penalty,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        max_tokens=msg.max_tokens or None, min_tokens=msg.min_tokens, stop=list(msg.stop) or None,
        stop_token_ids=list(msg.stop_token_ids) or None, include_stop_str_in_output=msg.include_stop_str,
        ignore_eos=msg.ignore_eos, logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        skip_special_tokens=msg.skip_special_tokens, logit_bias=dict(msg.logit_bias) or None,
        structured=structured_from_proto(msg.structured) if msg.HasField("structured") else None)
    return params, msg.sample_index


# ---- logprobs ------------------------------------------------------------------------------------
def logprob_to_proto(entry: dict[int, float], num_top: int) -> generation_pb2.TokenLogprob:
    """`entry` is the engine's {token_id: logprob} with the sampled token first."""
    sampled, logprob = next(iter(entry.items()))
    best = sorted(entry.items(), key=lambda kv: -kv[1])[:num_top]
    return generation_pb2.TokenLogprob(
        token_id=sampled, logprob=logprob,
        top=[generation_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in best])


def logprob_from_proto(msg: generation_pb2.TokenLogprob) -> dict[int, float]:
    entry = {msg.token_id: msg.logprob}
    for top in msg.top:
        entry.setdefault(top.token_id, top.logprob)
    return entry


def prompt_logprobs_to_proto(entries, num_top: int) -> list[generation_pb2.TokenLogprob]:
    """The engine's prompt logprobs (per position {token_id: Logprob}, the prompt token first,
    then the top candidates) -> TokenLogprob with `rank` and the `num_top` best candidates."""
    out = []
    for entry in entries:
        token_id, lp = next(iter(entry.items()))
        best = sorted(entry.items(), key=lambda kv: kv[1].rank)[:num_top]
        out.append(generation_pb2.TokenLogprob(
            token_id=token_id, logprob=lp.logprob, rank=lp.rank,
            top=[generation_pb2.TopLogprob(token_id=t, logprob=c.logprob) for t, c in best]))
    return out
