"""router.cli.plan: what `pdserve serve` forwards to each process (no process is started)."""
from router.cli import build_serve_parser, plan


def _argv(flags: list[str]) -> dict[str, list[str]]:
    ns = build_serve_parser().parse_args(["--model", "m", *flags])
    return {c.name: c.argv for c in plan(ns)}


def test_kv_stream_chunks_reaches_the_prefill_nodes_only():
    on = _argv(["--num-prefill", "2", "--kv-stream-chunks"])
    assert all(("--kv-stream-chunks" in argv) == name.startswith("prefill") for name, argv in on.items())
    assert sum(name.startswith("prefill") for name in on) == 2
    off = _argv([])
    assert not any("--kv-stream-chunks" in argv for argv in off.values())


def test_the_prefill_node_takes_the_flag_and_its_env_twin(monkeypatch):
    from engine.node.main import node_parser
    assert node_parser("prefill", 50061).parse_args(["--model", "m"]).kv_stream_chunks is False
    assert node_parser("prefill", 50061).parse_args(["--model", "m", "--kv-stream-chunks"]).kv_stream_chunks is True
    monkeypatch.setenv("PDSERVE_KV_STREAM_CHUNKS", "1")
    assert node_parser("prefill", 50061).parse_args(["--model", "m"]).kv_stream_chunks is True
