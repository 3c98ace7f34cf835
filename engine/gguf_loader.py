"""Read llama.cpp gguf files: HF config, tokenizer and dequantized weights with HF names.

Opening a gguf with ``gguf.GGUFReader`` takes 2-5 s (it parses the whole vocabulary) and
building the tokenizer with transformers takes ~5 s, so the first load writes a *sidecar*
directory (config.json, generation_config.json, tokenizer files, and tensors.json: each tensor's
name, type, shape and byte offset) under the pdserve cache, keyed by the file's name, size and
mtime. Later loads read the sidecar and memory-map the tensors they iterate straight from the
offsets: no later load parses the gguf's metadata again.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import transformers

from engine.default_model import cache_dir

if TYPE_CHECKING:
    import torch

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
_SIDECAR_VERSION = 1

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"unsupported gguf tensor {gguf_name!r}")


class GGUFFile:
    """One gguf checkpoint: metadata-derived config, tokenizer (via sidecar), weights."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"gguf file not found: {self.path}")

    @functools.cached_property
    def reader(self):
        import gguf

        return gguf.GGUFReader(self.path)

    @functools.cached_property
    def tensors(self) -> list:
        """The file's tensors (as GGUFReader's: name, tensor_type, shape, n_bytes, data_offset,
        data), from the sidecar's tensors.json when present (no metadata parse), else from the
        reader, writing tensors.json when the sidecar exists."""
        doc = self._table_doc
        if doc is None:
            doc = self._table_from_reader()
            self._write_table(doc)
        return _tensors_from_table(self.path, doc["tensors"])

    @functools.cached_property
    def _table_doc(self) -> dict | None:
        """The sidecar's tensors.json: {version, arch, tensors}; None when absent or unusable."""
        try:
            doc = json.loads((self.sidecar_dir / _TENSORS_FILE).read_text())
        except (OSError, ValueError):
            return None
        usable = (isinstance(doc, dict) and doc.get("version") == _TENSORS_VERSION
                  and isinstance(doc.get("arch"), str) and isinstance(doc.get("tensors"), list))
        return doc if usable else None

    def _table_from_reader(self) -> dict:
        return {"version": _TENSORS_VERSION, "arch": self.field("general.architecture"),
                "tensors": [{"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
                             "offset": int(t.data_offset)} for t in self.reader.tensors]}

    def _write_table(self, doc: dict) -> None:
        side = self.sidecar_dir
        if not (side / "config.json").is_file():
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=_TENSORS_FILE + ".", dir=side)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, side / _TENSORS_FILE)
        except OSError:  # a read-only cache: the next load parses the file again
            pass

    @property
    def sidecar_dir(self) -> pathlib.Path:
        st = self.path.stat()
        key = f"{self.path.stem}-{st.st_size}-{st.st_mtime_ns}-v{_SIDECAR_VERSION}"
        return cache_dir() / "gguf-sidecar" / key

    def ensure_sidecar(self) -> pathlib.Path:
        """The sidecar dir (an HF model dir without weights), building it on first use."""
        final = self.sidecar_dir
        if (final / "config.json").is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        print(f"pdserve: reading config and tokenizer from {self.path.name} (first use only; "
              f"cached in {final}) ...", file=sys.stderr, flush=True)
        if not transformers.utils.is_torch_available():  # the router's process hides torch from transformers
            return self._sidecar_in_child(final)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            config = self.build_config()
            config.save_pretrained(tmp)
            (tmp / "generation_config.json").write_text(
                json.dumps({"eos_token_id": self.eos_token_ids()}, indent=2))
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(self.path.parent), gguf_file=self.path.name)
            tokenizer.save_pretrained(tmp)
            table = self._table_from_reader()
            (tmp / _TENSORS_FILE).write_text(json.dumps(table))
            try:
                os.replace(tmp, final)  # atomic; fails if another process got there first
            except OSError:
                if not (final / "config.json").is_file():
                    raise
            self._table_doc = table  # this load reads its tensors from it, not from a rewrite
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _sidecar_in_child(self, final: pathlib.Path) -> pathlib.Path:
        """transformers reads a gguf tokenizer only with torch: a process whose transformers runs
        without it builds the sidecar once in a child (`python -m engine.gguf_loader sidecar FILE`)."""
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "engine.gguf_loader", "sidecar", str(self.path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  p for p in (str(pathlib.Path(__file__).resolve().parent.parent),
                                              os.environ.get("PYTHONPATH", "")) if p)})
        if proc.returncode != 0 or not (final / "config.json").is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{self.path.name}: building its config and tokenizer failed: {tail}")
        return final

    # --- metadata -------------------------------------------------------------------------

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @property
    def arch(self) -> str:
        doc = self._table_doc  # a sidecar's tensors.json names it: no metadata parse
        arch = doc["arch"] if doc is not None else self.field("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise ValueError(f"{self.path}: unsupported gguf architecture {arch!r}; "
                             f"supported: {', '.join(SUPPORTED_GGUF_ARCHS)}")
        return arch

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.tensors}

    def build_config(self) -> transformers.PretrainedConfig:
        arch = self.arch
        if "rope_freqs.weight" in self.tensor_names():
            raise ValueError(f"{self.path}: per-dimension rope frequency factors (rope_freqs, "
                             "llama3-style rope scaling in gguf) are not supported; load the HF "
                             "checkpoint instead")

        def meta(key, default=None):
            return self.field(f"{arch}.{key}", default)

        hidden = int(meta("embedding_length"))
        heads = int(meta("attention.head_count"))
        embd = next(t for t in self.tensors if t.name == "token_embd.weight")
        kwargs = dict(
            vocab_size=int(embd.shape[-1]),  # gguf dims are reversed: [hidden, vocab]
            hidden_size=hidden,
            intermediate_size=int(meta("feed_forward_length")),
            num_hidden_layers=int(meta("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(meta("attention.head_count_kv", heads)),
            max_position_embeddings=int(meta("context_length")),
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
            rope_parameters=self._rope_parameters(meta),
            tie_word_embeddings="output.weight" not in self.tensor_names(),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.field("tokenizer.ggml.padding_token_id"),
        )
        if arch == "llama":
            return transformers.LlamaConfig(
                head_dim=int(meta("attention.key_length", hidden // heads)),
                architectures=["LlamaForCausalLM"], **kwargs)
        return transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"], **kwargs)

    def _rope_parameters(self, meta) -> dict:
        rope = {"rope_type": "default", "rope_theta": float(meta("rope.freq_base", 10000.0))}
        kind = meta("rope.scaling.type", "none")
        if kind == "linear":
            rope.update(rope_type="linear", factor=float(meta("rope.scaling.factor")))
        elif kind == "yarn":
            rope.update(rope_type="yarn", factor=float(meta("rope.scaling.factor")),
                        original_max_position_embeddings=int(
                            meta("rope.scaling.original_context_length")))
        elif kind != "none":
            raise ValueError(f"{self.path}: unsupported rope scaling {kind!r}")
        return rope

    def eos_token_ids(self) -> list[int]:
        ids = [self.field("tokenizer.ggml.eos_token_id"), self.field("tokenizer.ggml.eot_token_id")]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    # --- weights --------------------------------------------------------------------------

    def iter_weights(self, config: transformers.PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, fp32 CPU tensor) per gguf tensor, dequantized one at a time."""
        for t in self.tensors:
            yield hf_name(t.name), self._dense(t, config)

    def iter_packed(self, config: transformers.PretrainedConfig) -> Iterator[tuple[str, object]]:
        """(HF name, tensor) per gguf tensor with quantized 2-D weights kept as stored
        (engine.quant.gguf.PackedTensor, rows in HF order); other tensors as iter_weights gives them."""
        from engine.quant.gguf import BLOCKS, PackedTensor

        for t in self.tensors:
            name = hf_name(t.name)
            if t.tensor_type.name not in BLOCKS or len(t.shape) != 2:
                yield name, self._dense(t, config)
                continue
            data = _torch().from_numpy(np.array(t.data, copy=True)).reshape(int(t.shape[1]), -1)  # [rows, row bytes]
            yield name, PackedTensor(t.tensor_type.name, self._unpermute_rows(name, data, config), int(t.shape[0]))

    def _dense(self, t, config: transformers.PretrainedConfig) -> torch.Tensor:
        from gguf.quants import dequantize

        shape = tuple(int(d) for d in reversed(t.shape))
        array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if not array.flags.writeable:  # F32 tensors come back as read-only memmap views
            array = array.copy()
        return self._unpermute_rows(hf_name(t.name), _torch().from_numpy(array.reshape(shape)), config)

    def _unpermute_rows(self, name: str, rows: torch.Tensor, config) -> torch.Tensor:
        if self.arch == "llama" and ".self_attn.q_proj." in name:
            return _unpermute(rows, config.num_attention_heads)
        if self.arch == "llama" and ".self_attn.k_proj." in name:
            return _unpermute(rows, config.num_key_value_heads)
        return rows


_TENSORS_FILE = "tensors.json"
_TENSORS_VERSION = 1


def _tensors_from_table(path: pathlib.Path, table: list) -> list:
    """GGUFReader-like tensors (`gguf.gguf_reader.ReaderTensor`, field None) over a read-only
    memory map of the file, from a tensor table; data shaped as GGUFReader shapes it (typed
    elements for float/int types, rows of bytes for quantized ones)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.gguf_reader import ReaderTensor
    from gguf.quants import quant_shape_to_byte_shape

    typed = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
             GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
             GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
             GGMLQuantizationType.I64: np.int64}
    data = np.memmap(path, mode="r")
    out = []
    for entry in table:
        qtype = GGMLQuantizationType(int(entry["type"]))
        dims = np.array(entry["shape"], dtype=np.uint64)
        n_elems = int(np.prod(dims))
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = n_elems * type_size // block_size
        offset = int(entry["offset"])
        np_dims = tuple(reversed([int(d) for d in entry["shape"]]))
        if offset < 0 or offset + n_bytes > data.size:
            raise ValueError(f"{path}: tensor {entry['name']!r} lies outside the file (stale tensors.json?)")
        raw = data[offset:offset + n_bytes]
        if qtype in typed:
            array = raw.view(typed[qtype]).reshape(np_dims)
        else:
            array = raw.reshape(quant_shape_to_byte_shape(np_dims, qtype))
        out.append(ReaderTensor(name=entry["name"], tensor_type=qtype, shape=dims, n_elements=n_elems,
                                n_bytes=n_bytes, data_offset=offset, data=array, field=None))
    return out


def _torch():
    """torch, imported only when weights are read: config, tokenizer and sidecar need none of it
    (the router's process, which loads no torch, opens gguf files too)."""
    import torch

    return torch


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation. Its converter reorders each head's rows from HF's
    [first rotary half | second half] to interleaved pairs: reshape(n_head, 2, d/2).swapaxes(1, 2).
    The inverse splits rows as (n_head, d/2, 2) and swaps back."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


if __name__ == "__main__":  # python -m engine.gguf_loader sidecar FILE: builds FILE's sidecar
    if len(sys.argv) != 3 or sys.argv[1] != "sidecar":
        sys.exit("usage: python -m engine.gguf_loader sidecar FILE.gguf")
    print(GGUFFile(pathlib.Path(sys.argv[2])).ensure_sidecar())
