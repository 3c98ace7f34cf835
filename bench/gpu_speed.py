"""Engine speed on one GPU, in one run: against HF transformers and against the memory floor.

    python bench/gpu_speed.py [--out bench/results/gpu_speed.json] [--sections hf,p1,floor,p2,smol]
                              [--num-prompts 1000] [--max-num-seqs 256] [--max-num-batched-tokens 8192]
                              [--budget-s 540] [--bandwidth-tbs 3.0] [--kv-cache-dtype fp8] [--keep-models]
    python bench/gpu_speed.py --tiny      # the same code path on CPU, tiny model and counts (~10 s)

Model: Llama-3-8B shape (bf16, random weights N(0, 0.02) drawn on the GPU from a seeded generator),
saved with `save_pretrained` to /dev/shm (or /tmp) next to a WordLevel tokenizer of 128256 tokens
built in code, then loaded by our own loader. Sections, in order (each timed; one failing is
reported and the rest still run):

  hf     HF `generate` (greedy, eos ignored) while the HF model is on the GPU: P2 workload (1024
         random ids in, 128 out) at batch 32, 64, 128 (256 if memory and time allow), one batch
         each: prompts all have the same length, so one batch's throughput is the workload's
         throughput at that batch. Plus batch-1 decode tok/s (128 in; t(129 new) - t(1 new)).
  p1     our engine, batch-1 decode: 128 in, t(257 new) - t(1 new) over 256, median of 3.
  floor  our engine, decode step time at batch 1, 64, 256 with 1024-token contexts (K=32 timed
         steps, median) over the floor (weights except the input embedding + batch x context x KV
         bytes) / bandwidth.
  p2     our engine, offline: 1000 prompts x 1024 random ids, 128 new tokens, one `generate` call.
  smol   SmolLM2-135M shape (bf16 random): decode tok/s at batch 1 and 64 (64 in, 128 new).

Writes {"device", "date", "command", "metrics", "details"} to --out after every section (with
"partial": true until the end) and prints a table last; exits 1 if a section failed. Optional
pieces (HF batch 256, smol) are skipped when the run nears --budget-s.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

T0 = time.perf_counter()
SECTIONS = ("hf", "p1", "floor", "p2", "smol")
LINEAR_ONLY_MS_BS1 = 5.55  # DEVICE.md: Llama-3-8B linear layers only, CUDA graph, H100, batch 1

LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
             "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
             "bos": 128000, "eos": 128001}
SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0,
                "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos": 1, "eos": 2}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 128, "vocab_size": 512, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "bos": 256, "eos": 257}
TINY_SMOL = dict(TINY, tie_word_embeddings=True, rope_theta=100000.0)


@dataclass(frozen=True)
class Scale:
    hf_batches: tuple[int, ...] = (32, 64, 128, 256)
    hf_optional: tuple[int, ...] = (256,)
    prompt_len: int = 1024  # P2 and the floor section
    new_tokens: int = 128  # P2
    warm_prompts: int = 8
    p1_prompt: int = 128
    p1_new: int = 256
    repeats: int = 3
    hf_bs1_prompt: int = 128
    hf_bs1_new: int = 128
    floor_batches: tuple[int, ...] = (1, 64, 256)
    floor_steps: int = 32  # K
    smol_batches: tuple[int, ...] = (1, 64)
    smol_prompt: int = 64
    smol_new: int = 128
    reserve_after_hf_s: float = 240.0  # engine load + p1 + floor + p2, kept free when HF runs optional batches
    smol_min_s: float = 45.0  # time smol needs; skipped when less is left


GPU_SCALE = Scale()
TINY_SCALE = Scale(hf_batches=(4, 8, 16), hf_optional=(16,), prompt_len=64, new_tokens=8, warm_prompts=2,
                   p1_prompt=32, p1_new=32, hf_bs1_prompt=32, hf_bs1_new=16, floor_batches=(1, 4, 8),
                   floor_steps=4, smol_batches=(1, 4), smol_prompt=16, smol_new=16,
                   reserve_after_hf_s=0.0, smol_min_s=0.0)


def log(msg: str) -> None:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def gib(n: float) -> float:
    return round(n / 2**30, 2)


# ---- model shapes and floors ---------------------------------------------------------------------

def weight_bytes(shape: dict, elem: int) -> int:
    """Bytes one decode step reads: every parameter except the input embedding table (a tied
    embedding is read as the lm_head, so it counts once)."""
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd, nh, nkv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = h * nh * hd * 2 + h * nkv * hd * 2 + 3 * h * inter + 2 * h
    return elem * (shape["num_hidden_layers"] * per_layer + h + h * v)


def kv_bytes_per_token(shape: dict, elem: int) -> int:
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * elem


# ---- building a random model dir -----------------------------------------------------------------

def build_tokenizer(vocab: int, bos: int, eos: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = {bos: "<|begin_of_text|>", eos: "<|end_of_text|>", eos + 1: "<unk>"}
    tok = Tokenizer(models.WordLevel({names.get(i, f"t{i}"): i for i in range(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(names.values()))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=names[bos], eos_token=names[eos], unk_token="<unk>", pad_token=names[eos])
    assert len(fast) == vocab and fast.convert_tokens_to_ids(names[eos]) == eos, "tokenizer ids are off"
    return fast


@torch.no_grad()
def build_hf_model(shape: dict, device: str, dtype: torch.dtype, seed: int):
    """HF LlamaForCausalLM with N(0, initializer_range) weights drawn on `device` (norms = 1)."""
    kw = {k: v for k, v in shape.items() if k not in ("bos", "eos", "rope_theta")}
    cfg = transformers.LlamaConfig(
        **kw, rms_norm_eps=1e-5, bos_token_id=shape["bos"], eos_token_id=shape["eos"], pad_token_id=shape["eos"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]})
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, cfg.initializer_range, generator=gen)
        elif name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, cfg.initializer_range, generator=gen)
    return model


def model_base_dir(need_bytes: int) -> pathlib.Path:
    shm = pathlib.Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free >= max(need_bytes, 20e9 if need_bytes > 1e9 else 0):
            return shm
    except OSError:
        pass
    return pathlib.Path(tempfile.gettempdir())


def save_model_dir(model, shape: dict, tag: str) -> tuple[pathlib.Path, dict]:
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dst = pathlib.Path(tempfile.mkdtemp(prefix=f"gpu_speed_{tag}_", dir=model_base_dir(nbytes + 2**30)))
    t = time.perf_counter()
    model.save_pretrained(dst)
    tok = build_tokenizer(shape["vocab_size"], shape["bos"], shape["eos"])
    tok.save_pretrained(dst)
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": shape["bos"], "eos_token_id": shape["eos"], "pad_token_id": shape["eos"]}))
    save_s = time.perf_counter() - t

    from engine.loader import load_model_source

    src = load_model_source(dst)
    assert src.config.vocab_size == shape["vocab_size"], src.config.vocab_size
    assert src.config.num_hidden_layers == shape["num_hidden_layers"]
    assert src.eos_token_ids == [shape["eos"]], src.eos_token_ids
    assert len(src.tokenizer) == shape["vocab_size"], len(src.tokenizer)
    assert src.tokenizer.encode("t5 t7", add_special_tokens=False) == [5, 7]
    stds = {n: round(float(p.detach().float().std()), 5) for n, p in list(model.named_parameters())[:3]}
    return dst, {"dir": str(dst), "param_bytes": nbytes, "save_s": round(save_s, 2),
                 "files": sorted(f.name for f in dst.iterdir()), "init_std_sample": stds}


def profile_steps(eng, steps: int) -> dict:
    """Where a decode step's time goes: kernel time by kind (torch.profiler, CUDA graph replays
    included) against the wall time of the same steps; the rest is launch gaps and host time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    kinds: Counter = Counter()
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", 0) or 0
        if dev <= 0 or e.key.startswith("cudaGraph"):
            continue
        k = e.key.lower()
        if any(x in k for x in ("gemm", "nvjet", "cutlass", "sm90", "xmma", "splitk", "skinny")):
            kind = "gemm"
        elif "decode_kernel" in k or "merge_splits" in k or "prefill" in k:
            kind = "attention"
        elif any(x in k for x in ("rms_norm", "silu", "rotary", "kv_cache_write")):
            kind = "fused elementwise"
        elif "memcpy" in k or "memset" in k:
            kind = "copies"
        else:
            kind = "other (sampler, embedding, ...)"
        kinds[kind] += dev / 1e3 / steps  # us -> ms per step
    busy = sum(kinds.values())
    out = {"wall_ms": 1e3 * wall, "kernel_ms": busy, "idle_ms": 1e3 * wall - busy,
           "by_kind_ms": {k: round(v, 4) for k, v in kinds.most_common()}}
    top = sorted(prof.key_averages(), key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:12]
    out["top_kernels_ms"] = {e.key[:80]: round((e.self_device_time_total or 0) / 1e3 / steps, 4) for e in top}
    log(f"profile: wall {out['wall_ms']:.3f} ms/step, kernels {busy:.3f} ms, idle {out['idle_ms']:.3f} ms; "
        + ", ".join(f"{k} {v:.3f}" for k, v in kinds.most_common()))
    return out


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 2, (n, length), generator=g).tolist()


