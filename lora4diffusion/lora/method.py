"""The adapter-method interface: what one adapter on one nn.Linear / nn.Conv2d implements.

``LoRALayer`` (layers.py) holds the frozen base layer and any number of named adapters, each an
``AdapterMethod``; it does the rest (user multipliers, merging, enabling, deleting, files). The contract, the
equations and how a new method plugs in are at the top of ``layers.py``. The methods: LoRA (``lora.py``),
DoRA (``dora.py``), LoHa (``loha.py``) and LoKr (``lokr.py``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lora4diffusion.errors import UserError

MAX_RANK = 4096  # far above any MNIST-sized layer; a bigger rank is a broken or hostile file
MAX_ALPHA = 1e6  # scale alpha/r > 1e6 turns any delta into inf/NaN outputs (alpha 1e30 is not an adapter)


class Factor(nn.Module):
    """One trainable tensor, as a child module (the wrapper files an adapter's child modules under the
    adapter's name), so its state-dict key is ``<child>.weight``."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


def matrix_shape(base: nn.Module) -> tuple[int, int]:
    """(out, in * kh * kw): the base weight as a matrix (an nn.Conv2d kernel flattened per output channel)."""
    w = base.weight
    return w.shape[0], w[0].numel()


class AdapterMethod(nn.Module):
    """One adapter of one base layer (nn.Linear, or nn.Conv2d with groups = 1).

    A subclass sets ``kind`` and ``keys``, builds its tensors in ``__init__`` as CHILD modules (the wrapper
    files child C of adapter N under ``<path>.C.N``, so its ``state_dict()`` keys are among ``keys``), and
    implements ``shapes``, ``problem`` and ``delta_weight``. ``forward`` defaults to applying ``delta_weight``
    as a weight (Linear: x ΔW^T; Conv2d: ΔW * x with the base's stride, padding, dilation) to the input after
    dropout; a method with a cheaper factored product (LoRA: B(A x)) overrides it.

    ``base_weight``: the base layer's W0 as it is without any merged adapter. Only a method whose ΔW depends
    on W0 (DoRA) uses it; the wrapper always passes it.
    """

    kind: ClassVar[str]  # its name in adapter files and in layers.METHODS ("lora")
    keys: ClassVar[tuple[str, ...]]  # every state_dict() name it may have (LoKr: w1 or w1_a and w1_b, ...)
    options: ClassVar[dict[str, Any]] = {}  # its own settings beyond rank and alpha, with their defaults
    up_keys: ClassVar[tuple[str, ...]] = ()  # the "B" of each A/B pair: LoRA+ gives them a larger lr

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, **options: Any):
        super().__init__()
        self.rank, self.alpha, self.init, self.rslora = rank, alpha, init, rslora
        self.dropout = float(dropout)
        self.opts = self.check_options(options)
        # the base's convolution geometry (None for a Linear), for applying ΔW as a weight
        conv = isinstance(base, nn.Conv2d)
        self.conv_args = (base.stride, base.padding, base.dilation) if conv else None
        self.input_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # --- what a method implements ---
    @classmethod
    def shapes(cls, base: nn.Module, rank: int, **options: Any) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor (by its ``keys`` name) of a rank-``rank`` adapter on ``base``."""
        raise NotImplementedError

    @classmethod
    def unfit(cls, base: nn.Module, rank: int, **options: Any) -> str | None:
        """Why this method cannot adapt ``base`` at ``rank`` (beyond the rank limit every method has); None
        when it can (OFT: its block size must divide the input size)."""
        return None

    @classmethod
    def problem(cls, tensors: dict[str, torch.Tensor], rank: int, **options: Any) -> str | None:
        """Why one module's tensors (by ``keys`` name, read from a file) cannot be a rank-``rank`` adapter of
        this method without any base at hand; None when they can."""
        return None

    def delta_weight(self, multiplier: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * ΔW in fp32, shaped like the base weight: merging adds exactly this to W0."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, multiplier: float = 1.0,
                base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * ΔW x: what this adapter adds to the base layer's output. The wrapper calls it with
        autocast off and casts the result to the base output's dtype."""
        w = self.delta_weight(multiplier, base_weight)
        return self.apply_weight(self.input_dropout(x.to(w.dtype)), w)

    # --- shared by the methods ---
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The method's own settings, defaults filled in; a UserError for an unknown name or a value of the
        wrong type (a method with more rules extends this)."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            have = ", ".join(cls.options) or "none"
            raise UserError(f"{cls.kind} has no option {unknown[0]!r} (its options: {have})")
        out = dict(cls.options)
        for name, value in options.items():
            want = type(cls.options[name])
            if type(value) is not want:
                raise UserError(f"{cls.kind} option {name} must be {want.__name__}, got {value!r:.40}")
            out[name] = value
        return out

    @property
    def scale(self) -> float:
        """alpha / r (Hu et al. 2021, eq. 3), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``weight`` in place of W0 and no bias."""
        return F.linear(x, weight) if self.conv_args is None else F.conv2d(x, weight, None, *self.conv_args)

    def metadata(self) -> dict[str, Any]:
        """The settings adapter files record, with the method's own ``options`` (only those that differ from
        their defaults, and only when there are any): ``type(m)(base, **settings, **options)`` builds a like
        adapter."""
        out = {"rank": self.rank, "alpha": self.alpha, "init": self.init, "rslora": self.rslora,
               "dropout": self.dropout}
        own = {k: v for k, v in self.opts.items() if v != self.options[k]}
        return {**out, "options": own} if own else out

    def extra_repr(self) -> str:
        return f"r={self.rank}, alpha={self.alpha:g}"
