"""HTTP request bodies (OpenAI + vLLM extra fields) and their conversion to `GenerateRequest`.

Bodies are parsed by pydantic (types); the client-given sampling values go into the
`GenerateRequest` as they are (`engine/sampling_proto.py` `write_given`, which refuses only a value
its proto field cannot hold). Their ranges and caps are checked once, by the router
(`router/prompts.py`): its INVALID_ARGUMENT comes back as a 400 with its message and the field as
`param` (`gateway/errors.py` `from_grpc`). What is checked here is what only an HTTP body has:
unknown fields, best_of, stream_options without stream, logit_bias keys that are not integers,
priority, echo, prompt and message shapes, and output constraints. Every error here is an
`APIError(400, ...)` naming the field.

A field we do not implement is refused with 400 naming it, never ignored; the only fields
accepted and ignored are `IGNORED_FIELDS` (they change nothing about the output):
user, metadata, store, service_tier, prompt_cache_key, safety_identifier.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr,
                      ValidationError)

from engine.sampling_proto import SAMPLING_FIELDS, write_given
from engine.structured.spec import spec_from_proto
from engine.tool_parsers import NamedFunctionOutput, RequiredOutput, ToolParser, get_parser
from gateway.errors import APIError, sampling_param
from protos.pdserve.v1 import generation_pb2 as pb

Float = Annotated[float, Strict()]  # JSON numbers only (ints allowed), never "0.5" strings
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


# Accepted and ignored: they label or bill a request and change nothing about its output.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "safety_identifier"})


class _Body(BaseModel):
    # unknown fields are kept so that refuse_unknown() can name them in a 400
    model_config = ConfigDict(extra="allow", populate_by_name=True)


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
    best_of: StrictInt | None = None  # only == n (or 1): we do not rank candidates
    response_format: "ResponseFormat | None" = None
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
    structured_outputs: "StructuredOutputs | None" = None
    guided_json: dict | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_decoding_backend: Literal["xgrammar", "auto"] | None = None  # we only have xgrammar


class JsonSchemaFormat(_Body):
    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: StrictBool | None = None  # always enforced strictly


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` (one of its constraint fields)."""
    json_: dict | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: StrictInt | None = None
    echo: StrictBool = False  # prompt + completion as the text (and logprobs); not with stream
    suffix: StrictStr | None = None  # refused: no fill-in-the-middle
    prompt_logprobs: StrictInt | None = None  # vLLM extra


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCallIn(_Body):
    name: StrictStr
    arguments: StrictStr


class ToolCallIn(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None


class FunctionDef(_Body):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None  # arguments of a forced call always follow the schema


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    prompt_logprobs: StrictInt | None = None  # vLLM extra: in the response, beside choices


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


_Sampling.model_rebuild()
for _cls in (CompletionRequest, ChatCompletionRequest, LegacyGenerateRequest):
    _cls.model_rebuild()


def parse(model: type[BaseModel], data: dict):
    """`model` from a JSON object, or APIError 400 naming the first bad (or unsupported) field."""
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "str", "int", "dict["))]
        param = ".".join(loc) or None
        raise APIError(400, f"{param or 'body'}: {err['msg']}", param=param) from None
    refuse_unknown(body)
    return body


def refuse_unknown(body: BaseModel, path: str = "") -> None:
    """400 naming the first field we do not implement (IGNORED_FIELDS at the top level pass)."""
    for name in body.model_extra or {}:
        if path or name not in IGNORED_FIELDS:
            param = f"{path}{name}"
            raise APIError(400, f"{param} is not supported by this server", param=param,
                           code="unsupported_field")
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                alias = type(body).model_fields[name].alias or name
                index = f".{i}" if isinstance(value, list) else ""
                refuse_unknown(item, f"{path}{alias}{index}.")


# -- sampling ------------------------------------------------------------------------------------

def check_body(req: _Sampling) -> None:
    """The rules only an HTTP body has; the sampling values themselves are the router's to check."""
    if req.best_of is not None and req.best_of not in (1, req.n):
        raise APIError(400, f"best_of must equal n ({req.n}) or 1: candidates are not ranked, got {req.best_of}",
                       param="best_of")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    logit_bias(req)
    if not -INT32_MAX - 1 <= req.priority <= INT32_MAX:
        raise APIError(400, f"priority must be in [{-INT32_MAX - 1}, {INT32_MAX}], got {req.priority}",
                       param="priority")


