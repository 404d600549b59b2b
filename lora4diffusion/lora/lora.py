"""LoRA (Hu et al. 2021): the first adapter method, ΔW = (alpha/r) B A.

Eq. 3 of the paper: h = W0 x + (alpha/r) B A x, with W0 frozen, A = ``lora_down`` [r, in] random and
B = ``lora_up`` [out, r] zero, so an adapted model starts exactly equal to its base. With rsLoRA
(Kalajdzievski 2023) the scale is alpha/sqrt(r). Laid out as PEFT: on an nn.Conv2d, A is the base's conv
with r output channels [r, in, kh, kw] and B a 1x1 conv [out, r, 1, 1], so ΔW = B A reshaped to the kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora4diffusion.lora.method import AdapterMethod

INITS = ("normal", "kaiming")  # normal: the seed's N(0, (1/r)^2) (PEFT "gaussian"); kaiming: PEFT's default


class LoRA(AdapterMethod):
    """A = ``lora_down``, B = ``lora_up`` (bias-free Linear or Conv2d modules in fp32); dropout on x."""

    kind = "lora"
    keys = ("lora_down.weight", "lora_up.weight")
    up_keys = ("lora_up.weight",)

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, **options):
        super().__init__(base, rank, alpha, init, rslora, dropout, **options)
        if isinstance(base, nn.Linear):
            down = nn.Linear(base.in_features, rank, bias=False)
            up = nn.Linear(rank, base.out_features, bias=False)
        else:
            b = base
            down = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding, b.dilation, bias=False)
            up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        # fp32 whatever the base dtype: the branch is computed in fp32 (see forward)
        w0 = base.weight
        down.to(device=w0.device, dtype=torch.float32)
        up.to(device=w0.device, dtype=torch.float32)
        if init == "normal":
            nn.init.normal_(down.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)  # B = 0: the adapted model starts as the base model
        self.lora_down, self.lora_up = down, up

    @classmethod
    def shapes(cls, base: nn.Module, rank: int, **options) -> dict[str, tuple[int, ...]]:
        """Linear: A [r, in], B [out, r]; Conv2d: A [r, in, kh, kw], B [out, r, 1, 1]."""
        w = base.weight
        if isinstance(base, nn.Linear):
            return {"lora_down.weight": (rank, w.shape[1]), "lora_up.weight": (w.shape[0], rank)}
        return {"lora_down.weight": (rank, *w.shape[1:]), "lora_up.weight": (w.shape[0], rank, 1, 1)}

    @classmethod
    def problem(cls, tensors: dict[str, torch.Tensor], rank: int, **options) -> str | None:
        for have, lack in (("down", "up"), ("up", "down")):
            if f"lora_{lack}.weight" not in tensors:
                return f"it has lora_{have} but no lora_{lack}"
        a, b = tensors["lora_down.weight"], tensors["lora_up.weight"]
        ok = a.dim() in (2, 4) and b.dim() == a.dim() and a.shape[0] == b.shape[1] == rank
        if not ok or (a.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
            return f"tensors {tuple(a.shape)}/{tuple(b.shape)} are not a rank-{rank} LoRA pair"
        return None

    def delta_weight(self, multiplier: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * scale * B A in fp32 (conv: [out, r] @ [r, in*kh*kw], viewed as the kernel)."""
        b, a = self.lora_up.weight, self.lora_down.weight
        delta = b.float().flatten(1) @ a.float().flatten(1)
        return (delta * (multiplier * self.scale)).view(b.shape[0], *a.shape[1:])

    def forward(self, x: torch.Tensor, multiplier: float = 1.0,
                base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * scale * B A x, never forming B A. The input is cast to the factors' dtype (fp32, as in
        the seed and PEFT): the small factors and their product keep full precision under bf16 autocast."""
        down = self.lora_down
        h = self.lora_up(down(self.input_dropout(x.to(down.weight.dtype))))
        return h * (multiplier * self.scale)
