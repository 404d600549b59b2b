"""LoKr options read back from tensor shapes: for files that hold a LoKr's factors but not the options that
chose their shapes (a LyCORIS file, a PEFT folder, without our ``lora4diffusion`` settings entry).

A LoKr module's file tensors are W1 ([a, c], or W1a [a, r] @ W1b [r, c]) and W2 ([b, d, kh, kw], or W2a
[b, r] @ W2b [r, d·kh·kw]); lokr.py's ``layout_for_shape`` chose them from the base weight's shape, the rank
and the options ``factor``, ``decompose_both`` and ``full_matrix``. Reading them back means finding one set
of options under which that layout gives every module's shapes. The base shape is the factors' products
(out = a·b, in = c·d), except for a low-rank W2 on a conv, whose W2b folds d with the kernel: there every
square kernel that divides it is a candidate (``base_shapes``). The factors tried are LyCORIS's
(``LokrModule.make_module_from_state_dict`` in lycoris/modules/lokr.py: -1 first, then the factor sizes the
shapes show), so a file LyCORIS reads is read here with options that rebuild the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora4diffusion.errors import UserError
from lora4diffusion.lora.lokr import W1, W1A, W1B, W2, W2A, W2B, LoKr, factorization, layout_for_shape

KERNEL_SIDES = (2, 3, 4, 5, 7)  # square kernels a low-rank conv W2b may hide (1: a Linear or 1x1 conv)
Split = Callable[[int, int], tuple[int, int]]


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """One module's LoKr tensor shapes by our key (``lokr_w1.weight``, ...)."""
    return {k: tuple(tensors[k].shape) for k in LoKr.keys if k in tensors}


def base_shapes(tensors: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The base weight shapes ([out, in] or [out, in, k, k]) these factors can be a LoKr of; [] when they
    are not LoKr factors at all (checked by ``LoKr.problem`` first)."""
    s = shapes_of(tensors)
    if any(0 in shape for shape in s.values()):
        return []
    a, c = s[W1] if W1 in s else (s[W1A][0], s[W1B][1])
    if W2 in s:
        b, d, *kernel = s[W2]
        return [(a * b, c * d, *kernel)]
    b, folded = s[W2A][0], s[W2B][1]
    return [(a * b, c * folded)] + [(a * b, c * (folded // (k * k)), k, k) for k in KERNEL_SIDES
                                    if folded % (k * k) == 0]


def fits(tensors: dict[str, torch.Tensor], rank: int, options: dict, split: Split = factorization) -> bool:
    """Do ``options`` at ``rank`` (with ``split`` dividing sizes) give exactly these tensors' shapes on some
    base shape they can belong to?"""
    want = shapes_of(tensors)
    o = {**LoKr.options, **options}
    return any(want == layout_for_shape(s, rank, o["factor"], o["decompose_both"], o["full_matrix"], split)
               for s in base_shapes(tensors))


def low_rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """The rank a module's low-rank factor shows (W1a or W2a), None when W1 and W2 are both full."""
    for key in (W1A, W2A):
        if key in tensors and tensors[key].dim() == 2:
            return int(tensors[key].shape[1])
    return None


def common_rank(modules: dict[str, dict[str, torch.Tensor]]) -> int | None:
    """The one rank the low-rank modules share (None when every module is full); different ranks are a
    UserError naming two modules (our adapter has one rank)."""
    ranks: dict[int, str] = {}
    for name, tensors in modules.items():
        r = low_rank(tensors)
        if r is not None:
            ranks.setdefault(r, name)
    if len(ranks) > 1:
        (r1, m1), (r2, m2) = list(ranks.items())[:2]
        raise UserError(f"modules have different ranks ({m1}: {r1}, {m2}: {r2}); one rank per adapter is"
                        " supported")
    return next(iter(ranks), None)


def infer_options(modules: dict[str, dict[str, torch.Tensor]], rank_hint: int = 1,
                  factor_hint: int | None = None) -> tuple[int, dict]:
    """(rank, options) under which our layout gives every module's shapes; options only where they differ
    from LoKr's defaults. The rank is the low-rank factors' (or ``rank_hint`` when every module is full:
    then full_matrix, or the rank's own rule, explains them at any rank); ``factor_hint`` (a file's own
    record of the factor) is tried first. A UserError names the first module no candidate explains (first
    under the most likely candidate) or two modules of different ranks."""
    rank = common_rank(modules)
    all_full = rank is None
    rank = rank_hint if all_full else rank
    sizes = sorted({n for t in modules.values() for n in _factor_sizes(t)})
    factors = list(dict.fromkeys([*([factor_hint] if factor_hint else []), -1, *sizes]))
    both = [True] if any(W1A in t for t in modules.values()) else [False, True]
    full = [False, True] if all_full else [False]
    for factor in factors:
        for decompose_both in both:
            for full_matrix in full:
                options = {"factor": factor, "decompose_both": decompose_both, "full_matrix": full_matrix}
                if all(fits(t, rank, options) for t in modules.values()):
                    return rank, {k: v for k, v in options.items() if v != LoKr.options[k]}
    first = {"factor": factors[0], "decompose_both": both[0], "full_matrix": False}
    name = next((n for n, t in modules.items() if not fits(t, rank, first)), next(iter(modules)))
    shown = "/".join(str(s) for s in shapes_of(modules[name]).values())
    raise UserError(f"module {name}: LoKr factors {shown} fit no factor / decompose_both / full_matrix rule"
                    f" shared by every module at rank {rank} (LyCORIS's layout)")


def _factor_sizes(tensors: dict[str, torch.Tensor]) -> set[int]:
    """The sizes a, b, c (and d where W2 is full) the factors show: LyCORIS's factor candidates."""
    s = shapes_of(tensors)
    a, c = s[W1] if W1 in s else (s[W1A][0], s[W1B][1])
    b = s[W2][0] if W2 in s else s[W2A][0]
    d = {s[W2][1]} if W2 in s else set()
    return {n for n in (a, b, c, *d) if n > 1}  # a factor is >= 1 (1 splits nothing: -1 covers it)


__all__ = ["base_shapes", "common_rank", "fits", "infer_options", "low_rank", "shapes_of"]
