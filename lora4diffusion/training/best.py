"""Keeping the best weights and stopping early (``--keep-best METRIC``, ``--patience P``): which way each
validation column improves, the best-so-far and the count of validations without improvement.

A metric is a column of validation.csv (training/validation.py, training/scores.py), optionally with a
direction: ``val_loss``, ``accuracy``, ``ink_ratio:min``. Without one it is the column's own:

    min    val_loss, val_eps_mse, val_l1, val_loss_tT       (lower is better)
    max    accuracy, plain_accuracy                         (higher is better)
    away   ink_ratio, slant_diff                            (the style's effect, either way: farthest from the
                                                            base, |log ratio| or |difference|; bold adds ink,
                                                            thin removes it)
    near   plain_ink_ratio, plain_slant_diff                (a trigger LoRA's leak without its trigger:
                                                            nearest the base, ratio 1 or difference 0);
           recon_ink_ratio                                  (a VAE's reconstructions: nearest the originals)

``ink`` and ``slant`` (a base's own) need ``:min`` or ``:max``: nothing makes one way better.

The state is a pure function of validation.csv's rows, read back as written (8 significant digits): a run
decides on the very numbers a resumed run reads, so the best step and the patience count resume bit for bit.
Improvement is strict (a tie is not one), as Keras' and Hugging Face's EarlyStopping with threshold 0.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora4diffusion.errors import UserError
from lora4diffusion.training.validation import cell, read_validation

log = logging.getLogger("lora4diffusion")

BEST_DIR = "best"  # RUN/best/: what the export writes, at the best validation of --keep-best
BEST_RECORD = "best.json"  # in it: {"metric", "direction", "value", "step"}

DIRECTIONS = ("min", "max")
# column -> its own direction (module docstring); val_loss_tT is matched by prefix
OWN_DIRECTION = {
    "val_loss": "min", "val_eps_mse": "min", "val_l1": "min",
    "accuracy": "max", "plain_accuracy": "max",
    "ink_ratio": "away", "slant_diff": "away",
    "plain_ink_ratio": "near", "plain_slant_diff": "near", "recon_ink_ratio": "near",
    "ink": None, "slant": None,
}  # fmt: skip
SCORE_METRICS = tuple(k for k in OWN_DIRECTION if not k.startswith("val_"))  # from --score-every
# away / near of a ratio are measured on log(ratio): 2x and 0.5x are as far from the base
RATIOS = ("ink_ratio", "plain_ink_ratio", "recon_ink_ratio")


def known_metrics() -> str:
    return ", ".join([*OWN_DIRECTION, "val_loss_tT"])


def parse_metric(text: str) -> tuple[str, str]:
    """``METRIC`` or ``METRIC:min|max`` -> (column, direction); a UserError names what is wrong."""
    name, _, direction = text.strip().partition(":")
    if name not in OWN_DIRECTION and not (name.startswith("val_loss_t") and name[10:].isdigit()):
        raise UserError(f"--keep-best {text!r}: unknown metric (known: {known_metrics()})")
    if direction and direction not in DIRECTIONS:
        raise UserError(f"--keep-best {text!r}: the direction after ':' is min or max, got {direction!r}")
    own = OWN_DIRECTION.get(name, "min")
    if not direction and own is None:
        raise UserError(f"--keep-best {name}: say which way is better ({name}:min or {name}:max)")
    return name, direction or own


def badness(value: float, metric: str, direction: str) -> float:
    """What the tracker minimises: the value, its negative, or its distance from the base (see above)."""
    if direction in ("away", "near") and metric in RATIOS:
        if value <= 0:  # no ink at all: the farthest from the base there is
            return -math.inf if direction == "away" else math.inf
        value = math.log(value)
    return {"min": value, "max": -value, "away": -abs(value), "near": abs(value)}[direction]


@dataclass
class Best:
    """The best value of ``metric`` so far (at ``step``) and ``waited``: validations that measured the metric
    since then without improving it. ``update`` per validation row; ``from_rows`` rebuilds it on resume."""

    metric: str
    direction: str
    value: float | None = None
    step: int | None = None
    waited: int = 0

    @classmethod
    def parse(cls, text: str) -> Best:
        return cls(*parse_metric(text))

    @property
    def spec(self) -> str:
        own = OWN_DIRECTION.get(self.metric, "min")
        return self.metric if self.direction == own else f"{self.metric}:{self.direction}"

    def update(self, step: int, row: dict[str, float | None]) -> bool:
        """Take one validation row (column -> value, None where not measured); True if it is the new best.
        Values are compared as written (``cell``)."""
        value = row.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        value = float(cell(value))
        if self.value is None or badness(value, self.metric, self.direction) < badness(
                self.value, self.metric, self.direction):
            self.value, self.step, self.waited = value, step, 0
            return True
        self.waited += 1
        return False

    @classmethod
    def from_rows(cls, text: str, rows: list[tuple[int, dict[str, float | None]]]) -> Best:
        best = cls.parse(text)
        for step, row in rows:
            best.update(step, row)
        return best

    def record(self) -> dict:
        """best.json's content."""
        return {"metric": self.metric, "direction": self.direction, "value": self.value, "step": self.step}

    def describe(self) -> str:
        if self.value is None:
            return f"{self.spec}: not measured yet"
        return f"best {self.metric} {self.value:.6g} at step {self.step}"


def write_best(run_dir: Path, export: Callable[[Path], None], best: Best) -> None:
    """``export(directory)`` and best.json into RUN/best/: built beside it and renamed into place, so
    RUN/best/ is always one whole export."""
    staging, old, final = (run_dir / name for name in (f".{BEST_DIR}.tmp", f".{BEST_DIR}.old", BEST_DIR))
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    export(staging)
    (staging / BEST_RECORD).write_text(json.dumps(best.record(), indent=2) + "\n")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def restore_best(run_dir: Path, spec: str, step: int) -> Best | None:
    """The best-so-far and the patience count of ``spec`` (--keep-best; "" none) rebuilt from validation.csv's
    rows up to ``step``; RUN/best/ is kept only if it is that best's export: one from a later step (past the
    checkpoint resumed from), for another metric, or of a run started over is removed (and written again when
    the run gets there)."""
    for leftover in (f".{BEST_DIR}.tmp", f".{BEST_DIR}.old"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    best = Best.from_rows(spec, read_validation(run_dir, step)) if spec else None
    final = run_dir / BEST_DIR
    try:
        saved = json.loads((final / BEST_RECORD).read_text())
    except (OSError, ValueError):
        saved = None
    keep = best is not None and step > 0 and saved == best.record()
    if final.exists() and not keep:
        if step > 0:
            log.warning("%s is not the export of this run's %s: removed", final,
                        best.describe() if best else "best (no --keep-best)")
        shutil.rmtree(final, ignore_errors=True)
    return best


__all__ = ["BEST_DIR", "BEST_RECORD", "DIRECTIONS", "OWN_DIRECTION", "SCORE_METRICS", "Best", "badness",
           "known_metrics", "parse_metric", "restore_best", "write_best"]
