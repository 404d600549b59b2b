"""The command line's argument types (bounded integers, finite floats) and ``--lora PATH[:SCALE]`` parsing."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lora4diffusion.errors import UserError
from lora4diffusion.pipeline import Pipeline

# Upper bounds at the door: beyond them a run cannot fit in memory, would never finish, or makes no sense
# (each message names the limit). Seeds feed torch.Generator.manual_seed, which takes 64-bit values.
SEED_LIMIT = 2**63
MAX_COUNT = 10**9  # step counts, epochs: no allocation depends on them
MAX_BATCH = 4096  # global training batch: 4096 x 28 x 28 activations already need tens of GB in the UNet
MAX_PER_DIGIT = 10_000  # samples per digit: 10 digits x 10,000 x 28 x 28 float32 = 314 MB of images
MAX_IMAGE_SIZE = 128  # training resolution (28 native): 5,000 digits at 128 px are 330 MB on the device
MAX_RANK = 512
MAX_LORA_WEIGHT = 1000.0  # |scale| of an adapter; beyond it an adapter only produces overflow


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def bounded_int(low: int, high: int, why: str = "the limit"):
    """argparse type factory: an integer in [low, high]; the message says which bound and why."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {'> 0' if low == 1 else f'>= {low}'}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high} ({why}), got {value}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = bounded_int(1, MAX_COUNT)
positive_int.__doc__ = "argparse type: an integer > 0 (and <= 10**9)."
seed_int = bounded_int(0, SEED_LIMIT - 1, "a 63-bit seed: 0 <= seed < 2**63")
batch_int = bounded_int(1, MAX_BATCH, "larger batches do not fit in memory")
per_digit_int = bounded_int(1, MAX_PER_DIGIT, "larger sample sets do not fit in memory")
image_size_int = bounded_int(1, MAX_IMAGE_SIZE, "the largest training resolution")
rank_int = bounded_int(1, MAX_RANK, "the largest LoRA rank")


def finite_float(low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False):
    """argparse type factory: a finite number (never nan/inf) within the given bounds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


nonneg_float = finite_float(0.0)
nonneg_float.__doc__ = "argparse type: a finite number >= 0 (rejects nan and inf)."
positive_float = finite_float(0.0, low_open=True)
unit_float = finite_float(0.0, 1.0)  # DDIM eta, probabilities
fraction_float = finite_float(0.0, 1.0, high_open=True)  # dropout, EMA decay
learning_rate = finite_float(0.0, 10.0, low_open=True)


def lora_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--lora PATH[:SCALE] (repeatable) and --force."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        required=required,
        metavar="PATH[:SCALE]",
        help="adapter directory or file, or a shipped adapter's name (bold, italic), optionally with a scale;"
        " repeat to mix adapters",
    )
    p.add_argument("--force", action="store_true", help="load adapters trained on a different base")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` (the CLI's --lora) -> (path, weight)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return text, 1.0  # a colon inside the path
        if not math.isfinite(weight):
            raise UserError(f"--lora {text}: the weight must be a finite number")
        return path, weight
    return text, 1.0


def parse_loras(items: list[str]) -> list[tuple[str, float]]:
    """Each ``--lora PATH[:SCALE]`` -> (path, scale), every scale finite and within MAX_LORA_WEIGHT."""
    out = []
    for text in items:
        path, weight = parse_lora_arg(text)
        head, sep, tail = text.rpartition(":")
        if sep and path == text and not Path(text).exists():
            raise UserError(f"--lora {text}: scale {tail!r} is not a number")
        if not abs(weight) <= MAX_LORA_WEIGHT:
            limit = f"{MAX_LORA_WEIGHT:g}"
            raise UserError(f"--lora {text}: the scale must lie in [-{limit}, {limit}]")
        out.append((path, weight))
    return out


def add_loras(pipe: Pipeline, args: argparse.Namespace) -> list[tuple[str, float, str]]:
    """Load each ``--lora PATH[:SCALE]`` (``--force``: any base) into ``pipe``; -> [(path, scale, name)]."""
    loras = parse_loras(args.lora)  # every argument checked before any adapter is read
    return [(path, weight, pipe.add_lora(path, weight, force=args.force)) for path, weight in loras]
