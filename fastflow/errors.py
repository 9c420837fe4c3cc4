"""One-line errors for the command-line programs.

Exit codes: 0 done (or stopped by SIGINT/SIGTERM after saving), 1 the environment failed us (an ``OSError`` such
as a full disk), 2 bad input (flags, files, data), 3 training diverged (non-finite loss), 130 a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

__all__ = ["UserError", "TrainingDiverged", "PeerLost", "ArgumentParser", "cli"]


class UserError(Exception):
    """A mistake in the input (flags, files, environment) that the user can fix; printed as one line."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss (or the weights) went non-finite; nothing was saved after the last good checkpoint."""

    exit_code = 3


class PeerLost(UserError):
    """Another process of a multi-process run ended (its own error says why); this one stops. Exit code 1."""

    exit_code = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``error: ... (see PROG --help)``), exit code 2.

    Stock argparse prints the whole usage block before the error; with dozens of flags the actual mistake
    scrolls away, and log scrapers see two lines. ``--help`` still prints the full usage.
    """

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a ``main`` so that a :class:`UserError` ends in one line on stderr and its exit code (2, or 3 for a
    diverged run); an ``OSError`` (disk full, file vanished) in one line and exit code 1; Ctrl-C in 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return e.exit_code
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            print(f"error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
