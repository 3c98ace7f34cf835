"""Chaos against a served stack: a seeded random mix of well-behaved bystanders, bad inputs, client
disconnects, readers that stop reading, SIGSTOP/SIGCONT of nodes and one kill -9, then the
RELIABILITY.md invariants (I1 free == total blocks on idle nodes, I2 no request id left anywhere, I6
no traceback / address / path in any error message, I7 bystanders correct; I4 no orphan process is
checked by the stack's teardown). The soak version samples every process's RSS and open fds.

    python bench/chaos_soak.py --minutes 30 [--model DIR] [--out bench/results/chaos_soak.json]

tests/services/test_rel_chaos.py runs `run_chaos()` for about a minute in CI. Everything is bounded
in time and count and uses loopback addresses only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protos.pdserve.v1 import generation_pb2 as g  # noqa: E402
from protos.pdserve.v1 import generation_pb2_grpc as gg  # noqa: E402
from tests.services.helpers import greedy_request, wait_idle  # noqa: E402
from tests.services.stack import start_stack  # noqa: E402

KEY, ADMIN_KEY = "chaos-user", "chaos-admin"
USER, ADMIN = (("authorization", f"Bearer {KEY}"),), (("authorization", f"Bearer {ADMIN_KEY}"),)
STACK_ARGS = ("--api-key", KEY, "--admin-key", ADMIN_KEY, "--max-stream-buffer", "32", "--max-model-len", "512")
LEAKY = re.compile(r"Traceback|File \"|0x[0-9a-f]{6,}|/(work|tmp|home|usr|root)/")
EXPECTED_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
WORDS = "the quick brown fox jumps over a lazy dog while seven hungry cats watch".split()


def bad_requests() -> list[g.GenerateRequest]:
    """Inputs every one of which must be refused with a clear status."""
    huge = greedy_request("x", 2**31 - 1)
    nan = greedy_request("hi", 4)
    nan.sampling.temperature = float("nan")
    bad_ids = g.GenerateRequest(token_ids=g.TokenIds(ids=[10**9]))
    role = g.GenerateRequest(chat=g.ChatInput(messages=[g.ChatMessage(role="system\n", content="hi")]))
    many = g.GenerateRequest(inputs=[g.Input(text="a")] * 64, n=100)
    model = greedy_request("hi", 4, model="not-this-model")
    return [g.GenerateRequest(), g.GenerateRequest(text=""), huge, nan, bad_ids, role, many, model,
            g.GenerateRequest(text="word " * 300_000)]


@dataclass
class Report:
    counts: dict = field(default_factory=dict)
    wrong_outputs: list = field(default_factory=list)  # (prompt, got, expected)
    bad_statuses: list = field(default_factory=list)  # (action, code, message): codes we never expect
    messages: list = field(default_factory=list)  # every error message seen (I6)
    samples: list = field(default_factory=list)  # soak: {"t": s, "rss_mb": {...}, "fds": {...}}
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def error(self, action: str, err: grpc.RpcError) -> None:
        with self.lock:
            self.messages.append(err.details() or "")
            if err.code() not in EXPECTED_ERRORS:
                self.bad_statuses.append((action, err.code().name, (err.details() or "")[:200]))

    def leaky_messages(self) -> list[str]:
        return [m for m in self.messages if LEAKY.search(m)]


class Chaos:
    def __init__(self, stack, seed: int, report: Report):
        self.stack, self.report, self.rng = stack, report, random.Random(seed)
        self.stub = stack.stub()
        self.prompts = [" ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 30))) for _ in range(8)]
        self.expected = [self._generate(p) for p in self.prompts]
        self.bad = bad_requests()
        self.lock = threading.Lock()
        self.think_s = 0.0

    def _generate(self, text: str) -> list[int]:
        return list(self.stub.Generate(greedy_request(text, 8), metadata=USER, timeout=60).completions[0].token_ids)

    # ---- actions -----------------------------------------------------------------------------------
    def bystander(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.prompts))
        got = self._generate(self.prompts[i])
        if got != self.expected[i]:
            with self.report.lock:
                self.report.wrong_outputs.append((self.prompts[i], got, self.expected[i]))

    def bad_input(self, rng: random.Random) -> None:
        try:
            self.stub.Generate(rng.choice(self.bad), metadata=USER, timeout=30)
            self.report.count("bad_input_accepted")
        except grpc.RpcError as err:
            self.report.error("bad_input", err)

    def disconnect(self, rng: random.Random) -> None:
        req = greedy_request(rng.choice(self.prompts), 200)
        req.stopping.ignore_eos = True
        call = self.stub.GenerateStream(req, metadata=USER, timeout=60)
        try:
            for _ in range(rng.randint(0, 20)):
                next(call)
        except (grpc.RpcError, StopIteration):
            pass
        call.cancel()

    def slow_reader(self, rng: random.Random) -> None:
        channel = grpc.insecure_channel(self.stack.router_address, options=[("grpc.http2.bdp_probe", 0),
                                                                           ("grpc.http2.lookahead_bytes", 1024)])
        try:
            req = greedy_request(rng.choice(self.prompts), 480)
            req.stopping.ignore_eos = True
            call = gg.GenerationStub(channel).GenerateStream(req, metadata=USER, timeout=30)
            next(call)
            time.sleep(rng.uniform(1.0, 3.0))
            call.cancel()
        finally:
            channel.close()

    ACTIONS = (("bystander", 5), ("bad_input", 3), ("disconnect", 2), ("slow_reader", 1))

    def worker(self, seed: int, end: float) -> None:
        rng = random.Random(seed)
        names, weights = zip(*self.ACTIONS)
        while time.monotonic() < end:
            if self.think_s:  # the soak's low request rate on a shared box: a pause between actions
                time.sleep(rng.uniform(0.5, 1.5) * self.think_s)
            action = rng.choices(names, weights)[0]
            try:
                getattr(self, action)(rng)
                self.report.count(action)
            except grpc.RpcError as err:  # bystanders may meet a frozen or dead node: a clean status then
                self.report.error(action, err)
                self.report.count(f"{action}_failed")

    def faults(self, end: float, nodes: list[str], kill: str | None) -> None:
        """SIGSTOP / SIGCONT random nodes for 1-3 s; kill -9 `kill` two thirds of the way through."""
        start = time.monotonic()
        killed = False
        while time.monotonic() < end - 5:
            if kill and not killed and time.monotonic() - start > (end - start) * 2 / 3:
                self.stack.kill(kill, signal.SIGKILL)
                nodes = [n for n in nodes if n != kill]
                killed = True
                self.report.count("kill")
            victim = self.rng.choice(nodes)
            self.stack.kill(victim, signal.SIGSTOP)
            self.report.count("freeze")
            try:
                time.sleep(self.rng.uniform(1.0, 3.0))
            finally:
                self.stack.kill(victim, signal.SIGCONT)
            time.sleep(self.rng.uniform(2.0, 6.0))

    def run(self, seconds: float, workers: int = 4, kill: str | None = "prefill-1") -> None:
        end = time.monotonic() + seconds
        nodes = [n for n in self.stack.processes if n.startswith(("prefill", "decode"))]
        threads = [threading.Thread(target=self.worker, args=(1000 + i, end)) for i in range(workers)]
        threads.append(threading.Thread(target=self.faults, args=(end, nodes, kill)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)

    def final_check(self) -> g.GetLoadsResponse:
        """After the chaos: bystanders all correct again, then the idle invariants' view."""
        for i, text in enumerate(self.prompts):
            got = self._generate(text)
            if got != self.expected[i]:
                self.report.wrong_outputs.append((text, got, self.expected[i]))
        return wait_idle(_AdminLoads(self.stub), timeout=30)


