"""GenerateRequest -> validated prompts (token ids) and SamplingParams.

Every check a client can fail happens here, before any node is involved, and raises ValueError
naming the field and its limit (the error interceptor makes that INVALID_ARGUMENT).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from engine.block_manager import block_hashes
from engine.chat import render_chat
from engine import sampling_proto
from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredSpec
from protos.pdserve.v1 import generation_pb2

MAX_PROMPTS = 64  # prompts in one Generate call
MAX_COMPLETIONS = 128  # prompts x n in one request
MAX_CHAT_MESSAGES = 256  # a chat this long still prefills in seconds on CPU with the default model
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")  # as the HTTP gateway's
MAX_BYTES_PER_TOKEN = 32  # text longer than max_model_len x this cannot fit the context: refused untokenized
MIN_TEXT_BYTES = 64 * 1024
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int


@dataclass
class Prompt:
    token_ids: list[int]
    params: SamplingParams  # n == this prompt's completions; max_tokens resolved
    max_tokens: int  # effective: clipped to the context
    _hashes: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)

    def block_hashes(self, block_size: int) -> list[int]:
        """The prompt's prefix-cache block hashes (for placement), computed once for all its n
        completions."""
        if block_size not in self._hashes:
            self._hashes[block_size] = block_hashes(self.token_ids, block_size)
        return self._hashes[block_size]


class PromptBuilder:
    """Tokenizes and validates the prompts of a request for one model."""

    def __init__(self, tokenizer, limits: ModelLimits, generation_defaults: dict | None = None,
                 check_spec: Callable[[StructuredSpec], None] | None = StructuredSpec.check):
        self.tokenizer = tokenizer
        self.check_spec = check_spec  # parses an output constraint (None: the router's own step, `Router.execute`)
        self.defaults = {**OPENAI_DEFAULTS, **(generation_defaults or {})}
        self.set_limits(limits)

    def set_limits(self, limits: ModelLimits) -> None:
        """The limits prompts are checked against (the router: the pool's max_model_len, once known)."""
        self.limits = limits
        self.max_text_bytes = max(MIN_TEXT_BYTES, limits.max_model_len * MAX_BYTES_PER_TOKEN)

    def check_text_size(self, num_bytes: int, what: str = "the prompt") -> None:
        """Refuses text that cannot fit the context before any tokenizer time is spent on it."""
        if num_bytes > self.max_text_bytes:
            raise ValueError(f"{what} has {num_bytes} bytes; at most {self.max_text_bytes} bytes are accepted "
                             f"(max_model_len {self.limits.max_model_len} x {MAX_BYTES_PER_TOKEN})")

    # ---- inputs -----------------------------------------------------------------------------
    def inputs(self, request: generation_pb2.GenerateRequest) -> list[list[int]]:
        single = request.WhichOneof("input")
        if single and request.inputs:
            raise ValueError("set either the single prompt (text / token_ids / chat) or inputs, not both")
        if single:
            return [self._tokens(request, single)]
        if not request.inputs:
            raise ValueError("the prompt is empty: set text, token_ids, chat or inputs")
        if len(request.inputs) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(request.inputs)}")
        return [self._tokens(item, item.WhichOneof("kind")) for item in request.inputs]

    def _tokens(self, holder, kind: str | None) -> list[int]:
        if kind == "text":
            if not holder.text:
                raise ValueError("the prompt is empty")
            self.check_text_size(len(holder.text.encode("utf-8", "surrogatepass")))
            ids = self.tokenizer.encode(holder.text, add_special_tokens=True)
        elif kind == "token_ids":
            ids = list(holder.token_ids.ids)
        elif kind == "chat":
            ids = self.chat(holder.chat.messages, tools=holder.chat.tools, add_generation_prompt=(
                holder.chat.add_generation_prompt if holder.chat.HasField("add_generation_prompt") else True))
        else:
            raise ValueError("the prompt is empty: set text, token_ids or chat")
        return self.check_prompt(ids)

    def check_prompt(self, ids: list[int]) -> list[int]:
        limits = self.limits
        if not ids:
            raise ValueError("the prompt is empty")
        bad = next((t for t in ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be < vocab size {limits.vocab_size}, got {bad}")
        if len(ids) >= limits.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {limits.max_model_len} "
                             "(prompt plus at least one new token must fit)")
        return list(ids)

    def chat(self, messages, add_generation_prompt: bool = True, tools=()) -> list[int]:
        """Renders with the chat template; special-token strings inside message contents are
        tokenized as plain text (engine.chat), so a user can never inject control tokens."""
        if len(messages) > MAX_CHAT_MESSAGES:
            raise ValueError(f"at most {MAX_CHAT_MESSAGES} chat messages, got {len(messages)}")
        for i, m in enumerate(messages):
            if m.role and m.role not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role[:40]!r}")
        self.check_text_size(_chat_bytes(messages, tools), "the chat")
        turns = [_turn(i, m) for i, m in enumerate(messages)]
        return render_chat(self.tokenizer, turns, add_generation_prompt=add_generation_prompt,
                           tools=[_tool(i, t) for i, t in enumerate(tools)] or None)

    # ---- sampling ---------------------------------------------------------------------------
    def params(self, request: generation_pb2.GenerateRequest) -> SamplingParams:
        """The request's parameters, the model's defaults where it left them unset (the output
        constraint is parsed here, so a bad one is INVALID_ARGUMENT before any node sees it)."""
        return sampling_proto.from_request(request, self.defaults, self.check_spec)

    def build(self, request: generation_pb2.GenerateRequest) -> list[Prompt]:
        """Validates and tokenizes (slow for long text: the router runs it on a worker thread)."""
        params = self.params(request)
        num_prompts = len(request.inputs) or 1
        if num_prompts * params.n > MAX_COMPLETIONS:
            raise ValueError(f"at most {MAX_COMPLETIONS} completions per request (prompts x n), "
                             f"got {num_prompts} x {params.n}")
        prompts = []
        for ids in self.inputs(request):
            max_tokens = params.verify(self.limits.vocab_size, self.limits.max_model_len, len(ids))
            prompts.append(Prompt(ids, params, max_tokens))
        return prompts


def _chat_bytes(messages, tools) -> int:
    """Bytes of the text a chat template renders: contents, tool calls and tool schemas."""
    def size(*texts: str) -> int:
        return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)

    return (sum(size(m.content, m.name) + sum(size(c.name, c.arguments) for c in m.tool_calls) for m in messages)
            + sum(size(t.name, t.description, t.parameters) for t in tools))


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"{what} must be a JSON object, got invalid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def _turn(i: int, m: generation_pb2.ChatMessage) -> dict:
    """One ChatMessage as the chat template sees it (tool call arguments as dicts)."""
    turn = {"role": "system" if m.role == "developer" else (m.role or "user"), "content": m.content}
    if m.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": _json_object(
                 c.arguments or "{}", f"messages[{i}].tool_calls[{j}].arguments")}}
            for j, c in enumerate(m.tool_calls)]
    if m.tool_call_id:
        turn["tool_call_id"] = m.tool_call_id
    if m.name:
        turn["name"] = m.name
    return turn


def _tool(i: int, t: generation_pb2.Tool) -> dict:
    if not t.name:
        raise ValueError(f"tools[{i}].name must not be empty")
    fn = {"name": t.name, "description": t.description,
          "parameters": _json_object(t.parameters, f"tools[{i}].parameters") if t.parameters else {}}
    return {"type": "function", "function": fn}
