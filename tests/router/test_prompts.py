"""router/prompts.py in process: text, token-id and chat prompts, the limits and the messages users
see, sampling defaults, n and max_tokens."""
from __future__ import annotations

import pytest

from engine.chat import render_chat
from engine.block_manager import block_hashes
from protos.pdserve.v1 import generation_pb2 as g
from router.prompts import (MAX_CHAT_MESSAGES, MAX_COMPLETIONS, MAX_PROMPTS, MIN_TEXT_BYTES, ModelLimits, Prompt,
                            PromptBuilder)

VOCAB, MAX_LEN = 49152, 64


@pytest.fixture(scope="module")
def builder(default_tokenizer):
    return PromptBuilder(default_tokenizer, ModelLimits(VOCAB, MAX_LEN))


def request(**kw) -> g.GenerateRequest:
    return g.GenerateRequest(**kw)


def ids(*token_ids: int) -> g.TokenIds:
    return g.TokenIds(ids=list(token_ids))


def refused(builder: PromptBuilder, req: g.GenerateRequest) -> str:
    with pytest.raises(ValueError) as err:
        builder.build(req)
    return str(err.value)


# ---- inputs ------------------------------------------------------------------------------------

def test_text_is_tokenized_with_the_models_special_tokens(builder, default_tokenizer):
    [prompt] = builder.build(request(text="Hello world"))
    assert prompt.token_ids == default_tokenizer.encode("Hello world", add_special_tokens=True)


def test_token_ids_are_used_as_they_are(builder):
    [prompt] = builder.build(request(token_ids=ids(5, 6, 7)))
    assert prompt.token_ids == [5, 6, 7]


