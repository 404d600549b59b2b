"""LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation"; LyCORIS): ΔW as a Kronecker product.

Eq. of §3.2: ΔW = (alpha/r) W1 ⊗ W2. The output and input sizes are each split into two factors,
out = a·b and in = c·d (``factorization``: the pair nearest the square root, the smaller at most ``factor``);
W1 is [a, c] and W2 [b, d] (on an nn.Conv2d, W2 carries the kernel: [b, d, kh, kw]). A Kronecker product of
full matrices has rank rank(W1)·rank(W2) with a·c + b·d parameters instead of a·b·c·d.

Full or low-rank, by LyCORIS's rules (PEFT's LoKr uses the same): W2 is a low-rank product W2a W2b
([b, r] @ [r, d·kh·kw]) when r < max(b, d) / 2, else a full matrix; W1 is W1a W1b only with
``decompose_both`` and r < max(a, c) / 2; ``full_matrix`` makes both full. When both are full the rank
plays no part and the scale is 1 (LyCORIS sets alpha = r; PEFT keeps alpha / r, so compare with alpha = r).
One factor starts at zero, so ΔW = 0. Inits: "normal" is LyCORIS's (W1 kaiming-uniform, W2 or W2b zero);
"kaiming" is PEFT's default (W1 or W1a zero, the rest kaiming-uniform).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.lora.method import AdapterMethod, Factor

W1, W1A, W1B, W2, W2A, W2B = (f"lokr_{k}.weight" for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@cache  # pure, and called per module and per candidate option when a file's layout is read back
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n, as LyCORIS splits it: (factor, dimension / factor) when
    ``factor`` divides the dimension; otherwise the divisor pair nearest the square root whose smaller member
    is at most ``factor`` (-1: no limit). 256 -> (16, 16); 128 -> (8, 16); 127 -> (1, 127); 128 with factor
    4 -> (4, 32). PEFT's copy does not sort in the first case (32 with factor 8 -> (8, 4), LyCORIS (4, 8))."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor == -1 else factor
    near = next(d for d in divisors(dimension) if d * d >= dimension)  # the smallest divisor >= sqrt
    if near <= limit:
        return tuple(sorted((near, dimension // near)))
    m = max(d for d in divisors(dimension) if d <= limit)
    return m, dimension // m


def layout(base: nn.Module, rank: int, factor: int, decompose_both: bool,
           full_matrix: bool) -> dict[str, tuple[int, ...]]:
    """The tensors of a rank-``rank`` LoKr on ``base`` and their shapes (LyCORIS's rules, module doc)."""
    return layout_for_shape(tuple(base.weight.shape), rank, factor, decompose_both, full_matrix)


def layout_for_shape(shape: tuple[int, ...], rank: int, factor: int, decompose_both: bool, full_matrix: bool,
                     split: Callable[[int, int], tuple[int, int]] = factorization,
                     ) -> dict[str, tuple[int, ...]]:
    """``layout`` for a base weight of ``shape`` ([out, in] or [out, in, kh, kw]); ``split`` divides a size
    into (a, b) (ours and LyCORIS's ``factorization``; readers of PEFT files pass PEFT's)."""
    (a, b), (c, d) = split(shape[0], factor), split(shape[1], factor)
    kernel = tuple(shape[2:])
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(a, c) / 2 and not full_matrix:
        shapes[W1A], shapes[W1B] = (a, rank), (rank, c)
    else:
        shapes[W1] = (a, c)
    if rank < max(b, d) / 2 and not full_matrix:
        shapes[W2A], shapes[W2B] = (b, rank), (rank, d * math.prod(kernel))
    else:
        shapes[W2] = (b, d, *kernel)
    return shapes


class LoKr(AdapterMethod):
    """W1 = ``lokr_w1`` (or ``lokr_w1_a`` @ ``lokr_w1_b``), W2 = ``lokr_w2`` (or ``lokr_w2_a`` @
    ``lokr_w2_b``), fp32."""

    kind = "lokr"
    keys = (W1, W1A, W1B, W2, W2A, W2B)
    options = {"factor": -1, "decompose_both": False, "full_matrix": False}
    up_keys = (W1A, W2A)  # the output side of each low-rank pair

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, **options: Any):
        super().__init__(base, rank, alpha, init, rslora, dropout, **options)
        self.weight_shape = tuple(base.weight.shape)
        shapes = self.shapes(base, rank, **self.opts)
        self.full = W1 in shapes and W2 in shapes  # both full: scale 1
        t = {k.split(".")[0]: torch.empty(s, device=base.weight.device) for k, s in shapes.items()}
        zero = ("lokr_w2", "lokr_w2_b") if init == "normal" else ("lokr_w1", "lokr_w1_a")
        for k, v in t.items():
            if k in zero:
                nn.init.zeros_(v)
            else:
                nn.init.kaiming_uniform_(v, a=math.sqrt(5))
            setattr(self, k, Factor(v))

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        if out["factor"] != -1 and out["factor"] < 1:
            raise UserError(f"lokr option factor must be -1 (near the square root) or >= 1,"
                            f" got {out['factor']}")
        return out

    @classmethod
    def shapes(cls, base: nn.Module, rank: int, **options: Any) -> dict[str, tuple[int, ...]]:
        return layout(base, rank, **cls.check_options(options))

    @classmethod
    def problem(cls, tensors: dict[str, torch.Tensor], rank: int, **options: Any) -> str | None:
        for full, pair in ((W1, (W1A, W1B)), (W2, (W2A, W2B))):
            name = full.split(".")[0]
            have = [k for k in pair if k in tensors]
            if (full in tensors) == bool(have) or len(have) == 1:
                return f"it needs either {name} or both {name}_a and {name}_b"
            if have:
                lo, hi = tensors[pair[0]], tensors[pair[1]]
                if lo.dim() != 2 or hi.dim() != 2 or not lo.shape[1] == hi.shape[0] == rank:
                    return f"{name}_a/{name}_b {tuple(lo.shape)}/{tuple(hi.shape)} are not a rank-{rank} pair"
        if tensors.get(W1, torch.zeros(1, 1)).dim() != 2:
            return "lokr_w1 must be a matrix"
        if tensors.get(W2, torch.zeros(1, 1)).dim() not in (2, 4):
            return "lokr_w2 must be a matrix (a Linear's) or 4-D (a conv's [b, d, kh, kw])"
        return None

    @property
    def scale(self) -> float:
        """alpha / r (rsLoRA: alpha / sqrt(r)); 1 when W1 and W2 are both full (LyCORIS)."""
        return 1.0 if self.full else super().scale

    def factor(self, full: str, pair: tuple[str, str]) -> torch.Tensor:
        key = full.split(".")[0]
        if hasattr(self, key):
            return getattr(self, key).weight.float()
        lo, hi = (getattr(self, k.split(".")[0]).weight.float() for k in pair)
        return lo @ hi

    def delta_weight(self, multiplier: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * scale * W1 ⊗ W2 in fp32, reshaped to the base weight."""
        w1, w2 = self.factor(W1, (W1A, W1B)), self.factor(W2, (W2A, W2B))
        if w2.dim() == 4:  # a full conv W2 [b, d, kh, kw]: W1 [a, c] acts on the channels only
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * (multiplier * self.scale)).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k.split('.')[0]}={tuple(getattr(self, k.split('.')[0]).weight.shape)}"
                           for k in self.keys if hasattr(self, k.split(".")[0]))
        return f"{super().extra_repr()}, {shapes}"
