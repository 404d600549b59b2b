"""The one exception type for bad user input.

Library functions raise ``UserError`` with a one-line message naming the problem; the CLI turns it into
that line on stderr and exit status 2 (no traceback). Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A named bad input: wrong file, wrong option value, mismatched checkpoint."""
