"""Cold start: the first long prompts after a node starts vs the same load once warm (issue 18).

    python bench/cold_start.py [--modes off,auto] [--out bench/results/cold_start_h200.json]
                               [--merge-into bench/results/gpu_speed_h200.json]
    python bench/cold_start.py --tiny     # CPU, tiny model, short prompts (the same code path, ~1 min)

The parent builds one random-weight model (Llama-3-8B shape, bf16, on the GPU; --tiny: a tiny one
on CPU) into /dev/shm, then per warm-up mode starts a FRESH process (`--child`) with an EMPTY
Triton cache directory (TRITON_CACHE_DIR: a fresh machine; --keep-triton-cache uses the normal
one) that builds the engine, runs `engine.warmup.warm_up(engine, mode)` as a node does before
SERVING, then submits --prompts prompts of --prompt-len random tokens at once (max_tokens 1;
chunked prefill at --max-num-batched-tokens) and times each one's first token (TTFT, from
submission); then --warm-rounds more rounds of fresh random prompts of the same shape.
Per mode: startup (engine build, warm-up), first-round median TTFT, warm median TTFT (median of
the warm rounds' medians), and how many Triton kernels compiled during the first round.

Metrics (the issue's names), from the mode the nodes use by default (`auto`: full on CUDA):
  metrics.first_long_prompt_ttft_ms, metrics.warm_long_prompt_ttft_ms, plus first_vs_warm,
  first_long_prompt_ttft_ms_no_warmup (mode off, if run), startup_s, warmup_s.
--out writes this script's own JSON; --merge-into adds the metrics to an existing results file
(e.g. bench/results/gpu_speed_h200.json: its "metrics" dict gains the keys, "details.cold_start"
the full report), creating it if missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def compiled_kernels() -> int:
    """Compiled variants held in memory by the Triton kernels of kernels/ (0 without Triton use)."""
    import importlib
    import pkgutil

    import kernels

    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return 0
    total = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        try:
            module = importlib.import_module(f"kernels.{info.name}")
        except Exception:
            continue
        for obj in vars(module).values():
            if isinstance(obj, JITFunction):
                total += sum(len(entry[0]) for entry in obj.device_caches.values())
    return total


# ---- the child: one fresh process, one warm-up mode ----------------------------------------------

def ttft_round(eng, prompts: list[list[int]], tag: str) -> list[float]:
    """Submits every prompt at once; seconds from submission to each one's first token."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", prompt_token_ids=p, params=params)
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - t0
    assert len(first) == len(prompts), (len(first), len(prompts))
    return [first[f"{tag}-{i}"] for i in range(len(prompts))]


def child(args) -> int:
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine
    from engine.warmup import warm_up

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    t0 = time.perf_counter()
    eng = LLMEngine(EngineArgs(model=args.model_dir, device=device, dtype=args.dtype,
                               max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                               max_num_batched_tokens=args.max_num_batched_tokens,
                               gpu_memory_utilization=args.gpu_memory_utilization))
    build_s = time.perf_counter() - t0
    compiled_at_build = compiled_kernels()
    report = warm_up(eng, args.warmup)
    compiled_after_warmup = compiled_kernels()
    vocab = eng.shape.vocab_size
    gen = torch.Generator().manual_seed(args.seed)

    def prompts() -> list[list[int]]:  # fresh random ids each round: no prefix-cache hit
        return torch.randint(10, vocab - 10, (args.prompts, args.prompt_len), generator=gen).tolist()

    first = ttft_round(eng, prompts(), "first")
    compiled_after_first = compiled_kernels()
    warm = [ttft_round(eng, prompts(), f"warm{r}") for r in range(args.warm_rounds)]
    bm = eng.block_manager
    result = {
        "mode": report.mode, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "build_s": build_s, "warmup_s": report.seconds, "warmup_shapes": report.shapes,
        "warmup_counts": report.counts(), "warmup_line": report.line(), "startup_s": build_s + report.seconds,
        "first_ttft_s": first, "first_median_ms": statistics.median(first) * 1e3,
        "warm_ttft_s": warm, "warm_median_ms": statistics.median(statistics.median(w) for w in warm) * 1e3,
        "compiled_at_build": compiled_at_build, "compiled_by_warmup": compiled_after_warmup - compiled_at_build,
        "compiled_during_first_round": compiled_after_first - compiled_after_warmup,
        "compiled_during_warm_rounds": compiled_kernels() - compiled_after_first,
        "free_blocks_after": bm.num_free_blocks, "total_blocks": bm.num_total_blocks,
        "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR"),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---- the parent --------------------------------------------------------------------------------------

