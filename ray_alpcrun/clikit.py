"""What the three command-line programs share: the argument parser (``--version``,
defaults in ``--help``, "unknown flag" for a mistyped flag) and one way to
print a line that is plain text or, with ``--log-json``, a JSON object."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from ray_alpcrun import __version__
from ray_alpcrun.logs import json_line


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout (the exit-code table) and shows each flag's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = "%(default)" in text or "default" in text
        if not shown and action.option_strings and default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that names a mistyped flag before anything else.

    Plain argparse reports a missing required flag first, so ``--handlr x``
    said "required: --handler" instead of pointing at the typo.
    """

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kw)
        self.add_argument(
            "--version", action="version", version=f"%(prog)s (ray_alpcrun {__version__})"
        )

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        unknown = self.unknown_flags(argv)
        if unknown:
            self.error(f"unknown flag{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}")
        parsed: argparse.Namespace = super().parse_args(argv, namespace)
        return parsed

    def unknown_flags(self, argv: Sequence[str]) -> list[str]:
        known = list(self._option_string_actions)
        out = []
        for token in argv:
            if token == "--":
                break
            if not token.startswith("--"):
                continue
            name = token.split("=", 1)[0]
            # argparse accepts a unique prefix of a long flag (--drain for --drain-timeout).
            if not any(flag.startswith(name) for flag in known):
                out.append(name)
        return out

    def error(self, message: str) -> NoReturn:
        # The line that matters, without argparse's usage block (34 lines for the bridge).
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


class Output:
    """Lines a CLI prints itself (addresses, the reason it stopped): plain text,
    or JSON objects with ``--log-json`` so that a log shipper can parse every line."""

    def __init__(self, prog: str, json_lines: bool = False) -> None:
        self.prog = prog
        self.json_lines = json_lines

    def say(self, text: str, level: str = "info", file: TextIO | None = None, **extra: Any) -> None:
        sink = sys.stdout if file is None else file
        if self.json_lines:
            print(json_line(text, level, self.prog, **extra), file=sink, flush=True)
        else:
            print(text, file=sink, flush=True)

    def fail(self, text: str, **extra: Any) -> None:
        """The one line that says why the program stops (stderr)."""
        if self.json_lines:
            self.say(f"{self.prog}: {text}", "error", sys.stderr, **extra)
        else:
            print(f"{self.prog}: {text}", file=sys.stderr, flush=True)
