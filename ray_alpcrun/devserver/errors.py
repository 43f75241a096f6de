"""Errors of the local services (all under the project's ``AlpcrunError`` root)."""

from __future__ import annotations

from ray_alpcrun.errors import AlpcrunError


class Rejected(AlpcrunError):
    """Raised by the service logic to refuse a request; ``code`` is a gRPC status name
    (``"NOT_FOUND"``) that the gRPC layer answers with."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class SessionClosed(AlpcrunError):
    """Raised by ``LocalServices.join`` when the session was closed before every task
    was answered."""
