"""A batch whose stream ended while it ran, delivered to the same bridge again:
answered from the computation kept there (``bridge.answerbook``), not run twice.
No Ray, a local devserver."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from ray_alpcrun.bridge.worker import BridgeWorker
from ray_alpcrun.runtime import Outcome
from tests.support.bridge_support import assert_exactly_once, async_client_for, worker_settings

pytestmark = pytest.mark.timeout(120)


class HeldEcho:
    """Echoes; the first batch waits until ``release`` is set. Counts runs per payload."""

    def __init__(self) -> None:
        self.runs: Counter[bytes] = Counter()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def share(self, session_id: str, level: int | None, payload: bytes) -> Any:
        return payload

    async def process(
        self, session_id: str, payloads: list[bytes], shared: Any | None
    ) -> list[Outcome]:
        self.runs.update(payloads)
        self.started.set()
        await self.release.wait()
        return [(p, None) for p in payloads]

    async def end_session(self, session_id: str) -> None:
        return None


async def test_a_batch_delivered_again_after_its_stream_broke_is_not_run_again(
    devserver: Any,
) -> None:
    # Issue 23's outside chaos run: most re-queued batches came from link cuts; each
    # ran again from the start on its next delivery, which the next fault could cost
    # too, and the third was dead-lettered.
    settings = worker_settings(devserver, session_linger_s=5.0, backoff_initial_s=0.05)
    processor = HeldEcho()
    worker = BridgeWorker(settings, processor)
    running = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(worker.first_registered.wait(), 30)
    n = 4
    async with async_client_for(devserver) as client:
        session = await client.create_session(app_id="kept")
        run = asyncio.ensure_future(
            session.run([b"t%d" % i for i in range(n)], batch_size=n, timeout_s=60)
        )
        await asyncio.wait_for(processor.started.wait(), 30)
        assert await asyncio.to_thread(devserver.abort, "stream") == 1
        for _ in range(500):
            if (await asyncio.to_thread(devserver.stats))["redeliveries"]:
                break
            await asyncio.sleep(0.02)  # ok: polls for the batch to be delivered again
        processor.release.set()
        results = await asyncio.wait_for(run, 60)
        await session.close()
    assert_exactly_once(results, n)
    assert all(r.ok for r in results)
    assert devserver.stats()["redeliveries"] == 1
    assert set(processor.runs.values()) == {1}, processor.runs  # each task ran once
    assert worker.stats.batches_answered_again == 1
    assert len(worker.link.answers) == 0  # answered: nothing kept
    await worker.stop(drain=True)
    await asyncio.wait_for(running, 30)
