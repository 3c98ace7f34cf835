"""`pdserve`: one command for every pdserve process.

    pdserve serve [flags]      router + prefill + decode nodes (+ HTTP gateway) on this machine
    pdserve router [flags]     the gRPC router only            (python -m router)
    pdserve prefill [flags]    one prefill node                 (python -m prefill_node)
    pdserve decode [flags]     one decode node                  (python -m decode_node)
    pdserve gateway [flags]    the OpenAI-compatible HTTP gateway (python -m gateway)
    pdserve bench [flags]      the load test: drive a server, report TTFT / ITL / goodput (python -m loadtest)

`pdserve <command> --help` explains each command's flags; every flag has a PDSERVE_* env twin.
"""
from __future__ import annotations

import argparse
import importlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from engine.cli_args import add_engine_args, add_flag, engine_argv
from engine.rpc.channel import sync_channel
from engine.rpc.process import spawn_env
from engine.rpc.security import Security, add_security_args
from engine.metrics import PREFIXES
from engine.tool_parsers import PARSERS
from router.gpu_share import gpu_share
from router.policy import DEFAULT_LOCAL_PREFILL_TOKENS, POLICIES

PLACEMENT_FLAGS = ("prefill_policy", "decode_policy", "local_prefill_tokens", "max_failovers")
STOP_SLACK_S = 5.0  # past the grace period, for a process to end its streams and exit before SIGKILL
DELEGATES = {"router": "router", "prefill": "prefill_node", "decode": "decode_node", "gateway": "gateway"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Append(argparse.Action):
    """Like action="append", also when the default is a string from the env twin."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        current = [current] if isinstance(current, str) else list(current or [])
        setattr(namespace, self.dest, current + [values])


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def start(self, echo: bool, env: dict | None = None) -> None:
        # every child calls die_with_parent() itself: no preexec_fn (engine.rpc.process.spawn_env)
        self.proc = subprocess.Popen([sys.executable, "-m", *self.argv], stdout=subprocess.PIPE, text=True,
                                     env=spawn_env(env), bufsize=1)
        threading.Thread(target=self._pump, args=(echo,), daemon=True).start()

    def _pump(self, echo: bool) -> None:
        """Reads the child's stdout: the READY line, then everything else (so the pipe never fills)."""
        for line in self.proc.stdout:
            if self.address is None and line.startswith("READY "):
                self.address = line.split(None, 1)[1].strip()
                self.ready.set()
            elif echo:
                sys.stdout.write(f"[{self.name}] {line}")
        self.ready.set()  # EOF: the child died

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_ready(children: list[Child], timeout: float, security=None) -> None:
    """Waits for each child's READY line and health SERVING; raises RuntimeError otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    for child in children:
        if not child.ready.wait(max(deadline - time.monotonic(), 0)) or child.address is None:
            raise RuntimeError(f"{child.name} did not become ready"
                               f"{'' if child.alive() else f' (exit code {child.proc.returncode})'}")
        if child.name.startswith("gateway"):
            continue
        with sync_channel(child.address, security=security) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or not child.alive():
                    raise RuntimeError(f"{child.name} at {child.address} never reported SERVING")
                time.sleep(0.1)


def stop_all(children: list[Child], grace: float) -> None:
    """Front doors first: SIGTERM to the gateway and the router, which let their streams finish
    within their grace period (then end them with a clear error); only once they are gone do the
    nodes get SIGTERM (so the router's in-flight requests keep their prefill and decode nodes until
    the end), then SIGKILL whatever outlives `grace` in all (plus STOP_SLACK_S for the nodes)."""
    front = [c for c in children if not c.name.startswith(("prefill", "decode"))]
    nodes = [c for c in children if c not in front]
    deadline = time.monotonic() + grace
    for group, until in ((front, deadline), (nodes, deadline + STOP_SLACK_S)):
        for child in reversed(group):
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)
        for child in group:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(until - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def _role_tp_argv(ns, role: str) -> list[str]:
    """--prefill-tensor-parallel-size / --decode-tensor-parallel-size override --tensor-parallel-size."""
    size = getattr(ns, f"{role}_tensor_parallel_size")
    return [] if size is None else ["--tensor-parallel-size", str(size)]


def _metrics_argv(ns, offset: int) -> list[str]:
    """--metrics-port P: the router serves metrics on P, the k-th node (prefill first) on P + k."""
    return [] if ns.metrics_port is None else ["--metrics-port", str(ns.metrics_port + offset),
                                               "--metrics-prefix", ns.metrics_prefix]


def plan(ns) -> list[Child]:
    """The processes of `pdserve serve`, nodes first, on free loopback ports. Every node gets every
    engine flag with a value (engine/cli_args.py `engine_argv`, derived from EngineArgs / NodeArgs)."""
    engine = engine_argv(ns)
    local = "127.0.0.1"
    router_address = f"{local if ns.host in ('0.0.0.0', '::') else ns.host}:{ns.port}"
    # Nodes also register with the router: it learns their block size, dtype, max_model_len, KV layout.
    register = ["--router", router_address] if ns.port else []
    nodes = [(role, i) for role, count in (("prefill", ns.num_prefill), ("decode", ns.num_decode)) for i in range(count)]
    children = [Child(f"{role}-{i}", [f"{role}_node", *engine, *_role_tp_argv(ns, role), *_metrics_argv(ns, 1 + j),
                                      *register, "--node-id", f"{role}-{i}",
                                      "--host", local, "--port", str(free_port())])
                for j, (role, i) in enumerate(nodes)]
    router = ["router", "--host", ns.host, "--port", str(ns.port), "--block-size", str(ns.block_size),
              "--dtype", ns.dtype, "--kv-transport", ns.kv_transport, "--grace-period", str(ns.grace_period),
              *_metrics_argv(ns, 0)]
    for flag in ("model", "served_model_name", "max_model_len", *PLACEMENT_FLAGS):
        if getattr(ns, flag) is not None:
            router += [f"--{flag.replace('_', '-')}", str(getattr(ns, flag))]
    for c in children:
        router += [f"--{c.name.split('-')[0]}", f"{local}:{c.argv[-1]}"]
    keys = [k for item in ns.api_key or () for k in item.split(",") if k]
    for key in keys:
        router += ["--api-key", key]
    for key in [k for item in ns.admin_key or () for k in item.split(",") if k]:
        router += ["--admin-key", key]
    if ns.max_stream_buffer is not None:
        router += ["--max-stream-buffer", str(ns.max_stream_buffer)]
    children.append(Child("router", router))
    if ns.gateway and importlib.util.find_spec("gateway.__main__") is not None:
        gateway = ["gateway", "--router", router_address, "--host", ns.gateway_host, "--port", str(ns.gateway_port),
                   "--shutdown-grace", str(ns.grace_period)]
        for key in keys:
            gateway += ["--api-key", key]
        if ns.tool_call_parser:
            gateway += ["--tool-call-parser", ns.tool_call_parser]
        gateway += ["--metrics-prefix", ns.metrics_prefix]
        children.append(Child("gateway", gateway))
    tls = Security.from_args(ns).argv()  # every process serves and calls with the same certificate
    for child in children:
        child.argv += tls
    return children


def build_serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve serve", description=(
        "Runs a whole pdserve stack on this machine: the gRPC router on --port, --num-prefill prefill "
        "nodes and --num-decode decode nodes on free loopback ports, and the OpenAI-compatible HTTP "
        "gateway on --gateway-port. Ctrl-C or SIGTERM stops everything."))
    add_engine_args(p, default_port=50051)  # engine flags go to every node; --host/--port are the router's
    g = p.add_argument_group("stack")
    add_flag(g, "--num-prefill", type=int, default=1,
             help="prefill nodes to start; 0 = colocated serving: each decode node prefills its own "
                  "prompts in its batch (chunked prefill), no KV transfer")
    add_flag(g, "--num-decode", type=int, default=1, help="decode nodes to start")
    for role in ("prefill", "decode"):
        add_flag(g, f"--{role}-tensor-parallel-size", type=int, default=None,
                 help=f"tensor-parallel ranks of each {role} node (default: --tensor-parallel-size)")
    add_flag(g, "--gateway", action=argparse.BooleanOptionalAction, default=True,
             help="also start the HTTP gateway (--no-gateway: gRPC only)")
    add_flag(g, "--gateway-port", type=int, default=8000, help="port of the HTTP gateway")
    add_flag(g, "--gateway-host", default="127.0.0.1", help="address the HTTP gateway listens on")
    add_flag(g, "--metrics-prefix", default="pdserve", choices=PREFIXES,
             help="metric name prefix on every port: pdserve (pdserve:...) or vllm (vllm:..., for vLLM's "
                  "dashboards and autoscaling rules)")
    add_flag(g, "--tool-call-parser", default=None, choices=sorted(PARSERS),
             help="the gateway's parser of model output into OpenAI tool_calls (needed for tool_choice auto)")
    add_flag(g, "--api-key", action=_Append, default=None,
             help="API key required by the router and the gateway (repeatable, or comma-separated)")
    add_flag(g, "--admin-key", action=_Append, default=None,
             help="API key of the router that also sees and aborts every client's requests (repeatable)")
    add_flag(g, "--max-stream-buffer", type=int, default=None,
             help="chunks the router buffers for a slow reader before it aborts the request (default 1024)")
    add_flag(g, "--metrics-port", type=int, default=None,
             help="Prometheus metrics: the router on this port, node k (prefill nodes first) on port + k "
                  "(the gateway always serves /metrics on its own port)")
    add_flag(g, "--startup-timeout", type=float, default=600.0,
             help="seconds to wait for every process to load its model and report SERVING")
    add_flag(g, "--grace-period", type=float, default=30.0,
             help="seconds in-flight streams get to finish on shutdown (then they end with UNAVAILABLE and "
                  "whatever is still running is killed)")
    placement = p.add_argument_group("placement (forwarded to the router; see `pdserve router --help`)")
    add_flag(placement, "--prefill-policy", default=None, choices=POLICIES, help="prefill pool policy (default prefix)")
    add_flag(placement, "--decode-policy", default=None, choices=POLICIES, help="decode pool policy (default prefix)")
    add_flag(placement, "--local-prefill-tokens", type=int, default=None,
             help="a decode node prefills prompts with at most this many uncached tokens itself "
                  f"(default {DEFAULT_LOCAL_PREFILL_TOKENS}; 0: never)")
    add_flag(placement, "--max-failovers", type=int, default=None,
             help="mid-stream moves of one completion to another decode node (default 2)")
    add_flag(g, "--gpu-share", default="none", choices=["none", "mps"],
             help="one GPU for prefill and decode nodes: none = time-slice it; mps = run them at once through "
                  "NVIDIA MPS (a control daemon is started in a private directory if none runs)")
    add_flag(g, "--prefill-sm-percent", type=int, default=50,
             help="with --gpu-share mps: the prefill nodes' share of the SMs in percent (decode nodes get the rest)")
    add_security_args(p)  # --node-key (default: a random one per stack) and TLS, for every process
    return p


def serve(argv) -> int:
    ns = build_serve_parser().parse_args(argv)
    if isinstance(ns.api_key, str):
        ns.api_key = [ns.api_key]
    if ns.num_prefill < 0 or ns.num_decode < 1:
        raise SystemExit("--num-decode must be >= 1 and --num-prefill >= 0 (0: colocated, the decode nodes "
                         "run their own prompts)")
    if isinstance(ns.admin_key, str):
        ns.admin_key = [ns.admin_key]
    if ns.tls_cert and not ns.tls_ca:
        raise SystemExit("--tls-cert needs --tls-ca too: the stack's processes call each other over TLS")
    children = plan(ns)
    # The children share one node key (router <-> nodes, prefill -> decode); a fresh random one unless
    # given. It travels by environment, never on a command line other users can read.
    env = {**os.environ, "PDSERVE_NODE_KEY": ns.node_key or secrets.token_urlsafe(32)}
    security = Security.from_args(ns).client
    try:
        share = gpu_share(ns)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    code = 0
    try:
        nodes = [c for c in children if c.name.startswith(("prefill", "decode"))]
        front = [c for c in children if c not in nodes]
        share.start()
        for child in nodes:
            child.start(echo=True, env={**env, **share.env_for(child.name.split("-")[0])})
        wait_ready(nodes, ns.startup_timeout, security)
        for child in front:
            child.start(echo=True, env=env)
            wait_ready([child], ns.startup_timeout, security)
        for child in children:
            print(f"{child.name:10s} {child.address} pid {child.proc.pid}", flush=True)
        print(f"READY {children[[c.name for c in children].index('router')].address}", flush=True)
        reported = set()
        while not stop.wait(0.5):
            for child in children:
                if not child.alive() and child.name not in reported:
                    reported.add(child.name)
                    print(f"{child.name} exited with code {child.proc.returncode}", file=sys.stderr, flush=True)
            if any(c.name in reported for c in front):  # without its front door the stack is useless
                code = 1
                break
    except RuntimeError as exc:
        print(f"pdserve serve: {exc}", file=sys.stderr)
        code = 1
    finally:
        stop_all(children, ns.grace_period + STOP_SLACK_S)
        share.stop()
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["serve", "bench", *DELEGATES]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "bench":
        from loadtest.cli import main as bench

        return bench(rest)
    if command not in DELEGATES:
        print(f"pdserve: unknown command {command!r}; choose one of {', '.join(commands)}", file=sys.stderr)
        return 2
    if command == "router":
        from engine.rpc.process import hide_torch_from_transformers

        hide_torch_from_transformers()  # as `python -m router` does
    module = importlib.import_module(f"{DELEGATES[command]}.__main__")
    return module.main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
