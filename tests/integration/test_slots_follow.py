"""Logical workers follow the pool (``BridgeWorker.resize``): no Ray, a local devserver."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_alpcrun.bridge.worker import BridgeWorker
from ray_alpcrun.runtime import Outcome
from tests.support.bridge_support import assert_exactly_once, async_client_for, worker_settings

pytestmark = pytest.mark.timeout(120)


class SlowEcho:
    """The compute side: echoes each payload after a short pause; records ended sessions."""

    def __init__(self, signal_after: int) -> None:
        self.ended: list[str] = []
        self.done = 0
        self.signal_after = signal_after
        self.reached = asyncio.Event()  # set once ``signal_after`` tasks are done

    async def share(self, session_id: str, level: int | None, payload: bytes) -> Any:
        return payload

    async def process(
        self, session_id: str, payloads: list[bytes], shared: Any | None
    ) -> list[Outcome]:
        await asyncio.sleep(0.01)  # ok: stands in for compute
        self.done += len(payloads)
        if self.done >= self.signal_after:
            self.reached.set()
        return [(p, None) for p in payloads]

    async def end_session(self, session_id: str) -> None:
        self.ended.append(session_id)


async def registered(worker: BridgeWorker, count: int) -> None:
    while True:  # the slots list changes as it resizes: poll it
        active = [s for s in worker.slots if not s.retired]
        if len(worker.slots) == count and all(s.registered.is_set() for s in active):
            return
        await asyncio.sleep(0.02)  # ok: polling period


async def test_slots_grow_and_retire_while_a_session_runs(devserver: Any) -> None:
    settings = worker_settings(devserver, session_linger_s=0.1)
    n = 300
    processor = SlowEcho(signal_after=n // 3)
    worker = BridgeWorker(settings, processor)
    running = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(registered(worker, 1), 30)
    worker.resize(3)
    await asyncio.wait_for(registered(worker, 3), 30)
    async with async_client_for(devserver) as client:
        session = await client.create_session(app_id="follow")
        run = asyncio.ensure_future(
            session.run([b"t%d" % i for i in range(n)], batch_size=5, timeout_s=60)
        )
        await asyncio.wait_for(processor.reached.wait(), 60)
        worker.resize(1)  # two slots drain their batches, then unregister
        results = await run
        await session.close()
    assert_exactly_once(results, n)
    assert all(r.ok for r in results)
    await asyncio.wait_for(registered(worker, 1), 30)
    assert worker.ready
    await worker.stop(drain=True)
    await asyncio.wait_for(running, 30)
