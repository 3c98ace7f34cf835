"""What a model is, without its weights: served name, HF config, tokenizer, eos ids, sampling
defaults, and the context limit its config allows.

The router reads this and never `engine.loader` (the weights, torch, the model code); the loader
builds its `ModelSource` on top. Nothing here imports torch (transformers 5 itself still does when
a config or tokenizer is loaded: its configuration module imports torch whenever it is installed).

Where a model comes from: the default model (``None``), a local HF directory, a ``.gguf`` file,
or a Hugging Face Hub repo id (fetched with ``snapshot_download``, honouring HF_HUB_OFFLINE and
the HF cache).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Literal

import transformers  # a lazy module: importing it loads nothing
from huggingface_hub import snapshot_download

from engine.default_model import default_model_path

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
HUB_IGNORE_PATTERNS = ["consolidated*", "original/*"]  # duplicate Mistral/Meta-format weights
_SAMPLED_KEYS = ("temperature", "top_p", "top_k")  # only meaningful when do_sample is true
_ALWAYS_KEYS = ("min_p", "repetition_penalty")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class ModelInfo:
    name: str  # served model name: repo id, directory name or gguf stem
    config: transformers.PretrainedConfig
    tokenizer: transformers.PreTrainedTokenizerBase
    eos_token_ids: list[int]
    generation_defaults: dict  # subset of temperature, top_p, top_k, min_p, repetition_penalty


@dataclass(frozen=True)
class ModelLocation:
    kind: Literal["gguf", "hf"]
    path: pathlib.Path  # the .gguf file or the HF directory (a Hub snapshot once downloaded)
    name: str


def locate_model(model: str | os.PathLike | None = None, *, revision: str | None = None) -> ModelLocation:
    """None: the default model; a directory; a .gguf file; or a Hub repo id (org/name), downloaded."""
    if model is None:
        path = default_model_path()
        return ModelLocation("gguf", path, path.stem)
    model = os.fspath(model)
    path = pathlib.Path(model).expanduser()
    if path.suffix == ".gguf":
        return ModelLocation("gguf", path, path.stem)
    if path.is_dir():
        return ModelLocation("hf", path, path.resolve().name)
    if path.exists():
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    if not _REPO_ID.match(model):
        raise FileNotFoundError(f"model not found: {path} is not a directory, a .gguf file "
                                "or a Hub repo id (org/name)")
    return ModelLocation("hf", _download(model, revision), model)


def load_model_info(model: str | os.PathLike | None = None, *, revision: str | None = None,
                    trust_remote_code: bool = False) -> ModelInfo:
    """The model's config and tokenizer, never its weights (see `locate_model` for `model`)."""
    where = locate_model(model, revision=revision)
    if where.kind == "gguf":
        from engine.gguf_loader import GGUFFile

        return gguf_model_info(GGUFFile(where.path))
    check_hf_dir(where.path)
    return hf_model_info(where.path, where.name, trust_remote_code)


def resolve_max_model_len(config, requested: int | None) -> int:
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window:
        limit = min(limit, window)  # sliding-window attention is not implemented: stay inside it
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit of {limit} tokens")
    return requested


# --- HF directories ---------------------------------------------------------------------------

def check_hf_dir(path: pathlib.Path) -> None:
    """FileNotFoundError without a config.json, ValueError unless it is a supported model."""
    check_architecture(read_json(path / "config.json"), where=str(path))


def hf_model_info(path: pathlib.Path, name: str, trust_remote_code: bool) -> ModelInfo:
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    return ModelInfo(name=name, config=config, tokenizer=tokenizer,
                     eos_token_ids=_eos_token_ids(gen, config, tokenizer),
                     generation_defaults=_generation_defaults(gen))


def check_architecture(config_json: dict, where: str) -> None:
    """ValueError unless the config describes a supported decoder-only model."""
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    model_type = config_json.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: unsupported model_type {model_type!r}; supported: {supported}")
    archs = config_json.get("architectures") or [SUPPORTED_ARCHITECTURES[model_type]]
    if SUPPORTED_ARCHITECTURES[model_type] not in archs:
        raise ValueError(f"{where}: unsupported architecture {archs}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES.values())}")


def _eos_token_ids(gen: dict, config, tokenizer) -> list[int]:
    for ids in (gen.get("eos_token_id"), getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if ids is not None:
            ids = [ids] if isinstance(ids, int) else ids
            return list(dict.fromkeys(int(i) for i in ids))
    return []


def _generation_defaults(gen: dict) -> dict:
    keys = _ALWAYS_KEYS + (_SAMPLED_KEYS if gen.get("do_sample") else ())
    return {k: gen[k] for k in keys if gen.get(k) is not None}


def read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name}: {path}")
    return json.loads(path.read_text())


# --- gguf -------------------------------------------------------------------------------------

def gguf_model_info(checkpoint) -> ModelInfo:
    """Config and tokenizer of an `engine.gguf_loader.GGUFFile`, from its sidecar directory."""
    sidecar = checkpoint.ensure_sidecar()
    config = transformers.AutoConfig.from_pretrained(sidecar)
    tokenizer = transformers.AutoTokenizer.from_pretrained(sidecar)
    gen = read_json(sidecar / "generation_config.json")
    return ModelInfo(name=checkpoint.path.stem, config=config, tokenizer=tokenizer,
                     eos_token_ids=_eos_token_ids(gen, config, tokenizer), generation_defaults={})


# --- hub --------------------------------------------------------------------------------------

def _download(repo_id: str, revision: str | None) -> pathlib.Path:
    try:
        return pathlib.Path(snapshot_download(
            repo_id, revision=revision,
            allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS))
    except Exception as e:  # offline, not cached, unknown repo, gated, network down ...
        raise RuntimeError(
            f"could not get model {repo_id!r}"
            f"{f' (revision {revision})' if revision else ''} from the Hugging Face Hub or its "
            f"local cache: {type(e).__name__}: {e}\n"
            "Pass a local model directory or a .gguf file instead, or run with HF_HUB_OFFLINE=1 "
            "once the model is in the HF cache.") from e
