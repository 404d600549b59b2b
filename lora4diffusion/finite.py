"""Never emit garbage: the check before a merge, an export or a resize writes tensors.

An overflowing adapter scale, a NaN adapter or an inf guidance turns weights or images into NaN/inf; clamping
or saving them would hand the user a file that looks fine and is not. Writers call ``require_finite`` first
(sampling checks its own output in ``Pipeline.generate``).
"""

from __future__ import annotations

import torch

from lora4diffusion.errors import UserError


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise UserError if any floating tensor in ``tensors`` ({name: tensor}) holds NaN or inf."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"{what}: non-finite values (NaN/inf) in {bad[0]}{more}; nothing was written")
