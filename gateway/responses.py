"""Router replies -> OpenAI JSON: completion / chat objects, stream chunks, logprobs, usage."""
from __future__ import annotations

import json
import math
import time

from protos.pdserve.v1 import generation_pb2 as pb

FR = pb.FinishReason
FINISH_REASONS = {
    FR.FINISH_REASON_UNSPECIFIED: None,
    FR.FINISH_REASON_LENGTH: "length",
    FR.FINISH_REASON_STOP: "stop",
    FR.FINISH_REASON_EOS: "stop",
    FR.FINISH_REASON_ABORTED: "abort",
    FR.FINISH_REASON_TIME_LIMIT: "time_limit",
    FR.FINISH_REASON_ERROR: "error",
}
# vLLM's names, for pdserve:request_success{finished_reason} (an end-of-sequence is "stop")
METRIC_REASONS = {FR.FINISH_REASON_LENGTH: "length", FR.FINISH_REASON_STOP: "stop",
                  FR.FINISH_REASON_EOS: "stop", FR.FINISH_REASON_ABORTED: "abort",
                  FR.FINISH_REASON_TIME_LIMIT: "time_limit", FR.FINISH_REASON_ERROR: "error"}
MIN_LOGPROB = -9999.0  # JSON has no -inf


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def stop_reason(msg) -> str | int | None:
    """The matched stop string or stop token id of a Completion / last stream chunk."""
    if msg.stop_sequence:
        return msg.stop_sequence
    if msg.HasField("stop_token_id"):
        return msg.stop_token_id
    return None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, details: bool = True) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if details:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def _lp(x: float) -> float:
    return MIN_LOGPROB if math.isnan(x) or x < MIN_LOGPROB else float(x)


def token_ids_of(logprobs) -> set[int]:
    ids = set()
    for entry in logprobs:
        ids.add(entry.token_id)
        ids.update(t.token_id for t in entry.top)
    return ids


def completion_logprobs(logprobs, strings: dict[int, str], text_offset: int) -> dict:
    """/v1/completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in logprobs:
        token = strings[entry.token_id]
        out["tokens"].append(token)
        out["token_logprobs"].append(_lp(entry.logprob))
        out["top_logprobs"].append({strings[t.token_id]: _lp(t.logprob) for t in entry.top})
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out


def echo_logprobs(prompt_ids, entries, strings: dict[int, str], num_top: int) -> dict:
    """/v1/completions logprobs of an echoed prompt: the first token has no context, so its
    token_logprobs and top_logprobs entries are null (as OpenAI's and vLLM's); `entries` are the
    prompt logprobs (TokenLogprob protos) of the tokens after it."""
    out = {"tokens": [], "token_logprobs": [None], "top_logprobs": [None], "text_offset": []}
    offset = 0
    for t in prompt_ids:
        token = strings[t]
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
    for e in entries:
        out["token_logprobs"].append(_lp(e.logprob))
        out["top_logprobs"].append({strings[c.token_id]: _lp(c.logprob) for c in e.top[:num_top]})
    return out


def join_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def vllm_prompt_logprobs(entries, strings: dict[int, str], num_top: int) -> list:
    """vLLM's `prompt_logprobs`: null for the first prompt token, then per token
    {token id: {logprob, rank, decoded_token}} with the prompt token first, then the top `num_top`."""
    out: list = [None]
    for e in entries:
        position = {str(e.token_id): {"logprob": _lp(e.logprob), "rank": e.rank,
                                      "decoded_token": strings[e.token_id]}}
        for rank, c in enumerate(e.top[:num_top], 1):
            position.setdefault(str(c.token_id), {"logprob": _lp(c.logprob), "rank": rank,
                                                  "decoded_token": strings[c.token_id]})
        out.append(position)
    return out


def chat_logprobs(logprobs, strings: dict[int, str]) -> dict:
    """/v1/chat/completions shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, logprob: float) -> dict:
        token = strings[token_id]
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t.token_id, t.logprob) for t in e.top]}
                        for e in logprobs]}


class Shape:
    """Object names and choice layout of one endpoint (completions or chat)."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def full(self, choices: list, usage_: dict) -> dict:
        out = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        out["usage"] = usage_
        return out

    def choice(self, index: int, text: str | None, finish: str | None, stop, logprobs,
               tool_calls: list[dict] | None = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {"index": index, "message": message,
                    "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": stop}

    def chunk(self, index: int, text: str | None, finish: str | None, stop, logprobs,
              role: bool = False, with_usage: bool = False, tool_calls: list[dict] | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage_: dict) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage_
        return out