class _AdminLoads:
    def __init__(self, stub):
        self.stub = stub

    def GetLoads(self, request, timeout=None):
        return self.stub.GetLoads(request, metadata=ADMIN, timeout=timeout)


def idle_violations(loads: g.GetLoadsResponse) -> list[str]:
    """I1 and I2 on every node that is up."""
    out = [f"router holds {list(loads.router_request_ids)}"] if loads.router_request_ids else []
    for n in loads.nodes:
        if not n.healthy:
            continue
        if n.load.free_blocks != n.load.total_blocks:
            out.append(f"{n.node_id}: {n.load.free_blocks} of {n.load.total_blocks} blocks free")
        if n.load.request_ids:
            out.append(f"{n.node_id} holds {list(n.load.request_ids)}")
    return out


def sample_processes(stack) -> dict:
    rss, fds = {}, {}
    for name, pid in stack.processes.items():
        try:
            with open(f"/proc/{pid}/status") as f:
                rss[name] = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))
            fds[name] = len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError, StopIteration, PermissionError):
            continue
    return {"rss_mb": rss, "fds": fds}


def run_chaos(stack, seconds: float, seed: int = 0, sample_every_s: float | None = None, workers: int = 4,
              think_s: float = 0.0) -> tuple[Report, list[str]]:
    """`workers` client threads, each pausing ~`think_s` seconds between actions (0: back to back)."""
    report = Report()
    chaos = Chaos(stack, seed, report)
    chaos.think_s = think_s
    sampler_stop = threading.Event()

    def sampler():
        start = time.monotonic()
        while not sampler_stop.wait(sample_every_s):
            report.samples.append({"t": round(time.monotonic() - start, 1), **sample_processes(stack)})

    thread = threading.Thread(target=sampler, daemon=True) if sample_every_s else None
    if thread is not None:
        report.samples.append({"t": 0.0, **sample_processes(stack)})
        thread.start()
    chaos.run(seconds, workers=workers)
    sampler_stop.set()
    if thread is not None:
        report.samples.append({"t": round(seconds, 1), "after": True, **sample_processes(stack)})
    return report, idle_violations(chaos.final_check())


def sample_ranges(samples: list[dict]) -> dict:
    """Per process: [min, max] RSS (MB) and open fds over the samples."""
    out: dict = {}
    for kind in ("rss_mb", "fds"):
        seen: dict[str, list[int]] = {}
        for sample in samples:
            for name, value in sample.get(kind, {}).items():
                seen.setdefault(name, []).append(value)
        out[kind] = {name: [min(v), max(v)] for name, v in seen.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--model", required=True, help="model directory (e.g. a tiny test model) or .gguf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS / fd samples")
    p.add_argument("--workers", type=int, default=4, help="client threads")
    p.add_argument("--think", type=float, default=0.0,
                   help="mean seconds each client thread pauses between actions (a low rate on a shared box)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    ns = p.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with start_stack(ns.model, num_prefill=2, num_decode=2, extra_args=STACK_ARGS, startup_timeout=600) as stack:
        report, violations = run_chaos(stack, ns.minutes * 60, ns.seed, ns.sample_every, ns.workers, ns.think)
    summary = {"minutes": ns.minutes, "workers": ns.workers, "think_s": ns.think, "counts": report.counts, "wrong_outputs": len(report.wrong_outputs),
               "bad_statuses": report.bad_statuses[:20], "leaky_messages": report.leaky_messages()[:20],
               "idle_violations": violations, "first_sample": report.samples[:1], "last_sample": report.samples[-1:],
               "ranges": sample_ranges(report.samples), "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(summary, indent=2))
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump({**summary, "samples": report.samples}, f, indent=1)
    ok = not (report.wrong_outputs or report.bad_statuses or report.leaky_messages() or violations)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
