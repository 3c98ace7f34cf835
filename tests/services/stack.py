"""`start_stack()`: a real pdserve stack (router + prefill + decode nodes [+ gateway]) started
through `pdserve serve` on free loopback ports, for service tests.

    with start_stack(model_dir, num_prefill=2, num_decode=2) as stack:
        stub = stack.stub()                       # pdserve.v1.Generation stub (sync)
        stack.kill("decode-0", signal.SIGKILL)
    # teardown: SIGTERM to `pdserve serve`, SIGKILL after a grace period, and an assertion
    # that no process of the stack is left.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

from protos.pdserve.v1 import generation_pb2_grpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 180.0
SMALL_ENGINE_ARGS = ("--num-gpu-blocks", "64", "--max-model-len", "256", "--max-num-seqs", "16",
                     "--dtype", "float32", "--device", "cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


@dataclass
class Stack:
    serve: subprocess.Popen
    router_address: str = ""
    gateway_url: str | None = None
    node_addresses: dict[str, str] = field(default_factory=dict)  # "prefill-0" -> host:port
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid (serve itself: "serve")
    output: list[str] = field(default_factory=list)
    _channels: list[grpc.Channel] = field(default_factory=list)

    def stub(self, address: str | None = None) -> generation_pb2_grpc.GenerationStub:
        channel = grpc.insecure_channel(address or self.router_address)
        self._channels.append(channel)
        return generation_pb2_grpc.GenerationStub(channel)

    def channel(self, address: str | None = None) -> grpc.Channel:
        channel = grpc.insecure_channel(address or self.router_address)
        self._channels.append(channel)
        return channel

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.processes[name], sig)

    def close(self, grace: float = 15.0) -> None:
        for channel in self._channels:
            channel.close()
        if self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(grace)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(pid_alive(p) for p in self.processes.values()):
            time.sleep(0.1)
        left = {name: pid for name, pid in self.processes.items() if pid_alive(pid)}
        for pid in left.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left after teardown: {left}"


def _pump(stack: Stack, ready: threading.Event) -> None:
    for line in stack.serve.stdout:
        stack.output.append(line)
        parts = line.split()
        if len(parts) == 4 and parts[2] == "pid":  # "<name> <address> pid <pid>"
            name, address, pid = parts[0], parts[1], int(parts[3])
            stack.processes[name] = pid
            if name == "router":
                stack.router_address = address
            elif name == "gateway":
                stack.gateway_url = f"http://{address}"
            else:
                stack.node_addresses[name] = address
        elif line.startswith("READY "):
            ready.set()
    ready.set()


@contextlib.contextmanager
def start_stack(model: str | os.PathLike, num_prefill: int = 1, num_decode: int = 1, kv_transport: str = "grpc",
                gateway: bool = False, extra_args=(), env: dict | None = None,
                startup_timeout: float = STARTUP_TIMEOUT_S):
    argv = [sys.executable, "-m", "router.cli", "serve", "--model", str(model),
            "--num-prefill", str(num_prefill), "--num-decode", str(num_decode), "--kv-transport", kv_transport,
            "--port", str(free_port()), "--grace-period", "3", *SMALL_ENGINE_ARGS]
    argv += ["--gateway", "--gateway-port", str(free_port())] if gateway else ["--no-gateway"]
    if "--local-prefill-tokens" not in extra_args:  # the tests exercise the prefill pool unless they say otherwise
        argv += ["--local-prefill-tokens", "0"]
    argv += list(extra_args)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    child_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    child_env.update(env or {})
    serve = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, bufsize=1, env=child_env)
    stack = Stack(serve, processes={"serve": serve.pid})
    ready = threading.Event()
    threading.Thread(target=_pump, args=(stack, ready), daemon=True).start()
    try:
        if not ready.wait(startup_timeout) or not stack.router_address:
            raise RuntimeError("the stack did not start:\n" + "".join(stack.output[-40:]))
        yield stack
    finally:
        stack.close()
