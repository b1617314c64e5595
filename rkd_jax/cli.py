"""The error contract of every command: bad input ends with one `error: ...` line, exit code 2.

Each entry point's `main(argv)` is `cli.run(_main, argv)`: the command's own function runs, and a
handled user error (the exceptions of `user_errors()`) becomes one line on stderr and exit
code 2. Everything else, a KeyError or TypeError from our own code included, stays a traceback:
it is a bug to fix, not a message to read. Code that reads a user's file turns what is missing
or malformed there into a ValueError that names the file and the field, at the reading site.

    def main(argv=None) -> int:
        return cli.run(_main, argv)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input to a command (a path, a flag, a file's content) that the user can fix."""


def one_line(message: Any) -> str:
    """A message on one line: what a command prints after `error: `."""
    return " ".join(str(message).split())


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a command reports as one line and exit code 2.

    ValueError carries the project's checked input errors (UserError, CheckpointError,
    InputError, ExportError, ConversionError, TableError are all ValueErrors); OSError is a path
    that is missing, unreadable or not writable; FloatingPointError is training that diverged
    (a learning rate too large), which the message says. KeyError, TypeError, IndexError are
    not here on purpose.
    """
    return (ValueError, OSError, FloatingPointError)


def report(error: BaseException) -> int:
    """Print `error: <one line>` on stderr and return the exit code for a user error."""
    print(f"error: {one_line(error) or type(error).__name__}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None):
    """Call `main(argv)`; a user error becomes one stderr line and exit code 2 (returned)."""
    try:
        return int(main(argv) or 0)
    except user_errors() as e:
        return report(e)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes follow the contract: one `error:` line, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {one_line(message)} (see {self.prog} --help)\n")
