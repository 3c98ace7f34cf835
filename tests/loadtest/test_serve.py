"""`pdserve serve --gpu-share mps` (with a stand-in for nvidia-cuda-mps-control, since CI has no GPU)
and `pdserve bench --serve ...`: start a stack, run, stop it."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from router.gpu_share import MpsShare
from tests.services.stack import REPO, SMALL_ENGINE_ARGS

pytestmark = pytest.mark.timeout(300)

# Records each call (argv, the MPS directories it was given, the command on stdin); "-d" starts a
# pretend daemon in the pipe directory, commands fail unless one runs there, "quit" stops it.
FAKE_MPS = """#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "start pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$FAKE_MPS_LOG"
  touch "$CUDA_MPS_PIPE_DIRECTORY/daemon"; exit 0
fi
read cmd
echo "$cmd pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_LOG"
[ -e "$CUDA_MPS_PIPE_DIRECTORY/daemon" ] || exit 1
[ "$cmd" = quit ] && rm "$CUDA_MPS_PIPE_DIRECTORY/daemon"
exit 0
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-cuda-mps-control"
    exe.write_text(FAKE_MPS)
    exe.chmod(0o755)
    log = tmp_path / "mps.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    return log


def _calls(log: pathlib.Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_mps_daemon_private_dirs_and_shares(fake_mps):
    share = MpsShare(30)
    share.start()
    pipe, logdir = share.dirs["CUDA_MPS_PIPE_DIRECTORY"], share.dirs["CUDA_MPS_LOG_DIRECTORY"]
    private = share.private
    assert os.path.isdir(pipe) and os.path.isdir(logdir) and pipe.startswith(private)
    assert oct(os.stat(pipe).st_mode & 0o777) == "0o700"
    assert share.env_for("prefill") == {**share.dirs, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert share.env_for("decode")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    assert share.env_for("router") == {} and share.env_for("gateway") == {}
    share.stop()
    calls = _calls(fake_mps)
    assert calls[0] == "get_server_list pipe="  # looked for a running daemon in the default place first
    assert calls[1] == f"start pipe={pipe} log={logdir}"
    assert calls[-1] == f"quit pipe={pipe}" and not os.path.exists(private)


def test_mps_uses_a_running_daemon_and_leaves_it(fake_mps, tmp_path, monkeypatch):
    pipe = tmp_path / "running"
    pipe.mkdir()
    (pipe / "daemon").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
    share = MpsShare(40)
    share.start()
    assert share.private is None and share.env_for("prefill")["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
    share.stop()
    assert _calls(fake_mps) == [f"get_server_list pipe={pipe}"] and (pipe / "daemon").exists()
    with pytest.raises(ValueError, match="prefill-sm-percent"):
        MpsShare(100)


def _serve(*args, env=None):
    return subprocess.run([sys.executable, "-m", "router.cli", "serve", "--no-gateway", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def test_mps_refused_clearly(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no nvidia-cuda-mps-control here
    reply = _serve("--gpu-share", "mps", "--prefill-sm-percent", "30", env=env)
    assert reply.returncode == 1
    assert "nvidia-cuda-mps-control is not on PATH" in reply.stderr and "Traceback" not in reply.stderr
    reply = _serve("--gpu-share", "mps", "--num-prefill", "0", env=env)
    assert reply.returncode != 0 and "nothing to split" in reply.stderr and "Traceback" not in reply.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_serve_starts_runs_and_stops(make_tiny_model, fake_mps, tmp_path):
    """`pdserve bench --serve ARGS`: the stack starts (MPS daemon first), the run completes, the stack
    and its daemon are gone afterwards."""
    args = " ".join(["--model", str(make_tiny_model("llama")), "--no-gateway", "--grace-period", "3",
                     "--gpu-share", "mps", "--prefill-sm-percent", "30", *SMALL_ENGINE_ARGS])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    reply = subprocess.run([sys.executable, "-m", "router.cli", "bench", "--serve", args, "--label", "mps",
                            "--num-requests", "6", "--output-len", "6", "--input-len", "24", "--concurrency", "3",
                            "--warmup", "0", "--no-progress", "--out", str(tmp_path / "out")],
                           cwd=REPO, capture_output=True, text=True, timeout=540, env=env)
    assert reply.returncode == 0, reply.stdout[-2000:] + reply.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "mps.json").read_text())
    assert res["summary"]["requests"]["ok"] == 6 and res["config"]["serve"] == args
    assert all(r["output_tokens"] == 6 for r in res["records"])
    log = (tmp_path / "out" / "mps_serve.log").read_text()
    assert "READY " in log
    calls = _calls(fake_mps)
    start = next(c for c in calls if c.startswith("start "))
    pipe = start.split()[1].removeprefix("pipe=")
    assert calls[-1] == f"quit pipe={pipe}" and not os.path.exists(pipe)
