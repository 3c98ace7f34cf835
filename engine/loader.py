"""Load a model with its weights: the `ModelInfo` (engine/model_info.py: config, tokenizer, eos
ids, sampling defaults) plus a lazy iterator over HF-named weights.

Sources: the default model (``None``), a local HF directory (safetensors), a ``.gguf`` file,
or a Hugging Face Hub repo id (see `engine.model_info.locate_model`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch
from safetensors import safe_open

from engine.gguf_loader import GGUFFile
from engine.model_info import ModelInfo, check_hf_dir, gguf_model_info, hf_model_info, locate_model, read_json

WeightIterator = Iterator[tuple[str, torch.Tensor]]
# HF name -> (dim, start, stop) of it to load, or None for the whole tensor (a TP rank's shard).
WeightSelector = Callable[[str], "tuple[int, int, int] | None"]


@dataclass
class ModelSource(ModelInfo):
    weights: Callable[[WeightSelector | None], WeightIterator] = field(repr=False, compare=False)
    # gguf only: the weights with quantized tensors kept packed (--quantization gguf, engine/quant).
    packed_weights: Callable[[], Iterator] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, info: ModelInfo, weights, packed_weights=None) -> "ModelSource":
        return cls(**{f.name: getattr(info, f.name) for f in fields(ModelInfo)}, weights=weights,
                   packed_weights=packed_weights)

    def iter_weights(self, select: WeightSelector | None = None) -> WeightIterator:
        """(HF parameter name, CPU tensor) pairs, loaded one at a time. Tensors keep their
        stored dtype (fp32 for gguf). A tied lm_head is not yielded. `select` cuts each tensor
        to a slice as it is read (safetensors: only the slice's bytes are read)."""
        return self.weights(select)


def load_model_source(model: str | os.PathLike | None = None, *, revision: str | None = None,
                      trust_remote_code: bool = False) -> ModelSource:
    """None: the default model; a directory; a .gguf file; or a Hub repo id (org/name)."""
    where = locate_model(model, revision=revision)
    if where.kind == "gguf":
        return _load_gguf(where.path)
    return _load_hf_dir(where.path, where.name, trust_remote_code)


# --- HF directories ---------------------------------------------------------------------------

def _load_hf_dir(path: pathlib.Path, name: str, trust_remote_code: bool) -> ModelSource:
    check_hf_dir(path)
    weight_files = _safetensors_files(path)
    return ModelSource.of(hf_model_info(path, name, trust_remote_code),
                          weights=lambda select: _iter_safetensors(weight_files, select))


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        shards = dict.fromkeys(read_json(index)["weight_map"].values())  # ordered, unique
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


def _load_gguf(path: pathlib.Path) -> ModelSource:
    checkpoint = GGUFFile(path)
    info = gguf_model_info(checkpoint)
    config = info.config
    return ModelSource.of(
        info,
        weights=lambda select: (
            (name, slice_tensor(t, select(name) if select else None)) for name, t in checkpoint.iter_weights(config)),
        packed_weights=lambda: checkpoint.iter_packed(config))
