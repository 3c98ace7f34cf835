"""`python -m loadtest` (also `pdserve bench`): drive a server with a workload, report the figures.

    python -m loadtest --target 127.0.0.1:50051 --concurrency 32 --input-len 128 --output-len 1024 \\
        --burst at=2,count=8,len=7000 --slo ttft_ms=1000 --slo itl_ms=50
    python -m loadtest --backend chat --target http://127.0.0.1:8000 --rate 4 --num-requests 200
    python -m loadtest --serve "--num-prefill 0" --serve "--num-prefill 1" ...   # start, run, stop each
    python -m loadtest --compare a.json b.json                                    # side by side
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import re
import sys

from loadtest import plots, report
from loadtest import workload as wl
from loadtest.arrivals import Arrivals, parse_rates
from loadtest.clients import Clock, TargetConfig, make_client
from loadtest.metrics import SLO, summarize
from loadtest.runner import Limits, Run
from loadtest.serve import ServedStack


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--backend", default="grpc", choices=["grpc", "completions", "chat"],
                   help="pdserve gRPC GenerateStream, or OpenAI-compatible /v1/completions or /v1/chat/completions")
    t.add_argument("--target", help="host:port (grpc) or base URL, e.g. http://127.0.0.1:8000 (http)")
    t.add_argument("--model", default="", help="model name to send (default: the served model)")
    t.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"), help="sent as 'Bearer <key>'")
    t.add_argument("--tls", action="store_true", help="grpc over TLS with the system's CA roots")
    t.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (grpc or https)")
    t.add_argument("--tls-server-name", help="grpc: the name the server's certificate must carry")
    t.add_argument("--insecure-skip-verify", action="store_true", help="https: do not verify the certificate")
    t.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (also the deadline)")
    t.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request")
    t.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests end at eos (default: ignore_eos so each produces its output length)")
    s = p.add_argument_group("stacks")
    s.add_argument("--serve", action="append", default=[], metavar="ARGS",
                   help="start `pdserve serve ARGS`, run, stop it; repeat to compare configurations")
    s.add_argument("--label", action="append", default=[], help="a name per --serve (or for --target)")
    s.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a --serve stack to be ready")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="random", choices=list(wl.GENERATORS))
    w.add_argument("--input-len", default="fixed:128", help="fixed:N | uniform:LO-HI | normal:MEAN,STD | "
                   "lognormal:MEDIAN,SIGMA (prompt tokens; shared-prefix: the suffix)")
    w.add_argument("--input-min", type=int, help="clamp prompt lengths (sharegpt: skip prompts outside)")
    w.add_argument("--input-max", type=int)
    w.add_argument("--output-len", default="fixed:128", help="the same forms, for max output tokens")
    w.add_argument("--output-min", type=int)
    w.add_argument("--output-max", type=int)
    w.add_argument("--prompt-format", choices=["ids", "text"], help="random token ids or words "
                   "(default: text for --backend chat, ids otherwise)")
    w.add_argument("--vocab-size", type=int, help="random ids < this (default: the model's over grpc, else 32000)")
    w.add_argument("--low-id", type=int, default=1000, help="random ids >= this (skips special tokens)")
    w.add_argument("--dataset", help="sharegpt: path to a ShareGPT-format JSON file")
    w.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: number of system prompts")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per system prompt")
    w.add_argument("--burst", action="append", default=[], metavar="at=S,count=K,len=L[,out=N]",
                   help="K prompts of L tokens sent S seconds into the run (repeatable)")
    w.add_argument("--with-and-without-bursts", action="store_true",
                   help="run each configuration twice: without the bursts, then with them")
    a = p.add_argument_group("arrivals and bounds")
    a.add_argument("--concurrency", type=int, default=8,
                   help="closed loop: concurrent clients; with --rate: most requests in flight (0 = no cap)")
    a.add_argument("--rate", type=float, help="open loop: requests per second (see --arrival)")
    a.add_argument("--arrival", default="poisson", choices=["poisson", "constant"], help="open-loop process")
    a.add_argument("--sweep", help="open loop over these rates, one run each: e.g. 1,2,4,8")
    a.add_argument("--num-requests", type=int, default=100, help="main requests per run (bursts come on top)")
    a.add_argument("--max-duration", type=float, default=600.0, help="no request starts after this many seconds")
    a.add_argument("--drain", type=float, default=120.0, help="seconds running requests get after --max-duration")
    a.add_argument("--warmup", type=int, default=2, help="short requests sent first, excluded from the figures")
    a.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrival times")
    o = p.add_argument_group("figures and output")
    o.add_argument("--slo", action="append", default=[], metavar="NAME=MS",
                   help="goodput objective: ttft_ms, tpot_ms, itl_ms (worst gap) or e2e_ms; repeatable")
    o.add_argument("--bin-s", type=float, help="width of the gaps-over-time bins (default: duration / 60)")
    o.add_argument("--out", help="directory for JSON, PNG and stack logs (default: loadtest-results/<time>)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    o.add_argument("--compare", nargs="+", metavar="JSON", help="print and plot these results side by side")
    return p


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"


@dataclasses.dataclass(frozen=True)
class Scenario:
    label: str
    workload: wl.WorkloadConfig
    arrivals: Arrivals


def workload_config(ns, vocab_size: int, bursts: tuple) -> wl.WorkloadConfig:
    text = (ns.prompt_format or ("text" if ns.backend == "chat" else "ids")) == "text"
    return wl.WorkloadConfig(
        kind=ns.workload, input_len=wl.LengthDist.parse(ns.input_len, ns.input_min, ns.input_max),
        output_len=wl.LengthDist.parse(ns.output_len, ns.output_min, ns.output_max), vocab_size=vocab_size,
        low_id=min(ns.low_id, vocab_size // 4), text=text, dataset=ns.dataset, num_prefixes=ns.num_prefixes,
        prefix_len=ns.prefix_len, bursts=bursts, seed=ns.seed)


def scenarios(ns, label: str, vocab_size: int) -> list[Scenario]:
    bursts = tuple(wl.Burst.parse(b) for b in ns.burst)
    variants = [("noburst", ()), ("burst", bursts)] if ns.with_and_without_bursts and bursts else [("", bursts)]
    if ns.sweep:
        rates = [(f"rate{r:g}", Arrivals(ns.arrival, ns.concurrency, r)) for r in parse_rates(ns.sweep)]
    elif ns.rate is not None:
        rates = [("", Arrivals(ns.arrival, ns.concurrency, ns.rate))]
    else:
        rates = [("", Arrivals("concurrency", ns.concurrency))]
    out = []
    for vname, vbursts in variants:
        for rname, arrivals in rates:
            name = "/".join(x for x in (label, vname, rname) if x)
            out.append(Scenario(name, workload_config(ns, vocab_size, vbursts), arrivals))
    return out


def target_config(ns, address: str) -> TargetConfig:
    return TargetConfig(backend=ns.backend, address=address, model=ns.model, api_key=ns.api_key, tls=ns.tls,
                        tls_ca=ns.tls_ca, tls_server_name=ns.tls_server_name,
                        insecure_skip_verify=ns.insecure_skip_verify, temperature=ns.temperature,
                        ignore_eos=ns.ignore_eos, timeout_s=ns.request_timeout)


def _config(ns, target: TargetConfig, scenario: Scenario, serve_args: str | None) -> dict:
    return {"target": {k: v for k, v in dataclasses.asdict(target).items() if k != "api_key"},
            "workload": dataclasses.asdict(scenario.workload), "arrivals": dataclasses.asdict(scenario.arrivals),
            "limits": {"max_duration_s": ns.max_duration, "drain_s": ns.drain}, "num_requests": ns.num_requests,
            "warmup": ns.warmup, "seed": ns.seed, "serve": serve_args}


def _progress(total: int, label: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", disable=disable, file=sys.stderr, leave=False)


async def _one(ns, client, target: TargetConfig, scenario: Scenario, server: dict, serve_args) -> dict:
    limits = Limits(ns.max_duration, ns.drain)
    if ns.warmup:
        warm = wl.warmup(scenario.workload, ns.warmup)
        await Run(client, warm, Arrivals("concurrency", min(ns.warmup, max(ns.concurrency, 1))), limits,
                  ns.seed).execute()
    specs = wl.build(scenario.workload, ns.num_requests)
    bar = _progress(len(specs), scenario.label, ns.no_progress)
    try:
        records, duration = await Run(client, specs, scenario.arrivals, limits, ns.seed,
                                      on_done=lambda r: bar.update(1)).execute()
    finally:
        bar.close()
    summary = summarize(records, duration, SLO.parse(ns.slo), ns.bin_s)
    return report.result(scenario.label, _config(ns, target, scenario, serve_args), server, summary, records)


async def _server_info(client) -> dict:
    try:
        return await client.server_info()
    except Exception as exc:  # a server that answers generation but not its info RPCs is still measurable
        return {"error": f"{type(exc).__name__}: {exc}"}


async def run_target(ns, address: str, label: str, serve_args: str | None) -> list[dict]:
    target = target_config(ns, address)
    bursts = sum(wl.Burst.parse(b).count for b in ns.burst)
    concurrency = max(ns.concurrency, 1) + bursts + 4 if ns.concurrency else 1024
    client = make_client(target, Clock(), max_connections=concurrency)
    try:
        server = await _server_info(client)
        vocab = ns.vocab_size or server.get("vocab_size") or 32000
        results = []
        for scenario in scenarios(ns, label, vocab):
            res = await _one(ns, client, target, scenario, server, serve_args)
            _emit(ns, res)
            results.append(res)
        return results
    finally:
        await client.close()


def _emit(ns, res: dict) -> None:
    stem = slug(res["label"])
    report.write_json(os.path.join(ns.out, f"{stem}.json"), res)
    print(report.table(res["label"], res["summary"]), flush=True)
    if not ns.no_plots:
        plots.run_plots(res, ns.out, stem)


def _targets(ns):
    """(address or None, label, serve args or None) per configuration."""
    if ns.serve:
        labels = ns.label + [slug(a) for a in ns.serve[len(ns.label):]]
        return [(None, label, args) for label, args in zip(labels, ns.serve)]
    if not ns.target:
        raise ValueError("give --target ADDRESS, --serve ARGS or --compare FILES")
    return [(ns.target, (ns.label or ["target"])[0], None)]


def _address(ns, stack: ServedStack) -> str:
    if ns.backend == "grpc":
        return stack.grpc_address
    if stack.http_url is None:
        raise RuntimeError("the --serve stack has no HTTP gateway (drop --no-gateway for an HTTP backend)")
    return stack.http_url


def measure(ns) -> list[dict]:
    results = []
    for address, label, serve_args in _targets(ns):
        if serve_args is None:
            results += asyncio.run(run_target(ns, address, label, None))
            continue
        print(f"starting pdserve serve {serve_args}", flush=True)
        with ServedStack(serve_args, os.path.join(ns.out, f"{slug(label)}_serve.log"), ns.startup_timeout) as stack:
            results += asyncio.run(run_target(ns, _address(ns, stack), label, serve_args))
    return results


def summarize_all(ns, results: list[dict]) -> None:
    if len(results) > 1:
        print("\n== side by side\n" + report.compare(results), flush=True)
        if not ns.no_plots:
            plots.compare(results, os.path.join(ns.out, "compare.png"))
    if ns.sweep and not ns.no_plots:
        plots.sweep(results, os.path.join(ns.out, "sweep.png"))


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    ns.out = ns.out or os.path.join("loadtest-results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(ns.out, exist_ok=True)
    try:
        if ns.compare:
            results = [report.load_json(path) for path in ns.compare]
        else:
            results = measure(ns)
        summarize_all(ns, results)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print(f"results in {ns.out}", flush=True)
    failed = [r["label"] for r in results if r["summary"]["requests"]["ok"] < r["summary"]["requests"]["sent"]]
    return 1 if failed and not ns.compare else 0
