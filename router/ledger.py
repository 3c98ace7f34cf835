"""The request ledger: every request the router is serving, by server-assigned id.

Client request ids are opaque labels: several requests may carry the same one, and Abort by
label aborts all of them. Ending a request early (Abort, time limit) cancels its pipelines'
tasks; each pipeline then fans the abort out to the nodes that hold its state.
"""
from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field

from protos.pdserve.v1 import generation_pb2

FR = generation_pb2.FinishReason


@dataclass(eq=False)
class RequestRun:
    request_id: str
    client_request_id: str
    tasks: list[asyncio.Task] = field(default_factory=list)
    end_reason: int = FR.FINISH_REASON_UNSPECIFIED  # ABORTED / TIME_LIMIT once ended early

    def end(self, reason: int) -> bool:
        if self.end_reason:
            return False
        self.end_reason = reason
        for task in self.tasks:
            task.cancel()
        return True


class Ledger:
    def __init__(self):
        self._runs: dict[str, RequestRun] = {}
        self._prefix = os.urandom(3).hex()
        self._ids = itertools.count()

    def open(self, client_request_id: str) -> RequestRun:
        run = RequestRun(f"req-{self._prefix}-{next(self._ids)}", client_request_id)
        self._runs[run.request_id] = run
        return run

    def close(self, run: RequestRun) -> None:
        self._runs.pop(run.request_id, None)

    def abort(self, request_id: str) -> int:
        """Ends the request with this server id, or every request labelled with it."""
        run = self._runs.get(request_id)
        runs = [run] if run is not None else [r for r in self._runs.values()
                                               if request_id and r.client_request_id == request_id]
        return sum(r.end(FR.FINISH_REASON_ABORTED) for r in runs)

    def ids(self) -> list[str]:
        return sorted(self._runs)

    def __len__(self) -> int:
        return len(self._runs)
