"""Fault injection against the local queue manager: workers that answer partly,
twice, never, or give up, and that are killed and replaced throughout; every
task must end up answered exactly once, as a result or a dead letter."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter

import grpc.aio
import pytest

from ray_alpcrun import transport
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.types import Batch, Message, SessionInfo
from tests.support.devserver_kit import (
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


class WorkerChurn:
    """Keeps ``n`` misbehaving workers alive, killing each after a random number of
    batches; optionally moves the fake clock so idle rebalancing happens too."""

    def __init__(
        self, svc: LocalServices, rng: random.Random, n: int = 3, clock: FakeClock | None = None
    ) -> None:
        self.svc, self.rng, self.n, self.clock = svc, rng, n, clock
        self.workers: list[RawWorker] = []
        self._stop = asyncio.Event()
        self._spawned = 0

    async def _spawn(self) -> RawWorker:
        holder: list[RawWorker] = []
        answer = misbehaving(self.rng, holder)
        w = RawWorker(self.svc, pod=f"w{self._spawned}", answer=answer)  # type: ignore[arg-type]
        self._spawned += 1
        holder.append(w)
        return await w.__aenter__()

    async def _run(self) -> None:
        while not self._stop.is_set():
            while len(self.workers) < self.n:
                self.workers.append(await self._spawn())
            for w in list(self.workers):
                if len(w.received) >= self.rng.randint(1, 15):
                    self.workers.remove(w)
                    await w.kill()
            if self.clock is not None:
                self.clock.advance(0.3)
            await asyncio.sleep(0.002)  # ok: the supervisor's polling period

    async def __aenter__(self) -> WorkerChurn:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await self._task
        for w in self.workers:
            await w.kill()


async def dead_letters(svc: LocalServices, channel: grpc.aio.Channel, sid: str) -> list[Message]:
    out: list[Message] = []
    stub = queue_stub(svc, channel)
    async for b in stub.ClientStreamDeadLetters(SessionInfo(id=sid), metadata=md(svc)):
        assert b.dead is True and all(m.error for m in b.messages)
        out.extend(b.messages)
    return out


async def read_everything(svc: LocalServices, client: RawClient, sids: list[str]) -> list[Batch]:
    try:
        return await asyncio.wait_for(client.read_all(), 20)
    except asyncio.TimeoutError:
        pytest.fail("stuck: " + " | ".join(snapshot(svc, sid) for sid in sids))


# CHAOS_SEEDS=80 runs a longer hunt for races.
SEEDS = range(int(os.environ.get("CHAOS_SEEDS", "3")))


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_every_task_answered_once(seed: int) -> None:
    async with LocalServices(free_config(max_deliveries=3), clock=FakeClock()) as svc:
        channel = transport.open_channel(svc.queue_address)
        try:
            s = await create_session(svc, channel, max_inflight_batches_per_worker=3)
            async with WorkerChurn(svc, random.Random(seed)), RawClient(svc) as client:
                for b in tasks(s.id, N_TASKS, per_batch=5):
                    client.send(b)
                client.half_close()
                results = [
                    m for b in await read_everything(svc, client, [s.id]) for m in b.messages
                ]
            await svc.ajoin(s.id, timeout_s=30)
            dead = await dead_letters(svc, channel, s.id)
        finally:
            await channel.close(None)
    answered = Counter(m.related_id for m in results) + Counter(m.id for m in dead)
    assert answered == Counter({f"t{i}": 1 for i in range(N_TASKS)})
    stats = svc.stats()
    assert stats["redeliveries"] > 0 and stats["dropped_results"] > 0
    assert stats["partial_results"] > 0 and stats["dead_lettered_batches"] > 0


@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_sessions_priorities_preemption(seed: int) -> None:
    clock = FakeClock()
    async with LocalServices(free_config(max_deliveries=3), clock=clock) as svc:
        channel = transport.open_channel(svc.queue_address)
        try:
            sessions = [
                await create_session(svc, channel, priority=2, preemptible=True, max_workers=2),
                await create_session(svc, channel, priority=5, max_inflight_batches_per_worker=2),
                await create_session(svc, channel, priority=9, min_workers=1),
            ]
            sids = [s.id for s in sessions]
            rng = random.Random(seed)
            async with WorkerChurn(svc, rng, n=4, clock=clock), RawClient(svc) as client:
                for i in range(0, 300, 3):  # one stream serves all three sessions
                    for sid in sids:
                        client.send(tasks(sid, 300, per_batch=3)[i // 3])
                client.half_close()
                batches = await read_everything(svc, client, sids)
            for sid in sids:
                await svc.ajoin(sid, timeout_s=30)
                results = [m for b in batches if b.session_id == sid for m in b.messages]
                dead = await dead_letters(svc, channel, sid)
                answered = Counter(m.related_id for m in results) + Counter(m.id for m in dead)
                assert answered == Counter({f"t{i}": 1 for i in range(300)}), sid
        finally:
            await channel.close(None)
    assert svc.stats()["unbinds"] > 0