# ---- the run ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.scale = TINY_SCALE if args.tiny else GPU_SCALE
        self.device = "cpu" if args.tiny else "cuda"
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.dtype_name = "float32" if args.tiny else "bfloat16"
        self.elem = torch.empty((), dtype=self.dtype).element_size()
        self.kv_elem = 1 if args.kv_cache_dtype == "fp8" else self.elem  # our engine's KV cache (HF: model dtype)
        self.shape = TINY if args.tiny else LLAMA3_8B
        self.smol_shape = TINY_SMOL if args.tiny else SMOLLM2_135M
        self.bw = args.bandwidth_tbs * 1e12
        self.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        bad = sorted(set(self.sections) - set(SECTIONS))
        if bad:
            raise SystemExit(f"unknown sections {bad}; choose from {','.join(SECTIONS)}")
        self.metrics: dict = {}
        self.details: dict = {"sections": {}}
        self.hf = None
        self.llm = None
        self.model_dir: pathlib.Path | None = None
        self.dirs: list[pathlib.Path] = []

    # -- bookkeeping
    def section(self, name: str, fn) -> None:
        log(f"=== {name}: start")
        t = time.perf_counter()
        status: dict = {}
        try:
            fn()
            status["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failing section must not stop the others
            status["status"] = "failed"
            status["error"] = f"{type(e).__name__}: {e}"[:2000]
            status["traceback"] = traceback.format_exc()[-6000:]
            log(f"!!! {name} failed: {type(e).__name__}: {e}")
            print(status["traceback"], flush=True)
        status["seconds"] = round(time.perf_counter() - t, 2)
        self.details["sections"][name] = status
        free_memory(self.device)
        log(f"=== {name}: {status['status']} in {status['seconds']:.1f}s")
        self.write(partial=True)

    def skip(self, name: str, why: str) -> None:
        self.details["sections"][name] = {"status": "skipped", "why": why}
        log(f"=== {name}: skipped ({why})")

    def left(self) -> float:
        return self.args.budget_s - elapsed()

    def write(self, partial: bool) -> None:
        out = pathlib.Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "date": datetime.date.today().isoformat(),
            "command": self.args.command,
            "metrics": self.metrics,
            "details": self.details,
        }
        if partial:
            doc["partial"] = True
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tmp.replace(out)

    def timed(self, fn):
        sync(self.device)
        t = time.perf_counter()
        r = fn()
        sync(self.device)
        return time.perf_counter() - t, r

    # -- the 8B-shaped model
    def build(self) -> None:
        t = time.perf_counter()
        self.hf = build_hf_model(self.shape, self.device, self.dtype, seed=self.args.seed)
        build_s = time.perf_counter() - t
        self.model_dir, info = save_model_dir(self.hf, self.shape, "llama3_8b" if not self.tiny else "tiny")
        self.dirs.append(self.model_dir)
        info["build_s"] = round(build_s, 2)
        info["attn_implementation"] = getattr(self.hf.config, "_attn_implementation", None)
        self.details["model"] = {"shape": self.shape, "dtype": self.dtype_name, **info}
        log(f"model: {info['param_bytes'] / 1e9:.2f} GB of params, built in {build_s:.1f}s, "
            f"saved in {info['save_s']:.1f}s to {self.model_dir}")

    def drop_hf(self) -> None:
        self.hf = None
        free_memory(self.device)

    def hf_generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        eos = self.shape["eos"]
        with torch.inference_mode():
            out = self.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=eos, eos_token_id=eos)
        assert out.shape == (ids.shape[0], ids.shape[1] + new), tuple(out.shape)
        return out

    def hf_section(self) -> None:
        sc, vocab = self.scale, self.shape["vocab_size"]
        L, new = sc.prompt_len, sc.new_tokens

        def ids_for(bs: int, length: int, seed: int) -> torch.Tensor:
            return torch.tensor(random_prompts(bs, length, vocab, seed), device=self.device)

        self.hf_generate(ids_for(sc.hf_batches[0], L, 7), 2)  # warm-up at the first batch's shape
        runs, prev = {}, None
        for bs in sc.hf_batches:
            if bs in sc.hf_optional and prev is not None:
                est = prev[1] * bs / prev[0]
                if elapsed() + est > self.args.budget_s - sc.reserve_after_hf_s:
                    runs[bs] = {"skipped": f"time: ~{est:.0f}s estimated, {self.left():.0f}s of budget left"}
                    log(f"hf bs{bs}: skipped ({runs[bs]['skipped']})")
                    continue
            if self.device == "cuda":
                free_memory(self.device)
                free, _ = torch.cuda.mem_get_info()
                need = bs * (L + new) * kv_bytes_per_token(self.shape, self.elem)
                if need > free:
                    runs[bs] = {"skipped": f"memory: KV alone needs {gib(need)} GiB, {gib(free)} GiB free"}
                    log(f"hf bs{bs}: skipped ({runs[bs]['skipped']})")
                    break
            ids = ids_for(bs, L, 100 + bs)
            error = None
            try:
                dt, _ = self.timed(lambda ids=ids: self.hf_generate(ids, new))
            except Exception as e:  # noqa: BLE001 - OOM (or cuBLAS failing to allocate) ends the sweep
                error = f"{type(e).__name__}: {e}"[:500]
            if error is not None:
                ids = None
                free_memory(self.device)
                runs[bs] = {"skipped": error}
                log(f"hf bs{bs}: failed, batch sweep ends here ({error.splitlines()[0][:200]})")
                break
            runs[bs] = {"seconds": round(dt, 3), "total_tok_s": bs * (L + new) / dt, "output_tok_s": bs * new / dt}
            prev = (bs, dt)
            log(f"hf bs{bs}: {dt:.2f}s, {runs[bs]['total_tok_s']:.0f} total tok/s, "
                f"{runs[bs]['output_tok_s']:.0f} output tok/s")
        done = {bs: r for bs, r in runs.items() if "total_tok_s" in r}
        self.details["hf"] = {
            "workload": f"{L} random ids in, {new} new tokens, greedy, eos ignored (min_new_tokens=max_new_tokens)",
            "note": "all prompts have the same length (no padding): one batch's throughput is the whole "
                    "workload's throughput at that batch size",
            "batches": runs}
        if done:
            best = max(done, key=lambda b: done[b]["total_tok_s"])
            self.metrics["hf_total_tok_s"] = done[best]["total_tok_s"]
            self.metrics["hf_output_tok_s"] = done[best]["output_tok_s"]
            self.details["hf"]["best_batch"] = best

        # batch-1 decode
        p, n1 = ids_for(1, sc.hf_bs1_prompt, 11), sc.hf_bs1_new
        self.hf_generate(p, 2)
        t1, _ = self.timed(lambda: self.hf_generate(p, 1))
        tn, _ = self.timed(lambda: self.hf_generate(p, n1 + 1))
        rate = n1 / (tn - t1) if tn > t1 else None
        self.details["hf"]["bs1"] = {"prompt": sc.hf_bs1_prompt, "t_1_new_s": round(t1, 4),
                                     f"t_{n1 + 1}_new_s": round(tn, 4), "decode_tok_s": rate}
        if rate is not None:
            self.metrics["hf_bs1_decode_tok_s"] = rate
        log(f"hf bs1 decode: {rate:.1f} tok/s" if rate is not None else "hf bs1 decode: timing noise, no figure")

    # -- our engine
    def make_llm(self, path, **over):
        from engine import LLM

        a = self.args
        kw = {"device": self.device, "dtype": self.dtype_name, "max_num_seqs": a.max_num_seqs,
              "max_num_batched_tokens": a.max_num_batched_tokens,
              "gpu_memory_utilization": a.gpu_memory_utilization, "max_model_len": a.max_model_len}
        if a.attention_backend:
            kw["attention_backend"] = a.attention_backend
        kw.update(a.engine_args)
        kw.update(over)
        return LLM(str(path), **kw)

    def engine_load(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            free_before, total = torch.cuda.mem_get_info()
        dt, self.llm = self.timed(lambda: self.make_llm(self.model_dir))
        eng = self.llm.engine
        info = {"construct_s": round(dt, 2), "num_blocks": eng.cache_config.num_blocks,
                "kv_blocks_fit": eng.kv_blocks_fit,  # before the max_num_seqs x max_model_len cap
                "block_size": eng.cache_config.block_size,
                "kv_cache_tokens": eng.cache_config.num_blocks * eng.cache_config.block_size,
                "max_num_seqs": eng.scheduler_config.max_num_seqs,
                "max_num_batched_tokens": eng.scheduler_config.max_num_batched_tokens,
                "max_model_len": eng.max_model_len,
                "attention_backend": type(getattr(eng.runner, "attn", None)).__name__,
                "cuda_graphs": getattr(eng.runner, "graphs", None) is not None}
        if self.device == "cuda":
            free_after, _ = torch.cuda.mem_get_info()
            info.update(gpu_total_gib=gib(total), free_before_gib=gib(free_before), free_after_gib=gib(free_after),
                        allocated_gib=gib(torch.cuda.memory_allocated()),
                        reserved_gib=gib(torch.cuda.memory_reserved()),
                        max_allocated_gib=gib(torch.cuda.max_memory_allocated()))
        self.details["engine"] = info
        self.metrics["engine_construct_s"] = dt
        log(f"engine: built in {dt:.1f}s, {info['num_blocks']} KV blocks ({info['kv_cache_tokens']} tokens; "
            f"the memory budget fits {info['kv_blocks_fit']})")

    def generate(self, prompts, max_tokens: int):
        from engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        dt, outs = self.timed(lambda: self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                        use_tqdm=False))
        lens = [len(o.outputs[0].token_ids) for o in outs]
        assert len(outs) == len(prompts) and all(n == max_tokens for n in lens), \
            f"expected {len(prompts)} outputs of {max_tokens} tokens, got lengths {sorted(Counter(lens).items())}"
        return dt, outs

    def decode_rate(self, batch: int, prompt: int, new: int, seed: int, repeats: int) -> dict:
        """batch * new / (t(new + 1 tokens) - t(1 token)), median over repeats, fresh prompts each
        call (so the prefix cache never helps one side only)."""
        vocab = self.llm.engine.shape.vocab_size
        self.generate(random_prompts(batch, prompt, vocab, seed), new + 1)  # warm-up
        diffs, t1s = [], []
        for r in range(repeats):
            tn, _ = self.generate(random_prompts(batch, prompt, vocab, seed + 1 + 2 * r), new + 1)
            t1, _ = self.generate(random_prompts(batch, prompt, vocab, seed + 2 + 2 * r), 1)
            diffs.append(tn - t1)
            t1s.append(t1)
        d = statistics.median(diffs)
        r = {"batch": batch, "prompt": prompt, "new_tokens": new, "decode_tok_s": batch * new / d if d > 0 else None,
             "ms_per_step": 1e3 * d / new, "t1_s_median": statistics.median(t1s),
             "diffs_s": [round(x, 4) for x in diffs]}
        if d <= 0:
            r["warning"] = "t(new + 1) - t(1) <= 0: timing noise larger than the decode time"
            log(f"decode bs{batch}: {r['warning']} ({r['diffs_s']})")
        return r

    def p1_section(self) -> None:
        sc = self.scale
        r = self.decode_rate(1, sc.p1_prompt, sc.p1_new, seed=1000, repeats=sc.repeats)
        self.details["p1"] = r
        if r["decode_tok_s"] is not None:
            self.metrics["bs1_decode_tok_s"] = r["decode_tok_s"]
            log(f"p1: bs1 decode {r['decode_tok_s']:.1f} tok/s ({r['ms_per_step']:.2f} ms/token)")

    def floor_section(self) -> None:
        from engine import SamplingParams

        sc, eng = self.scale, self.llm.engine
        K, L = sc.floor_steps, sc.prompt_len
        wb, kvb = weight_bytes(self.shape, self.elem), kv_bytes_per_token(self.shape, self.kv_elem)
        self.details["floor"] = {"K": K, "prompt": L, "bandwidth_bytes_s": self.bw, "weight_bytes": wb,
                                 "kv_bytes_per_token": kvb, "batches": {}}
        for bs in sc.floor_batches:
            if bs > eng.scheduler_config.max_num_seqs:
                self.details["floor"]["batches"][bs] = {"skipped": "batch above max_num_seqs"}
                continue
            prefill_steps_max = -(-bs * L // eng.scheduler_config.max_num_batched_tokens) + 2
            # Early requests decode while later ones prefill: give them room so none finishes
            # during the K timed steps; the rest is aborted afterwards.
            max_tokens = min(1 + K + prefill_steps_max + 4 + (12 if self.args.profile else 0), eng.max_model_len - L - 1)
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            rids = [f"floor{bs}-{i}" for i in range(bs)]
            for rid, ids in zip(rids, random_prompts(bs, L, self.shape["vocab_size"], 5000 + bs)):
                eng.add_request(rid, None, params, prompt_token_ids=ids)
            got: Counter = Counter()
            t = time.perf_counter()
            prefill_steps = 0
            while len(got) < bs:
                for o in eng.step():
                    got[o.request_id] += len(o.new_token_ids)
                prefill_steps += 1
                if prefill_steps > 10 * prefill_steps_max + 100:
                    raise RuntimeError(f"bs{bs}: {len(got)}/{bs} requests have a first token after "
                                       f"{prefill_steps} steps")
            prefill_s = time.perf_counter() - t
            start_ctx = L + sum(got.values()) / bs
            # No synchronization inside the loop: with async scheduling a step returns while the
            # next is queued, so a sync per step would serialize host and device. Events recorded
            # before each step are read after the loop (their gaps = device time per step).
            wall, ev, sizes, marks = [], [], [], []
            for _ in range(K + 1):
                if self.device == "cuda":
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    marks.append(e)
                t = time.perf_counter()
                outs = eng.step()
                wall.append(time.perf_counter() - t)
                sizes.append(len(outs))
                for o in outs:
                    got[o.request_id] += len(o.new_token_ids)
            wall, sizes = wall[1:], sizes[1:]  # the first call may still return the prefill's last step
            if marks:
                marks[-1].synchronize()
                ev = [a.elapsed_time(b) / 1e3 for a, b in zip(marks[1:], marks[2:])]
            if self.device == "cuda" and self.args.profile:
                self.details.setdefault("profile", {})[bs] = profile_steps(eng, 8)
            for rid in rids:
                eng.abort_request(rid)
            drain = 0
            while eng.has_unfinished_requests() and drain < 1000:
                eng.step()
                drain += 1
            bm = eng.block_manager
            ctx = start_ctx + K / 2  # mean context over the timed steps
            floor_s = (wb + bs * ctx * kvb) / self.bw
            step_s = statistics.median(wall)
            r = {"prefill_steps": prefill_steps, "prefill_s": round(prefill_s, 3),
                 "mean_context": round(ctx, 2), "step_ms_median": 1e3 * step_s,
                 "step_ms_min": 1e3 * min(wall), "step_ms_max": 1e3 * max(wall),
                 "event_ms_median": 1e3 * statistics.median(ev) if ev else None,
                 "floor_ms": 1e3 * floor_s, "vs_floor": step_s / floor_s,
                 "batch_in_timed_steps": sorted(Counter(sizes).items()),
                 "blocks_free_after": f"{bm.num_free_blocks}/{bm.num_total_blocks}"}
            if any(s != bs for s in sizes):
                r["warning"] = "some timed steps did not decode the whole batch"
            self.details["floor"]["batches"][bs] = r
            self.metrics[f"decode_step_vs_floor_bs{bs}"] = r["vs_floor"]
            self.metrics[f"decode_step_ms_bs{bs}"] = r["step_ms_median"]
            log(f"floor bs{bs}: step {r['step_ms_median']:.3f} ms (events {r['event_ms_median'] or 0:.3f} ms), "
                f"floor {r['floor_ms']:.4f} ms, x{r['vs_floor']:.3f}; batch sizes {r['batch_in_timed_steps']}")

    def p2_section(self) -> None:
        sc, n = self.scale, self.args.num_prompts
        L, new, vocab = sc.prompt_len, sc.new_tokens, self.shape["vocab_size"]
        self.generate(random_prompts(sc.warm_prompts, L, vocab, 9000), 8)
        prompts = random_prompts(n, L, vocab, 9001)
        log(f"p2: {n} prompts x {L} ids, {new} new tokens")
        dt, outs = self.generate(prompts, new)
        total = n * (L + new) / dt
        self.metrics["offline_total_tok_s"] = total
        self.metrics["offline_output_tok_s"] = n * new / dt
        self.details["p2"] = {"num_prompts": n, "prompt": L, "new_tokens": new, "seconds": round(dt, 3),
                              "cached_prompt_tokens": sum(o.num_cached_tokens for o in outs)}
        log(f"p2: {dt:.1f}s, {total:.0f} total tok/s, {n * new / dt:.0f} output tok/s")

    def drop_llm(self) -> None:
        self.llm = None
        free_memory(self.device)

    def smol_section(self) -> None:
        sc = self.scale
        shape = self.smol_shape
        hf = build_hf_model(shape, self.device, self.dtype, seed=self.args.seed + 1)
        path, info = save_model_dir(hf, shape, "smollm2" if not self.tiny else "tiny_smol")
        self.dirs.append(path)
        del hf
        free_memory(self.device)
        self.details["smollm2"] = {"shape": shape, "dtype": self.dtype_name, "model": info, "batches": {}}
        self.llm = self.make_llm(path, max_num_seqs=max(max(sc.smol_batches), 8))
        try:
            for bs in sc.smol_batches:
                r = self.decode_rate(bs, sc.smol_prompt, sc.smol_new, seed=7000 + bs, repeats=sc.repeats)
                self.details["smollm2"]["batches"][bs] = r
                if r["decode_tok_s"] is not None:
                    self.metrics[f"smollm2_bs{bs}_decode_tok_s"] = r["decode_tok_s"]
                    log(f"smollm2 bs{bs}: {r['decode_tok_s']:.1f} tok/s")
        finally:
            self.drop_llm()

    def floors(self) -> None:
        sc = self.scale
        wb, kvb = weight_bytes(self.shape, self.elem), kv_bytes_per_token(self.shape, self.kv_elem)
        p1_ctx = sc.p1_prompt + (sc.p1_new + 1) / 2
        f = {"bandwidth_bytes_s": self.bw, "weight_bytes_except_embedding": wb, "kv_bytes_per_token": kvb,
             "p1_mean_context": p1_ctx, "p1_floor_tok_s": self.bw / (wb + p1_ctx * kvb),
             "note": "floor = (weights except the input embedding + batch x context x KV bytes) / bandwidth"}
        if not self.tiny:
            f["p1_linear_only_ms"] = LINEAR_ONLY_MS_BS1
            f["p1_linear_only_tok_s"] = 1e3 / LINEAR_ONLY_MS_BS1
            f["linear_only_source"] = "DEVICE.md: linear layers only, CUDA graph, H100 (5.55 ms/step at batch 1)"
        self.details["floors"] = f

    def cleanup(self) -> None:
        self.hf = self.llm = None
        free_memory(self.device)
        if not self.args.keep_models:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)

    # -- all of it
    def run(self) -> None:
        a = self.args
        self.details.update(
            versions={"torch": torch.__version__, "transformers": transformers.__version__,
                      "python": sys.version.split()[0]},
            args={k: v for k, v in vars(a).items() if k != "command"}, scale=self.scale.__dict__,
            tiny=self.tiny)
        self.floors()
        log(f"device {self.device}, sections {','.join(self.sections)}, budget {a.budget_s:.0f}s")
        try:
            big = [s for s in ("hf", "p1", "floor", "p2") if s in self.sections]
            if big:
                self.section("build", self.build)
            if self.model_dir is None and big:
                for s in big:
                    self.skip(s, "model build failed")
                big = []
            if "hf" in big:
                self.section("hf", self.hf_section)
            self.drop_hf()
            engine_sections = [s for s in ("p1", "floor", "p2") if s in big]
            if engine_sections:
                self.section("engine_load", self.engine_load)
                for s in engine_sections:
                    if self.llm is None:
                        self.skip(s, "engine construction failed")
                    else:
                        self.section(s, getattr(self, f"{s}_section"))
            self.drop_llm()
            if "hf_total_tok_s" in self.metrics and "offline_total_tok_s" in self.metrics:
                self.metrics["offline_vs_hf_ratio"] = self.metrics["offline_total_tok_s"] / self.metrics["hf_total_tok_s"]
            if "smol" in self.sections:
                if self.left() < self.scale.smol_min_s:
                    self.skip("smol", f"time: {self.left():.0f}s of budget left")
                else:
                    self.section("smol", self.smol_section)
        finally:
            self.cleanup()
            self.details["total_s"] = round(elapsed(), 1)
            self.write(partial=False)
        self.print_table()

    def print_table(self) -> None:
        m, fl, sc = self.metrics, self.details["floors"], self.scale
        fb = self.details.get("floor", {}).get("batches", {})
        rows = [("bs1_decode_tok_s", ">= 170", lambda v: v >= 170,
                 f"floor {fl['p1_floor_tok_s']:.0f}" + (f", linear-only {fl['p1_linear_only_tok_s']:.0f}"
                                                       if "p1_linear_only_tok_s" in fl else ""))]
        for bs in sc.floor_batches:
            r = fb.get(bs, {})
            note = f"{r['step_ms_median']:.2f} ms vs {r['floor_ms']:.2f} ms" if "floor_ms" in r else ""
            rows.append((f"decode_step_vs_floor_bs{bs}", "<= 1.15", lambda v: v <= 1.15, note))
        best = self.details.get("hf", {}).get("best_batch")
        rows += [("offline_total_tok_s", ">= 30000", lambda v: v >= 30000, ""),
                 ("offline_output_tok_s", "", None, ""),
                 ("hf_total_tok_s", "", None, f"HF best batch {best}" if best else ""),
                 ("offline_vs_hf_ratio", ">= 5", lambda v: v >= 5, ""),
                 ("hf_bs1_decode_tok_s", "", None, "")]
        rows += [(f"smollm2_bs{bs}_decode_tok_s", "", None, "") for bs in sc.smol_batches]
        rows += [("engine_construct_s", "", None, f"{self.details.get('engine', {}).get('num_blocks', '?')} KV blocks")]
        print()
        for name, st in self.details["sections"].items():
            secs = f"{st['seconds']:.1f}s" if "seconds" in st else ""
            print(f"section {name:<12} {st['status']:<8} {secs:>7} {st.get('error', st.get('why', ''))}")
        print(f"\ndevice: {torch.cuda.get_device_name() if self.device == 'cuda' else 'cpu'}; "
              f"total {elapsed():.0f}s; json: {self.args.out}")
        print(f"{'metric':<32} | {'value':>12} | {'target/floor':<14} | {'ok':<4} | note")
        print("-" * 96)
        for name, target, ok, note in rows:
            v = m.get(name)
            val = "-" if v is None else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
            mark = "" if v is None or ok is None else ("yes" if ok(v) else "NO")
            print(f"{name:<32} | {val:>12} | {target:<14} | {mark:<4} | {note}")


