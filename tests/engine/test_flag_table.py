"""engine/cli_args.py: the engine flags come from the EngineArgs / NodeArgs fields (one table)."""
import argparse
import dataclasses

import pytest

from engine.cli_args import ENGINE_FLAGS, add_engine_args, engine_args_from, engine_argv
from engine.config import EngineArgs, NodeArgs


def _parse(argv, env=None) -> argparse.Namespace:
    return add_engine_args(argparse.ArgumentParser(), env=env or {}).parse_args(argv)


def test_every_field_is_a_flag_or_says_why_not():
    rows = {row.name for row in ENGINE_FLAGS}
    for owner in (EngineArgs, NodeArgs):
        for f in dataclasses.fields(owner):
            assert "flag" in f.metadata, f"{owner.__name__}.{f.name}"
            assert (f.name in rows) == (f.metadata["flag"] is not None)
            if f.metadata["flag"] is None:
                assert f.metadata["why"]
    internal = {f.name for f in dataclasses.fields(EngineArgs) if f.metadata["flag"] is None}
    assert internal == {"role", "enable_chunked_prefill", "attention_backend"}


def test_flag_names_defaults_env_twins_and_help_are_the_ones_users_know():
    parser = add_engine_args(argparse.ArgumentParser(), env={})
    actions = {a.dest: a for a in parser._actions}
    for row in ENGINE_FLAGS:
        action = actions[row.name]
        assert row.option in action.option_strings
        assert f"[env: PDSERVE_{row.name.upper()}]" in action.help
        assert action.default == row.default
    assert _parse([]).device == "auto" and EngineArgs().device == "auto"
    assert actions["block_size"].choices == [8, 16, 32, 64, 128]
    assert actions["dtype"].choices == ["auto", "float32", "bfloat16", "float16"]
    assert actions["quantization"].choices == ["none", "fp8", "awq", "gptq", "gguf"]
    help_text = parser.format_help()
    for option in ("--model", "--served-model-name", "--max-model-len", "--gpu-memory-utilization",
                   "--cpu-kv-cache-gb", "--max-num-seqs", "--max-num-batched-tokens", "--num-gpu-blocks",
                   "--seed", "--tensor-parallel-size", "--kv-cache-dtype", "--warmup", "--kv-transport",
                   "--host", "--port"):
        assert option in help_text


def test_node_flag_choices_are_the_names_their_modules_take():
    from engine.kv_transfer import TRANSPORTS
    from engine.warmup import MODES

    rows = {row.name: row for row in ENGINE_FLAGS}
    assert rows["kv_transport"].flag.choices == tuple(TRANSPORTS)
    assert rows["warmup"].flag.choices == MODES


def test_boolean_flags():
    assert _parse([]).enable_prefix_caching is True
    assert _parse(["--no-enable-prefix-caching"]).enable_prefix_caching is False
    assert _parse([]).async_scheduling is None
    assert _parse(["--async-scheduling"]).async_scheduling is True
    assert _parse(["--no-async-scheduling"]).async_scheduling is False
    assert _parse([]).enforce_eager is False and _parse(["--enforce-eager"]).enforce_eager is True
    with pytest.raises(SystemExit):
        _parse(["--no-enforce-eager"])  # store_true today: no negative form


def test_env_twins_set_defaults_and_the_command_line_wins():
    env = {"PDSERVE_MAX_MODEL_LEN": "512", "PDSERVE_ENABLE_PREFIX_CACHING": "0", "PDSERVE_ENFORCE_EAGER": "yes",
           "PDSERVE_DTYPE": "bfloat16", "PDSERVE_GPU_MEMORY_UTILIZATION": "0.5", "PDSERVE_NUM_GPU_BLOCKS": "auto",
           "PDSERVE_KV_TRANSPORT": "grpc"}
    ns = _parse([], env)
    assert (ns.max_model_len, ns.enable_prefix_caching, ns.enforce_eager, ns.dtype) == (512, False, True, "bfloat16")
    assert (ns.gpu_memory_utilization, ns.num_gpu_blocks, ns.kv_transport) == (0.5, None, "grpc")
    assert _parse(["--max-model-len", "64", "--enable-prefix-caching"], env).max_model_len == 64
    assert _parse(["--enable-prefix-caching"], env).enable_prefix_caching is True
    for bad in ({"PDSERVE_BLOCK_SIZE": "12"}, {"PDSERVE_SEED": "x"}, {"PDSERVE_ENFORCE_EAGER": "maybe"}):
        with pytest.raises(SystemExit):
            _parse([], bad)


@pytest.mark.parametrize("argv", [
    [],
    ["--model", "m", "--dtype", "bfloat16", "--device", "cpu", "--max-model-len", "1024", "--block-size", "32",
     "--no-enable-prefix-caching", "--enforce-eager", "--no-async-scheduling", "--seed", "7",
     "--max-num-batched-tokens", "512", "--num-gpu-blocks", "64", "--quantization", "fp8",
     "--kv-cache-dtype", "fp8", "--tensor-parallel-size", "2", "--warmup", "off", "--kv-transport", "nccl",
     "--served-model-name", "alias", "--gpu-memory-utilization", "0.6", "--cpu-kv-cache-gb", "0.25",
     "--max-num-seqs", "8"],
    ["--async-scheduling", "--max-model-len", "auto"],
])
def test_round_trip_argv_engine_args_forwarded_argv(argv):
    ns = _parse(argv)
    args = engine_args_from(ns, role="decode")
    assert args.role == "decode"
    forwarded = _parse(engine_argv(ns))
    assert engine_args_from(forwarded, role="decode") == args
    assert (forwarded.warmup, forwarded.kv_transport) == (ns.warmup, ns.kv_transport)
    assert engine_argv(forwarded) == engine_argv(ns)
    for row in ENGINE_FLAGS:
        if row.owner is EngineArgs:
            assert getattr(args, row.name) == getattr(ns, row.name)
