"""Which layers of a model an adapter adapts: presets (``attention``, ``all-linear``, ``conv``, the seed's
``reference``), module-path suffixes, exact paths and ``re:`` regexes, resolved to module paths."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import ResBlock


def max_rank(base: nn.Module) -> int:
    """The rank of the base weight matrix (a conv kernel counts as [out, in * kh * kw])."""
    w = base.weight
    return min(w.shape[0], w[0].numel())


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> layer for every nn.Linear / nn.Conv2d; an adapter wrapper (a module holding a
    ``base_layer``, layers.LoRALayer) stands for the layer it wraps."""
    found: dict[str, nn.Module] = {}
    wrappers: list[str] = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(getattr(m, "base_layer", None), nn.Module):
            found[path] = m.base_layer
            wrappers.append(path)
        elif isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            found[path] = m
    return found


def _parent(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.rpartition(".")[0])


_Preset = Callable[[str, nn.Module, nn.Module], bool]
PRESETS: dict[str, _Preset] = {
    # SD-style: all four projections of self- (attn1) and cross-attention (attn2)
    "attention": lambda p, m, model: re.search(r"(^|\.)attn[12]\.to_(q|k|v|out)$", p) is not None,
    # the seed's choice: cross-attention q/k/v only
    "reference": lambda p, m, model: re.search(r"(^|\.)attn2\.to_(q|k|v)$", p) is not None,
    # every nn.Linear. PEFT's all-linear leaves out the output head; our output layer is conv_out, a conv,
    # and the label embedding is an nn.Embedding, so nothing linear needs leaving out.
    "all-linear": lambda p, m, model: isinstance(m, nn.Linear),
    # the ResBlock convs (conv1, conv2 and a 1x1 skip); opt-in, e.g. "attention+conv"
    "conv": lambda p, m, model: isinstance(m, nn.Conv2d) and isinstance(_parent(model, p), ResBlock),
}


def _patterns(targets: str | Sequence[str]) -> list[str]:
    """A string is split on ',' and '+' (unless it is one 're:' regex); a list is taken as it is."""
    if isinstance(targets, str):
        items = [targets] if targets.startswith("re:") else re.split(r"[,+]", targets)
    else:
        items = list(targets)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise UserError("no LoRA targets given")
    return items


def _matcher(pattern: str) -> _Preset:
    if pattern in PRESETS:
        return PRESETS[pattern]
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise UserError(f"LoRA target {pattern!r} is not a valid regular expression ({e})") from None
        return lambda p, m, model: rx.fullmatch(p) is not None
    # an exact module path, or its last components: "to_q" matches "mid_attn.attn1.to_q"
    return lambda p, m, model: p == pattern or p.endswith("." + pattern)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths (model order) matched by presets, suffixes, exact paths or 're:' full-match regexes."""
    candidates = adaptable_modules(model)
    chosen: set[str] = set()
    for pattern in _patterns(targets):
        match = _matcher(pattern)
        hits = {p for p, m in candidates.items() if match(p, m, model)}
        if not hits:
            raise UserError(f"LoRA target {pattern!r} matches no nn.Linear/nn.Conv2d module of the model"
                            f" (presets: {', '.join(PRESETS)})")
        chosen |= hits
    return [p for p in candidates if p in chosen]
