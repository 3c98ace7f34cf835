"""Structured outputs on a GPU: the xgrammar token bitmask applied to CUDA logits (skipped without CUDA).

The GPU machine has no default model, so the tiny model gets a character-level tokenizer built in
code (printable ASCII, one token per character), which xgrammar reads as a raw vocabulary. Set
PDSERVE_STRUCTURED_TEST_DEVICE=cpu to run the same checks on CPU.
"""
from __future__ import annotations

import json
import os
import re
import string

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import RowSpec, Sampler, SamplingMetadata
from engine.structured import GrammarCache, StructuredSpec
from tests.conftest import build_tiny_model

DEVICE = os.environ.get("PDSERVE_STRUCTURED_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " ")
VOCAB = 128  # 3 specials + 95 characters + unused ids


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured-gpu")
    build_tiny_model("llama", vocab_size=VOCAB).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = LLM(str(model_dir), device=DEVICE, num_gpu_blocks=256, max_model_len=512,
                 async_scheduling=True)  # the default on CUDA; explicit, so a CPU run covers it too
    yield engine
    del engine
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def test_bitmask_on_device_logits_matches_cpu():
    tok = char_tokenizer()
    cache = GrammarCache(tok, VOCAB, [2])
    spec = StructuredSpec("regex", r"[0-9]{2}x")
    free = SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=gen)
    picks = {}
    for device in ("cpu", DEVICE):
        rows = [RowSpec(free, [1], []), RowSpec(free, [1], [], grammar=cache.state(spec)),
                RowSpec(free, [1], []), RowSpec(free, [1], [], grammar=cache.state(spec))]
        out = Sampler()(logits.to(device), SamplingMetadata.build(rows, VOCAB, device))
        picks[device] = [int(t) for t in out.sampled_token_ids.cpu()]
    assert picks["cpu"] == picks[DEVICE]
    assert picks[DEVICE][0] == int(logits[0].argmax()) and picks[DEVICE][2] == int(logits[2].argmax())
    for row in (1, 3):  # constrained rows: a digit, whatever the logits preferred
        assert tok.decode([picks[DEVICE][row]]) in string.digits


def test_regex_and_schema_hold_on_device(llm):
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": tok.encode("give:")}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    specs = [StructuredSpec("regex", r"[0-9]{3}-[a-z]{2}"), StructuredSpec("choice", choices=("alpha", "beta")),
             StructuredSpec("json_schema", json.dumps(schema))]
    params = [SamplingParams(structured=s, max_tokens=120, temperature=t, seed=i)
              for i, (s, t) in enumerate(zip(specs, (0.0, 0.9, 0.9)))]
    outs = llm.generate([prompt] * len(specs), params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[0]), texts[0]
    assert texts[1] in ("alpha", "beta"), texts[1]
    assert outs[2].outputs[0].finish_reason != "length", texts[2]
    jsonschema.validate(json.loads(texts[2]), schema)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


def test_batched_structured_rows_match_alone_on_device(llm):
    """A constrained row batched with free rows (a CUDA graph step of several sizes) = run alone."""
    tok = llm.get_tokenizer()
    spec = StructuredSpec("regex", r"[a-z]{4}[0-9]{4}")
    prompts = [{"prompt_token_ids": tok.encode(p)} for p in ("a:", "bb:", "ccc:", "dddd:")]
    constrained = SamplingParams(structured=spec, max_tokens=40, temperature=0.0)
    free = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    alone = llm.generate([prompts[0]], [constrained], use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(prompts, [constrained, free, free, free], use_tqdm=False)
    assert list(mixed[0].outputs[0].token_ids) == list(alone)
    assert re.fullmatch(r"[a-z]{4}[0-9]{4}", mixed[0].outputs[0].text)
