"""``RayAuth`` (issue 20 item 1): what the bridge adds to the environment of
``ray.init`` to join a cluster by address whose head asks for a token. Ray turns
token mode on by itself for ``ray.init()`` and ``auto`` only; joined by
``HOST:PORT``, a token at hand was not used and the join failed after ~20 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_alpcrun.config import RayAuth
from ray_alpcrun.errors import ConfigError

ADDRESS = "10.0.0.1:6379"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def token_file(home: Path) -> Path:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True)
    path.write_text("0123abcd" * 8)
    return path


def test_a_token_file_and_no_mode_join_with_token_authentication(home: Path) -> None:
    path = token_file(home)
    auth = RayAuth.read({}, home)
    assert auth == RayAuth(mode=None, token_source=str(path))
    assert auth.join_env(ADDRESS) == {"RAY_AUTH_MODE": "token"}


@pytest.mark.parametrize(
    ("environ", "source"),
    [
        ({"RAY_AUTH_TOKEN": "abc"}, "RAY_AUTH_TOKEN"),
        ({"RAY_AUTH_TOKEN": " ", "RAY_AUTH_TOKEN_PATH": "{tok}"}, "{tok}"),
    ],
)
def test_a_token_from_the_environment_counts_as_ray_reads_it(
    home: Path, tmp_path: Path, environ: dict[str, str], source: str
) -> None:
    tok = tmp_path / "tok"
    tok.write_text("abc")
    environ = {k: v.format(tok=tok) for k, v in environ.items()}
    auth = RayAuth.read(environ, home)
    assert auth.token_source == source.format(tok=tok)
    assert auth.join_env(ADDRESS) == {"RAY_AUTH_MODE": "token"}


def test_no_token_names_the_fix(home: Path, tmp_path: Path) -> None:
    # RAY_AUTH_TOKEN_PATH wins over ~/.ray/auth_token, as in Ray: a missing file is no token.
    token_file(home)
    for auth in (RayAuth.read({}, tmp_path), RayAuth.read({"RAY_AUTH_TOKEN_PATH": "/nope"}, home)):
        assert auth.token_source is None
        with pytest.raises(ConfigError, match=r"uses token authentication and no token is found"):
            auth.join_env(ADDRESS)
        with pytest.raises(ConfigError, match=r"ray get-auth-token"):
            auth.join_env(ADDRESS)


def test_a_mode_set_otherwise_is_respected_and_named(home: Path) -> None:
    token_file(home)
    auth = RayAuth.read({"RAY_AUTH_MODE": "Disabled"}, home)
    assert auth.mode == "disabled"
    with pytest.raises(ConfigError, match=r"but RAY_AUTH_MODE=disabled here: unset it"):
        auth.join_env(ADDRESS)


def test_token_mode_already_set_and_still_refused_blames_the_token(home: Path) -> None:
    path = token_file(home)
    auth = RayAuth.read({"RAY_AUTH_MODE": "token"}, home)
    with pytest.raises(ConfigError, match=rf"refused the token from {path}"):
        auth.join_env(ADDRESS)
