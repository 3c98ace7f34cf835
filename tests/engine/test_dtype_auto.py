"""`--dtype auto` on CPU: bf16 where the processor has native bf16 (avx512_bf16 / amx_bf16 in
/proc/cpuinfo), fp32 otherwise; PDSERVE_CPU_AUTO_DTYPE overrides (tests/conftest.py pins float32
for the suite, so parity tests stay fp32 on any machine)."""
from __future__ import annotations

import logging

import pytest
import torch

import engine.config as config
from engine.config import CPU_AUTO_DTYPE_ENV, cpu_auto_dtype, cpu_bf16_flags, resolve_dtype

CPU = torch.device("cpu")
_BASE = "processor\t: {i}\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra}\n\n"


def _cpuinfo(extra: str = "", cpus: int = 2) -> str:
    return "".join(_BASE.format(i=i, extra=extra) for i in range(cpus))


def test_flags_parsed_from_cpuinfo():
    assert cpu_bf16_flags(_cpuinfo("avx512_bf16 avx512_vnni")) == ["avx512_bf16"]
    assert cpu_bf16_flags(_cpuinfo("amx_tile amx_bf16 amx_int8 avx512_bf16")) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(_cpuinfo("avx512_vnni avx512_fp16")) == []
    assert cpu_bf16_flags("model name : avx512_bf16 in a name is not a flag\n") == []
    assert cpu_bf16_flags("") == []


def test_auto_on_cpu_follows_the_flags():
    assert cpu_auto_dtype(_cpuinfo("avx512_bf16"), env={})[0] == torch.bfloat16
    assert cpu_auto_dtype(_cpuinfo("amx_bf16"), env={})[0] == torch.bfloat16
    dtype, why = cpu_auto_dtype(_cpuinfo("avx2"), env={})
    assert dtype == torch.float32 and "no native bf16" in why


def test_env_overrides_detection():
    assert cpu_auto_dtype(_cpuinfo("avx512_bf16"), env={CPU_AUTO_DTYPE_ENV: "float32"})[0] == torch.float32
    assert cpu_auto_dtype(_cpuinfo(), env={CPU_AUTO_DTYPE_ENV: "bfloat16"})[0] == torch.bfloat16
    with pytest.raises(ValueError, match=CPU_AUTO_DTYPE_ENV):
        cpu_auto_dtype(_cpuinfo(), env={CPU_AUTO_DTYPE_ENV: "float16"})


def test_resolve_dtype(monkeypatch, caplog):
    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(config, "_logged_auto", set())
    monkeypatch.setattr(config, "cpu_bf16_flags", lambda cpuinfo=None: ["avx512_bf16"])
    with caplog.at_level(logging.INFO, logger="pdserve.engine"):
        assert resolve_dtype("auto", CPU) == torch.bfloat16
        assert resolve_dtype("auto", CPU) == torch.bfloat16
    lines = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert lines == ["dtype auto on CPU: bfloat16 (native bf16 on this CPU (avx512_bf16))"]  # logged once
    monkeypatch.setattr(config, "cpu_bf16_flags", lambda cpuinfo=None: [])
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # no CUDA call needed
    for name, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        assert resolve_dtype(name, CPU) == want  # explicit dtypes are never detected
    assert resolve_dtype(torch.float16, CPU) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", CPU)


def test_conftest_pins_fp32_for_the_suite():
    import os

    assert os.environ.get(CPU_AUTO_DTYPE_ENV) == "float32"
    assert resolve_dtype("auto", CPU) == torch.float32


@pytest.mark.parametrize("flags, want", [(["avx512_bf16"], torch.bfloat16), ([], torch.float32)])
def test_engine_auto_dtype_on_cpu(make_tiny_model, monkeypatch, flags, want):
    """The engine builds its weights and KV cache in the chosen dtype, and generates."""
    from engine import LLM, SamplingParams

    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(config, "cpu_bf16_flags", lambda cpuinfo=None: flags)
    llm = LLM(str(make_tiny_model("llama")), device="cpu", num_gpu_blocks=16, max_model_len=128)
    eng = llm.engine
    assert eng.dtype == want
    assert next(eng.runner.model.parameters()).dtype == want and eng.runner.kv_caches[0][0].dtype == want
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_engine_resolved_config_is_built_once_and_is_what_the_node_reports(make_tiny_model, monkeypatch):
    """LLMEngine.resolved: the frozen values the node reports (KV layout, registration), equal to
    the engine's own attributes; 'auto' resolved, not echoed."""
    import dataclasses

    from engine import LLM
    from engine.config import ResolvedConfig
    from engine.kv_transfer.base import KVSpec

    monkeypatch.delenv(CPU_AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(config, "cpu_bf16_flags", lambda cpuinfo=None: ["amx_bf16"])
    eng = LLM(str(make_tiny_model("llama")), device="cpu", num_gpu_blocks=24, max_model_len=96,
              block_size=32, max_num_batched_tokens=64, kv_cache_dtype="fp8").engine
    r = eng.resolved
    assert isinstance(r, ResolvedConfig)
    assert (r.device, r.dtype, r.kv_dtype) == (torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn)
    assert (r.max_model_len, r.max_num_batched_tokens, r.block_size, r.num_blocks) == (96, 64, 32, 24)
    assert (r.dtype_name, r.kv_dtype_name) == ("bfloat16", "float8_e4m3fn")
    assert (eng.dtype, eng.kv_dtype, eng.max_model_len, eng.cache_config.num_blocks) == (
        r.dtype, r.kv_dtype, r.max_model_len, r.num_blocks)
    spec = KVSpec.of_engine(eng)
    assert (spec.block_size, spec.dtype) == (32, torch.float8_e4m3fn)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.block_size = 16
    with pytest.raises(ValueError, match="unusable"):
        dataclasses.replace(r, num_blocks=1)
