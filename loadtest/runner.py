"""One run: send a workload's requests as the arrivals say, bounded by count and time.

Main requests follow the arrival process; burst requests go out at their own times on top. No
request starts after `max_duration_s`; requests still streaming `drain_s` later are cancelled and
counted as such, requests never sent are counted as `not_sent`, so every request is accounted for.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loadtest.arrivals import Arrivals, send_times
from loadtest.clients import Record
from loadtest.workload import RequestSpec


@dataclass(frozen=True)
class Limits:
    max_duration_s: float = 600.0  # no request starts later than this (s after the start)
    drain_s: float = 120.0         # then running requests get this long to finish


class Run:
    def __init__(self, client, specs: list[RequestSpec], arrivals: Arrivals, limits: Limits, seed: int,
                 on_done=None):
        self.client, self.specs, self.arrivals, self.limits, self.seed = client, specs, arrivals, limits, seed
        self.on_done = on_done or (lambda record: None)
        self.records = [Record(i, s.kind, s.prompt.num_tokens, s.max_tokens, scheduled=s.at)
                        for i, s in enumerate(specs)]
        self.tasks: list[asyncio.Task] = []
        self.cap = asyncio.Semaphore(arrivals.concurrency) if arrivals.concurrency > 0 else None

    @property
    def clock(self):
        return self.client.clock

    def open(self) -> bool:
        return self.clock.now() < self.limits.max_duration_s

    async def _send(self, i: int) -> None:
        await self.client.send(self.specs[i], self.records[i])
        self.on_done(self.records[i])

    async def _client_loop(self, queue: list[int]) -> None:
        while queue and self.open():
            await self._send(queue.pop(0))

    async def _at(self, i: int, t: float, capped: bool) -> None:
        await asyncio.sleep(max(t - self.clock.now(), 0.0))
        if t >= self.limits.max_duration_s:
            return
        if capped and self.cap is not None:
            async with self.cap:
                await self._send(i)
        else:
            await self._send(i)

    def _launch(self) -> None:
        main = [i for i, s in enumerate(self.specs) if s.kind != "burst"]
        times = send_times(self.arrivals, len(main), self.seed)
        if times is None:
            queue = list(main)
            self.tasks += [asyncio.ensure_future(self._client_loop(queue)) for _ in range(self.arrivals.concurrency)]
        else:
            for i, t in zip(main, times):
                self.records[i].scheduled = t
                self.tasks.append(asyncio.ensure_future(self._at(i, t, capped=True)))
        for i, s in enumerate(self.specs):
            if s.kind == "burst":
                self.tasks.append(asyncio.ensure_future(self._at(i, s.at, capped=False)))

    async def execute(self) -> tuple[list[Record], float]:
        """Runs to the end; returns the records and the run's duration (s)."""
        self.clock.restart()
        self._launch()
        budget = self.limits.max_duration_s + self.limits.drain_s
        _, pending = await asyncio.wait(self.tasks, timeout=budget)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = self.clock.now()
        for record in self.records:
            if record.status == "pending":
                record.status = "not_sent" if record.start is None else "cancelled"
        errors = [t.exception() for t in self.tasks if t.done() and not t.cancelled() and t.exception()]
        if errors:
            raise errors[0]
        return self.records, duration
