"""The command line's argument types (bounded integers, finite floats) and ``--lora PATH[:W|:TE:UNET]``
parsing."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lora4diffusion.errors import UserError
from lora4diffusion.limits import MAX_GUIDANCE, lora_weight
from lora4diffusion.lora.block_weights import AdapterWeight, from_lbw
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.prompt_syntax import TagWeight

# Upper bounds at the door: beyond them a run cannot fit in memory, would never finish, or makes no sense
# (each message names the limit). Seeds feed torch.Generator.manual_seed, which takes 64-bit values.
SEED_LIMIT = 2**63
MAX_COUNT = 10**9  # step counts, epochs: no allocation depends on them
MAX_BATCH = 4096  # global training batch: 4096 x 28 x 28 activations already need tens of GB in the UNet
MAX_PER_DIGIT = 10_000  # samples per digit: 10 digits x 10,000 x 28 x 28 float32 = 314 MB of images
MAX_IMAGES = 10 * MAX_PER_DIGIT  # images in one `sample` (prompts x --num too): the same 314 MB
MAX_IMAGE_SIZE = 128  # training resolution (28 native): 5,000 digits at 128 px are 330 MB on the device
MAX_RANK = 512


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # also a 5,000-digit number (Python's int-from-text limit)
        raise argparse.ArgumentTypeError(f"expected an integer, got {_shown(text)}") from None


def bounded_int(low: int, high: int, why: str = "the limit"):
    """argparse type factory: an integer in [low, high]; the message states both bounds and why. Its
    ``allowed`` says what passes (for messages about the same value read from a file)."""
    bounds = f"{'> 0' if low == 1 else f'>= {low}'} and <= {high}"

    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {bounds} ({why}), got {value}")
        return value

    parse.__name__ = "integer"
    parse.allowed = f"an integer {bounds} ({why})"
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
    """argparse type factory: a finite number (never nan/inf) within the given bounds. Its ``allowed`` says
    what passes (for messages about the same value read from a file)."""
    parts = ([] if low is None else [f"{'>' if low_open else '>='} {low:g}"]) + (
        [] if high is None else [f"{'<' if high_open else '<='} {high:g}"])
    bounds = " and ".join(parts)
    finite = f"a finite number{bounds and ' ' + bounds}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {_shown(text)}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {finite}, got {text[:40]}")
        if low is not None and (value <= low if low_open else value < low) or high is not None and (
                value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text[:40]}")
        return value

    parse.__name__ = "number"
    parse.allowed = finite
    return parse


nonneg_float = finite_float(0.0)
nonneg_float.__doc__ = "argparse type: a finite number >= 0 (rejects nan and inf)."
positive_float = finite_float(0.0, low_open=True)
unit_float = finite_float(0.0, 1.0)  # DDIM eta, probabilities
fraction_float = finite_float(0.0, 1.0, high_open=True)  # dropout, EMA decay
learning_rate = finite_float(0.0, 10.0, low_open=True)
guidance_float = finite_float(0.0, MAX_GUIDANCE)  # the measured limit (limits.py): beyond it, saturated noise


def lora_args(p: argparse.ArgumentParser, required: bool = False, blocks: bool = False) -> None:
    """--lora PATH[:TE[:UNET]] (repeatable), --force, and with ``blocks`` --lora-blocks PATH=SPEC."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        required=required,
        metavar="PATH[:W|:TE:UNET]",
        help="adapter directory or file, or a shipped adapter's name (bold, italic), optionally with a"
        " weight, or A1111's two: the text encoder's then the UNet's; repeat to mix adapters",
    )
    p.add_argument("--force", action="store_true", help="load adapters trained on a different base")
    if blocks:
        p.add_argument("--lora-blocks", action="append", default=[], metavar="PATH=SPEC",
                       help="per-block weights of the --lora PATH, as the LoRA Block Weight extension's lbw=:"
                       " a preset (ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, NONE, ALL0.5) or 17 / 26"
                       " numbers (BASE, IN.., M00, OUT..; docs/API.md maps them onto our UNet)")


