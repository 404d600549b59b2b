"""Argument types, the ``--lora`` parser and output checks shared by the CLI, ``evaluate`` and the server.

They live here, not in ``cli.py``, so that library modules never import the command line.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import tempfile
from pathlib import Path

from lora4diffusion.errors import UserError

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


def out_dir(path: str | Path, overwrite: bool = False, inputs: tuple[str | Path, ...] = ()) -> Path:
    """An output directory: may not exist yet or be empty; a file there is refused.

    A directory that already holds files is refused unless ``overwrite`` (so a typo never replaces a model,
    an adapter or samples), and so is one that is, or lies inside, one of ``inputs`` (never write over what
    is being read).
    """
    p = Path(path)
    if str(path) == "":
        raise UserError("--out is empty: name a directory")
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} is a file, not a directory")
    resolved = p.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if resolved == s or s in resolved.parents:
            raise UserError(f"--out {p} is the input {src}: write to another directory")
    from lora4diffusion import runlock

    if p.is_dir():
        runlock.check_free(p)  # a training running there: name it
    try:
        held = sorted(q.name for q in p.iterdir()) if p.is_dir() else []
    except OSError as e:
        raise UserError(f"--out {p}: cannot read it ({e.strerror or e})") from None
    if held and not overwrite:
        names = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise UserError(f"--out {p} already holds files ({names}); pass --overwrite or choose another --out")
    check_writable(p)
    return p


def check_writable(path: Path) -> None:
    """Fail now, not after the work: create and remove a probe file in ``path`` or its nearest parent.

    A real probe, not os.access: it also catches read-only file systems and works for root.
    """
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {path}: {probe} is a file, not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lora4diffusion-probe-", dir=probe)
    except OSError as e:
        denied = "permission denied, " if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise UserError(f"--out {path}: {denied}cannot write in {probe} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def lora_args(p: argparse.ArgumentParser, required: bool = False) -> None:
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


def parse_loras(items: list[str]) -> list[tuple[str, float]]:
    from lora4diffusion.lora.adapters import parse_lora_arg

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


def add_loras(pipe, args: argparse.Namespace) -> list[tuple[str, float, str]]:
    """Load each ``--lora PATH[:SCALE]`` (``--force``: any base) into ``pipe``; -> [(path, scale, name)]."""
    loras = parse_loras(args.lora)  # every argument checked before any adapter is read
    return [(path, weight, pipe.add_lora(path, weight, force=args.force)) for path, weight in loras]
