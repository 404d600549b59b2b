"""Captions for digits: template families, DreamBooth trigger words, the empty prompt, and digit_of.

A prompt-conditioned base learns from captions drawn from several phrasings of the same digit ("7",
"seven", "a handwritten seven", "the digit 7", "a picture of the number seven", ...), as SD learned from
varied alt-texts. One family (`HELD_OUT`) is never drawn in training: each of its templates is a new
combination of words that all do occur in training captions, so "does the model follow an unseen phrasing"
is measured with trained word embeddings, not random ones.

Trigger words (DreamBooth, Ruiz et al. 2023): a LoRA is trained on captions that carry a rare identifier,
placed either before the class noun as in the paper's "a [V] dog" ("a handwritten sks seven") or as a style
phrase ("the digit 7 in sks style"), the two placements SD LoRA trainers use. The identifier must be one of
the reserved rare words of the vocabulary: an ordinary caption word would tie the adapter to prompts the base
must keep answering as before (kohya-ss/sd-scripts #1045 is the failure this avoids).

Classifier-free guidance uses the empty prompt "" (bos, eos, padding), as SD does: `p_empty` of the
training captions are replaced by it.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterator, Sequence

import torch

from lora4diffusion.errors import UserError

NUMERALS = tuple("0123456789")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLE_WORDS = ("bold", "thin", "italic")  # the built-in styles of styles.py
# Rare identifiers as SD users pick them: "sks" (DreamBooth's examples), "ohwx" (kohya guides), "zwx",
# "tok" (diffusers' SDXL DreamBooth example), and a few more of the same kind.
TRIGGER_WORDS = ("sks", "ohwx", "zwx", "tok", "bnha", "xjy", "qwv", "vxk")
EMPTY_PROMPT = ""
# Textual inversion's placeholder S* (Gal et al. 2022): a NEW token whose vectors are learned, never a
# vocabulary word. Written <name> as in diffusers' examples ("<cat-toy>"), so a prompt can never mean a word
# by it and a placeholder whose embedding is not loaded is recognised as one.
PLACEHOLDER = re.compile(r"<[a-z0-9][a-z0-9_-]{0,62}>")

# {n} is the numeral, {w} the word. A trigger/style modifier goes right before the digit, or into a
# trailing "in ... style".
TEMPLATES: dict[str, tuple[str, ...]] = {
    "numeral": ("{n}",),
    "word": ("{w}",),
    "handwritten": ("a handwritten {w}", "a handwritten {n}", "{w}, handwritten"),
    "digit": ("the digit {n}", "the digit {w}", "a digit {w}"),
    "picture": (
        "a picture of the number {w}", "a picture of a {w}", "a photo of the digit {n}", "a drawing of a {w}"
    ),
    "number": ("the number {w}", "number {n}", "the numeral {n}"),
}
HELD_OUT = "held_out"
HELD_OUT_TEMPLATES = (
    "a picture of the digit {w}",
    "the handwritten number {n}",
    "a drawing of the numeral {w}",
    "a photo of a handwritten {n}",
)
FORMS = ("before", "style")  # where a modifier goes: before the digit, or "... in <modifier> style"
_TAG = re.compile(r"<[^<>]*>")  # <lora:name:weight> tags (AUTOMATIC1111) name no digit


def family_templates(family: str | None = None) -> tuple[str, ...]:
    """The templates of one family; None = every training family; HELD_OUT = the unseen phrasings."""
    if family is None:
        return tuple(itertools.chain.from_iterable(TEMPLATES.values()))
    if family == HELD_OUT:
        return HELD_OUT_TEMPLATES
    if family not in TEMPLATES:
        raise UserError(f"unknown caption family {family!r} (families: {', '.join([*TEMPLATES, HELD_OUT])})")
    return TEMPLATES[family]


def caption_words() -> frozenset[str]:
    """Every word an untriggered, unstyled training caption can contain (digits included)."""
    words: set[str] = set(NUMERALS) | set(DIGIT_WORDS)
    for t in family_templates(None):
        words.update(t.replace("{n}", "").replace("{w}", "").replace(",", " , ").split())
    return frozenset(words)


def check_trigger(trigger: str) -> str:
    """A trigger must be one reserved rare word, never an ordinary caption word."""
    reserved = ", ".join(TRIGGER_WORDS)
    word = trigger.strip().lower() if isinstance(trigger, str) else trigger  # prompts are lower-cased too
    if word not in TRIGGER_WORDS:
        if word in caption_words() or word in STYLE_WORDS:
            raise UserError(
                f"trigger {trigger!r} is an ordinary caption word: the base must keep its meaning;"
                f" use a reserved trigger ({reserved})"
            )
        raise UserError(f"trigger {trigger!r} is not a reserved trigger word (reserved: {reserved})")
    return word


def check_placeholder(token: str) -> str:
    """A textual-inversion token: ``<name>``, name of lower-case letters, digits, '-' and '_' (at most 63)."""
    if not isinstance(token, str) or not PLACEHOLDER.fullmatch(token):
        raise UserError(f"token {str(token)[:80]!r} is not a placeholder token: write <name> (lower-case"
                        " letters, digits, '-', '_'), e.g. <bold-ti>")
    return token


def check_modifier(word: str) -> str:
    """What captions may carry where the style goes: a reserved trigger word or a placeholder token."""
    return check_placeholder(word) if isinstance(word, str) and word.startswith("<") else check_trigger(word)


def check_style(style: str) -> str:
    if style not in STYLE_WORDS:
        raise UserError(f"style word {style!r} is not one of {', '.join(STYLE_WORDS)}")
    return style


def caption(digit: int, template: str, trigger: str | None = None, style: str | None = None,
            form: str = "before") -> str:
    """One caption: the template filled with the digit, the trigger/style modifier placed by `form`."""
    if form not in FORMS:
        raise UserError(f"caption form {form!r} is not one of {', '.join(FORMS)}")
    modifier = " ".join(w for w in (trigger, style) if w)
    if modifier and form == "before":
        template = template.replace("{n}", modifier + " {n}").replace("{w}", modifier + " {w}")
    text = template.format(n=NUMERALS[digit], w=DIGIT_WORDS[digit])
    if modifier and form == "style":
        text = f"{text} in {modifier} style"
    return text


def all_captions(digit: int, trigger: str | None = None, style: str | None = None,
                 family: str | None = None) -> list[str]:
    """Every caption `captions_for` can draw for this digit (both forms when there is a modifier)."""
    forms = FORMS if (trigger or style) else FORMS[:1]
    return [caption(digit, t, trigger, style, f) for t in family_templates(family) for f in forms]


def _labels_list(labels: torch.Tensor | Sequence[int]) -> list[int]:
    values = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 9:
            raise UserError(f"a caption needs a digit 0-9, got {v!r}")
    return values


def captions_for(
    labels: torch.Tensor | Sequence[int],
    generator: torch.Generator | None = None,
    trigger: str | None = None,
    style: str | None = None,
    p_empty: float = 0.0,
    family: str | None = None,
) -> list[str]:
    """One caption per label, drawn with `generator`: family uniformly, then a template in it, then where
    the trigger/style goes; with probability p_empty the caption is the empty prompt (for guidance)."""
    values = _labels_list(labels)
    trigger = check_modifier(trigger) if trigger is not None else None
    style = check_style(style) if style is not None else None
    if not 0.0 <= p_empty <= 1.0:
        raise UserError(f"p_empty must be in [0, 1], got {p_empty}")
    groups = [family_templates(family)] if family is not None else list(TEMPLATES.values())
    # One draw of four uniforms per caption: the stream does not depend on which branches are taken.
    u = torch.rand((len(values), 4), generator=generator, dtype=torch.float64).tolist()
    out = []
    for d, (u_empty, u_family, u_template, u_form) in zip(values, u, strict=True):
        if u_empty < p_empty:
            out.append(EMPTY_PROMPT)
            continue
        templates = groups[min(int(u_family * len(groups)), len(groups) - 1)]
        template = templates[min(int(u_template * len(templates)), len(templates) - 1)]
        out.append(caption(d, template, trigger, style, FORMS[int(u_form < 0.5)]))
    return out


def digit_of(prompt: str) -> int:
    """The digit a prompt names (a numeral or a number word), or -1 if it names none, several different
    ones, or a number of two or more digits ("17"). <...> tags such as <lora:bold:0.8> are ignored."""
    text = unicodedata.normalize("NFC", _TAG.sub(" ", prompt)).lower()
    numbers = re.findall(r"[0-9]+", text)
    if any(len(n) > 1 for n in numbers):
        return -1
    named = {int(n) for n in numbers}
    named.update(DIGIT_WORDS.index(w) for w in re.findall(r"[^\W\d_]+", text) if w in DIGIT_WORDS)
    return named.pop() if len(named) == 1 else -1


def iter_every_caption() -> Iterator[str]:
    """Every string the templates can produce: digits x families (held-out too) x triggers x styles x
    placements, and the empty prompt."""
    for d in range(10):
        for trigger in (None, *TRIGGER_WORDS):
            for style in (None, *STYLE_WORDS):
                for family in (None, HELD_OUT):
                    yield from all_captions(d, trigger, style, family)
    yield EMPTY_PROMPT


# What `sample --digits` asks a prompt model for: the "digit" family, cycled ("the digit 7", "the digit
# seven", "a digit seven", ...).
DIGITS_FAMILY = "digit"


def digit_prompts(digits: list[int] | torch.Tensor, family: str | None = DIGITS_FAMILY,
                  trigger: str | None = None) -> list[str]:
    """One prompt per digit from a caption family's templates, cycled per digit (the k-th occurrence of a
    digit takes template k mod T), so N samples of one digit cover the family evenly. family None = every
    training template; captions.HELD_OUT = the phrasings never seen in training. ``trigger``: placed before
    the digit, as a trigger LoRA was captioned ("a handwritten sks seven")."""
    templates = family_templates(family)
    seen: dict[int, int] = {}
    out = []
    for d in (digits.tolist() if isinstance(digits, torch.Tensor) else list(digits)):
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9:
            raise UserError(f"a digit prompt needs a digit 0-9, got {d!r}")
        k = seen.get(d, 0)
        seen[d] = k + 1
        out.append(caption(d, templates[k % len(templates)], trigger))
    return out


def negative_prompts(negative: str | list[str] | None, n: int) -> list[str]:
    """The unconditional branch's prompts: "" (None), one negative for all, or one per prompt."""
    if negative is None:
        return [EMPTY_PROMPT] * n
    if isinstance(negative, str):
        return [negative] * n
    negative = list(negative)
    if len(negative) != n:
        raise UserError(f"{len(negative)} negative prompts for {n} prompts: give one, or one per prompt")
    return negative


__all__ = [
    "DIGIT_WORDS", "EMPTY_PROMPT", "FORMS", "HELD_OUT", "HELD_OUT_TEMPLATES", "NUMERALS", "PLACEHOLDER",
    "STYLE_WORDS", "TEMPLATES", "TRIGGER_WORDS", "all_captions", "caption", "caption_words", "captions_for",
    "check_modifier", "check_placeholder", "check_style", "check_trigger", "digit_of", "digit_prompts",
    "family_templates", "iter_every_caption", "negative_prompts", "DIGITS_FAMILY",
]
