"""The one module of conversions between engine objects and pdserve.v1 protos.

- `SamplingParams` <-> `node_pb2.ResolvedParams` (`params_to_proto`, `params_from_proto`: the
  field table is `engine/sampling_proto.py`, which also maps the public `GenerateRequest`);
- logprob dicts `{token_id: logprob}` (sampled token first, then the top candidates) <-> `TokenLogprob`;
- prompt logprobs (`{token_id: Logprob}` per prompt position) -> `TokenLogprob` with its rank;
- finish-reason strings (engine/request.py FinishReason values) <-> the `FinishReason` enum;
- KV transport names (CLI `--kv-transport`, timings, docs) <-> the `KVTransport` enum;
"""
from __future__ import annotations

from engine import sampling_proto
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

# The router <-> node protocol: what the node RPCs' fields mean (NodeLoad.protocol). Raise
# NODE_PROTOCOL when a change would make a router and a node of different versions misread each
# other (a field whose absence changes what happens, a new required call), and MIN_NODE_PROTOCOL
# with it unless the router still serves older nodes correctly. 1: nodes send the text deltas and
# stop results (the router no longer detokenizes), NCCL pairs rendezvous on KVRendezvous.
NODE_PROTOCOL = 1
MIN_NODE_PROTOCOL = 1


def protocol_refusal(protocol: int) -> str | None:
    """Why a router of this version cannot use a node speaking `protocol`; None when it can."""
    if MIN_NODE_PROTOCOL <= protocol <= NODE_PROTOCOL:
        return None
    speaks = f"protocol {protocol}" if protocol else "a protocol from before versions (0)"
    return (f"the node speaks pdserve node {speaks}; this router speaks {MIN_NODE_PROTOCOL}"
            f"{'' if MIN_NODE_PROTOCOL == NODE_PROTOCOL else f'-{NODE_PROTOCOL}'}: run the same pdserve version "
            "on the router and its nodes")


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


# ---- sampling parameters (the mapping lives in engine/sampling_proto.py) ----------------------------
params_to_proto = sampling_proto.to_resolved
params_from_proto = sampling_proto.from_resolved


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
