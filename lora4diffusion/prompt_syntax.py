"""``<lora:NAME_OR_PATH[:WEIGHT]>`` tags inside a prompt (AUTOMATIC1111's extra-network syntax): one parser.

    "<lora:bold:0.8> a sks seven"  ->  text "a sks seven", loras {"bold": 0.8}

As in AUTOMATIC1111: a tag without a weight means weight 1, tags are case-insensitive (``<LORA:...>``), the
tag is removed from the text before it is tokenized, and the last tag of a name wins within one prompt.
AUTOMATIC1111's further positional fields (a separate text-encoder multiplier, ``dyn``) are refused rather
than ignored. Used by ``sample --prompt``, ``Pipeline.generate`` (pipeline.py) and the web page
(web/prompt.py, which allows plain names only, never paths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lora4diffusion.errors import UserError
from lora4diffusion.limits import lora_weight

TAG = re.compile(r"<lora:([^:<>]*)(?::([^:<>]*))?(?::([^<>]*))?>", re.IGNORECASE)
_OPEN = re.compile(r"<\s*lora\b", re.IGNORECASE)  # what is left of a tag that TAG could not read
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class Prompt:
    text: str  # the prompt without its tags, whitespace collapsed
    loras: dict[str, float] = field(default_factory=dict)  # name or path -> weight, in order of appearance


def check_weight(name: str, weight: float) -> float:
    """An adapter's weight, within the one limit of every way a weight arrives (limits.MAX_LORA_WEIGHT)."""
    return lora_weight(weight, f"adapter {str(name)[:80]!r}")


def check_name(name: str) -> str:
    """Adapter names are plain words: never a path (no '/', '..', drive letters), so they cannot escape."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"bad adapter name {str(name)[:80]!r} (letters, digits, '-', '_'; at most 64)")
    return name


def parse_prompt(prompt: str, paths: bool = False) -> Prompt:
    """Strip ``<lora:NAME[:WEIGHT]>`` tags; returns the remaining text and the tags' weights.

    ``paths`` False (the web page): NAME must be a plain adapter name (``check_name``). True (the CLI and
    Pipeline): NAME may also be a path to an adapter folder or file; it is resolved by the caller.
    A tag that cannot be read (unclosed, empty name, extra fields, a weight that is not a number) is a
    UserError naming it.
    """
    if not isinstance(prompt, str):
        raise UserError(f"a prompt must be text, got {type(prompt).__name__}")
    loras: dict[str, float] = {}
    tags = list(TAG.finditer(prompt))
    starts = {m.start() for m in tags}
    for m in _OPEN.finditer(prompt):  # a "<lora" that does not begin a readable tag: quote it as written
        if m.start() not in starts:
            close = prompt.find(">", m.start())
            end = close + 1 if 0 <= close < m.start() + 60 else m.start() + 40
            raise UserError(f"malformed tag {prompt[m.start() : end]!r} in prompt {prompt[:80]!r} (write"
                            " <lora:NAME[:WEIGHT]>)")
    for m in tags:
        tag, name, weight, extra = m.group(0), m.group(1).strip(), m.group(2), m.group(3)
        if not name:
            raise UserError(f"malformed tag {tag!r}: no adapter name (write <lora:NAME[:WEIGHT]>)")
        if not paths:
            check_name(name)
        if extra is not None:
            raise UserError(f"tag {tag!r}: only <lora:NAME[:WEIGHT]> is understood (one weight, no extra"
                            " fields)")
        try:
            w = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            raise UserError(f"tag {tag!r}: weight {weight.strip()!r} is not a number") from None
        loras.pop(name, None)
        loras[name] = check_weight(name, w)
    return Prompt(" ".join(TAG.sub(" ", prompt).split()), loras)


def has_tags(prompt: str) -> bool:
    return isinstance(prompt, str) and _OPEN.search(prompt) is not None


def call_loras(prompts: list[str], paths: bool = True) -> tuple[list[str], dict[str, float]]:
    """The tags of one sampling call: (stripped prompts, {name: weight}).

    Adapters act on the whole batch (their weight is a property of the network, not of a row), so every
    prompt of one call must carry the same tags with the same weights; anything else is refused with a
    message saying to sample those prompts in separate calls.
    """
    parsed = [parse_prompt(p, paths=paths) for p in prompts]
    if not parsed:
        return [], {}
    first = parsed[0].loras
    for p, original in zip(parsed, prompts, strict=True):
        if p.loras != first:
            diff = sorted(set(p.loras.items()) ^ set(first.items()))
            name = diff[0][0] if diff else "?"
            raise UserError(
                f"prompts of one call carry different <lora:...> tags (adapter {name!r} in {original[:60]!r}"
                f" vs {prompts[0][:60]!r}); an adapter's weight applies to the whole batch: sample them in"
                " separate calls"
            )
    return [p.text for p in parsed], dict(first)


__all__ = ["NAME", "TAG", "Prompt", "call_loras", "check_name", "check_weight", "has_tags",
           "parse_prompt"]
