import json
import os
import shutil
import time

import pytest
import torch
import transformers

from engine import loader
from engine.gguf_loader import GGUFFile, hf_name
from engine.loader import load_model_source
from tests.conftest import TINY_ARCHS, build_tiny_model

SAMPLE = "Hello world! <|im_start|>user\nWhat is 17 * 23? ünïcödé\t tabs  spaces<|im_end|>"


def expected_state_dict(arch: str, **overrides) -> dict[str, torch.Tensor]:
    model = build_tiny_model(arch, **overrides)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def assert_weights_equal(source, expected: dict[str, torch.Tensor]) -> None:
    got = dict(source.iter_weights())
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


# --- HF directories ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_tiny_models_round_trip(make_tiny_model, default_tokenizer, arch):
    path = make_tiny_model(arch)
    source = load_model_source(str(path))
    assert source.name == path.name
    assert source.config.model_type == TINY_ARCHS[arch][0].model_type
    assert source.config.vocab_size == 49152
    assert source.eos_token_ids == [2]
    assert source.tokenizer(SAMPLE).input_ids == default_tokenizer(SAMPLE).input_ids
    assert source.tokenizer.chat_template
    assert_weights_equal(source, expected_state_dict(arch))


def test_tied_model_has_no_lm_head_and_qwen2_has_nonzero_biases(make_tiny_model):
    tied = dict(load_model_source(str(make_tiny_model("smollm2"))).iter_weights())
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
    qwen = dict(load_model_source(str(make_tiny_model("qwen2"))).iter_weights())
    biases = [n for n in qwen if n.endswith(".bias")]
    assert sorted({n.split(".")[-2] for n in biases}) == ["k_proj", "q_proj", "v_proj"]
    assert all(qwen[n].abs().sum() > 0 for n in biases)


def test_llama3_rope_parameters_survive(make_tiny_model):
    rope = load_model_source(str(make_tiny_model("llama3"))).config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 64 and rope["rope_theta"] == 500000.0


def test_sharded_safetensors_load_identically(make_tiny_model):
    path = make_tiny_model("llama", max_shard_size="200KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (path / "model.safetensors").exists()
    assert_weights_equal(load_model_source(str(path)), expected_state_dict("llama"))


def test_stored_dtype_is_kept(make_tiny_model):
    source = load_model_source(str(make_tiny_model("mistral", dtype=torch.bfloat16)))
    expected = {k: v.to(torch.bfloat16) for k, v in expected_state_dict("mistral").items()}
    assert_weights_equal(source, expected)


def test_weights_are_lazy_and_reiterable(make_tiny_model):
    source = load_model_source(str(make_tiny_model("llama")))
    first = next(source.iter_weights())
    again = next(source.iter_weights())
    assert first[0] == again[0] and torch.equal(first[1], again[1])


@pytest.mark.parametrize("gen, eos", [
    ({"eos_token_id": 2}, [2]),
    ({"eos_token_id": [2, 0, 2]}, [2, 0]),
    ({}, [7]),  # falls back to config.eos_token_id
])
def test_eos_token_ids(make_tiny_model, gen, eos):
    path = make_tiny_model("llama", generation_config=gen, eos_token_id=7)
    assert load_model_source(str(path)).eos_token_ids == eos


def test_generation_defaults(make_tiny_model, tmp_path):
    sampled = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
               "repetition_penalty": 1.1, "eos_token_id": 2, "max_length": 100}
    source = load_model_source(str(make_tiny_model("qwen2", generation_config=sampled)))
    assert source.generation_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                          "repetition_penalty": 1.1}
    greedy = {"temperature": 0.6, "top_p": 0.9, "min_p": 0.05, "eos_token_id": 2}
    source = load_model_source(str(make_tiny_model("qwen2", generation_config=greedy)))
    assert source.generation_defaults == {"min_p": 0.05}

    no_gen = tmp_path / "no-gen"
    shutil.copytree(make_tiny_model("qwen2"), no_gen)
    (no_gen / "generation_config.json").unlink()
    source = load_model_source(str(no_gen))
    assert source.generation_defaults == {} and source.eos_token_ids == [2]


# --- hub --------------------------------------------------------------------------------------

