"""Find a model and expose what the engine needs from it: config, tokenizer, eos ids,
sampling defaults and a lazy iterator over HF-named weights.

Sources: the default model (``None``), a local HF directory (safetensors), a ``.gguf`` file,
or a Hugging Face Hub repo id (fetched with ``snapshot_download``, honouring HF_HUB_OFFLINE
and the HF cache).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors import safe_open

from engine.default_model import default_model_path
from engine.gguf_loader import GGUFFile

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

WeightIterator = Iterator[tuple[str, torch.Tensor]]
# HF name -> (dim, start, stop) of it to load, or None for the whole tensor (a TP rank's shard).
WeightSelector = Callable[[str], "tuple[int, int, int] | None"]


@dataclass
class ModelSource:
    name: str  # served model name: repo id, directory name or gguf stem
    config: transformers.PretrainedConfig
    tokenizer: transformers.PreTrainedTokenizerBase
    eos_token_ids: list[int]
    generation_defaults: dict  # subset of temperature, top_p, top_k, min_p, repetition_penalty
    weights: Callable[[WeightSelector | None], WeightIterator] = field(repr=False, compare=False)
    # gguf only: the weights with quantized tensors kept packed (--quantization gguf, engine/quant).
    packed_weights: Callable[[], Iterator] | None = field(default=None, repr=False, compare=False)

    def iter_weights(self, select: WeightSelector | None = None) -> WeightIterator:
        """(HF parameter name, CPU tensor) pairs, loaded one at a time. Tensors keep their
        stored dtype (fp32 for gguf). A tied lm_head is not yielded. `select` cuts each tensor
        to a slice as it is read (safetensors: only the slice's bytes are read)."""
        return self.weights(select)


def load_model_source(model: str | os.PathLike | None = None, *, revision: str | None = None,
                      trust_remote_code: bool = False) -> ModelSource:
    """None: the default model; a directory; a .gguf file; or a Hub repo id (org/name)."""
    if model is None:
        return _load_gguf(default_model_path())
    model = os.fspath(model)
    path = pathlib.Path(model).expanduser()
    if path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_hf_dir(path, path.resolve().name, trust_remote_code)
    if path.exists():
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    if not _REPO_ID.match(model):
        raise FileNotFoundError(f"model not found: {path} is not a directory, a .gguf file "
                                "or a Hub repo id (org/name)")
    return _load_hf_dir(_download(model, revision), model, trust_remote_code)


# --- HF directories ---------------------------------------------------------------------------

def _load_hf_dir(path: pathlib.Path, name: str, trust_remote_code: bool) -> ModelSource:
    config_json = _read_json(path / "config.json")
    check_architecture(config_json, where=str(path))
    weight_files = _safetensors_files(path)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    gen = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    return ModelSource(
        name=name,
        config=config,
        tokenizer=tokenizer,
        eos_token_ids=_eos_token_ids(gen, config, tokenizer),
        generation_defaults=_generation_defaults(gen),
        weights=lambda select: _iter_safetensors(weight_files, select),
    )


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


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        shards = dict.fromkeys(_read_json(index)["weight_map"].values())  # ordered, unique
        files = [path / shard for shard in shards]
    elif single.is_file():
        files = [single]
    else:
        raise FileNotFoundError(f"no weights in {path}: expected {single.name} or {index.name}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"missing weight shard {f} (listed in {index})")
    return files


def _iter_safetensors(files: list[pathlib.Path], select: WeightSelector | None = None) -> WeightIterator:
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints stored
                    continue
                cut = select(key) if select else None
                if cut is None:
                    yield key, f.get_tensor(key)
                else:
                    dim, start, stop = cut
                    part = f.get_slice(key)
                    yield key, part[start:stop] if dim == 0 else part[:, start:stop]


def slice_tensor(tensor: torch.Tensor, cut: tuple[int, int, int] | None) -> torch.Tensor:
    """`tensor` cut to (dim, start, stop), as its own compact copy (the full one can be freed)."""
    if cut is None:
        return tensor
    dim, start, stop = cut
    return tensor.narrow(dim, start, stop - start).clone()


def _eos_token_ids(gen: dict, config, tokenizer) -> list[int]:
    for ids in (gen.get("eos_token_id"), getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if ids is not None:
            ids = [ids] if isinstance(ids, int) else ids
            return list(dict.fromkeys(int(i) for i in ids))
    return []


def _generation_defaults(gen: dict) -> dict:
    keys = _ALWAYS_KEYS + (_SAMPLED_KEYS if gen.get("do_sample") else ())
    return {k: gen[k] for k in keys if gen.get(k) is not None}


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name}: {path}")
    return json.loads(path.read_text())


# --- hub ----------------------------------------------------------------------------------

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


# --- gguf ---------------------------------------------------------------------------------

def _load_gguf(path: pathlib.Path) -> ModelSource:
    checkpoint = GGUFFile(path)
    sidecar = checkpoint.ensure_sidecar()
    config = transformers.AutoConfig.from_pretrained(sidecar)
    tokenizer = transformers.AutoTokenizer.from_pretrained(sidecar)
    gen = _read_json(sidecar / "generation_config.json")
    return ModelSource(
        name=path.stem,
        config=config,
        tokenizer=tokenizer,
        eos_token_ids=_eos_token_ids(gen, config, tokenizer),
        generation_defaults={},
        weights=lambda select: (
            (name, slice_tensor(t, select(name) if select else None)) for name, t in checkpoint.iter_weights(config)),
        packed_weights=lambda: checkpoint.iter_packed(config),
    )
