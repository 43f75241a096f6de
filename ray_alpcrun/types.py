"""The project's own message types: what every module but ``wire`` works with.

They mirror the wire contract (ALPCRUN_PROTOCOL.md section 5.3) field by field;
``None`` stands for an unset ``optional`` field. Durations are seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_PRIORITY = 5
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_MAX_INFLIGHT = 10


class InstructionType(enum.IntEnum):
    BIND = 0
    UNBIND = 1


class WorkerStatus(enum.IntEnum):
    IDLE = 0
    BUSY = 1


@dataclass(frozen=True, slots=True)
class SessionAttributes:
    """Session configuration. ``idle_timeout_s=None`` means the server default (60 s);
    ``max_inflight_batches_per_worker=0`` means the server default (10)."""

    priority: int = DEFAULT_PRIORITY
    client_id: str = ""
    min_workers: int | None = None
    max_workers: int | None = None
    idle_timeout_s: float | None = None
    preemptible: bool = False
    cleanup_on_client_exit: bool = False
    max_inflight_batches_per_worker: int = 0
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str = ""
    app_id: str = ""
    attributes: SessionAttributes | None = None


@dataclass(slots=True)
class Message:
    """One task (``payload``) or one result (``payload`` or ``error``)."""

    id: str = ""
    payload: bytes = b""
    related_id: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Batch:
    id: str = ""
    session_id: str = ""
    priority: int = 0
    messages: list[Message] = field(default_factory=list)
    use_shared_data: bool | None = None
    required_shared_data_update_level: int | None = None
    dead: bool | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """Reply of the unary calls that return nothing; errors travel as gRPC status codes."""


@dataclass(frozen=True, slots=True)
class Instruction:
    type: InstructionType | int  # an int: a type this project does not know
    session_id: str


@dataclass(frozen=True, slots=True)
class WorkerState:
    worker_id: str
    status: WorkerStatus
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class SharedData:
    session_id: str
    update_level: int | None = None
    payload: bytes = b""
    ttl_s: float | None = None
