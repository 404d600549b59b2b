"""``LORA4DIFFUSION_QUICK=1``: every command at toy size, so a whole tour (README.md) runs in a few minutes.

The one place that shrinks work: ``cli.main`` calls :func:`shrink` on the parsed arguments when the variable
is set. Training presets become ``tiny`` and step counts, sample counts and epochs are capped; `serve` checks
that it can start and exits instead of waiting for a browser. The commands themselves stay as written (the
README test, tests/test_readme.py, runs them verbatim). Results are toy results: never for real use.
"""

from __future__ import annotations

import argparse
import os
import sys

ENV = "LORA4DIFFUSION_QUICK"

# argument name -> the most it may be in quick mode (None in the arguments: the command's default, capped)
CAPS = {
    "max_train_steps": 4,
    "lora_steps": 4,
    "steps": 4,  # sampling steps
    "per_digit": 2,
    "num": 2,
    "epochs": 1,
}
TINY = "tiny"


def enabled() -> bool:
    """True when ``LORA4DIFFUSION_QUICK`` is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def shrink(args: argparse.Namespace) -> list[str]:
    """Cap the work ``args`` asks for (in place) when quick mode is on; returns what changed."""
    if not enabled():
        return []
    changed = []
    for name, cap in CAPS.items():
        if hasattr(args, name):
            value = getattr(args, name)
            if value is None and (
                (name == "num" and not getattr(args, "prompt", None))  # --num exists only beside --prompt
                or getattr(args, "samples", None) is not None  # evaluate --samples: nothing is sampled
            ):
                continue
            if value is None or value > cap:
                setattr(args, name, cap)
                changed.append(f"{name.replace('_', '-')} {cap}")
    for name in ("preset", "scratch_preset"):
        if getattr(args, name, None) not in (None, TINY):
            setattr(args, name, TINY)
            changed.append(f"{name.replace('_', '-')} {TINY}")
    if changed:
        print(f"{ENV}: {', '.join(changed)} (toy sizes)", file=sys.stderr)
    return changed
