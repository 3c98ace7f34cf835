"""HTTP request bodies (OpenAI + vLLM extra fields) and their conversion to `GenerateRequest`.

Bodies are parsed by pydantic (types) and then checked by the engine's own `SamplingParams`
(ranges and caps, with messages that name the limit), so the gateway refuses exactly what the
engine would, before any gRPC call. Every error here is an `APIError(400, ...)` naming the field.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, ValidationError

from engine.sampling_params import SamplingParams
from gateway.errors import APIError
from protos.pdserve.v1 import generation_pb2 as pb

Float = Annotated[float, Strict()]  # JSON numbers only (ints allowed), never "0.5" strings
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI SDKs send fields we do not use


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _Sampling(_Body):
    """Fields shared by /v1/completions, /v1/chat/completions and /generate."""
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    user: StrictStr | None = None
    # vLLM extras
    top_k: StrictInt | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: StrictInt = 0
    request_id: StrictStr | None = None


Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessageIn(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True


class LegacyGenerateRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = None


class TokenizeBody(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeBody(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]


def parse(model: type[BaseModel], data: dict):
    """`model` from a JSON object, or APIError 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "str", "int"))]
        param = ".".join(loc) or None
        raise APIError(400, f"{param or 'body'}: {err['msg']}", param=param) from None


# -- sampling ------------------------------------------------------------------------------------

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                    "presence_penalty", "frequency_penalty")


def check_sampling(req: _Sampling, max_tokens: int | None, logprobs: int | None,
                   vocab_size: int | None = None) -> SamplingParams:
    """Validates every sampling / stopping field with the engine's rules (ValueError -> 400)."""
    given = {f: getattr(req, f) for f in _SAMPLING_FIELDS if getattr(req, f) is not None}
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)",
                           param="logit_bias") from None
    if not -INT32_MAX - 1 <= req.priority <= INT32_MAX:
        raise APIError(400, f"priority must be in [{-INT32_MAX - 1}, {INT32_MAX}], got {req.priority}",
                       param="priority")
    try:
        params = SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
            stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            logit_bias=bias, **given)
    except ValueError as exc:
        message = str(exc)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from None
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", bias or ())):
        check_token_ids(name, ids, vocab_size)
    return params


def check_token_ids(name: str, ids, vocab_size: int | None = None) -> None:
    limit = vocab_size if vocab_size else UINT32_MAX + 1
    for t in ids:
        if t < 0 or t >= limit:
            raise APIError(400, f"{name} must hold token ids in [0, {limit}), got {t}", param=name)


def sampling_proto(req: _Sampling, params: SamplingParams, max_tokens: int | None,
                   logprobs: int | None, inputs: list[pb.Input]) -> pb.GenerateRequest:
    """The GenerateRequest: client-given fields only, so the router applies model defaults."""
    sampling = pb.SamplingParameters(**{f: getattr(params, f) for f in _SAMPLING_FIELDS
                                        if getattr(req, f) is not None})
    if params.logit_bias:
        sampling.logit_bias.update(params.logit_bias)
    stopping = pb.StoppingCriteria(min_new_tokens=params.min_tokens, stop=params.stop,
                                   stop_token_ids=params.stop_token_ids,
                                   include_stop_str=params.include_stop_str_in_output,
                                   ignore_eos=params.ignore_eos)
    if max_tokens is not None:
        stopping.max_new_tokens = max_tokens
    request = pb.GenerateRequest(model=req.model or "", sampling=sampling, stopping=stopping,
                                 n=params.n, priority=req.priority,
                                 client_request_id=(req.request_id or "")[:256],
                                 skip_special_tokens=params.skip_special_tokens)
    if logprobs is not None:
        request.logprobs = logprobs
    if len(inputs) == 1:
        request.MergeFrom(single_input(inputs[0]))
    else:
        request.inputs.extend(inputs)
    return request


def single_input(item: pb.Input) -> pb.GenerateRequest:
    """The single-prompt form of one Input (GenerateStream takes only that form)."""
    kind = item.WhichOneof("kind")
    return pb.GenerateRequest(**{kind: getattr(item, kind)})


# -- prompts ---------------------------------------------------------------------------------------

def completion_inputs(prompt, vocab_size: int | None) -> list[pb.Input]:
    """OpenAI's four prompt forms: str, [str], [int], [[int]]."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    inputs = []
    for p in prompt:
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p, str):
            inputs.append(pb.Input(text=p))
        else:
            check_token_ids("prompt", p, vocab_size)
            inputs.append(pb.Input(token_ids=pb.TokenIds(ids=p)))
    return inputs


_ROLES = ("system", "user", "assistant", "developer", "tool")


def chat_messages(messages: list[ChatMessageIn]) -> list[pb.ChatMessage]:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {m.role[:40]!r}",
                           param=f"messages.{i}.role")
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(part.text for part in m.content)
        out.append(pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=content or ""))
    return out
