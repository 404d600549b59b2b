"""Several LoRA adapters, each at a weight, as one adapter file (``merge-lora``): concatenated or by SVD.

Stacking adapters i at weights w_i adds sum_i w_i s_i B_i A_i to each module's W0 (s_i = alpha_i / r_i, or
alpha_i / sqrt(r_i) with rsLoRA). Two ways to hold that sum in one LoRA, as peft's ``add_weighted_adapter``
(``combination_type="cat"`` / ``"svd"``) and kohya's ``merge_lora.py --concat`` / ``svd_merge_lora.py``:

- **concat** (exact): B = [B_1 | B_2 | ...], A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], rank r = sum_i r_i,
  alpha = r (scale 1), so B A = sum_i w_i s_i B_i A_i: the merged adapter at weight 1 draws the images of
  the stack, to fp32 rounding. A module only some adapters adapt gets their factors first and zero rows
  after, as peft lays it out (the same tensors). One file holds one rank, so the sum of ranks must not
  exceed any adapted module's own rank (``targets.max_rank``: a LoRA of a larger rank is refused on
  loading); beyond it, svd.
- **svd** (approximate): each module's summed delta truncated to rank k by SVD (``extract.factor_delta``;
  alpha = k). Eckart-Young: it is the best rank-k approximation in Frobenius norm, and its relative error is
  sqrt(sum of the discarded s_j^2 / sum of all s_j^2), reported per module and overall. k defaults to the
  largest source rank (peft's default). kohya also clamps the factors at their 0.99 quantile; this does not
  (the error reported is then exactly Eckart-Young's).

Only LoRA adapters merge: a DoRA, LoHa, LoKr or OFT adapter is refused with one line naming ``resize``, which
turns it into a LoRA by the SVD of its ΔW on its base (DoRA's and OFT's ΔW depend on the base weights,
which an adapter file does not hold). The result keeps every source's trigger words (``trigger_words``, in
order, once each), its bundled tokens (pivotal tuning; a token bundled twice must have the same vectors), and
its provenance: ``merged_from``, a JSON list of {adapter, weight, method, rank, trigger_words, metadata}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora4diffusion.errors import UserError
from lora4diffusion.limits import lora_weight
from lora4diffusion.lora.adapters import UNKNOWN, Adapter
from lora4diffusion.lora.extract import factor_delta, relative_errors
from lora4diffusion.lora.lora import LoRA
from lora4diffusion.lora.prompt_lora import TRIGGER_KEY, trigger_words

MERGE_METHODS = ("concat", "svd")
MERGED_FROM = "merged_from"  # Adapter.extra entry: the sources, a JSON list


@dataclass
class Source:
    """One adapter to merge: the adapter, its weight, and how the user named it (a path or a shipped name)."""

    adapter: Adapter
    weight: float
    label: str


def merge_adapters(sources: Sequence[Source], method: str = "concat", rank: int | None = None,
                   ) -> tuple[Adapter, dict[str, float]]:
    """One LoRA adapter equal (concat) or closest at rank ``rank`` (svd) to the sources stacked at their
    weights. Returns it and the relative Frobenius errors ({"overall": ..., module: ...}; all 0 for concat).

    A merged rank above a module's own rank (min(out, in * kh * kw), from the sources' shapes) is refused.
    Everything is checked before anything is computed; a problem is one UserError line.
    """
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method {method!r} (choose {' or '.join(MERGE_METHODS)})")
    if not sources:
        raise UserError("merge-lora: give at least one --lora")
    if method == "concat" and rank is not None:
        raise UserError("--rank is for --method svd (concat's rank is the sum of the sources' ranks)")
    for s in sources:
        if s.adapter.method != LoRA.kind:
            raise UserError(f"{s.label} is a {s.adapter.method} adapter: merge-lora merges LoRA adapters;"
                            " turn it into one first (`lora4diffusion resize --lora"
                            f" {s.label} --rank R --out DIR`, the SVD of its ΔW on its base)")
        lora_weight(s.weight, f"adapter {s.label}")
    fingerprint = _common_fingerprint(sources)
    modules = _modules(sources)
    limits = {m: min(b.shape[0], a[0].numel()) for m, (a, b) in _first_pairs(sources).items()}
    if method == "concat":
        new_rank = sum(s.adapter.rank for s in sources)
    else:
        new_rank = max(s.adapter.rank for s in sources) if rank is None else rank
        if isinstance(new_rank, bool) or not isinstance(new_rank, int) or new_rank < 1:
            raise UserError(f"--rank must be a positive integer, got {new_rank!r:.40}")
    tight = min(modules, key=lambda m: limits[m])
    if new_rank > limits[tight]:
        hint = (f"; use --method svd --rank {limits[tight]} or fewer" if method == "concat" else "")
        raise UserError(f"merged rank {new_rank} exceeds the rank {limits[tight]} of module {tight}{hint}")
    tensors, parts = {}, {}
    for m in modules:
        present = [(s, *s.adapter.pair(m)) for s in sources if m in s.adapter.modules]
        if method == "concat":
            tensors.update(_concat(m, present, new_rank))
        else:
            delta = sum(s.weight * s.adapter.scale * (b.double().flatten(1) @ a.double().flatten(1))
                        for s, a, b in present)
            b, a, tail, total = factor_delta(m, delta, new_rank, 1.0)
            a0, b0 = present[0][1], present[0][2]
            tensors[f"{m}.lora_down.weight"] = a.float().reshape(new_rank, *a0.shape[1:])
            tensors[f"{m}.lora_up.weight"] = b.float().reshape(b0.shape[0], new_rank, *b0.shape[2:])
            parts[m] = (tail, total)
    errors = relative_errors(parts) if method == "svd" else {"overall": 0.0, **dict.fromkeys(modules, 0.0)}
    merged = Adapter(tensors, new_rank, float(new_rank), init="merged", fingerprint=fingerprint,
                     extra=_metadata(sources, method, errors["overall"]), embeddings=_embeddings(sources))
    return merged, errors


def _concat(module: str, present: list, rank: int) -> dict[str, torch.Tensor]:
    """peft's cat: A rows w_i s_i A_i, B columns B_i, in the sources' order, then zeros up to ``rank``."""
    downs = [a.float() * s.weight * s.adapter.scale for s, a, _ in present]  # peft: A * weight * scaling
    ups = [b.float() for _, _, b in present]
    down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
    pad = rank - down.shape[0]
    if pad:
        down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])], dim=0)
        up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
    return {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up}


def _common_fingerprint(sources: Sequence[Source]) -> str:
    """The base every source was trained on (sources of unknown base take the others'); two bases refused."""
    known = {}
    for s in sources:
        if s.adapter.fingerprint != UNKNOWN:
            known.setdefault(s.adapter.fingerprint, s.label)
    if len(known) > 1:
        (fa, la), (fb, lb) = list(known.items())[:2]
        raise UserError(f"{la} and {lb} were trained on different bases (fingerprints {fa[:12]},"
                        f" {fb[:12]}): their sum fits neither")
    return next(iter(known), UNKNOWN)


def _first_pairs(sources: Sequence[Source]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's (A, B) in the first source that adapts it; every other source's must fit the same base
    layer (same input and output shapes)."""
    first: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
    for s in sources:
        for m in s.adapter.modules:
            a, b = s.adapter.pair(m)
            if m not in first:
                first[m] = (a, b, s.label)
                continue
            a0, b0, label = first[m]
            if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]:
                raise UserError(f"module {m}: {label} and {s.label} adapt it with other shapes"
                                f" ({tuple(a0.shape)}/{tuple(b0.shape)} vs"
                                f" {tuple(a.shape)}/{tuple(b.shape)}): not the same base")
    return {m: (a, b) for m, (a, b, _) in first.items()}


def _modules(sources: Sequence[Source]) -> list[str]:
    """Every adapted module, in the first source's order, then the modules later sources add."""
    return list(dict.fromkeys(m for s in sources for m in s.adapter.modules))


def _embeddings(sources: Sequence[Source]) -> dict[str, torch.Tensor]:
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for s in sources:
        for token, vectors in s.adapter.embeddings.items():
            if token in out and not torch.equal(out[token][0], vectors):
                raise UserError(f"{out[token][1]} and {s.label} both bring token {token} with different"
                                " vectors: one merged file cannot hold both")
            out.setdefault(token, (vectors, s.label))
    return {token: v for token, (v, _) in out.items()}


def _metadata(sources: Sequence[Source], method: str, error: float) -> dict[str, str]:
    words = list(dict.fromkeys(w for s in sources for w in trigger_words(s.adapter)))
    history = [{"adapter": s.label, "weight": s.weight, "method": s.adapter.method, "rank": s.adapter.rank,
                "alpha": s.adapter.alpha, "rslora": s.adapter.rslora,
                "trigger_words": trigger_words(s.adapter), "metadata": s.adapter.extra} for s in sources]
    extra = {MERGED_FROM: json.dumps(history), "merge_method": method,
             "merge_error": repr(error if math.isfinite(error) else float("nan"))}
    if words:
        extra[TRIGGER_KEY] = json.dumps(words)
    return extra


__all__ = ["MERGED_FROM", "MERGE_METHODS", "Source", "merge_adapters"]
