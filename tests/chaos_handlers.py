"""Handlers for the fault-injection tests (imported inside Ray actors).

``chaos`` reads a command from its payload, ``b"<command>:<arg>"``:

* ``ok:X``      -> returns ``b"ok:X"``
* ``raise:X``   -> raises ``ValueError``
* ``exit:PATH`` -> the first time (no file at PATH) creates PATH and kills its
  own process with ``os._exit``; afterwards returns like ``ok``
* ``segv:PATH`` -> the same, but crashes with a segmentation fault (ctypes)
* ``hang:PATH`` -> the first time creates PATH and sleeps for an hour; afterwards ok
* ``big:N``     -> returns N bytes
* ``poison:X``  -> kills its process every time (only a per-task error can answer it)

Anything else (e.g. random bytes) raises ``ValueError("garbage payload ...")``.
"""

from __future__ import annotations

import os
import time

COMMANDS = ("ok", "raise", "exit", "segv", "hang", "big", "poison")


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
    if name == "hang" and _first_time(text):
        time.sleep(3600)  # ok: a hung handler, ended by the task timeout
    if name == "big":
        return b"b" * int(text)
    return b"ok:" + arg
