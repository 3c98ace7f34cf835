"""Process lifecycle shared by every pdserve server process.

- `die_with_parent()`: the child asks Linux to SIGTERM it when its parent dies (PR_SET_PDEATHSIG),
  and a watcher task polls `os.getppid()` as a portable fallback;
- `stop_signals()`: an asyncio.Event set by SIGTERM / SIGINT;
- `announce_ready(address)`: the one `READY host:port` line on stdout that spawners wait for.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


PARENT_PID_ENV = "PDSERVE_PARENT_PID"  # set by a spawner (`spawn_env`): the pid the child must outlive


def spawn_env(env: dict | None = None) -> dict:
    """The environment for a child that calls `die_with_parent()` itself. Spawners use this instead
    of a `preexec_fn`: one forces a real fork(), and a fork of a process with live gRPC objects runs
    gRPC's fork handlers, whose restarted poller can crash the child before exec on the epoll fd
    that close_fds closed ("epoll_wait error: Bad file descriptor"); without it CPython spawns with
    vfork and no handlers run."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Best effort: Linux only, a no-op elsewhere. When the spawner set PDSERVE_PARENT_PID and the
    parent is already gone (it died before this call), the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    expected = os.environ.get(PARENT_PID_ENV, "")
    if expected.isdigit() and os.getppid() != int(expected):
        os.kill(os.getpid(), sig)


def stop_signals(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Event:
    """An event set on SIGTERM or SIGINT (and when the parent process goes away)."""
    loop = loop or asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    parent = os.getppid()

    async def watch_parent():
        while not event.is_set():
            if os.getppid() != parent:
                event.set()
                return
            await asyncio.sleep(1.0)

    event.watcher = loop.create_task(watch_parent())  # keep a reference
    return event


def announce_ready(address: str) -> None:
    print(f"READY {address}", flush=True)


def hide_torch_from_transformers() -> bool:
    """Imports transformers as if torch were not installed, so it takes its torch-free paths for
    good (the router's process: it reads a config and a tokenizer, never weights). transformers
    decides once, at import, whether torch exists, and imports it from its config module when it
    does. torch stays importable, but the router parses structured-output constraints in a child
    (engine/structured/checker.py: xgrammar imports torch). A gguf file's first use then builds its sidecar in a child process
    (`engine.gguf_loader.GGUFFile.ensure_sidecar`). Returns False, changing nothing, when torch or
    transformers is already loaded."""
    if "torch" in sys.modules or "transformers" in sys.modules:
        return False
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" notice
    sys.modules["torch"] = None  # find_spec and import both report it missing
    try:
        import transformers  # noqa: F401
        from transformers.utils import is_torch_available

        is_torch_available()  # cached from here on
    finally:
        del sys.modules["torch"]
    return True
