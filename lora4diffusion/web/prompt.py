"""Prompts for the web page: ``<lora:NAME:WEIGHT>`` tags (AUTOMATIC1111's syntax) and prompt -> conditioning.

Today's model is conditioned on a digit label, so the text that is left once the tags are stripped must name
digits: ``"7"``, ``"seven"``, ``"3 5 7"``, ``"0-9"``, ``"three and 8"``. A text-conditioned pipeline replaces
:func:`encode_prompt` (the one place where a prompt becomes model conditioning) and keeps everything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora4diffusion.errors import UserError
from lora4diffusion.prompt_syntax import (  # noqa: F401 (re-exported for web/)
    MAX_WEIGHT,
    NAME,
    TAG,
    Prompt,
    check_name,
    check_weight,
    parse_prompt,
)

# The tag parsing is shared with the CLI and Pipeline (lora4diffusion.prompt_syntax); the page takes plain
# adapter names only (parse_prompt's default), never paths.
WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
_TOKEN = re.compile(r"(\d)\s*-\s*(\d)|(\d)|([a-z]+)")
_FILLER = {"and", "a", "an", "digit", "digits", "number", "numbers", "the", "of", "to", "then", "or"}


def prompt_digits(text: str) -> list[int]:
    """Digits named by the text, in order, duplicates dropped (as ``sample --digits``): '3 5 7', 'seven',
    '0-9', '3,five'. An empty text means every digit 0-9."""
    words = re.sub(r"[,;.+&/]", " ", text.lower()).strip()
    if not words:
        return list(range(10))
    out: list[int] = []
    pos = 0
    for m in _TOKEN.finditer(words):
        gap = words[pos : m.start()].strip()
        if gap:
            raise UserError(f"cannot read {gap!r} in the prompt: this model draws digits (e.g. '7', 'seven', "
                            f"'3 5 7', '0-9')")
        pos = m.end()
        if m.group(1) is not None:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise UserError(f"range {m.group(0)!r} is reversed (write {hi}-{lo})")
            new = list(range(lo, hi + 1))
        elif m.group(3) is not None:
            new = [int(m.group(3))]
        elif m.group(4) in WORDS:
            new = [WORDS[m.group(4)]]
        elif m.group(4) in _FILLER:
            new = []
        else:
            raise UserError(f"unknown word {m.group(4)!r} in the prompt: this model is conditioned on a "
                            f"digit label (try '7', 'seven', '3 5 7' or '0-9')")
        out += [d for d in new if d not in out]
    if words[pos:].strip():
        raise UserError(f"cannot read {words[pos:].strip()!r} in the prompt")
    if not out:
        raise UserError("the prompt names no digit (try '7', 'seven', '3 5 7' or '0-9')")
    return out


@dataclass
class Conditioning:
    labels: list[int]  # one per image: per_digit of the first digit, then of the next (``sample``'s order)
    columns: list[str]  # what each column of the page's grid shows
    per_digit: int
    digits: list[int]


def encode_prompt(text: str, negative: str, per_digit: int) -> Conditioning:
    """Prompt -> the model's conditioning: THE function a text-conditioned pipeline replaces.

    The label model draws ``per_digit`` images of each digit the text names, in the order of
    ``lora4diffusion sample --digits D --per-digit N`` (so the equivalent command gives the same images).
    It has no text encoder to read a negative prompt with, so one is refused rather than silently ignored.
    """
    if negative.strip():
        raise UserError("negative prompts need a text-conditioned model; this base is conditioned on a digit "
                        "label (leave it empty)")
    digits = prompt_digits(text)
    labels = [d for d in digits for _ in range(per_digit)]
    return Conditioning(labels, [str(d) for d in digits], per_digit, digits)