def logit_bias(req: _Sampling) -> dict[int, float] | None:
    """The body's logit_bias with token-id keys (JSON object keys are strings)."""
    try:
        return {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None


def check_token_ids(name: str, ids, vocab_size: int | None = None) -> None:
    limit = vocab_size if vocab_size else UINT32_MAX + 1
    for t in ids:
        if t < 0 or t >= limit:
            raise APIError(400, f"{name} must hold token ids in [0, {limit}), got {t}", param=name)


def renamed_params(req: _Sampling) -> dict[str, str]:
    """The OpenAI names of the engine's parameters where this body's differ (for an error's `param`)."""
    if not isinstance(req, ChatCompletionRequest):
        return {}
    return {"logprobs": "top_logprobs",
            "max_tokens": "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"}


def sampling_proto(req: _Sampling, max_tokens: int | None, logprobs: int | None, inputs: list[pb.Input],
                   structured: pb.StructuredOutput | None = None,
                   prompt_logprobs: int | None = None) -> pb.GenerateRequest:
    """The GenerateRequest: client-given fields only, so the router applies model defaults."""
    request = pb.GenerateRequest(model=req.model or "", sampling=pb.SamplingParameters(),
                                 stopping=pb.StoppingCriteria(), priority=req.priority,
                                 client_request_id=(req.request_id or "")[:256])
    given = {f: getattr(req, f) for f in SAMPLING_FIELDS}
    given.update(n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                 stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
                 ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                 skip_special_tokens=req.skip_special_tokens, logit_bias=logit_bias(req))
    try:
        write_given(given, request)
    except ValueError as exc:  # a value no proto field can hold; the rest is the router's to refuse
        raise APIError(400, str(exc), param=sampling_param(str(exc), renamed_params(req))) from None
    if structured is not None:
        request.structured.CopyFrom(structured)
    if len(inputs) == 1:
        request.MergeFrom(single_input(inputs[0]))
    else:
        request.inputs.extend(inputs)
    return request


def single_input(item: pb.Input) -> pb.GenerateRequest:
    """The single-prompt form of one Input (GenerateStream takes only that form)."""
    kind = item.WhichOneof("kind")
    return pb.GenerateRequest(**{kind: getattr(item, kind)})


# -- echo ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Echo:
    """How a completions request echoes its prompt (`echo: true`): the prompt's text goes before the
    completion, and with `logprobs` the prompt tokens' logprobs go before the generated ones.
    `max_tokens: 0` (lm-eval-harness's loglikelihood requests) generates one token, as vLLM does,
    and returns only the prompt (finish_reason length, no completion tokens)."""
    prompts: tuple  # per prompt: its text, or its token ids (the text comes from Detokenize)
    prompt_only: bool  # max_tokens 0
    logprobs: int | None  # top candidates per prompt token (the request's logprobs); None: no logprobs


def echo_plan(req: CompletionRequest, max_tokens: int) -> Echo | None:
    """The echo of a completions request (None without echo); refuses what is not built."""
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_field")
    if req.stream and req.n > 1 and (req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)):
        raise APIError(400, "with stream: true, prompt_logprobs and echo with logprobs need n = 1, got "
                       f"n = {req.n}", param="n", code="unsupported_field")
    if not req.echo:
        return None
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
        else [req.prompt]
    return Echo(tuple(prompts), max_tokens == 0, req.logprobs)


def prompt_logprobs_count(req: CompletionRequest | ChatCompletionRequest, echo: Echo | None) -> int | None:
    """Top candidates per prompt token to ask for: the most of what echo's logprobs and vLLM's
    prompt_logprobs want (None: no prompt logprobs)."""
    wanted = [n for n in (req.prompt_logprobs, echo.logprobs if echo else None) if n is not None]
    return max(wanted) if wanted else None


# -- structured outputs -------------------------------------------------------------------------

def structured_output(req: _Sampling) -> tuple[str, pb.StructuredOutput] | None:
    """(the field that set it, the constraint) from response_format, structured_outputs or
    guided_*; at most one of them; the schema / regex / grammar is parsed here (400 naming it)."""
    given = _constraints(req)
    if len(given) > 1:
        raise APIError(400, f"give at most one output constraint, got {', '.join(f for f, _ in given)}",
                       param=given[1][0])
    if not given:
        return None
    field, msg = given[0]
    check_structured(field, msg)
    return field, msg


def check_structured(field: str, msg: pb.StructuredOutput) -> None:
    """The cheap checks of a constraint (its shape, limits, a schema's JSON), on the event loop.
    The grammar itself is parsed by the router, on its checker processes (a schema can take
    seconds to parse, which here would hold up every other request); its refusal comes back as
    INVALID_ARGUMENT and `constraint_refusal` names this field in the 400."""
    try:
        spec = spec_from_proto(msg)
        if spec is not None and spec.kind == "json_schema":
            spec.check_schema_json()
    except ValueError as exc:
        raise APIError(400, f"{field}: {exc}", param=field) from None


