"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): LoRA on the direction, a trained
magnitude.

Eq. 5 of the paper: W' = m · (W0 + ΔW) / ||W0 + ΔW||, with ΔW = (alpha/r) B A a LoRA update (lora.py) and
m a trained vector initialised to ||W0||, so with B = 0 the adapted layer starts equal to its base. The norm
is taken per output channel by default (``norm_axis="out"``: each row of the [out, in] weight, each output
filter of a conv kernel), as PEFT's ``use_dora`` and LyCORIS's ``wd_on_out`` do; ``norm_axis="in"`` takes
it per input column instead, as A1111 and older LyCORIS files do (ComfyUI reads the axis from the magnitude's
shape). As in PEFT (and §4.3 of the paper), the norm is treated as a constant in the backward pass.

What the adapter adds to the base output: m_user · (W' - W0) x, so a user multiplier of 0 is the base and 1
is the paper's W'; in between, the weight moves along the straight line from W0 to W' (ComfyUI's strength).
PEFT scales ΔW inside the norm instead, so the two agree at 1 and differ at other multipliers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.lora.lora import LoRA
from lora4diffusion.lora.method import AdapterMethod, Factor

AXES = ("out", "in")


def weight_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """||w|| per output channel ([out]; axis "out") or per input channel ([in]; axis "in")."""
    return (w if axis == "out" else w.transpose(0, 1)).flatten(1).norm(dim=1)


def along(v: torch.Tensor, w: torch.Tensor, axis: str) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against the weight ``w`` on ``axis``."""
    shape = [1] * w.dim()
    shape[0 if axis == "out" else 1] = -1
    return v.view(shape)


class DoRA(LoRA):
    """LoRA's A = ``lora_down`` and B = ``lora_up``, plus the magnitude m = ``dora_magnitude`` ([out] or
    [in], fp32)."""

    kind = "dora"
    keys = ("lora_down.weight", "lora_up.weight", "dora_magnitude.weight")
    options = {"norm_axis": "out"}
    up_keys = ("lora_up.weight",)

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, **options: Any):
        super().__init__(base, rank, alpha, init, rslora, dropout, **options)
        w0 = base.weight.detach().float()
        self.dora_magnitude = Factor(weight_norm(w0, self.opts["norm_axis"]))  # m = ||W0||: starts as base

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        out = super().check_options(options)
        if out["norm_axis"] not in AXES:
            raise UserError(f"dora option norm_axis must be 'out' or 'in', got {out['norm_axis']!r:.40}")
        return out

    @classmethod
    def shapes(cls, base: nn.Module, rank: int, **options: Any) -> dict[str, tuple[int, ...]]:
        """LoRA's A and B, and m: [out] (norm_axis "out") or [in] (norm_axis "in")."""
        axis = cls.check_options(options)["norm_axis"]
        channels = base.weight.shape[0 if axis == "out" else 1]
        return {**LoRA.shapes(base, rank), "dora_magnitude.weight": (channels,)}

    @classmethod
    def problem(cls, tensors: dict[str, torch.Tensor], rank: int, **options: Any) -> str | None:
        if "dora_magnitude.weight" not in tensors:
            return "it has LoRA factors but no dora_magnitude"
        if not any(k in tensors for k in LoRA.keys):
            return "it has a dora_magnitude but no LoRA factors"
        m = tensors["dora_magnitude.weight"]
        if m.dim() != 1:
            return f"dora_magnitude {tuple(m.shape)} is not a vector"
        return LoRA.problem(tensors, rank)

    def delta_weight(self, multiplier: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * (W' - W0) in fp32, W' = m (W0 + ΔW) / ||W0 + ΔW|| (eq. 5)."""
        if base_weight is None:
            raise ValueError("DoRA's ΔW depends on W0: pass base_weight")
        axis = self.opts["norm_axis"]
        w0 = base_weight.float()
        v = w0 + super().delta_weight(1.0)  # W0 + (alpha/r) B A
        # A constant in the backward pass (§4.3; PEFT). Clamped: a channel whose weights are all zero (norm
        # 0) would give 0/0; any other norm is left exactly as it is (LyCORIS adds its eps to every norm).
        norm = weight_norm(v, axis).detach().clamp_min(torch.finfo(v.dtype).eps)
        w = v * along(self.dora_magnitude.weight / norm, v, axis)
        return (w - w0) * multiplier

    forward = AdapterMethod.forward  # (W' - W0) x: the weight is normalised as a whole, no factored shortcut

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_axis={self.opts['norm_axis']}"
