"""One-line errors for the command-line programs."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

__all__ = ["UserError", "cli"]


class UserError(Exception):
    """A mistake in the input (flags, files, environment) that the user can fix; printed as one line."""


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a ``main`` so that a :class:`UserError` (or Ctrl-C) ends in one line on stderr and exit code 2 (130)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
