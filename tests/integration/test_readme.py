"""The README and the reference under docs/ stay true: every command in their code
blocks parses with the program's real flags, every flag in the tables exists and
every flag of each CLI has a row, their Python snippets compile, the handler
example runs, ``--help`` of every CLI runs, every relative link points at a file,
and the demo runs (smaller than the README's default, to stay bounded)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ray_alpcrun.bridge.cli import build_parser as bridge_parser
from ray_alpcrun.config import Env
from ray_alpcrun.demo import _parser as demo_parser
from ray_alpcrun.devserver.cli import build_parser as devserver_parser
from ray_alpcrun.refworker.cli import build_parser as refworker_parser
from tests.support.cli_support import run

README = Path(__file__).resolve().parents[2] / "README.md"
PAGES = [README, *sorted((README.parent / "docs").glob("**/*.md"))]
# The README first, then every page of the reference.
TEXT = "\n".join(page.read_text() for page in PAGES)
PARSERS = {
    "ray_alpcrun.bridge": lambda: bridge_parser(Env()),
    "ray_alpcrun.devserver": devserver_parser,
    "ray_alpcrun.refworker": lambda: refworker_parser(Env()),
    "ray_alpcrun.demo": demo_parser,
}


def code_blocks(language: str) -> list[str]:
    pattern = re.compile(r"^ *```" + language + r"\n(.*?)^ *```", re.M | re.S)
    return [m.group(1) for m in pattern.finditer(TEXT)]


def commands() -> list[tuple[str, list[str]]]:
    """``(module, args)`` of every ``python -m ray_alpcrun...`` in a bash block."""
    out = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split(" #")[0].replace("[", "").replace("]", ""))
                if words[:2] == ["python", "-m"] and words[2] in PARSERS:
                    out.append((words[2], words[3:]))
    return out


def table_flags() -> dict[str, set[str]]:
    """The flags in each CLI's table (the section under ``### `python -m X```)."""
    out: dict[str, set[str]] = {}
    for section in re.split(r"^#{2,3} ", TEXT, flags=re.M)[1:]:
        title = section.splitlines()[0]
        module = next((m for m in PARSERS if f"`python -m {m}`" in title), None)
        if module is not None:
            rows = re.findall(r"^\| `(--[a-z-]+)", section, re.M)
            rows += re.findall(r"^\| `--[a-z-]+[^`]*`, `(--[a-z-]+)", section, re.M)
            out[module] = set(rows)
    return out


def test_the_readme_shows_commands_of_each_cli() -> None:
    assert {m for m, _ in commands()} >= set(PARSERS)


@pytest.mark.parametrize(("module", "args"), commands())
def test_each_readme_command_parses(module: str, args: list[str]) -> None:
    parser = PARSERS[module]()
    assert not getattr(parser, "unknown_flags", lambda a: [])(args), args
    parser.parse_args(args)  # exits 2 (SystemExit) on a stale flag or value


def test_every_flag_of_each_cli_has_a_row() -> None:
    tables = table_flags()
    for module in ("ray_alpcrun.bridge", "ray_alpcrun.devserver", "ray_alpcrun.refworker"):
        flags = {
            flag
            for action in PARSERS[module]()._actions
            for flag in action.option_strings
            if flag.startswith("--") and flag not in ("--help", "--version")
        }
        # A flag's row may name its short and long forms; the long one counts.
        assert flags <= tables[module] | {"--help", "--version"}, (
            module,
            sorted(flags - tables[module]),
        )


def test_relative_links_point_at_files() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_each_flag_in_the_tables_exists() -> None:
    tables = table_flags()
    for module in ("ray_alpcrun.bridge", "ray_alpcrun.devserver", "ray_alpcrun.refworker"):
        assert tables.get(module), module
    for module, flags in tables.items():
        known = set(PARSERS[module]()._option_string_actions)
        assert flags <= known, (module, sorted(flags - known))


def test_python_snippets_compile_and_the_handler_example_runs() -> None:
    blocks = code_blocks("python")
    assert blocks
    for block in blocks:
        compile(block, "README.md or docs/", "exec")
    namespace: dict[str, object] = {}
    exec(next(b for b in blocks if b.startswith("# mymod.py")), namespace)
    assert namespace["handle"](b"abc", None) == b"ABC"  # type: ignore[operator]


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_help_runs_offline(module: str) -> None:
    code, out = run(module, "--help")
    assert code == 0 and "usage:" in out, out


@pytest.mark.timeout(240)
def test_the_demo_runs_with_the_base_install(tmp_path: Path) -> None:
    # Its own Ray, as a user's first run; only base dependencies are imported, and
    # from a directory outside the repository (the example ships in the package).
    code, out = run("ray_alpcrun.demo", "--tasks", "8", "--paths", "500", "--no-progress",
                    timeout_s=200, outside=tmp_path)  # fmt: skip
    assert code == 0, out
    assert "Europeans within 3 standard errors" in out, out


def docs_text() -> str:
    """The README and the pages under docs/ (where the reference lives)."""
    return TEXT


def test_the_exit_4_row_quotes_what_the_bridge_prints() -> None:
    from ray_alpcrun.bridge.settings import WorkerSettings, fatal_for
    from ray_alpcrun.errors import AuthError

    settings = WorkerSettings("q:1", "c:1", "k", "ghpc.v1", "n", "p", 1)
    # The key is checked against the node cache first (before Ray starts).
    fatal = fatal_for(AuthError("PERMISSION_DENIED", "invalid API key"), settings, "node cache")
    assert fatal is not None
    rows = re.findall(r"^\| exit 4, `([^`]*)`", docs_text(), re.M)
    assert rows and all(fatal.reason.startswith(row.removesuffix("...")) for row in rows), rows


def test_each_ray_start_command_uses_flags_ray_has() -> None:
    from ray.scripts.scripts import start

    known = {opt for param in start.params for opt in param.opts}
    lines = [
        line
        for block in re.findall(r"^ *```bash\n(.*?)^ *```", docs_text(), re.M | re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if "ray start" in line
    ]
    assert any("--head" in line for line in lines) and any("--address" in line for line in lines)
    for line in lines:
        words = shlex.split(line.split(" #")[0])
        flags = {w.split("=")[0] for w in words[words.index("start") + 1 :] if w.startswith("--")}
        assert flags <= known, (line, sorted(flags - known))
