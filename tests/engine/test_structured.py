"""Structured outputs in the engine: specs, the grammar cache, the batched bitmask, and output that
always matches (tiny random Llama on CPU, so only the grammar makes the output well-formed)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.rpc import convert
from engine.sampler import RowSpec, Sampler, SamplingMetadata
from engine.structured import GrammarCache, StructuredSpec

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return str(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_gpu_blocks=256, max_model_len=512)


def _spec_params(spec: StructuredSpec, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 200)
    return SamplingParams(structured=spec, **kw)


# -- specs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    (StructuredSpec("regex", "(ab"), "invalid structured regex"),
    (StructuredSpec("json_schema", "{not json"), "not valid JSON"),
    (StructuredSpec("json_schema", '{"type": "nonsense"}'), "invalid structured json_schema"),
    (StructuredSpec("json_schema", "[1, 2]"), "must be a JSON object"),
    (StructuredSpec("grammar", "root ::= "), "invalid structured grammar"),
])
def test_bad_specs_raise_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.check()


def test_spec_shape_is_checked_at_construction():
    with pytest.raises(ValueError, match="kind must be one of"):
        StructuredSpec("yaml", "x")
    with pytest.raises(ValueError, match="must not be empty"):
        StructuredSpec("regex", "")
    with pytest.raises(ValueError, match="1 to 1024"):
        StructuredSpec("choice")
    with pytest.raises(ValueError, match="non-empty"):
        StructuredSpec("choice", choices=("a", ""))


@pytest.mark.parametrize("spec", [
    StructuredSpec("json_schema", json.dumps(SCHEMA)), StructuredSpec("json_object"),
    StructuredSpec("regex", "[a-z]+"), StructuredSpec("choice", choices=("yes", "no")),
    StructuredSpec("grammar", 'root ::= "x" | "y"')])
def test_spec_proto_round_trip(spec):
    params = SamplingParams(structured=spec, max_tokens=5)
    back, _ = convert.params_from_proto(convert.params_to_proto(params))
    assert back.structured == spec
    assert convert.params_from_proto(convert.params_to_proto(SamplingParams()))[0].structured is None


def test_grammar_cache_is_an_lru(default_tokenizer):
    cache = GrammarCache(default_tokenizer, 49152, [2], max_entries=2)
    specs = [StructuredSpec("regex", r) for r in ("a+", "b+", "c+")]
    for s in specs:
        cache.state(s)
    assert len(cache) == 2 and cache.misses == 3
    cache.state(specs[2])
    assert cache.hits == 1
    cache.state(specs[0])  # evicted before: compiled again
    assert cache.misses == 4


def test_bitmask_only_touches_constrained_rows(default_tokenizer):
    cache = GrammarCache(default_tokenizer, 49152, [2])
    state = cache.state(StructuredSpec("choice", choices=("yes",)))
    free = SamplingParams(temperature=0.0)
    rows = [RowSpec(free, [1], []), RowSpec(free, [1], [], grammar=state)]
    logits = torch.randn(2, 49152)
    out = Sampler()(logits, SamplingMetadata.build(rows, 49152, "cpu"))
    assert int(out.sampled_token_ids[0]) == int(logits[0].argmax())
    assert default_tokenizer.decode([int(out.sampled_token_ids[1])]) in ("y", "ye", "yes")


# -- generation ----------------------------------------------------------------------------------

SCHEMAS = [
    SCHEMA,
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "n": {"type": "number"}}, "required": ["color", "n"]},
]


def test_json_schema_outputs_validate(llm):
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode("Give me JSON:")}] * len(SCHEMAS)
    params = [_spec_params(StructuredSpec("json_schema", json.dumps(s)), temperature=0.8, seed=i)
              for i, s in enumerate(SCHEMAS)]
    for schema, out in zip(SCHEMAS, llm.generate(prompts, params, use_tqdm=False)):
        c = out.outputs[0]
        assert c.finish_reason != "length", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_regex_choice_grammar_and_json_object_hold(llm):
    specs = [StructuredSpec("regex", r"[0-9]{3}-[a-z]{2}"), StructuredSpec("choice", choices=("alpha", "beta", "gamma")),
             StructuredSpec("grammar", 'root ::= ("ab" | "cd") "!"'), StructuredSpec("json_object")]
    outs = llm.generate([[5, 6, 7]] * 4, [_spec_params(s, temperature=1.0, seed=3) for s in specs], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[0])
    assert texts[1] in ("alpha", "beta", "gamma")
    assert texts[2] in ("ab!", "cd!")
    if outs[3].outputs[0].finish_reason != "length":
        assert isinstance(json.loads(texts[3]), dict)
    assert all(o.outputs[0].finish_reason != "length" for o in outs[:3])


def test_eos_only_once_complete_and_length_cut(llm):
    # ignore_eos off: the tiny model is biased towards eos (2) by logit_bias, yet the output completes.
    spec = StructuredSpec("regex", "[a-c]{6}")
    out = llm.generate([[9, 9, 9]], _spec_params(spec, temperature=0.0, logit_bias={2: 100.0}), use_tqdm=False)
    assert re.fullmatch("[a-c]{6}", out[0].outputs[0].text) and out[0].outputs[0].finish_reason == "eos"
    cut = llm.generate([[9, 9, 9]], _spec_params(StructuredSpec("regex", "[a-c]{60}"), max_tokens=4,
                                                  temperature=0.0), use_tqdm=False)
    assert cut[0].outputs[0].finish_reason == "length" and len(cut[0].outputs[0].token_ids) == 4


def test_a_complete_grammar_wins_over_min_tokens(llm):
    out = llm.generate([[4, 5, 6]], _spec_params(StructuredSpec("choice", choices=("yes",)), min_tokens=20,
                                                 temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert out.text == "yes" and out.finish_reason == "eos"


def test_batched_structured_and_free_rows_match_alone(llm):
    spec = StructuredSpec("json_schema", json.dumps(SCHEMAS[3]))
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    constrained = _spec_params(spec, temperature=0.0)
    both = llm.generate([[3, 4, 5], [3, 4, 5]], [free, constrained], use_tqdm=False)
    alone = [llm.generate([[3, 4, 5]], p, use_tqdm=False)[0] for p in (free, constrained)]
    assert [o.outputs[0].token_ids for o in both] == [o.outputs[0].token_ids for o in alone]
    assert both[0].outputs[0].token_ids != both[1].outputs[0].token_ids


def test_prefill_then_decode_continues_the_grammar(model_dir, llm):
    """The prefill engine samples the first token under the grammar; the decode engine rebuilds
    the matcher from the same spec, accepts that token and continues: same output as colocated."""
    spec = StructuredSpec("json_schema", json.dumps(SCHEMA))
    params = _spec_params(spec, temperature=0.0)
    prompt = [11, 12, 13, 14]
    want = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    pre = LLMEngine(EngineArgs(model=model_dir, role="prefill", num_gpu_blocks=64, max_model_len=512))
    dec = LLMEngine(EngineArgs(model=model_dir, role="decode", num_gpu_blocks=64, max_model_len=512))
    wire, _ = convert.params_from_proto(convert.params_to_proto(params))
    pre.add_request("r", prompt_token_ids=prompt, params=wire)
    first = [o for o in pre.step()][0].new_token_ids[0]
    kv = pre.export_kv("r")
    dec.import_request("r", kv.prompt_token_ids, first, wire, kv.k, kv.v)
    got = [first]
    while dec.has_unfinished_requests():
        for out in dec.step():
            got += out.new_token_ids
    assert got == want
    jsonschema.validate(json.loads(llm.get_tokenizer().decode(got, skip_special_tokens=True)), SCHEMA)
    assert dec.block_manager.num_free_blocks == dec.block_manager.num_total_blocks


def test_import_refuses_a_first_token_outside_the_grammar(model_dir):
    dec = LLMEngine(EngineArgs(model=model_dir, role="decode", num_gpu_blocks=32))
    s = dec.shape
    kv = torch.zeros(s.num_layers, 1, 16, s.num_kv_heads, s.head_dim)
    params = _spec_params(StructuredSpec("choice", choices=("yes",)))
    with pytest.raises(ValueError, match="outside the request's grammar"):
        dec.import_request("x", [1, 2, 3], 2, params, kv, kv)
    assert not dec.has_unfinished_requests()


def test_async_scheduling_skips_a_finished_grammar(model_dir):
    """Async scheduling (the CUDA default) queues step N+1 before step N's tokens are read: a row whose
    grammar accepted its end token in step N must not be masked again (xgrammar raises)."""
    llm = LLM(model_dir, num_gpu_blocks=256, max_model_len=512, async_scheduling=True)
    tok = llm.get_tokenizer()
    spec = StructuredSpec("choice", choices=("yes", "no"))
    prompts = [{"prompt_token_ids": tok.encode(p)} for p in ("a", "bb", "ccc")]
    params = [_spec_params(spec, temperature=0.0), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
              _spec_params(StructuredSpec("regex", r"[0-9]{6}"), temperature=0.0)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[0].outputs[0].text in ("yes", "no")
    assert re.fullmatch(r"[0-9]{6}", outs[2].outputs[0].text)
    assert len(outs[1].outputs[0].token_ids) == 12
