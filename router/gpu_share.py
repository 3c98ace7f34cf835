"""`pdserve serve --gpu-share mps --prefill-sm-percent P`: prefill and decode nodes on one GPU at
once, each on its own share of the SMs, through NVIDIA MPS.

Uses the MPS control daemon that already runs (the one CUDA_MPS_PIPE_DIRECTORY names, or the
default one); otherwise starts one with `nvidia-cuda-mps-control -d` in a private pipe and log
directory and quits it (`quit` on its control pipe) when the stack stops. Prefill nodes get
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=P, decode nodes 100-P. The GPU's own settings (compute mode,
clocks, MIG) are never touched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

MPS_CONTROL = "nvidia-cuda-mps-control"
CONTROL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 15.0


class NoShare:
    """Time-slicing, the default: nothing to start, nothing to add to the nodes' environment."""

    def start(self) -> None:
        pass

    def env_for(self, role: str) -> dict[str, str]:
        return {}

    def stop(self) -> None:
        pass


class MpsShare:
    def __init__(self, prefill_percent: int):
        if not 1 <= prefill_percent <= 99:
            raise ValueError(f"--prefill-sm-percent must be in [1, 99], got {prefill_percent}")
        self.prefill_percent = prefill_percent
        self.exe: str | None = None
        self.dirs: dict[str, str] = {}  # CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY of the daemon
        self.private: str | None = None  # the directory of the daemon we started (None: one that ran already)

    def start(self) -> None:
        self.exe = shutil.which(MPS_CONTROL)
        if self.exe is None:
            raise RuntimeError(f"--gpu-share mps needs NVIDIA MPS, but {MPS_CONTROL} is not on PATH (it comes with "
                               "the NVIDIA driver on Linux); use --gpu-share none to time-slice the GPU")
        self.dirs = {k: os.environ[k] for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY") if k in os.environ}
        if self._alive():
            return
        self.private = tempfile.mkdtemp(prefix="pdserve-mps-")
        self.dirs = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(self.private, "pipe"),
                     "CUDA_MPS_LOG_DIRECTORY": os.path.join(self.private, "log")}
        for path in self.dirs.values():
            os.mkdir(path, 0o700)
        reply = subprocess.run([self.exe, "-d"], env=self._env(), capture_output=True, text=True,
                               timeout=CONTROL_TIMEOUT_S)
        if reply.returncode == 0 and self._wait_alive():
            return
        details = (reply.stderr or reply.stdout).strip() or self._log_tail()
        self._remove_private()
        raise RuntimeError(f"could not start the MPS control daemon ({MPS_CONTROL} -d, exit code "
                           f"{reply.returncode}; it must run as root or as the GPU's owner): {details}")

    def env_for(self, role: str) -> dict[str, str]:
        if role not in ("prefill", "decode"):
            return {}
        percent = self.prefill_percent if role == "prefill" else 100 - self.prefill_percent
        return {**self.dirs, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percent)}

    def stop(self) -> None:
        """Quits the daemon we started (and its server), then removes its directory."""
        if self.private is None:
            return
        try:
            self._control("quit")
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._remove_private()

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.dirs}

    def _control(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe], input=command + "\n", env=self._env(), capture_output=True, text=True,
                              timeout=CONTROL_TIMEOUT_S)

    def _alive(self) -> bool:
        try:
            return self._control("get_server_list").returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _wait_alive(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._alive():
                return True
            time.sleep(0.2)
        return False

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dirs["CUDA_MPS_LOG_DIRECTORY"], "control.log")) as f:
                return f.read()[-500:].strip()
        except OSError:
            return "no output"

    def _remove_private(self) -> None:
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)
            self.private = None


def gpu_share(ns) -> NoShare | MpsShare:
    """The GPU sharing of `pdserve serve` from its flags."""
    if ns.gpu_share == "none":
        return NoShare()
    if ns.num_prefill == 0:
        raise ValueError("--gpu-share mps splits the GPU between prefill and decode nodes; with --num-prefill 0 "
                         "there is nothing to split")
    return MpsShare(ns.prefill_sm_percent)
