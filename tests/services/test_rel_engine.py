"""F2 (issue 14): engine commands that allocate are cancellation-safe, and the idle self-check
compares reserved blocks with the live reservations (I8)."""
from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def decode_engine(make_tiny_model):
    return LLMEngine(EngineArgs(model=str(make_tiny_model("llama")), role="decode", num_gpu_blocks=32,
                                max_model_len=256, dtype="float32", device="cpu"))


def _hold_engine_thread(ae: AsyncEngine) -> threading.Event:
    """Queues a command that blocks the engine thread until the returned event is set (a busy engine)."""
    release = threading.Event()
    asyncio.get_running_loop().create_task(ae.call(lambda engine: release.wait(10)))
    return release


@pytest.mark.timeout(60)
def test_cancelled_reserve_frees_its_blocks(decode_engine):
    async def main():
        ae = AsyncEngine(decode_engine)
        ae.start()
        try:
            total = decode_engine.block_manager.num_total_blocks
            release = _hold_engine_thread(ae)
            await asyncio.sleep(0.05)
            calls = [asyncio.ensure_future(ae.reserve(40)) for _ in range(5)]
            timed_out = asyncio.wait_for(ae.reserve(40), timeout=0.05)  # like the router's Reserve deadline
            with pytest.raises(asyncio.TimeoutError):
                await timed_out
            await asyncio.sleep(0.05)
            for call in calls:
                call.cancel()
            release.set()  # the engine now runs every reserve, after their callers left
            kept = await ae.reserve(16)  # a caller that stayed: its blocks stay reserved
            assert kept is not None
            for _ in range(100):
                free = ae.load_snapshot()["free_blocks"]
                if free == total - len(kept):
                    break
                await asyncio.sleep(0.02)
            assert free == total - len(kept)
            await ae.free_reserved(kept)
            assert (await ae.load())["free_blocks"] == total
        finally:
            await ae.stop()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_idle_check_counts_reserved_blocks_no_reservation_holds(decode_engine, caplog):
    async def main():
        ae = AsyncEngine(decode_engine)
        held: list[list[int]] = []
        ae.held_reservation_blocks = lambda: sum(len(b) for b in held)
        ae.start()
        try:
            held.append(await ae.reserve(20))  # recorded: no leak
            await asyncio.sleep(1.5)
            assert ae.leaks == 0
            lost = await ae.reserve(20)  # nobody records it: a leak
            for _ in range(100):
                if ae.leaks:
                    break
                await asyncio.sleep(0.05)
            assert ae.leaks == 1
            await ae.free_reserved(lost)
            await ae.free_reserved(held.pop())
        finally:
            await ae.stop()

    with caplog.at_level(logging.ERROR, logger="pdserve.engine"):
        asyncio.run(main())
    assert any("kv leak" in r.getMessage() for r in caplog.records)
