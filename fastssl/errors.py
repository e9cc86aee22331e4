"""The one exception type that reaches users.

Anything a user can fix (a recipe key, a path, a corrupt file, a missing optional package) is raised as
`UserError` with a one-line message naming the value received and what was expected. The command-line
tools catch it, print `error: <message>` and exit with status 2; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps


class UserError(Exception):
    """An error caused by user input; its message is shown as one line, without a traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a tool's main(): UserError and Ctrl-C become one line on stderr and a non-zero exit."""

    @wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130

    return wrapper
