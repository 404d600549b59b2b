"""The one exception type for bad user input.

Library functions raise ``UserError`` with a one-line message naming the problem; the CLI turns it into
that line on stderr and exit status 2 (no traceback). Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A named bad input: wrong file, wrong option value, mismatched checkpoint."""


def require_finite(tensors: dict, what: str) -> None:
    """Raise UserError if any tensor in ``tensors`` ({name: tensor}) holds NaN or inf: never write garbage."""
    import torch

    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"{what}: non-finite values (NaN/inf) in {bad[0]}{more}; nothing was written")
