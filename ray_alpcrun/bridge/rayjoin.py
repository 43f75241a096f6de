"""Joining a Ray cluster by address (``--ray-address HOST:PORT``), checked
before ``ray.init``: Ray itself retries for ~20 s against a cluster that wants a
token (minutes when nothing listens there) and ends in a traceback.

One call of Ray's GCS client, made without a token, tells a cluster that uses
token authentication from one that does not. A cluster that asks for a token
is joined with ``RAY_AUTH_MODE=token`` when a token is at hand and the mode is
unset (what ``ray.init()`` and ``--ray-address auto`` do by themselves, but not
a join by address); otherwise the one line that names the fix is raised as a
:class:`~ray_alpcrun.errors.ConfigError` (see :class:`~ray_alpcrun.config.RayAuth`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator

from ray_alpcrun.config import RayAuth
from ray_alpcrun.errors import ConfigError
from ray_alpcrun.logs import fields

log = logging.getLogger("ray_alpcrun.bridge")

# Addresses that Ray resolves itself (a local cluster, its address file, Ray Client).
_RAY_RESOLVES = ("auto", "local")


def init_address(address: str | None) -> str | None:
    """What to pass ``ray.init``: without ``--ray-address``, a Ray of the bridge's
    own (``local``), as documented; ``ray.init()`` would join a cluster that
    ``ray start`` left running on this machine. ``RAY_ADDRESS`` in the environment
    still names the cluster to join, as Ray reads it."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        return "local"
    return address


def prepare_join(address: str | None, auth: RayAuth, connect_timeout_s: float = 5.0) -> str | None:
    """Make ``ray.init(address=...)`` join at once, or raise ConfigError; returns
    the address to pass it (:func:`init_address`)."""
    target = _host_port(address)
    if address is None or target is None:
        return init_address(address)  # Ray finds it, and turns token mode on by itself
    _check_reachable(address, *target, connect_timeout_s)
    if _asks_for_token(address) is not True:
        return address
    env = auth.join_env(address)
    _set_ray_env(env)
    if _asks_for_token(address):
        raise auth.refused(address)
    settings = " ".join(f"{k}={v}" for k, v in env.items())
    log.info(
        f"joining with Ray token authentication ({settings})",
        extra=fields(address=address, token=auth.token_source),
    )
    return address


def _host_port(address: str | None) -> tuple[str, int] | None:
    if address is None or address in _RAY_RESOLVES or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None  # Ray's own error says what it expected
    return host.strip("[]"), int(port)


def _check_reachable(address: str, host: str, port: int, timeout_s: float) -> None:
    where = f"no Ray cluster at {address}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError:
        raise ConfigError(
            f"{where}: connection refused (start its head with `ray start --head "
            f"--port {port}`, or check --ray-address)"
        ) from None
    except socket.gaierror as exc:
        raise ConfigError(f"{where}: cannot resolve {host!r} ({exc.strerror})") from None
    except TimeoutError:
        raise ConfigError(
            f"{where}: no answer within {timeout_s:g} s (check --ray-address and firewalls)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None


def _asks_for_token(address: str) -> bool | None:
    """True when the cluster's GCS refused this process's credentials, False when
    it answered, None when that could not be told (then ``ray.init`` decides)."""
    import ray._raylet
    import ray.exceptions

    refused = getattr(ray.exceptions, "AuthenticationError", None)
    client = getattr(ray._raylet, "GcsClient", None)
    if refused is None or client is None:
        return None  # a Ray without token authentication
    # Ray's C++ client logs each refusal on stderr; the one line we raise says it.
    with _quiet_stderr():
        try:
            client(address=address)
        except refused:
            return True
        except Exception:
            return None
    return False


def _set_ray_env(env: dict[str, str]) -> None:
    """Set ``env`` for this process (and what it starts), and have Ray reread its
    configuration, as Ray does when it turns token mode on by itself."""
    from ray import _raylet

    os.environ.update(env)
    initialize = getattr(getattr(_raylet, "Config", None), "initialize", None)
    if initialize is not None:
        initialize("")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
