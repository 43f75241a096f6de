"""Handlers for the fault-injection tests (imported inside Ray actors).

``chaos`` reads a command from its payload, ``b"<command>:<arg>"``:

* ``ok:X``      -> returns ``b"ok:X"``
* ``raise:X``   -> raises ``ValueError``
* ``exit:PATH`` -> the first time (no file at PATH) creates PATH and kills its
  own process with ``os._exit``; afterwards returns like ``ok``
* ``segv:PATH`` -> the same, but crashes with a segmentation fault (ctypes)
* ``hang:X``    -> sleeps for an hour, every time (only the task timeout answers it:
  a timed-out sub-batch is re-run one task per call, so a hang that happened only
  once would then succeed)
* ``big:N``     -> returns N bytes
* ``nap:MS``    -> sleeps MS milliseconds, returns ``b"ok:MS"``
* ``poison:X``  -> kills its process every time (only a per-task error can answer it)

Anything else (e.g. random bytes) raises ``ValueError("garbage payload ...")``.
"""

from __future__ import annotations

import os
import time

COMMANDS = ("ok", "raise", "exit", "segv", "hang", "big", "poison", "nap")


def _first_time(path: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _segfault() -> None:
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV


def chaos(payload: bytes, shared: bytes | None) -> bytes:
    command, sep, arg = bytes(payload).partition(b":")
    try:
        name = command.decode("ascii") if sep else ""
    except UnicodeDecodeError:
        name = ""
    if name not in COMMANDS:
        raise ValueError(f"garbage payload ({len(payload)} bytes, starts {bytes(payload[:8])!r})")
    text = arg.decode()
    if name == "raise":
        raise ValueError(f"asked to raise: {text}")
    if name == "poison":
        os._exit(3)
    if name == "exit" and _first_time(text):
        os._exit(1)
    if name == "segv" and _first_time(text):
        _segfault()
    if name == "hang":
        time.sleep(3600)  # ok: a hung handler, ended by the task timeout
    if name == "nap":
        time.sleep(int(text) / 1000)  # ok: simulated work
    if name == "big":
        return b"b" * int(text)
    return b"ok:" + arg


def hog(payload: bytes, shared: bytes | None) -> bytes:
    """``hog:MB`` allocates MB megabytes (a leak in one task); anything else echoes."""
    command, _, arg = bytes(payload).partition(b":")
    if command == b"hog":
        block = bytearray(int(arg) * 1024 * 1024)
        return bytes(len(block).to_bytes(8, "little"))
    return bytes(payload)


def tagged(payload: bytes, shared: bytes | None) -> bytes:
    """The chaos run's handler (``tests/support/chaos_cluster.py``): payloads
    ``b"<command>:<tag>/<index>[:<arg>]"``; answers name their task and the shared
    data they saw, so an answer given to another task or session, or computed
    with another level's data, is seen:

    * ``ok:T/I[:MS]``   -> sleeps MS milliseconds (default 0), returns ``b"T/I|<shared>"``
    * ``raise:T/I``     -> raises ``ValueError("asked to raise: T/I")``
    * ``hang:T/I``      -> sleeps for an hour (the task timeout answers it)
    * ``exit:T/I:PATH`` -> the first time (no file at PATH) kills its process; then like ok

    Anything else raises ``ValueError("garbage payload ...")``.
    """
    command, _, rest = bytes(payload).partition(b":")
    task, _, arg = rest.partition(b":")
    seen = bytes(shared) if shared is not None else b"-"
    if command == b"ok":
        if arg:
            time.sleep(int(arg) / 1000)  # ok: simulated work
        return task + b"|" + seen
    if command == b"raise":
        raise ValueError(f"asked to raise: {task.decode(errors='replace')}")
    if command == b"hang":
        time.sleep(3600)  # ok: a hung handler, ended by the task timeout
    if command == b"exit":
        if _first_time(arg.decode()):
            os._exit(1)
        return task + b"|" + seen
    raise ValueError(f"garbage payload ({len(payload)} bytes, starts {bytes(payload[:8])!r})")
