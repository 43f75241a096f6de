"""``--task-timeout`` is timed from when the actor starts the task (issue 11,
item 3): before, a call's deadline ran from when it was queued and counted a
full timeout for every task queued ahead of it, plus a 1 s slack, so a hung
task behind 20 queued ones failed after 11.5 s for a 0.5 s timeout."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.fake_backend import FakeBackend, started

pytestmark = pytest.mark.asyncio


async def test_a_hung_task_is_timed_from_its_start_not_from_its_queueing() -> None:
    backend = FakeBackend()
    d = await started(backend, task_timeout_s=0.5, num_actors=1, min_chunk=100)
    first = asyncio.ensure_future(d.run("s", [b"wait", *(b"q%d" % i for i in range(19))]))
    await backend.entered.wait()
    hung = asyncio.ensure_future(d.run("s", [b"hang"]))
    await asyncio.sleep(0.3)  # ok: the first call runs longer than one timeout
    assert not hung.done()  # queued behind it: not yet timed
    released = time.perf_counter()
    backend.release.set()
    assert await hung == [(None, "task timed out after 0.5 s")]
    waited_s = time.perf_counter() - released
    print(f"\nhung task failed {waited_s:.2f} s after it started (timeout 0.5 s)")
    # From its start: one timeout plus slack (~0.75 s), far below the old
    # queue-wide deadline (0.5 s x 20 tasks + 1 s); the bound only guards that.
    assert waited_s < 5.0
    assert all(error is None for _, error in await first)
