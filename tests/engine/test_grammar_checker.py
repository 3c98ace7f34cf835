"""engine/structured/checker.py: the router's output constraints parsed in a child process give the
in-process answers; a slow parse times out and a dead child is replaced."""
from __future__ import annotations

import pytest

from engine.structured.checker import GrammarChecker
from engine.structured.spec import StructuredSpec

GOOD = [StructuredSpec("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}'),
        StructuredSpec("regex", "[ab]+"), StructuredSpec("choice", choices=("yes", "no")),
        StructuredSpec("grammar", 'root ::= "a" | "b"'), StructuredSpec("json_object")]
BAD = [StructuredSpec("grammar", "root ::= nope"), StructuredSpec("json_schema", "{not json"),
       StructuredSpec("json_schema", "[1, 2]"), StructuredSpec("regex", "(")]


def _in_process(spec: StructuredSpec) -> str:
    try:
        spec.check()
    except ValueError as exc:
        return str(exc)
    return ""


@pytest.fixture(scope="module")
def checker():
    c = GrammarChecker()
    yield c
    c.close()


def test_the_child_answers_like_the_process_itself(checker):
    for spec in GOOD:
        checker.check(spec)
    for spec in BAD:
        want = _in_process(spec)
        assert want
        with pytest.raises(ValueError) as err:
            checker.check(spec)
        assert str(err.value) == want


def test_a_dead_child_is_replaced(checker):
    checker.check(GOOD[0])
    checker._proc.kill()
    checker._proc.wait()
    checker.check(GOOD[1])  # a new child
    with pytest.raises(ValueError, match="invalid structured grammar"):
        checker.check(BAD[0])


def test_a_parse_that_takes_too_long_is_refused_and_the_child_replaced():
    slow = GrammarChecker(timeout_s=0.001, start_timeout_s=0.0)  # the child cannot even start in time
    try:
        with pytest.raises(ValueError, match="took more than 0.001 s to parse"):
            slow.check(GOOD[0])
        assert slow._proc is None
    finally:
        slow.close()


def test_a_child_that_dies_mid_check_is_unavailable_not_an_internal_error(monkeypatch):
    import grpc

    from engine.structured import checker as mod

    c = GrammarChecker()
    try:
        c.check(GOOD[0])
        def dies(stream, deadline):  # the child dies before it answers (deterministic: no race with its answer)
            c._proc.kill()
            c._proc.wait()
            raise EOFError("the checker closed its output")

        monkeypatch.setattr(mod, "_read_frame", dies)
        with pytest.raises(mod.CheckerError, match="grammar checker process failed") as err:
            c.check(GOOD[1])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and c._proc is None
        monkeypatch.undo()
        c.check(GOOD[1])
    finally:
        c.close()


def test_a_pool_runs_checks_at_once_and_answers_like_one_child():
    """Two threads check through a pool of two children at once; every answer is the in-process
    one; a pool of one makes the second caller wait for the first."""
    import threading
    import time

    from engine.structured.checker import GrammarCheckerPool

    pool = GrammarCheckerPool(2)
    try:
        answers: dict[int, list] = {}

        def run(i: int) -> None:
            got = []
            for spec in GOOD + BAD:
                try:
                    pool.check(spec)
                    got.append("")
                except ValueError as exc:
                    got.append(str(exc))
            answers[i] = got
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        want = [_in_process(s) for s in GOOD + BAD]
        assert answers == {0: want, 1: want}
        assert sum(c._proc is not None for c in list(pool._idle.queue)) >= 1
    finally:
        pool.close()

    class Slow:
        def check(self, spec):
            time.sleep(0.3)

        def close(self):
            pass

    def two_checks(size: int) -> float:
        p = GrammarCheckerPool(size)
        for _ in range(size):
            p._idle.get()
        for _ in range(size):
            p._idle.put(Slow())
        done = []
        threads = [threading.Thread(target=lambda: (p.check(GOOD[0]), done.append(time.monotonic())))
                   for _ in range(2)]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert len(done) == 2
        return max(done) - t
    assert two_checks(1) >= 0.6  # one after the other
    assert two_checks(2) < 0.55  # at once
    with pytest.raises(ValueError):
        GrammarCheckerPool(0)
