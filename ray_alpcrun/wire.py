"""The one place that converts between protobuf and the project's own types.

gRPC calls in this project are registered with the (de)serialisers below, so
that servers, clients and workers send and receive ``ray_alpcrun.types``
objects and never see ``*_pb2`` classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as PbMessage

from ray_alpcrun._proto import ghpc_pb2 as pb
from ray_alpcrun.errors import ProtocolError
from ray_alpcrun.types import (
    Batch,
    Instruction,
    InstructionType,
    Message,
    SessionAttributes,
    SessionInfo,
    SharedData,
    Status,
    WorkerState,
    WorkerStatus,
)

# --- durations -------------------------------------------------------------


def _duration_to_s(d: Duration) -> float:
    return float(d.seconds) + float(d.nanos) / 1e9


def _set_duration(d: Duration, seconds: float) -> None:
    whole = int(seconds)
    d.seconds = whole
    d.nanos = round((seconds - whole) * 1e9)


# --- sessions --------------------------------------------------------------


def session_to_pb(s: SessionInfo) -> pb.Session:
    msg = pb.Session(id=s.id)
    msg.app.id = s.app_id
    a = s.attributes
    if a is not None:
        out = msg.attributes
        out.priority = a.priority
        out.client_id = a.client_id
        if a.min_workers is not None:
            out.min_workers = a.min_workers
        if a.max_workers is not None:
            out.max_workers = a.max_workers
        if a.idle_timeout_s is not None:
            _set_duration(out.idle_timeout, a.idle_timeout_s)
        out.preemptible = a.preemptible
        out.cleanup_on_client_exit = a.cleanup_on_client_exit
        out.max_inflight_batches_per_worker = a.max_inflight_batches_per_worker
        out.tags.extend(a.tags)
    return msg


def session_from_pb(msg: pb.Session) -> SessionInfo:
    attrs = None
    if msg.HasField("attributes"):
        a = msg.attributes
        attrs = SessionAttributes(
            priority=a.priority,
            client_id=a.client_id,
            min_workers=a.min_workers if a.HasField("min_workers") else None,
            max_workers=a.max_workers if a.HasField("max_workers") else None,
            idle_timeout_s=_duration_to_s(a.idle_timeout) if a.HasField("idle_timeout") else None,
            preemptible=a.preemptible,
            cleanup_on_client_exit=a.cleanup_on_client_exit,
            max_inflight_batches_per_worker=a.max_inflight_batches_per_worker,
            tags=tuple(a.tags),
        )
    return SessionInfo(id=msg.id, app_id=msg.app.id, attributes=attrs)


# --- batches ---------------------------------------------------------------


def batch_to_pb(b: Batch) -> pb.Batch:
    msg = pb.Batch(id=b.id, session_id=b.session_id, priority=b.priority)
    if b.use_shared_data is not None:
        msg.use_shared_data = b.use_shared_data
    if b.required_shared_data_update_level is not None:
        msg.required_shared_data_update_level = b.required_shared_data_update_level
    if b.dead is not None:
        msg.dead = b.dead
    add = msg.messages.add
    for m in b.messages:
        out = add(id=m.id, payload=m.payload)
        if m.related_id is not None:
            out.related_id = m.related_id
        if m.error is not None:
            out.error = m.error
    return msg


def batch_from_pb(msg: pb.Batch) -> Batch:
    messages = [
        Message(
            m.id,
            m.payload,
            m.related_id if m.HasField("related_id") else None,
            m.error if m.HasField("error") else None,
        )
        for m in msg.messages
    ]
    return Batch(
        id=msg.id,
        session_id=msg.session_id,
        priority=msg.priority,
        messages=messages,
        use_shared_data=msg.use_shared_data if msg.HasField("use_shared_data") else None,
        required_shared_data_update_level=(
            msg.required_shared_data_update_level
            if msg.HasField("required_shared_data_update_level")
            else None
        ),
        dead=msg.dead if msg.HasField("dead") else None,
    )


# --- encoded sizes -----------------------------------------------------------
#
# gRPC's max_message_bytes applies to the serialised message, so whoever must
# stay under it measures what it encodes. These count exactly what
# ``batch_to_pb(b).SerializeToString()`` writes (a test compares the two),
# without building the protobuf: field numbers below 16 take a one-byte tag.


def varint_bytes(n: int) -> int:
    """The length of ``n`` (>= 0) as a protobuf varint."""
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def text_bytes(s: str) -> int:
    """The UTF-8 length of ``s`` (what protobuf writes for a string field)."""
    return len(s) if s.isascii() else len(s.encode())


def _field(length: int) -> int:
    return 1 + varint_bytes(length) + length


def message_bytes(m: Message) -> int:
    """What ``m`` adds to an encoded Batch: its ``messages`` entry, framing included."""
    size = 0
    if m.id:
        size += _field(text_bytes(m.id))
    if m.payload:
        size += _field(len(m.payload))
    if m.related_id is not None:
        size += _field(text_bytes(m.related_id))
    if m.error is not None:
        size += _field(text_bytes(m.error))
    return _field(size)


def batch_header_bytes(b: Batch) -> int:
    """The encoded size of ``b`` without its messages."""
    size = 0
    if b.id:
        size += _field(text_bytes(b.id))
    if b.session_id:
        size += _field(text_bytes(b.session_id))
    if b.priority:
        size += 1 + varint_bytes(b.priority)
    if b.use_shared_data is not None:
        size += 2
    if b.required_shared_data_update_level is not None:
        size += 1 + varint_bytes(b.required_shared_data_update_level)
    if b.dead is not None:
        size += 2
    return size


def batch_bytes(b: Batch) -> int:
    """The encoded size of ``b``: what gRPC compares with ``max_message_bytes``."""
    return batch_header_bytes(b) + sum(message_bytes(m) for m in b.messages)


# --- worker control --------------------------------------------------------


def instruction_to_pb(i: Instruction) -> pb.Instruction:
    return pb.Instruction(type=int(i.type), session_id=i.session_id)  # type: ignore[arg-type]


def instruction_from_pb(msg: pb.Instruction) -> Instruction:
    # A type we do not know stays a plain int: the worker logs and skips it, as
    # the guide's ``switch`` does (the real server may number or add types).
    kind: InstructionType | int
    try:
        kind = InstructionType(msg.type)
    except ValueError:
        kind = int(msg.type)
    return Instruction(type=kind, session_id=msg.session_id)


def worker_state_to_pb(s: WorkerState) -> pb.WorkerState:
    return pb.WorkerState(
        worker_id=s.worker_id,
        status=int(s.status),  # type: ignore[arg-type]
        session_id=s.session_id,
    )


def worker_state_from_pb(msg: pb.WorkerState) -> WorkerState:
    try:
        status = WorkerStatus(msg.status)
    except ValueError as exc:
        raise ProtocolError(f"unknown WorkerState.status {msg.status}") from exc
    return WorkerState(worker_id=msg.worker_id, status=status, session_id=msg.session_id)


# --- shared data -----------------------------------------------------------


def shared_data_to_pb(s: SharedData) -> pb.SharedData:
    msg = pb.SharedData(session_id=s.session_id, payload=s.payload)
    if s.update_level is not None:
        msg.update_level = s.update_level
    if s.ttl_s is not None:
        _set_duration(msg.ttl, s.ttl_s)
    return msg


def shared_data_from_pb(msg: pb.SharedData) -> SharedData:
    return SharedData(
        session_id=msg.session_id,
        update_level=msg.update_level if msg.HasField("update_level") else None,
        payload=msg.payload,
        ttl_s=_duration_to_s(msg.ttl) if msg.HasField("ttl") else None,
    )


def status_to_pb(_: Status) -> pb.Status:
    return pb.Status()


def status_from_pb(_: pb.Status) -> Status:
    return Status()


# --- serialisers used by the gRPC method tables ----------------------------


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Codec(Generic[T]):
    """Turns one of the project's types into wire bytes and back."""

    message: str  # the protobuf message's name, e.g. "Session" for SessionInfo
    encode: Callable[[T], bytes]
    decode: Callable[[bytes], T]


