"""The limits on an adapter's weight and on the guidance scale: one number each, however the value arrives.

An adapter weight comes from ``--lora NAME:W``, a ``<lora:NAME:W>`` tag in a prompt, ``Pipeline.add_lora``
/ ``set_lora_weight``, the web API's ``loras`` and a sampling record (``sample --from``); the guidance scale
from ``--guidance`` (sample, evaluate), the web API's ``guidance`` and a sampling record. Each is checked
against the number here.

Both were chosen by measurement (``python benchmarks/weight_limits.py``; benchmarks/RESULTS.md, "Adapter
weight and guidance limits"), 100 samples per setting, on the shipped bases and adapters:
- weight: the shipped bold / italic adapters draw the digit asked for in 44-99 % of the images at |w| = 1.5,
  14-42 % at |w| = 2 and 7-21 % (chance is 10 %) at 2.5, on the prompt base and on pixel-base alike; from 3
  on, white blobs (bold, ink 0.5-0.8) or near-empty images. The limit is 2: the last weight at which some
  digits are still drawn.
- guidance: the prompt base draws digits at 100 % up to w = 20, 83 % at 30, 41 % at 50 and chance from 100;
  pixel-base stops earlier (58 % at 6, chance from 15). The limit is 30, the last setting at which a shipped
  base still draws digits; beyond it (the issue's ``--guidance 1e6``) every model gives saturated noise.
"""

from __future__ import annotations

import math

from lora4diffusion.errors import UserError

MAX_LORA_WEIGHT = 2.0  # |weight| of an adapter (measured: see the module docstring)
MAX_GUIDANCE = 30.0  # classifier-free guidance scale w, 0 <= w <= MAX_GUIDANCE (measured: see above)


def _number(value: object) -> float | None:
    """A finite int or float (not a bool, not text), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return value if math.isfinite(value) else None


def lora_weight(value: object, what: str) -> float:
    """``value`` as an adapter weight in [-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT]; else a UserError naming
    ``what`` (the flag, tag or field the weight came from) and the range."""
    w = _number(value)
    if w is None or abs(w) > MAX_LORA_WEIGHT:
        got = f"{w:g}" if w is not None else repr(value)[:40]
        raise UserError(f"{what}: the weight must be a finite number in {weight_range()}, got {got}")
    return w


def weight_range() -> str:
    return f"[-{MAX_LORA_WEIGHT:g}, {MAX_LORA_WEIGHT:g}]"


__all__ = ["MAX_GUIDANCE", "MAX_LORA_WEIGHT", "lora_weight", "weight_range"]
