"""engine/model_info.py: what the router loads of a model (config, tokenizer, eos ids, sampling
defaults, the context limit) without its weights, the same as the loader's ModelSource."""
import shutil
import types

import pytest

from engine.loader import load_model_source
from engine.model_info import load_model_info, resolve_max_model_len


def _same_info(info, source) -> None:
    assert (info.name, info.eos_token_ids, info.generation_defaults) == (
        source.name, source.eos_token_ids, source.generation_defaults)
    assert {**info.config.to_dict(), "_name_or_path": ""} == {**source.config.to_dict(), "_name_or_path": ""}
    assert info.tokenizer("Hello world").input_ids == source.tokenizer("Hello world").input_ids


def test_a_directory_without_weights_is_enough_for_the_router(make_tiny_model, tmp_path):
    full = make_tiny_model("qwen2")
    bare = tmp_path / full.name
    shutil.copytree(full, bare)
    (bare / "model.safetensors").unlink()
    _same_info(load_model_info(str(bare)), load_model_source(str(full)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model_source(str(bare))  # the engine still needs them


def test_the_default_model_reads_like_the_loaders(default_model_path):
    _same_info(load_model_info(None), load_model_source(str(default_model_path)))


def _config(model_type="llama", max_position_embeddings=4096, sliding_window=None):
    return types.SimpleNamespace(model_type=model_type, max_position_embeddings=max_position_embeddings,
                                 sliding_window=sliding_window)


def test_max_model_len_defaults_to_the_models_limit_and_refuses_more():
    assert resolve_max_model_len(_config(), None) == 4096
    assert resolve_max_model_len(_config(), 1024) == 1024
    with pytest.raises(ValueError, match="max_model_len 8192 exceeds the model's limit of 4096 tokens"):
        resolve_max_model_len(_config(), 8192)


def test_mistral_stays_inside_its_sliding_window():
    assert resolve_max_model_len(_config("mistral", 32768, sliding_window=4096), None) == 4096
    assert resolve_max_model_len(_config("llama", 32768, sliding_window=4096), None) == 32768  # not a mistral
