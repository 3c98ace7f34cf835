"""`AsyncEngine`: one thread owns an `LLMEngine`; asyncio code talks to it through commands.

    engine thread                                    event loop (gRPC servicers)
    ─────────────                                    ───────────────────────────
    loop:                                            stream = await ae.add_request(...)
      run queued commands (add, abort, export,  ◄──  (command queue + condition; a future per command)
        import, reserve, free, load)
      step() while work exists, else sleep      ──►  async for out in stream: ...
      dispatch StepOutputs to per-request queues      (loop.call_soon_threadsafe(queue.put_nowait))

An exception inside `step()` (the model forward) is fatal: every in-flight request gets a final
output with finish_reason 'error', every later command raises `Unavailable`, and `on_fatal(exc)` is
called on the event loop (the nodes flip health to NOT_SERVING and exit non-zero).

When the engine goes idle it checks its invariants: with no request, no held KV and no reservation,
free blocks must equal total blocks, else it logs `kv leak`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable

from engine.llm_engine import KVExport, LLMEngine
from engine.outputs import StepOutput
from engine.parallel.ranks import RankDied
from engine.rpc.errors import Unavailable
from engine.sampling_params import SamplingParams

logger = logging.getLogger("pdserve.engine")

_END = object()
PREFIX_REFRESH_S = 0.1  # how stale the reported prefix-cache hashes may be
MAX_REPORTED_PREFIX_HASHES = 4096  # prefix-cache blocks a node reports to the router (bounded message)
IDLE_SETTLE_S = 1.0  # idle this long before reserved blocks are compared with live reservations


class RequestStream:
    """The StepOutputs of one request, in order; iteration ends after the finished one."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finished:
            self.finished = True
        return out


