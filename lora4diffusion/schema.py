"""Type and range checks for values read from files (config JSON, safetensors metadata, PEFT configs).

A file from a stranger can hold anything: a string where a channel count belongs, ``1e12`` timesteps, a
NaN alpha, ``true`` for a rank. Every reader checks each value here before using it, and a failure is a
``UserError`` with one line naming the field and the value (shortened), so the caller can prefix the file.
Python's own coercions are not used on purpose: ``int(4.7)`` truncates and ``bool("no")`` is True.
"""

from __future__ import annotations

import math
import re

from lora4diffusion.errors import UserError

_INT_TEXT = re.compile(r"[+-]?\d{1,30}")


def shown(value: object, limit: int = 40) -> str:
    """repr(value), shortened: a 1 MB string in a config must not become a 1 MB error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer(value: object, name: str, lo: int, hi: int) -> int:
    """A JSON integer (not a bool, not a float such as 4.7 or 4.0) with lo <= value <= hi."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {shown(value)}")
    if not lo <= value <= hi:
        raise UserError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def number(value: object, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite JSON number (int or float, not a bool) with lo <= value <= hi (lo < value if lo_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise UserError(f"{name} must be {bound} and <= {hi:g}, got {value:g}")
    return value


def boolean(value: object, name: str) -> bool:
    """A JSON true/false: the string "no" is not False (bool("no") is True)."""
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {shown(value)}")
    return value


def string(value: object, name: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name} must be a string, got {shown(value)}")
    if choices is not None and value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}; got {shown(value)}")
    return value


def int_text(text: object, name: str, lo: int, hi: int) -> int:
    """An integer written as text (safetensors metadata is str -> str): "4", not "4.7", "abc" or "1e3"."""
    if not isinstance(text, str) or not _INT_TEXT.fullmatch(text.strip()):
        raise UserError(f"{name} must be an integer, got {shown(text)}")
    return integer(int(text), name, lo, hi)


def float_text(text: object, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite number written as text: "4.0", "1e-3"; not "nan", "inf" or "abc"."""
    try:
        value = float(text) if isinstance(text, str) and len(text) < 64 else None
    except ValueError:
        value = None
    if value is None:
        raise UserError(f"{name} must be a number, got {shown(text)}")
    return number(value, name, lo, hi, lo_open)
