"""The handler API: what users write. No protobuf, gRPC or Ray types here.

Two forms:

* a function ``handle(payload: bytes, shared: bytes | None) -> bytes``;
* a :class:`Handler` subclass, whose instances live inside the pool's actors
  and see the grid session life cycle::

      class Pricer(Handler):
          def decode_shared(self, payload):            # once per (session, level)
              return np.frombuffer(payload, dtype=np.float64)

          def on_session_start(self, session):         # session.shared is decoded
              session.state["calls"] = 0

          def process(self, payload, session):         # one task
              session.state["calls"] += 1
              return payload

          def process_batch(self, payloads, session):  # optional, vectorised
              return [p for p in payloads]

Both are named on command lines as ``module:object`` (see :func:`load_handler`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray_alpcrun.errors import HandlerError


@dataclass(slots=True)
class SessionContext:
    """What a handler knows about the session it serves on this actor.

    ``shared`` is the shared data of the batch in hand, as returned by
    ``decode_shared``, at exactly the level the batch asked for
    (``update_level``); both are ``None`` for a batch that asks for no shared
    data (no ``use_shared_data``), whatever earlier batches had. ``state`` is the handler's own
    per-session scratch space, dropped when the session ends; ``xp`` is the
    array module to compute with (CuPy on a GPU actor, NumPy otherwise).
    """

    id: str
    tags: tuple[str, ...] = ()
    shared: Any = None
    update_level: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    xp: Any = None
    device: Any = None


class Handler:
    """Base class for class-form handlers. Override :meth:`process`; the rest is optional.

    An exception from ``process`` becomes that task's error and touches no other
    task. An exception from ``decode_shared`` or ``on_session_start`` means the
    batch cannot be processed at all: it is answered as dead.
    """

    # True: ``decode_shared`` receives a read-only ``memoryview`` over Ray's object
    # store instead of ``bytes``. No copy is made per actor, so the actors of a
    # node share one copy of the data (decode it with e.g. ``np.frombuffer``).
    zero_copy_shared: bool = False

    def decode_shared(self, payload: bytes) -> Any:
        """Turn the session's shared-data bytes into what ``session.shared`` holds."""
        return payload

    def on_session_start(self, session: SessionContext) -> None:
        """Called once per session on this actor, before its first task."""

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        """Compute one task's result."""
        raise NotImplementedError(f"{type(self).__name__} must override process()")

    # Set to a method ``process_batch(self, payloads, session) -> Sequence[bytes |
    # BaseException]`` to receive a whole sub-batch at once (the GPU fast path).
    process_batch: Callable[..., Sequence[bytes | BaseException]] | None = None

    def on_shared_update(self, session: SessionContext, previous_level: int | None) -> None:
        """Called when a batch brings a higher update level than the session saw
        before; ``session.shared`` and ``session.update_level`` already hold it."""

    def on_session_end(self, session: SessionContext) -> None:
        """Called when the session ends on this actor (closed, unbound or evicted)."""


class FunctionHandler(Handler):
    """Adapts ``handle(payload, shared) -> bytes`` to the class form."""

    def __init__(self, fn: Callable[[bytes, bytes | None], bytes]) -> None:
        self.fn = fn
        # A function opts in to zero-copy shared data with ``fn.zero_copy_shared = True``.
        self.zero_copy_shared = bool(getattr(fn, "zero_copy_shared", False))

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        return self.fn(payload, session.shared)

    def __repr__(self) -> str:
        return f"FunctionHandler({getattr(self.fn, '__qualname__', self.fn)!r})"


HandlerSpec = str | Handler | type[Handler] | Callable[[bytes, bytes | None], bytes]


def import_object(spec: str) -> Any:
    """Import ``module:object`` (``object`` may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerError(f"handler must be given as MODULE:OBJECT, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import handler module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise HandlerError(f"module {module_name!r} has no attribute {attr!r}") from exc
    return obj


def load_handler(spec: HandlerSpec) -> Handler:
    """Build a handler instance from a ``module:object`` string, a Handler class
    or instance, or a plain function."""
    obj = import_object(spec) if isinstance(spec, str) else spec
    if isinstance(obj, Handler):
        return obj
    if inspect.isclass(obj):
        if not issubclass(obj, Handler):
            raise HandlerError(f"{obj.__qualname__} is a class but not a ray_alpcrun.Handler")
        try:
            return obj()
        except Exception as exc:
            raise HandlerError(f"cannot construct handler {obj.__qualname__}: {exc}") from exc
    if callable(obj):
        return FunctionHandler(obj)
    raise HandlerError(f"handler {spec!r} is neither a function nor a Handler")