def _final(request_id: str, reason: str) -> StepOutput:
    return StepOutput(request_id=request_id, index=0, new_token_ids=[], text_delta="", finished=True,
                      finish_reason=reason)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_fatal: Callable[[BaseException], Any] | None = None,
                 name: str = "engine"):
        self.engine = engine
        self.on_fatal = on_fatal
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._reserved_blocks = 0  # engine thread only: blocks handed out by reserve(), not yet imported/freed
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.steps = 0
        self.held_reservation_blocks: Callable[[], int] | None = None  # set by the decode servicer
        self.leaks = 0  # idle self-checks that found blocks nobody holds
        self._snapshot: dict = {}  # published by the engine thread after every command batch and step
        self._prefix_hashes: list[int] = []
        self._prefix_at = float("-inf")

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish()  # the engine thread is not running yet
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if getattr(self.engine, "ranks", None) is not None:  # a TP rank dying while idle fails us too
            self.engine.ranks.on_death = self._rank_died

    def _rank_died(self, why: str) -> None:
        """Rank watcher thread: goes fatal on the engine thread, also when no step is running."""
        def fail(engine: LLMEngine) -> None:
            if self.error is None:
                self._fatal(RankDied(why))
        asyncio.run_coroutine_threadsafe(self.call(fail), self._loop)

    async def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        if self._thread is None or not self._thread.is_alive():  # no step in flight: stop the TP ranks
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopped

    # ---- commands (event loop side) ------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any], undo: Callable[[LLMEngine, Any], Any] | None = None) -> Any:
        """Runs `fn(engine)` on the engine thread between two steps; returns its result.

        `undo(engine, result)` makes an allocating command cancellation-safe: when the caller is gone
        (its await cancelled or timed out) by the time `fn`'s result arrives, `undo` is queued as the
        next engine command, so nothing `fn` allocated outlives its caller."""
        if self.error is not None or self._stopped:
            raise Unavailable("the engine is not running")
        fut = self._loop.create_future()
        with self._cond:
            self._commands.append((fn, fut, undo))
            self._cond.notify()
        try:
            return await fut
        except asyncio.CancelledError:
            # cancelled after the result arrived but before this task resumed: the result is ours to undo
            # (a future cancelled before its result came is undone by _resolve instead)
            if undo is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                result = fut.result()
                self._submit(lambda engine: undo(engine, result))
            raise

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          priority: int = 0, sample_index: int = 0,
                          output_token_ids: list[int] | None = None) -> RequestStream:
        stream = RequestStream(request_id)

        def add(engine: LLMEngine):
            engine.add_request(request_id, params=params, prompt_token_ids=prompt_token_ids, priority=priority,
                               sample_index=sample_index, output_token_ids=output_token_ids)
            self._streams[request_id] = stream
        await self.call(add)
        return stream

    async def import_request(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                             params: SamplingParams, k, v, block_ids: list[int], priority: int = 0,
                             sample_index: int = 0) -> RequestStream:
        """Decode role. `block_ids` come from `reserve()`; they belong to the request from here on
        (freed with it), also when the import fails."""
        stream = RequestStream(request_id)

        def imp(engine: LLMEngine):
            self._reserved_blocks -= len(block_ids)
            try:
                engine.import_request(request_id, prompt_token_ids, first_token_id, params, k, v,
                                      priority=priority, block_ids=block_ids, sample_index=sample_index)
            except BaseException:
                # The engine frees the blocks itself when writing them fails; not when validation does.
                still_held = [b for b in block_ids if b in engine.block_manager.used]
                if len(still_held) == len(block_ids):
                    engine.free_reserved(block_ids)
                raise
            self._streams[request_id] = stream

        def undo(engine: LLMEngine, _result) -> None:  # the caller left: nobody reads this stream
            engine.abort_request(request_id)
            self._streams.pop(request_id, None)
        await self.call(imp, undo)
        return stream

    async def abort(self, request_id: str) -> bool:
        def abort(engine: LLMEngine) -> bool:
            found = engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._put(stream, _final(request_id, "abort"))
            return found or stream is not None
        if self.error is not None:
            return False
        return await self.call(abort)

    async def export_kv(self, request_id: str, from_block: int = 0) -> KVExport:
        return await self.call(lambda engine: engine.export_kv(request_id, from_block))

    async def export_computed_kv(self, request_id: str, from_block: int, min_blocks: int = 1):
        return await self.call(lambda engine: engine.export_computed_kv(request_id, from_block, min_blocks))

    async def release(self, request_id: str) -> bool:
        return await self.call(lambda engine: engine.release(request_id))

    async def reserve(self, num_tokens: int, headroom_blocks: int = 0) -> list[int] | None:
        """Blocks for `num_tokens` tokens, or None unless that many plus `headroom_blocks` are free."""
        def reserve(engine: LLMEngine):
            bm = engine.block_manager
            if not bm.can_allocate(bm.blocks_needed(num_tokens) + headroom_blocks):
                return None
            blocks = engine.reserve_blocks(num_tokens)
            if blocks is not None:
                self._reserved_blocks += len(blocks)
            return blocks

        def undo(engine: LLMEngine, blocks: list[int] | None) -> None:
            if blocks is not None:
                self._free_reserved(engine, blocks)
        return await self.call(reserve, undo)

    async def free_reserved(self, block_ids: list[int]) -> None:
        await self.call(lambda engine: self._free_reserved(engine, block_ids))

    def _free_reserved(self, engine: LLMEngine, block_ids: list[int]) -> None:
        engine.free_reserved(block_ids)
        self._reserved_blocks -= len(block_ids)

    async def load(self) -> dict:
        return await self.call(lambda engine: {**engine.load(), "request_ids": sorted(engine.request_ids())})

    @property
    def num_preemptions(self) -> int:
        """Preemptions so far (read from any thread: a plain int)."""
        return self.engine.scheduler.num_preemptions

    def take_step_tokens(self) -> list[int]:
        """Tokens computed by each engine step since the last call (any thread)."""
        return self.engine.take_step_tokens()

    def load_snapshot(self) -> dict:
        """The load as of the last command batch or step; never waits for the engine thread."""
        return self._snapshot

    # ---- engine thread ------------------------------------------------------------------------
    def _put(self, stream: RequestStream, out: StepOutput) -> None:
        self._loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _resolve(self, fut: asyncio.Future, result=None, exc: BaseException | None = None,
                 undo: Callable[[LLMEngine, Any], Any] | None = None) -> None:
        def settle():
            if fut.done():  # the caller was cancelled or timed out: it will never see `result`
                if undo is not None and exc is None:
                    self._submit(lambda engine: undo(engine, result))
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        self._loop.call_soon_threadsafe(settle)

    def _run(self) -> None:
        was_busy = False
        while True:
            with self._cond:
                settling = False
                while not self._commands and not self._stopped and not self.engine.has_unfinished_requests():
                    if was_busy:
                        was_busy, settling = False, True
                        self._idle_check()
                    if settling:  # idle for a whole settle period: no reservation is half-recorded
                        settling = self._cond.wait(IDLE_SETTLE_S)
                        if not settling:
                            self._reservation_check()
                        continue
                    self._cond.wait()
                if self._stopped:
                    break
                commands = list(self._commands)
                self._commands.clear()
            results = []
            for fn, fut, undo in commands:
                try:
                    results.append((fut, undo, fn(self.engine), None))
                except Exception as exc:
                    results.append((fut, None, None, exc))
            if commands:
                self._publish()  # before the callers see their results, so GetLoad agrees with them
            for fut, undo, result, exc in results:
                if fut is not None:
                    self._resolve(fut, result, exc, undo)
            was_busy = True
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    self._fatal(exc)
                    return
                self.steps += 1
                self._publish()
                self._dispatch(outputs)
        self._fail_commands(Unavailable("the engine stopped"))

    def _publish(self) -> None:
        """Engine thread: a fresh load dict (one reference swap; readers never see it half-built).
        The prefix-cache hashes (bounded) are refreshed at most every PREFIX_REFRESH_S while busy,
        and always once the engine goes idle (so an idle node never reports stale ones)."""
        now = time.monotonic()
        if now - self._prefix_at >= PREFIX_REFRESH_S or not self.engine.has_unfinished_requests():
            self._prefix_at = now
            self._prefix_hashes = self.engine.block_manager.recent_hashes(MAX_REPORTED_PREFIX_HASHES)
        self._snapshot = {**self.engine.load(), "request_ids": sorted(self.engine.request_ids()),
                          "prefix_hashes": self._prefix_hashes}

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            self._put(stream, out)

    def _fatal(self, exc: BaseException) -> None:
        logger.critical("engine step failed; failing %d requests", len(self._streams), exc_info=exc)
        self.error = exc
        for request_id, stream in self._streams.items():
            self._put(stream, _final(request_id, "error"))
        self._streams.clear()
        self._fail_commands(Unavailable("the engine failed"))
        if self.on_fatal is not None:
            self._loop.call_soon_threadsafe(self.on_fatal, exc)

    def _fail_commands(self, exc: BaseException) -> None:
        with self._cond:
            commands = list(self._commands)
            self._commands.clear()
        for _, fut, _undo in commands:
            if fut is not None:
                self._resolve(fut, exc=exc)

    def _submit(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Event loop: queues `fn(engine)` with nobody waiting for its result (cleanups)."""
        with self._cond:
            self._commands.append((fn, None, None))
            self._cond.notify()

    def _idle_check(self) -> None:
        try:
            self.check_invariants()
        except AssertionError as exc:
            self.leaks += 1
            logger.error("%s", exc)

    def _reservation_check(self) -> None:
        """I8: blocks handed out by reserve() and not yet imported or freed must all belong to a
        live reservation of the servicer (`held_reservation_blocks`)."""
        if self.held_reservation_blocks is None:
            return
        held = self.held_reservation_blocks()
        if held != self._reserved_blocks:
            self.leaks += 1
            logger.error("kv leak: %d blocks reserved in the engine, live reservations hold %d",
                         self._reserved_blocks, held)

    def check_invariants(self) -> None:
        """Engine thread (or a stopped engine): block accounting, and I1 when nothing is held."""
        engine = self.engine
        engine.check_invariants()
        load = engine.load()
        idle = not engine.request_ids() and self._reserved_blocks == 0 and not self._streams
        if idle and load["free_blocks"] != load["total_blocks"]:
            raise AssertionError(f"kv leak: {load['free_blocks']} free blocks of {load['total_blocks']} on an "
                                 f"idle engine")

