"""Background tasks end owned (issue 18 item 11): the direct path's receiver and
the coalescer's sends are awaited, or their exceptions retrieved, when they end
or are cancelled. No Ray cluster: a socket pair stands in for a pool actor."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import pytest

from ray_alpcrun.pool.direct import _Connection
from ray_alpcrun.pool.sockets import HEADER

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # Directly on the logger: a CLI run in this process (setup_logging) stops
    # "ray_alpcrun" records from propagating to caplog's root handler.
    logger = logging.getLogger("ray_alpcrun.logs")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


async def test_a_receiver_that_cannot_read_a_frame_logs_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its exception used to stay unretrieved, then close()'s cancel() discarded it.
    ours, actor = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with actor:
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        connection = _Connection(reader, writer)
        sending = asyncio.ensure_future(connection.send([]))
        await asyncio.sleep(0)  # ok: let the frame go out before its answer arrives
        garbage = b"not a pickle"
        with caplog.at_level(logging.ERROR, logger="ray_alpcrun.logs"):
            actor.sendall(HEADER.pack(len(garbage)) + garbage)
            with pytest.raises(ConnectionError):  # the part waiting is failed, not left
                await asyncio.wait_for(sending, 5)
            await asyncio.sleep(0)  # ok: the receiver's done callbacks run on the next turn
        connection.close()
        writer.close()
    unique = {id(r): r for r in caplog.records}  # reached by both handlers when propagating
    [record] = [r for r in unique.values() if r.getMessage() == "background task failed"]
    assert record.exc_info is not None and record.exc_info[0].__name__ == "UnpicklingError"
