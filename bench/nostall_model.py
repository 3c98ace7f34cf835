"""Builds the no-stall benchmark's model directory and prints its path (last line of stdout).

    python bench/nostall_model.py            # Llama-3-8B shape, bf16, random weights, on the GPU -> /dev/shm
    python bench/nostall_model.py --tiny     # a tiny llama (fp32, CPU) with the same tokenizer scheme

The model is built as bench/gpu_speed.py builds it (a transformers config, N(0, 0.02) weights from a
seeded generator, save_pretrained, a WordLevel tokenizer made in code) and checked by our loader.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from gpu_speed import LLAMA3_8B, TINY, build_hf_model, save_model_dir  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny fp32 model on the CPU")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    shape, device, dtype = (TINY, "cpu", torch.float32) if ns.tiny else (LLAMA3_8B, "cuda", torch.bfloat16)
    model = build_hf_model(shape, device, dtype, ns.seed)
    path, info = save_model_dir(model, shape, "nostall_tiny" if ns.tiny else "nostall_llama3_8b")
    print(f"model: {info['param_bytes'] / 1e9:.3f} GB of params, saved in {info['save_s']} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
