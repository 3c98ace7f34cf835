"""Per-step cost of tensor parallelism on CPU (gloo): TP=N vs TP=1 on the default model.

A correctness path here (ranks share the box's cores), not a speed path. For each size: one
engine, a warm-up, then a prefill step of `--prompt-len` tokens (one row) and `--steps` decode
steps of `--batch` rows; prints the median ms per step and writes JSON.

    .venv/bin/python -m bench.tp_cpu_step [--sizes 1,3] [--batch 8] [--steps 32] [--out f.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def _timed_steps(engine: LLMEngine, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times


def measure(size: int, batch: int, steps: int, prompt_len: int) -> dict:
    engine = LLMEngine(EngineArgs(tensor_parallel_size=size, max_model_len=1024, num_gpu_blocks=512,
                                  enable_prefix_caching=False, dtype="float32"))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
        engine.add_request("warm", params=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                           prompt_token_ids=list(range(5, 69)))
        while engine.has_unfinished_requests():
            engine.step()
        engine.add_request("prefill", params=SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                           prompt_token_ids=[(7 * i) % 40000 + 5 for i in range(prompt_len)])
        prefill = _timed_steps(engine, 1)
        for i in range(batch):
            engine.add_request(f"d{i}", params=params, prompt_token_ids=[(3 * i + j) % 40000 + 5 for j in range(16)])
        engine.step()  # the batch's prefill
        decode = _timed_steps(engine, steps)
        return {"tp": size, "prefill_ms": prefill[0] * 1e3, "decode_ms_median": statistics.median(decode) * 1e3,
                "decode_ms_min": min(decode) * 1e3}
    finally:
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,3")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    rows = [measure(int(s), ns.batch, ns.steps, ns.prompt_len) for s in ns.sizes.split(",")]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "batch": ns.batch, "steps": ns.steps, "prompt_len": ns.prompt_len, "rows": rows}
    for r in rows:
        print(f"TP={r['tp']}: prefill {ns.prompt_len} tokens {r['prefill_ms']:.1f} ms; decode batch {ns.batch}: "
              f"median {r['decode_ms_median']:.1f} ms/step (min {r['decode_ms_min']:.1f})")
    print("load average", result["load_average"])
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
