"""router.cli.plan: what `pdserve serve` forwards to each process (no process is started)."""
from router.cli import build_serve_parser, plan


def _argv(flags: list[str]) -> dict[str, list[str]]:
    ns = build_serve_parser().parse_args(["--model", "m", *flags])
    return {c.name: c.argv for c in plan(ns)}


def test_kv_stream_chunks_reaches_every_node_as_a_value():
    from engine.node.main import node_parser
    for flags, want in ((["--num-prefill", "2", "--kv-stream-chunks"], True), ([], False)):
        nodes = {name: argv for name, argv in _argv(flags).items() if name != "router" and name != "gateway"}
        assert sum(name.startswith("prefill") for name in nodes) == (2 if want else 1)
        for name, argv in nodes.items():
            role = name.split("-")[0]
            assert node_parser(role, 0).parse_args(argv[1:]).kv_stream_chunks is want, name


def test_the_prefill_node_takes_the_flag_and_its_env_twin(monkeypatch):
    from engine.node.main import node_parser
    assert node_parser("prefill", 50061).parse_args(["--model", "m"]).kv_stream_chunks is False
    assert node_parser("prefill", 50061).parse_args(["--model", "m", "--kv-stream-chunks"]).kv_stream_chunks is True
    monkeypatch.setenv("PDSERVE_KV_STREAM_CHUNKS", "1")
    assert node_parser("prefill", 50061).parse_args(["--model", "m"]).kv_stream_chunks is True


def test_every_node_gets_the_engine_values_of_the_serve_command():
    """No hand-kept list: each node's argv parses back to the serve command's EngineArgs (and node
    options), whatever flag was set, on the command line or through its env twin."""
    from engine.cli_args import engine_args_from
    from engine.node.main import node_parser

    flags = ["--num-prefill", "1", "--dtype", "bfloat16", "--device", "cpu", "--max-model-len", "256",
             "--block-size", "32", "--no-enable-prefix-caching", "--enforce-eager", "--async-scheduling",
             "--seed", "3", "--num-gpu-blocks", "40", "--kv-cache-dtype", "fp8", "--warmup", "minimal",
             "--kv-transport", "grpc", "--max-num-seqs", "4", "--cpu-kv-cache-gb", "0.5"]
    serve_ns = build_serve_parser().parse_args(["--model", "m", *flags])
    for name, argv in _argv(flags).items():
        if not name.startswith(("prefill", "decode")):
            continue
        role = name.split("-")[0]
        node_ns = node_parser(role, 0).parse_args(argv[1:])
        assert engine_args_from(node_ns, role) == engine_args_from(serve_ns, role)
        assert (node_ns.warmup, node_ns.kv_transport) == ("minimal", "grpc")


def test_role_tensor_parallel_size_overrides_the_forwarded_one():
    from engine.node.main import node_parser

    argv = _argv(["--tensor-parallel-size", "2", "--decode-tensor-parallel-size", "4"])
    assert node_parser("prefill", 0).parse_args(argv["prefill-0"][1:]).tensor_parallel_size == 2
    assert node_parser("decode", 0).parse_args(argv["decode-0"][1:]).tensor_parallel_size == 4


def test_nodes_register_with_the_stacks_router_so_it_learns_their_config():
    argv = _argv(["--num-prefill", "1", "--port", "50123", "--host", "0.0.0.0"])
    for name in ("prefill-0", "decode-0"):
        assert argv[name][argv[name].index("--router") + 1] == "127.0.0.1:50123"
    assert "--router" not in argv["router"]
    assert argv["decode-0"][-1] == argv["router"][argv["router"].index("--decode") + 1].rsplit(":", 1)[1]
    assert not any("--router" in a for n, a in _argv(["--port", "0"]).items() if n != "gateway")
