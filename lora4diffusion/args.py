"""Argument types, the ``--lora`` parser and output checks shared by the CLI, ``evaluate`` and the server.

They live here, not in ``cli.py``, so that library modules never import the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora4diffusion.errors import UserError


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse names the option in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonneg_float(text: str) -> float:
    """argparse type: a number >= 0 (rejects nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


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
    if p.is_dir() and not overwrite and any(p.iterdir()):
        names = ", ".join(sorted(q.name for q in p.iterdir())[:3])
        raise UserError(
            f"--out {p} already holds files ({names}, ...); pass --overwrite or choose another --out"
        )
    return p


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
        out.append((path, weight))
    return out


def add_loras(pipe, args: argparse.Namespace) -> list[tuple[str, float, str]]:
    """Load each ``--lora PATH[:SCALE]`` (``--force``: any base) into ``pipe``; -> [(path, scale, name)]."""
    loras = parse_loras(args.lora)  # every argument checked before any adapter is read
    return [(path, weight, pipe.add_lora(path, weight, force=args.force)) for path, weight in loras]
