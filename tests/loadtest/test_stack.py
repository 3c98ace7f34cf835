"""Short load-test runs against a real tiny stack on loopback (router + prefill + decode + gateway
processes, tiny random llama): gRPC and both HTTP endpoints, every request accounted for, JSON and
PNG files written, and --compare over the results."""
from __future__ import annotations

import json

import pytest

from loadtest.cli import main
from tests.services.stack import start_stack

pytestmark = pytest.mark.timeout(600)
STARTUP_S = 500.0  # seconds; a shared, loaded 2-core box can take minutes to start four processes
KEY = "sk-test-loadtest"
RUN = ("--num-requests", "12", "--output-len", "8", "--input-len", "uniform:16-48", "--concurrency", "4",
       "--burst", "at=0.2,count=2,len=64,out=4", "--warmup", "1", "--seed", "3", "--no-progress",
       "--slo", "ttft_ms=60000", "--slo", "itl_ms=60000", "--api-key", KEY)


@pytest.fixture(scope="module")
def stack(make_tiny_model):
    with start_stack(make_tiny_model("llama"), gateway=True, extra_args=("--api-key", KEY),
                     startup_timeout=STARTUP_S) as s:
        assert s.gateway_url, "".join(s.output[-40:])
        yield s


def _result(out, label: str) -> dict:
    return json.loads((out / f"{label}.json").read_text())


def _check_run(res: dict, out, label: str, server_timings: bool) -> None:
    summary, records = res["summary"], res["records"]
    assert summary["requests"] == {"total": 14, "sent": 14, "ok": 14, "by_status": {"ok": 14}}
    assert len(records) == 14 and sorted(r["index"] for r in records) == list(range(14))
    main_records = [r for r in records if r["kind"] == "main"]
    bursts = [r for r in records if r["kind"] == "burst"]
    assert len(main_records) == 12 and len(bursts) == 2
    assert all(r["output_tokens"] == 8 and len(r["chunk_times"]) == 8 for r in main_records)
    assert all(r["output_tokens"] == 4 for r in bursts)
    assert all(r["start"] >= 0.2 for r in bursts)  # sent at their time, not before
    assert summary["main"]["itl_ms"]["count"] == 12 * 7
    assert summary["main"]["ttft_ms"]["count"] == 12 and summary["burst"]["ttft_ms"]["count"] == 2
    assert summary["goodput"]["requests"] == 14 and summary["goodput"]["fraction"] == 1.0
    assert summary["throughput"]["output_tokens_per_s"] > 0
    assert ("server_kv_transfer_bytes" in summary["main"]) == server_timings
    if server_timings:
        assert all(r["server"]["kv_transfer_bytes"] > 0 and r["server"]["decode_node"] for r in main_records)
    assert res["versions"]["python"] and res["host"]["cpus"] and res["config"]["workload"]["bursts"][0]["at"] == 0.2
    for png in (f"{label}_itl_over_time.png", f"{label}_cdf.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_grpc_run(stack, tmp_path, capsys):
    assert main(["--target", stack.router_address, "--label", "grpc", "--out", str(tmp_path), *RUN]) == 0
    _check_run(_result(tmp_path, "grpc"), tmp_path, "grpc", server_timings=True)
    printed = capsys.readouterr().out
    assert "main itl_ms" in printed and "goodput" in printed


@pytest.mark.parametrize("backend", ["completions", "chat"])
def test_http_run(stack, tmp_path, backend):
    assert main(["--backend", backend, "--target", stack.gateway_url, "--label", backend,
                 "--out", str(tmp_path), *RUN]) == 0
    res = _result(tmp_path, backend)
    _check_run(res, tmp_path, backend, server_timings=False)
    assert all(r["prompt_tokens"] > 0 for r in res["records"])  # from the usage chunk


def test_wrong_key_counts_errors_by_status(stack, tmp_path):
    argv = ["--target", stack.router_address, "--out", str(tmp_path), "--label", "badkey", "--num-requests", "3",
            "--output-len", "4", "--warmup", "0", "--no-progress", "--no-plots", "--api-key", "wrong"]
    assert main(argv) == 1
    assert _result(tmp_path, "badkey")["summary"]["requests"]["by_status"] == {"UNAUTHENTICATED": 3}
    http = ["--backend", "completions", "--target", stack.gateway_url, *argv[2:]]
    http[http.index("badkey")] = "badkey_http"
    assert main(http) == 1
    assert _result(tmp_path, "badkey_http")["summary"]["requests"]["by_status"] == {"401": 3}


def test_compare(stack, tmp_path, capsys):
    runs = []
    for label, extra in (("a", ()), ("b", ("--concurrency", "2"))):
        assert main(["--target", stack.router_address, "--label", label, "--out", str(tmp_path), "--no-plots",
                     *RUN, *extra]) == 0
        runs.append(str(tmp_path / f"{label}.json"))
    capsys.readouterr()
    assert main(["--compare", *runs, "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "chat ITL p99 ms" in table and "burst TTFT p50 ms" in table and "14/14" in table
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_open_loop(stack, tmp_path):
    """--sweep: one Poisson run per rate, each request sent at its seeded time, and the sweep plot."""
    assert main(["--target", stack.router_address, "--label", "sw", "--out", str(tmp_path), "--sweep", "20,40",
                 "--num-requests", "6", "--output-len", "4", "--input-len", "16", "--warmup", "0",
                 "--no-progress", "--api-key", KEY]) == 0
    runs = [_result(tmp_path, f"sw_rate{r}") for r in (20, 40)]
    for res, rate in zip(runs, (20, 40)):
        assert res["config"]["arrivals"] == {"kind": "poisson", "concurrency": 8, "rate": rate}
        records = res["records"]
        assert res["summary"]["requests"]["ok"] == 6 and records[0]["scheduled"] == 0.0
        assert all(r["start"] >= r["scheduled"] - 1e-3 for r in records)
    assert [r["scheduled"] for r in runs[0]["records"]] != [r["scheduled"] for r in runs[1]["records"]]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