def test_hub_repo_id_uses_snapshot_download(make_tiny_model, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(make_tiny_model("qwen2"))

    monkeypatch.setattr(loader, "snapshot_download", fake_snapshot_download)
    source = load_model_source("someorg/tiny-qwen2", revision="abc123")
    assert source.name == "someorg/tiny-qwen2"
    assert source.config.model_type == "qwen2"
    assert calls == [("someorg/tiny-qwen2", {
        "revision": "abc123", "allow_patterns": loader.HUB_ALLOW_PATTERNS,
        "ignore_patterns": loader.HUB_IGNORE_PATTERNS})]
    assert_weights_equal(source, expected_state_dict("qwen2"))


def test_hub_offline_and_not_cached_gives_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        load_model_source("someorg/not-cached-model")
    message = str(err.value)
    assert "someorg/not-cached-model" in message
    assert "local model directory or a .gguf file" in message


# --- bad inputs -------------------------------------------------------------------------------

def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_source(str(tmp_path))


def test_missing_weights_and_shards(make_tiny_model, tmp_path):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(make_tiny_model("llama"), no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model_source(str(no_weights))

    no_shard = tmp_path / "no-shard"
    shutil.copytree(make_tiny_model("llama", max_shard_size="200KB"), no_shard)
    next(no_shard.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing weight shard"):
        load_model_source(str(no_shard))


@pytest.mark.parametrize("patch", [
    {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
    {"architectures": ["LlamaForSequenceClassification"]},
])
def test_unsupported_architecture(make_tiny_model, tmp_path, patch):
    path = tmp_path / "odd"
    shutil.copytree(make_tiny_model("llama"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **patch}))
    with pytest.raises(ValueError, match="llama, mistral, qwen2|LlamaForCausalLM"):
        load_model_source(str(path))


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(path, "phi2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported gguf architecture 'phi2'.*llama, qwen2"):
        load_model_source(str(path))


def test_gguf_tensor_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.11.attn_q.weight") == "model.layers.11.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_name("rope_freqs.weight")


# --- the default gguf -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_source(default_model_path):
    return load_model_source()


@pytest.fixture(scope="module")
def transformers_gguf_model(default_model_path):
    """transformers' own gguf import: an independent reference for dequantization and the
    Q/K un-permutation."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32)


def test_default_gguf_config(default_source, transformers_gguf_model):
    ours, ref = default_source.config, transformers_gguf_model.config
    assert default_source.name == "SmolLM2-135M-Instruct.Q4_1"
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "head_dim"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads,
            ours.num_key_value_heads, ours.vocab_size) == (576, 30, 9, 3, 49152)
    assert default_source.eos_token_ids == [2]
    assert default_source.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert default_source.generation_defaults == {}


def test_default_gguf_weights_match_transformers(default_source, transformers_gguf_model):
    ref = transformers_gguf_model.state_dict()
    ref.pop("lm_head.weight")  # tied to the embedding; we do not yield it
    got = {}
    for name, tensor in default_source.iter_weights():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        got[name] = tensor
    assert sorted(got) == sorted(ref) and len(got) == 272
    for name, tensor in ref.items():
        assert got[name].shape == tensor.shape, name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_default_gguf_tokenizer_matches_transformers(default_source, default_model_path):
    ref = transformers.AutoTokenizer.from_pretrained(default_model_path.parent,
                                                     gguf_file=default_model_path.name)
    ids = default_source.tokenizer(SAMPLE).input_ids
    assert ids == ref(SAMPLE).input_ids
    assert default_source.tokenizer.decode(ids) == SAMPLE
    chat = [{"role": "user", "content": "hi"}]
    assert (default_source.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def test_default_gguf_second_load_uses_the_sidecar(default_source, default_model_path):
    sidecar = GGUFFile(default_model_path).sidecar_dir
    assert (sidecar / "tokenizer.json").is_file() and (sidecar / "config.json").is_file()
    start = time.perf_counter()
    again = load_model_source(str(default_model_path))
    assert time.perf_counter() - start < 2.0  # building it takes ~7 s
    assert again.tokenizer(SAMPLE).input_ids == default_source.tokenizer(SAMPLE).input_ids


def test_gguf_sidecar_is_keyed_by_file_identity(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    before = GGUFFile(path).sidecar_dir
    assert GGUFFile(path).sidecar_dir == before
    os.utime(path, ns=(0, 12345))
    touched = GGUFFile(path).sidecar_dir
    path.write_bytes(b"GGUF and more")
    os.utime(path, ns=(0, 12345))
    assert len({before, touched, GGUFFile(path).sidecar_dir}) == 3
