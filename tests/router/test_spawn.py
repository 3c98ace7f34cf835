"""Child processes are spawned without a preexec_fn (engine.rpc.process.spawn_env): a preexec_fn
forces a real fork(), and forking a process with live gRPC objects runs gRPC's fork handlers,
whose restarted poller can crash the child before exec ("epoll_wait error: Bad file descriptor";
it failed a node start in the suite and CI). Each child arms PR_SET_PDEATHSIG itself and, given
the spawner's pid, dies at once if its parent is already gone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.rpc.process import PARENT_PID_ENV, spawn_env
from router import cli

ARM = "from engine.rpc.process import die_with_parent; die_with_parent(); import time; time.sleep(0.5)"


def test_pdserve_serve_spawns_its_children_without_a_preexec_fn(monkeypatch):
    seen = {}

    class Popen:
        def __init__(self, argv, **kwargs):
            seen.update(kwargs)
            self.stdout = iter(())

    monkeypatch.setattr(cli.subprocess, "Popen", Popen)
    cli.Child("router", ["router"]).start(echo=False, env={"X": "1"})
    assert "preexec_fn" not in seen
    assert seen["env"]["X"] == "1" and seen["env"][PARENT_PID_ENV] == str(os.getpid())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_spawner_is_already_gone_ends_itself():
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ok = subprocess.run([sys.executable, "-c", ARM], cwd=here, env=spawn_env(), timeout=60)
    assert ok.returncode == 0
    orphan = subprocess.run([sys.executable, "-c", ARM], cwd=here, timeout=60,
                            env={**spawn_env(), PARENT_PID_ENV: str(os.getpid() + 1_000_000)})
    assert orphan.returncode == -15  # SIGTERM from die_with_parent: its recorded parent is not its parent
