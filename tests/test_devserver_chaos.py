"""Fault injection against the local queue manager: workers that answer partly,
twice, never, or give up, and that are killed and replaced throughout; every
task must end up answered exactly once, as a result or a dead letter."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter

import pytest

from ray_alpcrun import transport
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.types import Batch, Message, Session
from tests.devserver_kit import (
    FakeClock,
    RawClient,
    RawWorker,
    create_session,
    echo,
    free_config,
    md,
    queue_stub,
    snapshot,
    tasks,
)

N_TASKS = 1000


def misbehaving(rng: random.Random, worker: list[RawWorker]) -> object:
    async def answer(batch: Batch) -> Batch | None:
        roll = rng.random()
        result = await echo(batch)
        if roll < 0.08:
            return None  # hold: answered only by a redelivery after this worker dies
        if roll < 0.14:
            result.messages = result.messages[1:]  # partial: the rest is re-queued
        elif roll < 0.20:
            worker[0].send(await echo(batch))  # a duplicate behind the real answer
        elif roll < 0.23:
            result.dead = True
            result.messages = [Message(id=batch.messages[0].id, error="gave up")]
        return result

    return answer


# CHAOS_SEEDS=80 runs a longer hunt for races.
@pytest.mark.parametrize("seed", range(int(os.environ.get("CHAOS_SEEDS", "3"))))
async def test_chaos_every_task_answered_once(seed: int) -> None:
    rng = random.Random(seed)
    async with LocalServices(free_config(max_deliveries=3), clock=FakeClock()) as svc:
        channel = transport.open_channel(svc.queue_address)
        s = await create_session(svc, channel, max_inflight_batches_per_worker=3)
        workers: list[RawWorker] = []
        stop = asyncio.Event()

        async def spawn(i: int) -> RawWorker:
            holder: list[RawWorker] = []
            w = RawWorker(svc, pod=f"w{i}", answer=misbehaving(rng, holder))  # type: ignore[arg-type]
            holder.append(w)
            return await w.__aenter__()

        async def supervise() -> None:
            spawned = 0
            while not stop.is_set():
                while len(workers) < 3:
                    workers.append(await spawn(spawned))
                    spawned += 1
                for w in list(workers):
                    if len(w.received) >= rng.randint(1, 15):
                        workers.remove(w)
                        await w.kill()
                await asyncio.sleep(0.002)  # ok: the supervisor's polling period

        supervisor = asyncio.create_task(supervise())
        try:
            async with RawClient(svc) as client:
                for b in tasks(s.id, N_TASKS, per_batch=5):
                    client.send(b)
                client.half_close()
                try:
                    batches = await asyncio.wait_for(client.read_all(), 20)
                except asyncio.TimeoutError:
                    pytest.fail(f"stuck: {snapshot(svc, s.id)}")
                results = [m for b in batches for m in b.messages]
            await svc.ajoin(s.id, timeout_s=30)
            stub = queue_stub(svc, channel)
            dead: list[Message] = []
            async for b in stub.ClientStreamDeadLetters(Session(id=s.id), metadata=md(svc)):
                assert b.dead is True
                dead.extend(b.messages)
        finally:
            stop.set()
            await supervisor
            for w in workers:
                await w.kill()
            await channel.close(None)
        answered = Counter(m.related_id for m in results) + Counter(m.id for m in dead)
        assert answered == Counter({f"t{i}": 1 for i in range(N_TASKS)})
        assert all(m.error for m in dead)
        stats = svc.stats()
        assert stats["redeliveries"] > 0 and stats["dropped_results"] > 0
        assert stats["partial_results"] > 0 and stats["dead_lettered_batches"] > 0