def test_several_inputs_of_each_kind(builder, default_tokenizer):
    prompts = builder.build(request(inputs=[g.Input(text="Hi"), g.Input(token_ids=ids(1, 2)),
                                            g.Input(chat=g.ChatInput(messages=[g.ChatMessage(content="Hi")]))]))
    assert [p.token_ids for p in prompts[:2]] == [default_tokenizer.encode("Hi", add_special_tokens=True), [1, 2]]
    assert prompts[2].token_ids == render_chat(default_tokenizer, [{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("req, message", [
    (request(), "the prompt is empty: set text, token_ids, chat or inputs"),
    (request(text=""), "the prompt is empty"),
    (request(token_ids=ids()), "the prompt is empty"),
    (request(text="a", inputs=[g.Input(text="b")]),
     "set either the single prompt (text / token_ids / chat) or inputs, not both"),
    (request(inputs=[g.Input()]), "the prompt is empty: set text, token_ids or chat"),
    (request(inputs=[g.Input(text="a")] * (MAX_PROMPTS + 1)), f"at most {MAX_PROMPTS} prompts per request, got 65"),
    (request(token_ids=ids(1, VOCAB)), f"prompt token ids must be < vocab size {VOCAB}, got {VOCAB}"),
    (request(token_ids=ids(*[1] * MAX_LEN)),
     f"the prompt has {MAX_LEN} tokens; max_model_len is {MAX_LEN} (prompt plus at least one new token must fit)"),
], ids=["nothing", "empty-text", "empty-ids", "both", "empty-input", "too-many-prompts", "vocab", "too-long"])
def test_bad_inputs_are_refused_with_the_field_and_its_limit(builder, req, message):
    assert refused(builder, req) == message


def test_text_too_large_for_the_context_is_refused_before_tokenizing(builder):
    assert builder.max_text_bytes == MIN_TEXT_BYTES  # 64 x 32 bytes is under the floor
    big = "x" * (MIN_TEXT_BYTES + 1)
    assert refused(builder, request(text=big)) == (
        f"the prompt has {MIN_TEXT_BYTES + 1} bytes; at most {MIN_TEXT_BYTES} bytes are accepted "
        f"(max_model_len {MAX_LEN} x 32)")
    chat = g.ChatInput(messages=[g.ChatMessage(content=big)])
    assert refused(builder, request(chat=chat)).startswith(f"the chat has {MIN_TEXT_BYTES + 1} bytes")


@pytest.mark.parametrize("where", ["tool-arguments", "tool-schema"])
def test_chat_text_in_tools_counts_toward_the_size_limit(builder, where):
    """Tool call arguments and tool schemas are rendered into the prompt too: text there is refused
    untokenized like text in a message's content (the tokenizer thread never renders 16 MiB of it)."""
    big = '{"a": "' + "x" * MIN_TEXT_BYTES + '"}'
    if where == "tool-arguments":
        chat = g.ChatInput(messages=[g.ChatMessage(role="assistant", tool_calls=[
            g.ToolCall(id="c", name="f", arguments=big)])])
    else:
        chat = g.ChatInput(messages=[g.ChatMessage(content="hi")], tools=[g.Tool(name="f", parameters=big)])
    assert refused(builder, request(chat=chat)).startswith("the chat has ")


def test_the_text_limit_grows_with_the_context(default_tokenizer):
    assert PromptBuilder(default_tokenizer, ModelLimits(VOCAB, 8192)).max_text_bytes == 8192 * 32


# ---- chat ----------------------------------------------------------------------------------------

def test_chat_renders_the_template_and_maps_developer_to_system(builder, default_tokenizer):
    chat = g.ChatInput(messages=[g.ChatMessage(role="developer", content="Be brief."),
                                 g.ChatMessage(role="user", content="Hi")])
    [prompt] = builder.build(request(chat=chat))
    assert prompt.token_ids == render_chat(default_tokenizer, [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi"}])


def test_chat_without_the_generation_prompt(builder, default_tokenizer):
    chat = g.ChatInput(messages=[g.ChatMessage(content="Hi")], add_generation_prompt=False)
    [prompt] = builder.build(request(chat=chat))
    assert prompt.token_ids == render_chat(default_tokenizer, [{"role": "user", "content": "Hi"}],
                                           add_generation_prompt=False)
    assert prompt.token_ids != builder.build(request(chat=g.ChatInput(messages=chat.messages)))[0].token_ids


def test_special_tokens_in_chat_content_are_plain_text(builder, default_tokenizer):
    [prompt] = builder.build(request(chat=g.ChatInput(messages=[g.ChatMessage(content="<|im_end|>")])))
    end = default_tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = render_chat(default_tokenizer, [{"role": "user", "content": "x"}])
    assert prompt.token_ids.count(end) == plain.count(end)  # no extra control token from the content


@pytest.mark.parametrize("chat, message", [
    (g.ChatInput(messages=[g.ChatMessage(role="root", content="x")]),
     "messages[0].role must be one of system, user, assistant, developer, tool, got 'root'"),
    (g.ChatInput(messages=[g.ChatMessage(content="x")] * (MAX_CHAT_MESSAGES + 1)),
     f"at most {MAX_CHAT_MESSAGES} chat messages, got {MAX_CHAT_MESSAGES + 1}"),
    (g.ChatInput(messages=[g.ChatMessage(role="assistant", tool_calls=[g.ToolCall(id="c", name="f",
                                                                                  arguments="[1]")])]),
     "messages[0].tool_calls[0].arguments must be a JSON object"),
    (g.ChatInput(messages=[g.ChatMessage(content="x")], tools=[g.Tool(name="")]), "tools[0].name must not be empty"),
    (g.ChatInput(messages=[g.ChatMessage(content="x")], tools=[g.Tool(name="f", parameters="{")]),
     "tools[0].parameters must be a JSON object, got invalid JSON"),
], ids=["role", "too-many", "tool-arguments", "tool-name", "tool-parameters"])
def test_bad_chats_are_refused(builder, chat, message):
    assert refused(builder, request(chat=chat)) == message


# ---- sampling parameters, n, max_tokens ----------------------------------------------------------

def test_unset_sampling_fields_take_the_model_defaults_then_openais(default_tokenizer):
    builder = PromptBuilder(default_tokenizer, ModelLimits(VOCAB, MAX_LEN), {"temperature": 0.6, "top_p": 0.9})
    params = builder.params(request(text="x"))
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.6, 0.9, 0, 0.0, 1.0)
    params = builder.params(request(text="x", sampling=g.SamplingParameters(temperature=0.0, top_k=5)))
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.9, 5)  # 0 is set, not unset


def test_request_fields_reach_the_sampling_params(builder):
    req = request(text="x", n=3, logprobs=2, skip_special_tokens=False,
                  sampling=g.SamplingParameters(seed=11, presence_penalty=0.5, logit_bias={4: -1.0}),
                  stopping=g.StoppingCriteria(max_new_tokens=5, min_new_tokens=1, stop=["\n"], stop_token_ids=[2],
                                              include_stop_str=True, ignore_eos=True))
    p = builder.params(req)
    assert (p.n, p.logprobs, p.skip_special_tokens, p.seed, p.presence_penalty, p.frequency_penalty) == (
        3, 2, False, 11, 0.5, 0.0)
    assert (p.logit_bias, p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == ({4: -1.0}, 5, 1, ["\n"], [2])
    assert (p.include_stop_str_in_output, p.ignore_eos, p.prompt_logprobs, p.structured) == (True, True, None, None)


def test_n_defaults_to_one_and_completions_are_capped(builder):
    assert builder.params(request(text="x")).n == 1
    [prompt] = builder.build(request(token_ids=ids(1), n=4))
    assert prompt.params.n == 4
    many = request(inputs=[g.Input(token_ids=ids(1))] * 2, n=MAX_COMPLETIONS // 2 + 1)
    assert refused(builder, many) == (f"at most {MAX_COMPLETIONS} completions per request (prompts x n), "
                                      f"got 2 x {MAX_COMPLETIONS // 2 + 1}")


def test_max_tokens_unset_is_the_rest_of_the_context_per_prompt(builder):
    short, longer = builder.build(request(inputs=[g.Input(token_ids=ids(1, 2)), g.Input(token_ids=ids(*[1] * 10))]))
    assert (short.max_tokens, longer.max_tokens) == (MAX_LEN - 2, MAX_LEN - 10)
    assert short.params is longer.params and short.params.max_tokens is None


def test_max_tokens_past_the_context_is_refused(builder):
    req = request(token_ids=ids(*[1] * 60), stopping=g.StoppingCriteria(max_new_tokens=5))
    assert refused(builder, req) == "prompt length 60 + max_tokens 5 = 65 exceeds the max model length 64"


def test_min_tokens_past_the_context_is_refused(builder):
    req = request(token_ids=ids(*[1] * 60), stopping=g.StoppingCriteria(min_new_tokens=5))
    assert refused(builder, req) == ("min_tokens 5 exceeds the 4 tokens left by prompt length 60 within the max "
                                     "model length 64")


def test_stop_token_ids_past_the_vocabulary_are_refused(builder):
    req = request(token_ids=ids(1), stopping=g.StoppingCriteria(stop_token_ids=[VOCAB + 1]))
    assert refused(builder, req) == f"stop_token_ids must be < vocab size {VOCAB}, got {VOCAB + 1}"


def test_a_bad_structured_output_is_refused_before_any_node(builder):
    req = request(text="x", structured=g.StructuredOutput(json_schema="{not json"))
    assert refused(builder, req).startswith("structured json_schema is not valid JSON: ")


# ---- prompt hashes -------------------------------------------------------------------------------

def test_prompt_block_hashes_are_the_engines_and_computed_once():
    prompt = Prompt(list(range(40)), None, 1)
    first = prompt.block_hashes(16)
    assert first == block_hashes(list(range(40)), 16) and len(first) == 2
    assert prompt.block_hashes(16) is first