def _codec(
    pb_type: type[PbMessage], to_pb: Callable[[T], PbMessage], from_pb: Callable[[Any], T]
) -> Codec[T]:
    name = pb_type.DESCRIPTOR.name

    def encode(obj: T) -> bytes:
        return to_pb(obj).SerializeToString()

    def decode(data: bytes) -> T:
        try:
            return from_pb(pb_type.FromString(data))
        except DecodeError as exc:
            raise ProtocolError(f"malformed {name}: {exc}") from exc

    return Codec(name, encode, decode)


CODECS: dict[type, Codec[Any]] = {
    SessionInfo: _codec(pb.Session, session_to_pb, session_from_pb),
    Batch: _codec(pb.Batch, batch_to_pb, batch_from_pb),
    Status: _codec(pb.Status, status_to_pb, status_from_pb),
    Instruction: _codec(pb.Instruction, instruction_to_pb, instruction_from_pb),
    WorkerState: _codec(pb.WorkerState, worker_state_to_pb, worker_state_from_pb),
    SharedData: _codec(pb.SharedData, shared_data_to_pb, shared_data_from_pb),
}

Cardinality = Literal["unary_unary", "unary_stream", "stream_stream"]


@dataclass(frozen=True, slots=True)
class MethodSpec:
    service: str
    name: str
    cardinality: Cardinality
    request: type
    response: type


def _methods() -> dict[str, MethodSpec]:
    pool = pb.DESCRIPTOR
    own = {codec.message: cls for cls, codec in CODECS.items()}
    out: dict[str, MethodSpec] = {}
    for service in pool.services_by_name.values():
        for m in service.methods:
            if m.client_streaming and m.server_streaming:
                card: Cardinality = "stream_stream"
            elif m.server_streaming:
                card = "unary_stream"
            elif not m.client_streaming:
                card = "unary_unary"
            else:  # pragma: no cover - the contract has no client-streaming-only RPC
                raise AssertionError(m.full_name)
            out[f"{service.name}.{m.name}"] = MethodSpec(
                service.name, m.name, card, own[m.input_type.name], own[m.output_type.name]
            )
    return out


# Keyed "Service.Method", e.g. "Queue.WorkerUpdate"; derived from the proto so
# the two cannot disagree.
METHODS: dict[str, MethodSpec] = _methods()
DEFAULT_PROTO_PACKAGE = pb.DESCRIPTOR.package