def _engine_arg(kv: str) -> tuple[str, object]:
    key, sep, value = kv.partition("=")
    if not sep:
        raise SystemExit(f"--engine-arg wants KEY=VALUE, got {kv!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and counts on CPU (checks the script)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/gpu_speed.json; with --tiny /tmp/gpu_speed_tiny.json)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--profile", action="store_true",
                    help="after each floor batch, profile 8 more decode steps (kernel time by kind vs wall)")
    ap.add_argument("--num-prompts", type=int, default=None, help="P2 prompts (default 1000; --tiny 16)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--attention-backend", default=None, help="torch | triton (default: the engine's choice by device)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="skip optional pieces (HF batch 256, smol) when the run nears this many seconds")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.0,
                    help="memory bandwidth of the floor, TB/s (3.0: H100 device-to-device copy, DEVICE.md)")
    ap.add_argument("--num-gpu-blocks", type=int, default=None, help="KV blocks (default: the engine profiles)")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="any other EngineArgs field, e.g. --engine-arg enforce_eager=true (repeatable)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="our engine's KV cache dtype (fp8: e4m3, 1 byte an element; the floor counts it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-models", action="store_true", help="keep the saved model dirs")
    args = ap.parse_args(argv)
    args.command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "gpu_speed_tiny.json") if args.tiny else "bench/results/gpu_speed.json"
    args.engine_args = dict(_engine_arg(kv) for kv in args.engine_arg)
    if args.num_gpu_blocks is not None:
        args.engine_args["num_gpu_blocks"] = args.num_gpu_blocks
    if args.kv_cache_dtype != "auto":
        args.engine_args["kv_cache_dtype"] = args.kv_cache_dtype
    if args.num_prompts is None:
        args.num_prompts = 16 if args.tiny else 1000
    if args.tiny:
        torch.set_num_threads(1)  # tiny matmuls: threads only add stalls on a busy CPU
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on CPU")
    bench = Bench(args)
    bench.run()
    return 1 if any(s["status"] == "failed" for s in bench.details["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
