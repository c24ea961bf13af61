"""What the package's command lines share: one way to report a user error."""

from __future__ import annotations

import sys

USER_ERROR = 2  # exit code of a command line given bad input


def fail(message: object) -> int:
    """Print ``error: message`` as the one line on stderr; returns ``USER_ERROR`` (2)."""
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR
