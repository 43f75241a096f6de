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


class PayloadTooLarge(AlpcrunError, ValueError):
    """Raised when data to send exceeds the client's ``max_message_bytes``."""


class HandlerError(AlpcrunError):
    """Raised when a user handler cannot be loaded or set up."""


class TaskFailed(AlpcrunError):
    """Raised by the Ray pool when a task's handler raised and errors are not returned."""

    def __init__(self, task_id: str, error: str) -> None:
        super().__init__(f"task {task_id}: {error}")
        self.task_id = task_id
        self.error = error


class TasksFailed(TaskFailed):
    """Raised by ``RayPool.map`` when tasks failed: the first one's id and error, every
    failure in ``failures`` and every result (a ``TaskFailed`` where one failed) in ``results``."""

    def __init__(self, failures: list[TaskFailed], results: list[object]) -> None:
        first = failures[0]
        super().__init__(first.task_id, first.error)
        self.failures = failures
        self.results = results

    def __str__(self) -> str:
        more = len(self.failures) - 1
        text = super().__str__()
        return f"{text} (and {more} more failed of {len(self.results)})" if more else text


class SessionSetupError(AlpcrunError):
    """Raised when a batch cannot run at all: shared data could not be decoded or
    the session start hook raised. The caller answers the batch as dead."""


class PoolUnavailable(AlpcrunError):
    """Raised by the actor pool for a batch while it has given up for now: no actor
    has been live for longer than its bound. The caller answers the batch dead."""


class ActorLost(AlpcrunError):
    """Raised by a pool backend when an actor died or became unreachable during a call."""


class SubmitTimeout(AlpcrunError, TimeoutError):
    """Raised when a client's ``submit``/``run`` did not get every answer within ``timeout_s``."""


class SharedDataUnavailable(AlpcrunError):
    """Raised when a batch's shared data cannot be fetched from the node cache."""


class FatalError(AlpcrunError):
    """Raised when the bridge must stop rather than retry; ``exit_code`` says why."""

    def __init__(self, exit_code: int, reason: str) -> None:
        super().__init__(reason)
        self.exit_code = exit_code
        self.reason = reason


# Exit codes of the command-line programs, one per cause an operator must fix.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_AUTH = 4
EXIT_TLS = 5
EXIT_HANDLER = 6
EXIT_UNAVAILABLE = 7
EXIT_INTERRUPTED = 130
