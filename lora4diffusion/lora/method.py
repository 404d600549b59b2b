"""The adapter-method interface: what one adapter on one nn.Linear / nn.Conv2d implements.

``LoRALayer`` (layers.py) holds the frozen base layer and any number of named adapters, each an
``AdapterMethod``; it does the rest (user multipliers, merging, enabling, deleting, files). The contract, the
equations and how a new method plugs in are at the top of ``layers.py``; LoRA (``lora.py``) is the first
implementation.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class AdapterMethod(nn.Module):
    """One adapter of one base layer (nn.Linear, or nn.Conv2d with groups = 1).

    A subclass sets ``kind`` and ``keys``, builds its tensors in ``__init__`` as CHILD modules (the wrapper
    files child C of adapter N under ``<path>.C.N``, so its ``state_dict()`` keys are ``keys``), and
    implements ``shapes``, ``problem`` and ``delta_weight``. ``forward`` defaults to applying ``delta_weight``
    as a weight (Linear: x ΔW^T; Conv2d: ΔW * x with the base's stride, padding, dilation); a method with a
    cheaper factored product (LoRA: B(A x)) overrides it.
    """

    kind: ClassVar[str]  # its name in adapter files and in layers.METHODS ("lora")
    keys: ClassVar[tuple[str, ...]]  # its state_dict() names; in a file, the first marks a module

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.rank, self.alpha, self.init, self.rslora = rank, alpha, init, rslora
        self.dropout = float(dropout)
        # the base's convolution geometry (None for a Linear), for applying ΔW as a weight
        conv = isinstance(base, nn.Conv2d)
        self.conv_args = (base.stride, base.padding, base.dilation) if conv else None

    # --- what a method implements ---
    @classmethod
    def shapes(cls, base: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor (by its ``keys`` name) of a rank-``rank`` adapter on ``base``."""
        raise NotImplementedError

    @classmethod
    def problem(cls, tensors: dict[str, torch.Tensor], rank: int) -> str | None:
        """Why one module's tensors (by ``keys`` name, read from a file) cannot be a rank-``rank`` adapter of
        this method without any base at hand; None when they can."""
        return None

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """multiplier * ΔW in fp32, shaped like the base weight: merging adds exactly this to W0."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """multiplier * ΔW x: what this adapter adds to the base layer's output. The wrapper calls it with
        autocast off and casts the result to the base output's dtype."""
        w = self.delta_weight(multiplier)
        return self.apply_weight(x.to(w.dtype), w)

    # --- shared by the methods ---
    @property
    def scale(self) -> float:
        """alpha / r (Hu et al. 2021, eq. 3), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``weight`` in place of W0 and no bias."""
        return F.linear(x, weight) if self.conv_args is None else F.conv2d(x, weight, None, *self.conv_args)

    def metadata(self) -> dict[str, Any]:
        """The settings adapter files record; ``type(m)(base, **m.metadata())`` builds a like adapter."""
        return {"rank": self.rank, "alpha": self.alpha, "init": self.init, "rslora": self.rslora,
                "dropout": self.dropout}

    def extra_repr(self) -> str:
        return f"r={self.rank}, alpha={self.alpha:g}"
