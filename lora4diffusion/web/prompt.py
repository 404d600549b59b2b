"""Prompts for the web page: ``<lora:NAME:WEIGHT>`` tags (AUTOMATIC1111's syntax) and prompt -> conditioning.

What the text left once the tags are stripped becomes is decided in one place, :func:`encode_prompt`: a label
model reads digits from it (``"7"``, ``"seven"``, ``"3 5 7"``, ``"0-9"``, ``"three and 8"``); a prompt model
(training/prompt_base.py trains it) gives it to its text encoder, with the negative prompt as guidance's
unconditional branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora4diffusion.errors import UserError
from lora4diffusion.prompt_syntax import (  # noqa: F401 (re-exported for web/)
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
# ASCII digits only, as `sample --digits` and the CSV reader ("٣" is not read as a 3)
_TOKEN = re.compile(r"([0-9])\s*-\s*([0-9])|([0-9])|([a-z]+)")
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
    labels: list  # one per image: digits (label model) or prompts (prompt model), ``sample``'s order
    columns: list[str]  # what each column of the page's grid shows
    per_digit: int  # images per column
    digits: list[int] | None  # label model: the digits asked for; prompt model: None
    prompts: list[str] | None = None  # prompt model: the prompts asked for (one column each)
    negative: str | None = None  # prompt model: the unconditional branch's prompt (None: "")


PROMPT_SEPARATOR = "|"  # several prompts in one box, one grid column each (= repeated `sample --prompt`)


def encode_prompt(text: str, negative: str, per_digit: int, tokenizer=None) -> Conditioning:
    """Prompt -> the model's conditioning: the one place where the page's text becomes model input.

    Label model (``tokenizer`` None): draws ``per_digit`` images of each digit the text names, in the order
    of ``lora4diffusion sample --digits D --per-digit N`` (so the equivalent command gives the same images).
    It has no text encoder to read a negative prompt with, so one is refused rather than silently ignored.

    Prompt model (its ``models.tokenizer.Tokenizer``): the text goes to the text encoder as it is; ``|``
    separates prompts (one grid column each), ``per_digit`` images of each, in the order of ``sample
    --prompt A --prompt B --num N``. The negative prompt replaces the empty prompt as guidance's
    unconditional branch (SD's negative prompt). Every prompt is tokenized here, so an unknown word is a
    400 with the tokenizer's one line (naming the word and the nearest vocabulary words) before any queueing.
    """
    if tokenizer is None:
        if negative.strip():
            raise UserError("negative prompts need a text-conditioned model; this base is conditioned on a "
                            "digit label (leave it empty)")
        digits = prompt_digits(text)
        labels = [d for d in digits for _ in range(per_digit)]
        return Conditioning(labels, [str(d) for d in digits], per_digit, digits)
    prompts = [" ".join(p.split()) for p in text.split(PROMPT_SEPARATOR)]
    if len(prompts) > 1 and not all(prompts):
        raise UserError(f"an empty prompt between '{PROMPT_SEPARATOR}' separators (one prompt per column)")
    negative = " ".join(negative.split())
    tokenizer.encode([*prompts, negative])  # UserError: unknown word (nearest ones named) or too long
    labels = [p for p in prompts for _ in range(per_digit)]
    return Conditioning(labels, [p or "(empty prompt)" for p in prompts], per_digit, None, prompts,
                        negative or None)
