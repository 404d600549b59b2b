"""The one exception type for bad user input.

Library functions raise ``UserError`` with a one-line message naming the problem; the CLI turns it into
that line on stderr and exit status 2 (no traceback). Anything else is a bug and keeps its traceback.
"""

import errno


class UserError(ValueError):
    """A named bad input: wrong file, wrong option value, mismatched checkpoint."""


def describe_os_error(e: OSError) -> str:
    """A short reason for an OSError: "permission denied", "no space left on device", ..."""
    if isinstance(e, PermissionError):
        return "permission denied"
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return (e.strerror or str(e) or type(e).__name__).lower()
