"""The flags both worker programs share (``worker_cli``): plaintext next to TLS
is said out loud at startup (issue 18 item 12). No Ray, no network."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from ray_alpcrun.bridge import cli as bridge_cli
from ray_alpcrun.clikit import Output
from ray_alpcrun.errors import EXIT_HANDLER
from ray_alpcrun.refworker import cli as refworker_cli
from ray_alpcrun.worker_cli import is_loopback

BAD_HANDLER = ["--handler", "no_such_module_here:handler"]  # stops right after the config


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """The CLIs configure logging for the process: put it back for the next tests."""
    package, root = logging.getLogger("ray_alpcrun"), logging.getLogger()
    handlers, propagate, level = package.handlers[:], package.propagate, package.level
    root_handlers, last_resort = root.handlers[:], logging.lastResort
    yield
    package.handlers[:], package.propagate = handlers, propagate
    package.setLevel(level)
    root.handlers[:], logging.lastResort = root_handlers, last_resort
    logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:3337", True),
        ("127.1.2.3:3337", True),
        ("localhost:3337", True),
        ("[::1]:3337", True),
        ("dns:///localhost:3337", True),
        ("unix:/tmp/cache.sock", True),
        ("10.0.0.7:3337", False),
        ("[fd00::7]:3337", False),
        ("cache.internal:3337", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("program", ["bridge", "refworker"])
@pytest.mark.parametrize(
    ("flags", "warned"),
    [
        (["--ca-cert", "ca.pem", "--cache", "10.0.0.7:3337"], True),
        (["--ca-cert", "ca.pem", "--cache", "127.0.0.1:3337"], False),
        (["--ca-cert", "ca.pem", "--cache-ca-cert", "ca.pem", "--cache", "10.0.0.7:3337"], False),
        (["--cache", "10.0.0.7:3337"], False),  # plaintext everywhere: nothing to compare
    ],
)
def test_tls_to_the_queue_but_cleartext_to_a_remote_cache_warns_naming_the_flag(
    program: str, flags: list[str], warned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*BAD_HANDLER, *flags]
    if program == "bridge":
        code = bridge_cli._main(argv, Output("test"), bridge_cli.StartupSignals())
    else:
        code = refworker_cli.main(argv)
    assert code == EXIT_HANDLER
    err = capsys.readouterr().err
    assert ("--cache-ca-cert" in err and "cleartext" in err) is warned, err
