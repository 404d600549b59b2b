"""``<lora:NAME_OR_PATH[:WEIGHT]>`` tags inside a prompt (AUTOMATIC1111's extra-network syntax): one parser.

    "<lora:bold:0.8> a sks seven"  ->  text "a sks seven", loras {"bold": 0.8}

As in AUTOMATIC1111: a tag without a weight means weight 1, tags are case-insensitive (``<LORA:...>``), the
tag is removed from the text before it is tokenized, and the last tag of a name wins within one prompt.
With ``fields`` (``sample --prompt`` and ``Pipeline``) a tag also takes AUTOMATIC1111's further fields, in
its order (extensions-builtin/Lora/extra_networks_lora.py): ``<lora:NAME:TE:UNET>``, the first number the
text encoder's weight and the second the UNet's (it defaults to the first), or named ``te=`` / ``unet=``;
and the LoRA Block Weight extension's ``lbw=PRESET`` or ``lbw=w1,w2,...`` (17 or 26 numbers; the blocks:
lora/block_weights.py). Such a tag's weight is a ``TagWeight``. Its other fields (A1111's ``dyn=``, the
extension's ``start=`` / ``stop=`` / ``step=`` / ``lbwe=``, a third number) are refused rather than
ignored, one line naming the field. The web page (web/prompt.py: plain names only, never paths) takes
``<lora:NAME[:WEIGHT]>`` and refuses the further fields the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lora4diffusion.errors import UserError
from lora4diffusion.limits import lora_weight

TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>", re.IGNORECASE)
_OPEN = re.compile(r"<\s*lora\b", re.IGNORECASE)  # what is left of a tag that TAG could not read
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAMED = ("te", "unet", "lbw")  # the named fields a tag takes
_LBW_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,31}")  # a block-weight preset's name (ALL, OUTS, ALL0.5)
_LBW = re.compile(rf"{_LBW_NAME.pattern}|[-+0-9.eE, ]{{1,400}}")  # a preset name or a list of numbers
NOT_TAKEN = {  # named fields of A1111 and the LoRA Block Weight extension that are not taken, and why
    "dyn": "A1111's dynamic rank (dyn=) is not supported",
    **dict.fromkeys(("start", "stop", "step"), "weights act on every step here (the LoRA Block Weight"
                    " extension's start=, stop=, step= are not supported)"),
    "lbwe": "the extension's elemental weights (lbwe=) are not supported",
    "w": "write lbw= for block weights",
}


@dataclass(frozen=True)
class TagWeight:
    """A tag's weights beyond one number: the text encoder's, the UNet's, and a block-weight list or preset
    (``lbw=``; read by lora/block_weights.py, which knows the UNet)."""

    te: float
    unet: float
    lbw: str | None = None

    def __str__(self) -> str:  # the tag's fields, as written back into a prompt
        text = f"{self.te:g}:{self.unet:g}"
        return f"{text}:lbw={self.lbw}" if self.lbw else text


@dataclass
class Prompt:
    text: str  # the prompt without its tags, whitespace collapsed
    # name or path -> weight (a TagWeight when the tag has TE/UNet/block fields), in order of appearance
    loras: dict[str, float | TagWeight] = field(default_factory=dict)


def check_weight(name: str, weight: float) -> float:
    """An adapter's weight, within the one limit of every way a weight arrives (limits.MAX_LORA_WEIGHT)."""
    return lora_weight(weight, f"adapter {str(name)[:80]!r}")


