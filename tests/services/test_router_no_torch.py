"""The router process loads no torch for its model (engine.rpc.process.hide_torch_from_transformers):
`python -m router` starts and tokenizes without mapping libtorch, and its tokenizer and chat
template give what the engine's (torch-loaded) tokenizer gives. A structured-output constraint is
still checked where the request enters, by a child process (xgrammar loads torch). A .gguf whose
sidecar is not built yet gets it from a child process."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import generation_pb2_grpc as gg
from tests.services.stack import REPO, free_port


def _start_router(model, env=None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router", "--model", str(model), "--port", str(port),
                             "--max-model-len", "256", "--prefill", f"127.0.0.1:{free_port()}",
                             "--decode", f"127.0.0.1:{free_port()}"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        pytest.fail(f"router did not start: {line!r}")
    return proc, port


def _torch_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any("libtorch" in line for line in maps)


def _check_tokenizer(port: int, reference) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gg.GenerationStub(channel)
        text = "Hello there, how are you? Ünïcödé 🙂"
        got = stub.Tokenize(g.TokenizeRequest(text=text), timeout=30)
        assert list(got.token_ids) == reference.encode(text)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        got = stub.Tokenize(g.TokenizeRequest(messages=[g.ChatMessage(**m) for m in messages]), timeout=30)
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert list(got.token_ids) == list(expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
@pytest.mark.timeout(120)
def test_router_process_loads_no_torch(make_tiny_model):
    import transformers

    model = make_tiny_model("llama")
    proc, port = _start_router(model)
    try:
        assert not _torch_mapped(proc.pid)
        _check_tokenizer(port, transformers.AutoTokenizer.from_pretrained(model))
        assert not _torch_mapped(proc.pid)  # tokenizing and templating loaded none either
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gg.GenerationStub(channel)
            bad = g.GenerateRequest(text="hi", structured=g.StructuredOutput(grammar="root ::= nope"))
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(bad, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            good = g.GenerateRequest(text="hi", structured=g.StructuredOutput(json_schema='{"type": "object"}'))
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(good, timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()  # checked; no node is up
        assert not _torch_mapped(proc.pid)  # the constraints were parsed in a child (engine/structured/checker.py)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
@pytest.mark.timeout(300)
def test_router_builds_a_gguf_sidecar_in_a_child_process(default_model_path, tmp_path):
    from engine.gguf_loader import GGUFFile

    env = {"PDSERVE_CACHE_DIR": str(tmp_path)}  # no sidecar yet
    proc, port = _start_router(default_model_path, env)
    try:
        assert not _torch_mapped(proc.pid)
        os.environ["PDSERVE_CACHE_DIR"] = str(tmp_path)
        try:
            gguf = GGUFFile(default_model_path)
            assert (gguf.sidecar_dir / "config.json").is_file()  # the child built it where we look
            from engine.model_info import gguf_model_info

            _check_tokenizer(port, gguf_model_info(gguf).tokenizer)
        finally:
            del os.environ["PDSERVE_CACHE_DIR"]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
