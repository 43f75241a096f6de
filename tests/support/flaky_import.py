"""A handler module that cannot be imported while a marker file exists: an outage
in which no pool actor can start (a broken deploy, a missing mount), for the
fault tests of issue 18. The marker's path is fixed so that actor processes find
it; the test creates and removes it.

``exit:PATH`` kills the actor the first time (no file at PATH yet, then it
creates one) and answers like any other payload afterwards: the payload itself.
"""

from __future__ import annotations

import os
import tempfile

MARKER = os.path.join(tempfile.gettempdir(), f"ray_alpcrun-broken-import-{os.getuid()}")

if os.path.exists(MARKER):
    raise ImportError(f"{__name__} cannot be imported while {MARKER} exists (a test's outage)")


def handle(payload: bytes, shared: bytes | None) -> bytes:
    command, _, arg = bytes(payload).partition(b":")
    if command == b"exit":
        try:
            fd = os.open(arg.decode(), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return bytes(payload)
        os.close(fd)
        os._exit(1)
    return bytes(payload)
