"""What the message limits allow: the client's own, and the queue manager's once
it refused a batch over its limit (read from gRPC's RESOURCE_EXHAUSTED text);
the errors that name them."""

from __future__ import annotations

import re

import grpc

# Room left under the message limit for what the queue manager adds to a batch
# on its way (ids it fills in, a renamed batch id) and for the protocol's slack.
HEADROOM_BYTES = 64 * 1024


def usable_bytes(max_message_bytes: int) -> int:
    """How much of a message limit the client fills with one batch."""
    return max(1, max_message_bytes - HEADROOM_BYTES)


def too_large(
    what: str, size: int, max_message_bytes: int, queue_max_message_bytes: int | None = None
) -> str:
    """The error for a payload the message limit cannot carry: the client's own,
    or the queue manager's once it refused a batch (``queue_max_message_bytes``,
    parsed from its RESOURCE_EXHAUSTED reply)."""
    if queue_max_message_bytes is not None and queue_max_message_bytes < max_message_bytes:
        return (
            f"{what} of {size} bytes does not fit the queue manager's message limit of "
            f"{queue_max_message_bytes} bytes (it refused a larger batch: RESOURCE_EXHAUSTED, "
            f"received message larger than max); Client(max_message_bytes={max_message_bytes}) "
            "is more than it accepts: raise the services' limit, or set "
            "Client(max_message_bytes=...) to theirs"
        )
    return (
        f"{what} of {size} bytes exceeds the client's message limit "
        f"({usable_bytes(max_message_bytes)} bytes usable of "
        f"max_message_bytes={max_message_bytes}); "
        "raise it with Client(max_message_bytes=...) (the services must accept as much)"
    )


# gRPC's text for a message over the receiver's limit: "(its size vs. the limit)".
_OVER_LIMIT = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


def refused_limit(exc: grpc.RpcError) -> int | None:
    """The receiver's limit when ``exc`` says a message was over it (RESOURCE_EXHAUSTED)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if code is None or details is None or code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    found = _OVER_LIMIT.search(details() or "")
    return None if found is None else int(found.group(2))