def build_model(args) -> pathlib.Path:
    import gpu_speed as gs

    shape = gs.TINY if args.tiny else gs.LLAMA3_8B
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    model = gs.build_hf_model(shape, device, torch.bfloat16 if device == "cuda" else torch.float32, seed=0)
    path, _ = gs.save_model_dir(model, shape, "cold_start")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def run_mode(args, model_dir: pathlib.Path, mode: str) -> dict:
    env = dict(os.environ)
    cache = None
    if not args.keep_triton_cache:
        cache = tempfile.mkdtemp(prefix="cold_start_triton_")
        env["TRITON_CACHE_DIR"] = cache  # empty: a fresh machine's first start
    argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", "--model-dir", str(model_dir),
            "--warmup", mode, "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len),
            "--warm-rounds", str(args.warm_rounds), "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--dtype", args.dtype,
            "--seed", str(args.seed)] + (["--tiny"] if args.tiny else [])
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child ({mode}) failed, rc {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_wall_s"] = wall
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny model, 8 x 700-token prompts")
    ap.add_argument("--modes", default="off,auto", help="warm-up modes to run, each in a fresh process")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per round (default 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 7000; --tiny 700)")
    ap.add_argument("--warm-rounds", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=None, help="default 8192; --tiny 2048")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 8192; --tiny 1024")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-triton-cache", action="store_true",
                    help="children use the normal Triton cache dir (a restart on the same machine)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a child may take")
    ap.add_argument("--model-dir", default=None, help="use this model dir instead of building one")
    ap.add_argument("--out", default=None, help="write this script's JSON report here")
    ap.add_argument("--merge-into", default=None,
                    help="add the metrics to this results file's 'metrics' (e.g. bench/results/gpu_speed_h200.json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.prompts = args.prompts or 8
    args.prompt_len = args.prompt_len or (700 if args.tiny else 7000)
    args.max_model_len = args.max_model_len or (2048 if args.tiny else 8192)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (1024 if args.tiny else 8192)
    if args.child:
        return child(args)

    t0 = time.perf_counter()
    model_dir = pathlib.Path(args.model_dir) if args.model_dir else build_model(args)
    built = args.model_dir is None
    try:
        results = {}
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            print(f"[{time.perf_counter() - t0:6.1f}s] mode {mode}: fresh process"
                  f"{'' if args.keep_triton_cache else ', empty Triton cache'} ...", flush=True)
            results[mode] = run_mode(args, model_dir, mode)
            r = results[mode]
            print(f"         {r['warmup_line']}; first {r['first_median_ms']:.0f} ms, warm {r['warm_median_ms']:.0f} ms, "
                  f"compiled during the first round: {r['compiled_during_first_round']}", flush=True)
    finally:
        if built:
            shutil.rmtree(model_dir, ignore_errors=True)

    print(f"\n{'warm-up':8} {'startup s':>9} {'warm-up s':>9} {'first TTFT ms':>13} {'warm TTFT ms':>12} "
          f"{'first/warm':>10} {'compiles 1st':>12}")
    for mode, r in results.items():
        print(f"{r['mode'] if mode == 'auto' else mode:8} {r['startup_s']:9.2f} {r['warmup_s']:9.2f} "
              f"{r['first_median_ms']:13.1f} {r['warm_median_ms']:12.1f} "
              f"{r['first_median_ms'] / r['warm_median_ms']:10.3f} {r['compiled_during_first_round']:12d}")
    main_mode = "auto" if "auto" in results else next(iter(results))
    m = results[main_mode]
    metrics = {"first_long_prompt_ttft_ms": m["first_median_ms"], "warm_long_prompt_ttft_ms": m["warm_median_ms"],
               "first_vs_warm": m["first_median_ms"] / m["warm_median_ms"], "startup_s": m["startup_s"],
               "warmup_s": m["warmup_s"]}
    if "off" in results and main_mode != "off":
        metrics["first_long_prompt_ttft_ms_no_warmup"] = results["off"]["first_median_ms"]
        metrics["warm_long_prompt_ttft_ms_no_warmup"] = results["off"]["warm_median_ms"]
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "device": m["device"], "torch": torch.__version__,
              "workload": {"prompts": args.prompts, "prompt_len": args.prompt_len, "max_tokens": 1,
                           "warm_rounds": args.warm_rounds, "max_num_batched_tokens": args.max_num_batched_tokens,
                           "max_model_len": args.max_model_len, "fresh_triton_cache": not args.keep_triton_cache,
                           "model": "tiny" if args.tiny else "llama-3-8b shape, random bf16"},
              "metrics_from_mode": main_mode, "metrics": metrics, "modes": results}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    if args.merge_into:
        path = pathlib.Path(args.merge_into)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault("metrics", {}).update(metrics)
        data.setdefault("details", {})["cold_start"] = report
        path.write_text(json.dumps(data, indent=1))
    print(f"\nmetrics ({main_mode}): " + json.dumps({k: round(v, 3) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
