import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class App(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SessionAttributes(_message.Message):
    __slots__ = ("priority", "client_id", "min_workers", "max_workers", "idle_timeout", "preemptible", "cleanup_on_client_exit", "max_inflight_batches_per_worker", "tags")
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIBLE_FIELD_NUMBER: _ClassVar[int]
    CLEANUP_ON_CLIENT_EXIT_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BATCHES_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    priority: int
    client_id: str
    min_workers: int
    max_workers: int
    idle_timeout: _duration_pb2.Duration
    preemptible: bool
    cleanup_on_client_exit: bool
    max_inflight_batches_per_worker: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, priority: _Optional[int] = ..., client_id: _Optional[str] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., preemptible: _Optional[bool] = ..., cleanup_on_client_exit: _Optional[bool] = ..., max_inflight_batches_per_worker: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("id", "app", "attributes")
    ID_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    app: App
    attributes: SessionAttributes
    def __init__(self, id: _Optional[str] = ..., app: _Optional[_Union[App, _Mapping]] = ..., attributes: _Optional[_Union[SessionAttributes, _Mapping]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("id", "payload", "related_id", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RELATED_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    payload: bytes
    related_id: str
    error: str
    def __init__(self, id: _Optional[str] = ..., payload: _Optional[bytes] = ..., related_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("id", "session_id", "priority", "messages", "use_shared_data", "required_shared_data_update_level", "dead")
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    USE_SHARED_DATA_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SHARED_DATA_UPDATE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    session_id: str
    priority: int
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    use_shared_data: bool
    required_shared_data_update_level: int
    dead: bool
    def __init__(self, id: _Optional[str] = ..., session_id: _Optional[str] = ..., priority: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., use_shared_data: _Optional[bool] = ..., required_shared_data_update_level: _Optional[int] = ..., dead: _Optional[bool] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Instruction(_message.Message):
    __slots__ = ("type", "session_id")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        BIND: _ClassVar[Instruction.Type]
        UNBIND: _ClassVar[Instruction.Type]
    BIND: Instruction.Type
    UNBIND: Instruction.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    type: Instruction.Type
    session_id: str
    def __init__(self, type: _Optional[_Union[Instruction.Type, str]] = ..., session_id: _Optional[str] = ...) -> None: ...

class WorkerState(_message.Message):
    __slots__ = ("worker_id", "status", "session_id")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        IDLE: _ClassVar[WorkerState.Status]
        BUSY: _ClassVar[WorkerState.Status]
    IDLE: WorkerState.Status
    BUSY: WorkerState.Status
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    status: WorkerState.Status
    session_id: str
    def __init__(self, worker_id: _Optional[str] = ..., status: _Optional[_Union[WorkerState.Status, str]] = ..., session_id: _Optional[str] = ...) -> None: ...

class SharedData(_message.Message):
    __slots__ = ("session_id", "update_level", "payload", "ttl")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    update_level: int
    payload: bytes
    ttl: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., update_level: _Optional[int] = ..., payload: _Optional[bytes] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