def check_name(name: str) -> str:
    """Adapter names are plain words: never a path (no '/', '..', drive letters), so they cannot escape."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"bad adapter name {str(name)[:80]!r} (letters, digits, '-', '_'; at most 64)")
    return name


def parse_prompt(prompt: str, paths: bool = False, fields: bool | None = None) -> Prompt:
    """Strip ``<lora:NAME[:WEIGHT]>`` tags; returns the remaining text and the tags' weights.

    ``paths`` False (the web page): NAME must be a plain adapter name (``check_name``). True (the CLI and
    Pipeline): NAME may also be a path to an adapter folder or file; it is resolved by the caller.
    ``fields`` (default: as ``paths``): the further fields (module doc) are read; else refused.
    A tag that cannot be read (unclosed, empty name, a field not understood, a weight that is not a number)
    is a UserError naming it.
    """
    if not isinstance(prompt, str):
        raise UserError(f"a prompt must be text, got {type(prompt).__name__}")
    fields = paths if fields is None else fields
    loras: dict[str, float | TagWeight] = {}
    tags = list(TAG.finditer(prompt))
    starts = {m.start() for m in tags}
    for m in _OPEN.finditer(prompt):  # a "<lora" that does not begin a readable tag: quote it as written
        if m.start() not in starts:
            close = prompt.find(">", m.start())
            end = close + 1 if 0 <= close < m.start() + 60 else m.start() + 40
            raise UserError(f"malformed tag {prompt[m.start() : end]!r} in prompt {prompt[:80]!r} (write"
                            " <lora:NAME[:WEIGHT]>)")
    for m in tags:
        tag, name, rest = m.group(0), m.group(1).strip(), m.group(2)
        if not name:
            raise UserError(f"malformed tag {tag!r}: no adapter name (write <lora:NAME[:WEIGHT]>)")
        if not paths:
            check_name(name)
        items = [] if rest is None else rest.split(":")
        if not fields and (len(items) > 1 or any("=" in item for item in items)):
            raise UserError(f"tag {tag!r}: only <lora:NAME[:WEIGHT]> is understood here (one weight, no extra"
                            " fields; text-encoder, UNet and block weights are for sample --prompt and the"
                            " Python API)")
        loras.pop(name, None)
        loras[name] = _tag_weight(tag, name, items)
    return Prompt(" ".join(TAG.sub(" ", prompt).split()), loras)


def _number(tag: str, what: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"tag {tag!r}: {what} {text.strip()!r} is not a number") from None


def _tag_weight(tag: str, name: str, items: list[str]) -> float | TagWeight:
    """A tag's fields after the name -> its weight: a number (plain tags) or a TagWeight. A1111's rule:
    positional numbers are TE then UNet (UNet defaults to TE); te= / unet= override them."""
    positional, named = [], {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            positional.append(item)
            continue
        key = key.strip().lower()
        if key not in NAMED:
            why = NOT_TAKEN.get(key, f"the fields are {', '.join(NAMED)}")
            raise UserError(f"tag {tag!r}: field {key[:20]!r} is not taken: {why}")
        if key in named:
            raise UserError(f"tag {tag!r}: field {key}= is given twice")
        named[key] = value.strip()
    if len(positional) > 2:
        raise UserError(f"tag {tag!r}: at most two numbers, the text encoder's weight and the UNet's"
                        f" (<lora:NAME:TE:UNET>; A1111's third, dyn, is not taken), got {len(positional)}")
    if len(positional) == 2 and not positional[1].strip():
        raise UserError(f"tag {tag!r}: an empty UNet weight (write <lora:NAME:TE:UNET>)")
    te = 1.0 if not positional or not positional[0].strip() else _number(tag, "weight", positional[0])
    if len(positional) < 2 and not named:  # the plain tag: one weight for the whole adapter
        return check_weight(name, te)
    if len(positional) > 1 and _LBW_NAME.fullmatch(positional[1].strip()):
        raise UserError(f"tag {tag!r}: UNet weight {positional[1].strip()!r} is not a number (block weights:"
                        f" lbw={positional[1].strip()})")
    unet = _number(tag, "UNet weight", positional[1]) if len(positional) > 1 else te
    te = _number(tag, "text-encoder weight", named["te"]) if "te" in named else te
    unet = _number(tag, "UNet weight", named["unet"]) if "unet" in named else (
        unet if len(positional) > 1 else te)
    lbw = named.get("lbw")
    if lbw is not None and not lbw:
        raise UserError(f"tag {tag!r}: lbw= is empty (a preset name or 17 / 26 numbers)")
    if lbw is not None and not _LBW.fullmatch(lbw):
        raise UserError(f"tag {tag!r}: lbw={lbw[:40]} is not a preset name nor a list of numbers")
    return TagWeight(check_weight(f"{name} (text encoder)", te), check_weight(f"{name} (UNet)", unet), lbw)


def has_tags(prompt: str) -> bool:
    return isinstance(prompt, str) and _OPEN.search(prompt) is not None


def prompt_loras(prompts: list[str], paths: bool = True, fields: bool | None = None,
                 ) -> tuple[list[str], list[dict[str, float | TagWeight]]]:
    """The tags of one sampling call, row by row: (stripped prompts, one {name: weight} per prompt). Prompts
    of one call may carry different tags: each row then gets its own adapters (Pipeline.generate).
    ``fields``: as ``parse_prompt``."""
    parsed = [parse_prompt(p, paths=paths, fields=fields) for p in prompts]
    return [p.text for p in parsed], [p.loras for p in parsed]


def call_loras(prompts: list[str], paths: bool = True, fields: bool | None = None,
               ) -> tuple[list[str], dict[str, float | TagWeight]]:
    """The tags of a call whose prompts all carry the same tags: (stripped prompts, {name: weight}).

    For callers that apply one set of weights to the whole batch (records that name one weight per
    adapter); anything else is refused with a message saying so. ``fields``: as ``parse_prompt``.
    """
    stripped, rows = prompt_loras(prompts, paths=paths, fields=fields)
    if not rows:
        return [], {}
    first = rows[0]
    for row, original in zip(rows, prompts, strict=True):
        if row != first:
            diff = sorted({k for k, _ in set(row.items()) ^ set(first.items())})
            name = diff[0] if diff else "?"
            raise UserError(
                f"prompts of one call carry different <lora:...> tags (adapter {name!r} in {original[:60]!r}"
                f" vs {prompts[0][:60]!r}); here one weight applies to the whole batch: sample them in"
                " separate calls"
            )
    return stripped, dict(first)


__all__ = ["NAME", "TAG", "Prompt", "TagWeight", "call_loras", "check_name", "check_weight", "has_tags",
           "parse_prompt", "prompt_loras"]
