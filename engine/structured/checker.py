"""Checks output constraints in a child process, for the router: xgrammar imports torch, and the
router process loads none (issue #10). The child also keeps a grammar that takes xgrammar too long
to parse, or crashes it, away from the router: the call times out or fails, the child is replaced.

Wire (the child's stdin / stdout): one frame per request and per answer, a 4-byte big-endian
length and then the bytes. A request is a serialized `pdserve.v1.StructuredOutput`; an answer is
UTF-8 text, empty when the constraint parses, else the reason (`StructuredSpec.check`'s message).

    python -m engine.structured.checker     # the child; exits when its stdin closes
"""
from __future__ import annotations

import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time

from engine.rpc.errors import Unavailable
from engine.rpc.process import spawn_env
from engine.structured.spec import StructuredSpec, spec_from_proto, spec_to_proto

START_TIMEOUT_S = 120.0  # the first answer includes importing xgrammar (and torch) on a busy machine
CHECK_TIMEOUT_S = 10.0  # one constraint; longer is refused
CHECKERS = 2  # children (checks at once) of a GrammarCheckerPool
MAX_FRAME = 1 << 24
_LEN = struct.Struct(">I")


class CheckerError(Unavailable):
    """The checker process failed (not the constraint): UNAVAILABLE; the next call starts another."""


class GrammarChecker:
    """`check(spec)` raises ValueError for a bad constraint, like `StructuredSpec.check`, from a
    child started on first use. Thread-safe: one check at a time (the router calls it from its
    tokenizer thread)."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S):
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._answered = False  # the current child has answered once (it is past its imports)
        self._lock = threading.Lock()

    def check(self, spec: StructuredSpec) -> None:
        payload = spec_to_proto(spec).SerializeToString()
        with self._lock:
            proc = self._child()
            timeout = self.timeout_s if self._answered else self.start_timeout_s + self.timeout_s
            try:
                proc.stdin.write(_LEN.pack(len(payload)) + payload)
                proc.stdin.flush()
                answer = _read_frame(proc.stdout, time.monotonic() + timeout)
            except TimeoutError:
                self._stop()
                raise ValueError(f"structured {spec.kind} took more than {self.timeout_s:g} s to parse") from None
            except (OSError, EOFError, ValueError) as exc:
                code = self._stop()
                raise CheckerError(f"the grammar checker process failed (exit code {code}): {exc}") from None
            self._answered = True
        if answer:
            raise ValueError(answer.decode("utf-8", "replace"))

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "engine.structured.checker"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=spawn_env(),
                                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
            self._answered = False
        return self._proc

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()
        return proc.returncode


class GrammarCheckerPool:
    """Up to `size` checks at once, each in its own `GrammarChecker` child (started when first
    needed): a constraint that takes the whole timeout to parse holds one child, not every
    structured request behind it. Thread-safe; a caller waits while every child is busy."""

    def __init__(self, size: int = CHECKERS, **kwargs):
        if size < 1:
            raise ValueError(f"a checker pool needs at least one child, got {size}")
        self.size = size
        self._idle: queue.LifoQueue = queue.LifoQueue()  # the most recently used (warm) child first
        for _ in range(size):
            self._idle.put(GrammarChecker(**kwargs))

    def check(self, spec: StructuredSpec) -> None:
        checker = self._idle.get()
        try:
            checker.check(spec)
        finally:
            self._idle.put(checker)

    def close(self) -> None:
        """Ends every child (after the checks running now); a later check starts new ones."""
        checkers = [self._idle.get() for _ in range(self.size)]
        for checker in checkers:
            checker.close()
            self._idle.put(checker)


def _read_exact(stream, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(stream.fileno(), n - len(data))
        if not chunk:
            raise EOFError("the checker closed its output")
        data += chunk
    return data


def _read_frame(stream, deadline: float) -> bytes:
    (n,) = _LEN.unpack(_read_exact(stream, _LEN.size, deadline))
    if n > MAX_FRAME:
        raise ValueError(f"a frame of {n} bytes exceeds {MAX_FRAME}")
    return _read_exact(stream, n, deadline)


def _answer(payload: bytes) -> bytes:
    from protos.pdserve.v1 import generation_pb2

    try:
        spec = spec_from_proto(generation_pb2.StructuredOutput.FromString(payload))
        if spec is not None:
            spec.check()
    except ValueError as exc:
        return str(exc).encode("utf-8", "replace")
    except Exception as exc:  # a message that does not parse: say so, stay up
        return f"the structured constraint could not be read: {type(exc).__name__}".encode()
    return b""


def main() -> int:
    from engine.rpc.process import die_with_parent

    die_with_parent()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_LEN.size)
        if len(head) < _LEN.size:
            return 0  # the parent closed our input
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            return 2
        answer = _answer(stdin.read(n))
        stdout.write(_LEN.pack(len(answer)) + answer)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