def constraint_refusal(err: APIError, field: str | None) -> APIError:
    """The router's refusal of a constraint's grammar ("invalid structured regex: ...") as the 400
    naming the request field that gave it; any other error as it is."""
    if (field is None or err.status != 400 or err.param is not None
            or not err.message.startswith(("invalid structured ", "structured "))):
        return err
    return APIError(400, f"{field}: {err.message}", param=field, code=err.code)


def _schema_text(schema) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)


def _constraints(req: _Sampling) -> list[tuple[str, pb.StructuredOutput]]:
    out = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        out.append(("response_format", pb.StructuredOutput(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                           param="response_format.json_schema.schema")
        out.append(("response_format", pb.StructuredOutput(json_schema=_schema_text(fmt.json_schema.schema_))))
    so = req.structured_outputs
    if so is not None:
        for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                            ("grammar", so.grammar), ("json_object", so.json_object or None)):
            if value is not None:
                out.append((f"structured_outputs.{name}", _one(name, value)))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{name}")
        if value is not None:
            out.append((f"guided_{name}", _one(name, value)))
    return out


def _one(name: str, value) -> pb.StructuredOutput:
    if name == "json":
        return pb.StructuredOutput(json_schema=_schema_text(value))
    if name == "choice":
        return pb.StructuredOutput(choice=pb.ChoiceList(choices=value))
    if name == "json_object":
        return pb.StructuredOutput(json_object=True)
    return pb.StructuredOutput(**{name: value})


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
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{i}].tool_calls is only allowed on assistant messages",
                           param=f"messages.{i}.tool_calls")
        calls = [pb.ToolCall(id=c.id, name=c.function.name,
                             arguments=_json_object_text(c.function.arguments,
                                                         f"messages.{i}.tool_calls.{j}.function.arguments"))
                 for j, c in enumerate(m.tool_calls or ())]
        out.append(pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=content or "",
                                  tool_calls=calls, tool_call_id=m.tool_call_id or "", name=m.name or ""))
    return out


def _json_object_text(text: str, param: str) -> str:
    try:
        ok = isinstance(json.loads(text), dict)
    except ValueError:
        ok = False
    if not ok:
        raise APIError(400, f"{param} must be a JSON object as a string", param=param)
    return text


# -- tools ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools: the parser that reads the output (None: plain content),
    the grammar forcing the call (required / named), and the tools for the prompt."""
    tools: tuple[pb.Tool, ...] = ()
    parser: ToolParser | None = None
    structured: pb.StructuredOutput | None = None
    named: bool = False  # the finish reason stays "stop" (OpenAI's behaviour for a named function)


def tool_plan(req: ChatCompletionRequest, parser_name: str | None) -> ToolPlan:
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    tools = tuple(pb.Tool(name=t.function.name, description=t.function.description or "",
                          parameters=json.dumps(t.function.parameters) if t.function.parameters else "")
                  for t in req.tools)
    if choice == "none":
        return ToolPlan(tools)
    if choice is None or choice == "auto":
        if parser_name is None:
            raise APIError(400, "tool_choice auto needs a server started with --tool-call-parser "
                                "(hermes, llama3_json, mistral, pythonic); use tool_choice required or a named "
                                "function", param="tool_choice")
        return ToolPlan(tools, get_parser(parser_name))
    if choice == "required":
        schema = _required_schema(req.tools, req.parallel_tool_calls)
        return ToolPlan(tools, RequiredOutput(), _checked("tool_choice", json.dumps(schema)))
    fn = next((t.function for t in req.tools if t.function.name == choice.function.name), None)
    if fn is None:
        raise APIError(400, f"tool_choice names {choice.function.name[:64]!r}, which is not in tools",
                       param="tool_choice.function.name")
    schema = fn.parameters or {"type": "object"}
    return ToolPlan(tools, NamedFunctionOutput(fn.name), _checked("tool_choice", json.dumps(schema)), named=True)


def _required_schema(tools: list[ToolDef], parallel: bool) -> dict:
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "parameters": t.function.parameters or {"type": "object"}},
              "required": ["name", "parameters"]} for t in tools]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _checked(field: str, schema: str) -> pb.StructuredOutput:
    msg = pb.StructuredOutput(json_schema=schema)
    check_structured(field, msg)
    return msg
