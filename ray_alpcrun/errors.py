"""The project's exception hierarchy, grouped by who must act."""

from __future__ import annotations


class AlpcrunError(Exception):
    """Root of every exception raised by ray_alpcrun."""


class ConfigError(AlpcrunError):
    """Raised when settings (flags, environment, files) are missing or invalid."""


class ProtocolError(AlpcrunError):
    """Raised when a peer sends something the wire contract does not allow."""


class RpcError(AlpcrunError):
    """Raised when a call to an ALPCRUN.CH service fails; ``code`` is the gRPC status name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class AuthError(RpcError):
    """Raised when a service rejects the API key (UNAUTHENTICATED or PERMISSION_DENIED)."""


class NotFoundError(RpcError):
    """Raised when a service does not know the session or shared-data level asked for."""


class UnavailableError(RpcError):
    """Raised when a service cannot be reached or went away."""


class HandlerError(AlpcrunError):
    """Raised when a user handler cannot be loaded or set up."""


class TaskFailed(AlpcrunError):
    """Raised by ``ray_alpcrun.pool`` when a task's handler raised and errors are not returned."""

    def __init__(self, task_id: str, error: str) -> None:
        super().__init__(f"task {task_id}: {error}")
        self.task_id = task_id
        self.error = error
