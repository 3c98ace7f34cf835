"""`--serve "ARGS"`: start `pdserve serve ARGS`, wait for its READY line, hand out its addresses,
stop it afterwards (SIGTERM, then SIGKILL after a grace period).

The router's and the gateway's ports are free loopback ports unless ARGS names them. Everything the
stack prints goes to a log file next to the results.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading

STOP_GRACE_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(args: str) -> list[str]:
    argv = shlex.split(args)
    if "--port" not in argv:
        argv += ["--port", str(_free_port())]
    if "--no-gateway" not in argv and "--gateway-port" not in argv:
        argv += ["--gateway-port", str(_free_port())]
    return [sys.executable, "-m", "router.cli", "serve", *argv]


class ServedStack:
    def __init__(self, args: str, log_path: str, startup_timeout_s: float = 900.0):
        self.argv, self.log_path, self.startup_timeout_s = serve_argv(args), log_path, startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.grpc_address: str | None = None
        self.http_url: str | None = None
        self.tail: list[str] = []
        self._ready = threading.Event()

    def __enter__(self) -> ServedStack:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env=env)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(self.startup_timeout_s) or self.grpc_address is None:
            self.stop()
            raise RuntimeError(f"`pdserve serve` did not become ready within {self.startup_timeout_s:g} s "
                               f"(exit code {self.proc.returncode}); its last lines:\n" + "".join(self.tail[-30:]))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _pump(self) -> None:
        with open(self.log_path, "a") as log:
            log.write("$ " + shlex.join(self.argv) + "\n")
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.tail = (self.tail + [line])[-200:]
                parts = line.split()
                if len(parts) == 4 and parts[0] == "gateway" and parts[2] == "pid":
                    self.http_url = f"http://{parts[1]}"
                elif line.startswith("READY "):
                    self.grpc_address = parts[1]
                    self._ready.set()
        self._ready.set()  # EOF: the stack exited

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