def _weights(tail: str) -> list[float] | None:
    """The trailing ``W`` or ``TE:UNET`` of a --lora argument as numbers; None when they are not numbers."""
    try:
        return [float(x) for x in tail.split(":")]
    except ValueError:
        return None


def parse_lora_arg(text: str) -> tuple[str, float | TagWeight]:
    """``PATH``, ``PATH:WEIGHT`` or ``PATH:TE:UNET`` (the CLI's --lora, A1111's order: the text encoder's
    weight, then the UNet's) -> (path, weight or TagWeight); each weight within the one limit of every
    adapter weight (limits.MAX_LORA_WEIGHT)."""
    head, sep, tail = text.rpartition(":")
    if not sep or _weights(tail) is None:
        return text, 1.0  # no weight, or a colon inside the path
    inner, sep2, mid = head.rpartition(":")
    if sep2 and _weights(mid) is not None and inner:  # PATH:TE:UNET
        te, unet = lora_weight(float(mid), f"--lora {text}"), lora_weight(float(tail), f"--lora {text}")
        return inner, TagWeight(te, unet)
    return head, lora_weight(float(tail), f"--lora {text}")


def parse_loras(items: list[str]) -> list[tuple[str, float | TagWeight]]:
    """Each ``--lora PATH[:W|:TE:UNET]`` -> (path, weight): a path or shipped name, weights within the
    limit."""
    out = []
    for text in items:
        if not text.strip():
            raise UserError(f"--lora {text!r} is empty: name an adapter folder or file, or a shipped adapter"
                            " (bold, italic; `lora4diffusion list`)")
        path, weight = parse_lora_arg(text)
        head, sep, tail = text.rpartition(":")
        if sep and path == text and not Path(text).exists():
            raise UserError(f"--lora {text}: weight {tail!r} is not a number")
        if not path.strip():
            raise UserError(f"--lora {text}: no adapter before the weight (write PATH[:WEIGHT])")
        inner, sep2, tail2 = path.rpartition(":")
        if sep2 and inner and path != text and not Path(path).exists() and _weights(tail2) is not None:
            raise UserError(f"--lora {text}: more than two weights (write PATH[:WEIGHT] or PATH:TE:UNET,"
                            " A1111's text-encoder and UNet weights)")
        out.append((path, weight))
    return out


def parse_lora_blocks(items: list[str], paths: list[str]) -> dict[str, str]:
    """Each ``--lora-blocks PATH=SPEC`` -> {path: spec}; PATH must be the PATH of one --lora."""
    out: dict[str, str] = {}
    for text in items:
        path, eq, spec = text.rpartition("=")
        if not eq or not path.strip() or not spec.strip():
            raise UserError(f"--lora-blocks {text}: write PATH=SPEC (a --lora's PATH, then a preset such as"
                            " OUTS or 17 / 26 numbers)")
        if path not in paths:
            raise UserError(f"--lora-blocks {text}: {path!r} is not the PATH of a --lora (given:"
                            f" {', '.join(paths) or 'none'})")
        if path in out:
            raise UserError(f"--lora-blocks: {path!r} is given twice")
        out[path] = spec.strip()
    return out


def add_loras(pipe: Pipeline, args: argparse.Namespace) -> list[tuple[str, float | TagWeight, str]]:
    """Load each ``--lora PATH[:W|:TE:UNET]`` (``--force``: any base; ``--lora-blocks``: its block weights)
    into ``pipe``; -> [(path, weight, name)], the weight a TagWeight when it is more than one number."""
    loras = parse_loras(args.lora)  # every argument checked before any adapter is read
    blocks = parse_lora_blocks(getattr(args, "lora_blocks", None) or [], [p for p, _ in loras])
    out = []
    for path, weight in loras:
        if path in blocks:
            te, unet = (weight.te, weight.unet) if isinstance(weight, TagWeight) else (weight, weight)
            weight = TagWeight(te, unet, blocks[path])
        steer = weight
        if isinstance(weight, TagWeight):
            steer = from_lbw(weight.te, weight.unet, weight.lbw, pipe.unet.cfg) if weight.lbw else \
                AdapterWeight(weight.te, weight.unet)
        out.append((path, weight, pipe.add_lora(path, steer, force=args.force)))
    return out
