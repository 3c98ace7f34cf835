"""The request ledger: every request the router is serving, by server-assigned id.

Client request ids are opaque labels: several requests may carry the same one, and Abort by
label aborts all of them. Server ids are unguessable (128 random bits), and every run belongs to the
scope of the key that opened it: Abort and the ids GetLoads shows stay inside the caller's scope
(router.auth.ADMIN sees every scope). Ending a request early (Abort, time limit) cancels its pipelines'
tasks; each pipeline then fans the abort out to the nodes that hold its state.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Callable

from protos.pdserve.v1 import generation_pb2
from router.auth import ADMIN

FR = generation_pb2.FinishReason


@dataclass(eq=False)
class RequestRun:
    request_id: str
    client_request_id: str
    scope: str = ""  # router.auth.Scopes.caller() of the key that opened it
    tasks: list[asyncio.Task] = field(default_factory=list)
    end_reason: int = FR.FINISH_REASON_UNSPECIFIED  # ABORTED / TIME_LIMIT once ended early
    failure: BaseException | None = None  # set by fail(): the request ends with this error
    wakeup: Callable[[], None] | None = field(default=None, repr=False)  # wakes the request's reader

    def end(self, reason: int) -> bool:
        if self.end_reason:
            return False
        self.end_reason = reason
        for task in self.tasks:
            task.cancel()
        return True

    def fail(self, exc: BaseException) -> None:
        """Ends the request with an error status (router shutdown, a reader too far behind)."""
        if self.failure is None:
            self.failure = exc
            for task in self.tasks:
                task.cancel()
            if self.wakeup is not None:
                self.wakeup()


class Ledger:
    def __init__(self):
        self._runs: dict[str, RequestRun] = {}

    def open(self, client_request_id: str, scope: str = "") -> RequestRun:
        run = RequestRun(f"req-{secrets.token_hex(16)}", client_request_id, scope)
        self._runs[run.request_id] = run
        return run

    def close(self, run: RequestRun) -> None:
        self._runs.pop(run.request_id, None)

    def abort(self, request_id: str, scope: str = "") -> int:
        """Ends the request with this server id, or every request labelled with it, in `scope`."""
        mine = [r for r in self._runs.values() if scope in (ADMIN, r.scope)]
        runs = [r for r in mine if r.request_id == request_id] or [
            r for r in mine if request_id and r.client_request_id == request_id]
        return sum(r.end(FR.FINISH_REASON_ABORTED) for r in runs)

    def ids(self, scope: str = ADMIN) -> list[str]:
        return sorted(r.request_id for r in self._runs.values() if scope in (ADMIN, r.scope))

    def runs(self) -> list[RequestRun]:
        return list(self._runs.values())

    def __len__(self) -> int:
        return len(self._runs)
