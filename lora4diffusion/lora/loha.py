"""LoHa (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS): ΔW as the Hadamard product of two low-rank products.

Eq. 2 of FedPara: ΔW = (alpha/r) (W1a W1b) ⊙ (W2a W2b), with W1a, W2a [out, r] and W1b, W2b [r, in]. The
rank of ΔW can reach r², for the parameters of a rank-2r LoRA. On an nn.Conv2d, "in" is in * kh * kw and the
product is reshaped to the kernel (LyCORIS and PEFT without ``use_effective_conv2d``). One factor starts at
zero, so ΔW = 0 and the adapted model starts equal to its base. Inits: "normal" is LyCORIS's (W1a ~ N(0,
0.1²), W1b, W2b ~ N(0, 1), W2a = 0); "kaiming" is PEFT's (kaiming-uniform W1a, W1b, W2a; W2b = 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lora4diffusion.lora.method import AdapterMethod, Factor, matrix_shape

KEYS = ("hada_w1_a.weight", "hada_w1_b.weight", "hada_w2_a.weight", "hada_w2_b.weight")


class LoHa(AdapterMethod):
    """W1a = ``hada_w1_a``, W1b = ``hada_w1_b``, W2a = ``hada_w2_a``, W2b = ``hada_w2_b`` (fp32)."""

    kind = "loha"
    keys = KEYS
    up_keys = ("hada_w1_a.weight", "hada_w2_a.weight")  # the output side of each pair

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, **options: Any):
        super().__init__(base, rank, alpha, init, rslora, dropout, **options)
        self.weight_shape = tuple(base.weight.shape)
        w0 = base.weight
        t = {k.split(".")[0]: torch.empty(s, device=w0.device) for k, s in self.shapes(base, rank).items()}
        if init == "normal":
            nn.init.normal_(t["hada_w1_a"], std=0.1)
            nn.init.normal_(t["hada_w1_b"], std=1.0)
            nn.init.normal_(t["hada_w2_b"], std=1.0)
            nn.init.zeros_(t["hada_w2_a"])
        else:
            for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
                nn.init.kaiming_uniform_(t[k], a=math.sqrt(5))
            nn.init.zeros_(t["hada_w2_b"])
        for k, v in t.items():
            setattr(self, k, Factor(v))

    @classmethod
    def shapes(cls, base: nn.Module, rank: int, **options: Any) -> dict[str, tuple[int, ...]]:
        """W1a, W2a: [out, r]; W1b, W2b: [r, in] (conv: [r, in * kh * kw])."""
        out, flat_in = matrix_shape(base)
        a, b = (out, rank), (rank, flat_in)
        return {KEYS[0]: a, KEYS[1]: b, KEYS[2]: a, KEYS[3]: b}

    @classmethod
    def problem(cls, tensors: dict[str, torch.Tensor], rank: int, **options: Any) -> str | None:
        lack = [k.split(".")[0] for k in KEYS if k not in tensors]
        if lack:
            return f"it lacks {', '.join(lack)}"
        w1a, w1b, w2a, w2b = (tensors[k] for k in KEYS)
        if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or not (
            w1a.shape[1] == w1b.shape[0] == w2a.shape[1] == w2b.shape[0] == rank
            and w1a.shape[0] == w2a.shape[0] and w1b.shape[1] == w2b.shape[1]
        ):
            shapes = "/".join(str(tuple(t.shape)) for t in (w1a, w1b, w2a, w2b))
            return f"tensors {shapes} are not rank-{rank} LoHa factors"
        return None

    def delta_weight(self, multiplier: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * (alpha/r) (W1a W1b) ⊙ (W2a W2b) in fp32, reshaped to the base weight."""
        w1 = self.hada_w1_a.weight.float() @ self.hada_w1_b.weight.float()
        w2 = self.hada_w2_a.weight.float() @ self.hada_w2_b.weight.float()
        return (w1 * w2 * (multiplier * self.scale)).view(self.weight_shape)
