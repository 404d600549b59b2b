"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"): the frozen weight
turned by a learned orthogonal matrix.

Eq. 2 of the paper: W' = W0 R with R orthogonal, so the angles between the neurons (the hyperspherical
energy) are kept. R is block-diagonal, n blocks of size b (``rank`` here, as LyCORIS names it; the layer's
input size in, or in * kh * kw on an nn.Conv2d, must be a multiple of b), and each block comes from a
skew-symmetric Q by Cayley's transform (eq. 3): R_i = (I - Q_i)(I + Q_i)^{-1}, exact (PEFT's
``use_cayley_neumann=False``; its default approximates the inverse by a series). Laid out as PEFT's OFT: the
trained tensor ``oft_r`` [n, b (b - 1) / 2] holds each Q_i's upper triangle, and the rotation acts on the
weight's input side, W' = W0 R^T (for a Linear: the input x is turned by R before W0, x R W0^T). Q = 0 gives
R = I: the adapted layer starts as its base. alpha plays no part (there is no scale).

What the adapter adds: m_user (W0 R^T - W0) x, so m = 0 is the base and 1 is the paper's W'. Several OFT
adapters add their changes to the same W0 (PEFT multiplies their rotations instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora4diffusion.lora.method import AdapterMethod, Factor, matrix_shape


def cayley(upper: torch.Tensor, block: int) -> torch.Tensor:
    """[n, b (b - 1) / 2] upper triangles of skew-symmetric Q_i -> [n, b, b] orthogonal
    R_i = (I - Q_i)(I + Q_i)^{-1}."""
    n = upper.shape[0]
    rows, cols = torch.triu_indices(block, block, 1, device=upper.device)
    q = upper.new_zeros(n, block, block)
    q[:, rows, cols] = upper
    q = q - q.transpose(1, 2)
    eye = torch.eye(block, device=upper.device, dtype=upper.dtype).expand(n, block, block)
    return torch.linalg.solve(eye + q, eye - q, left=False)  # X (I + Q) = I - Q


class OFT(AdapterMethod):
    """Q's upper triangles ``oft_r`` [in / b, b (b - 1) / 2] (fp32); ``rank`` = the block size b."""

    kind = "oft"
    keys = ("oft_r.weight",)

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, **options: Any):
        super().__init__(base, rank, alpha, init, rslora, dropout, **options)
        self.weight_shape = tuple(base.weight.shape)
        (shape,) = self.shapes(base, rank).values()
        self.oft_r = Factor(torch.zeros(shape, device=base.weight.device))  # Q = 0: R = I at the start

    @classmethod
    def shapes(cls, base: nn.Module, rank: int, **options: Any) -> dict[str, tuple[int, ...]]:
        """[in / b, b (b - 1) / 2] for block size b = ``rank`` (in: in * kh * kw on a conv)."""
        _, flat_in = matrix_shape(base)
        return {"oft_r.weight": (flat_in // rank, rank * (rank - 1) // 2)}

    @classmethod
    def unfit(cls, base: nn.Module, rank: int, **options: Any) -> str | None:
        _, flat_in = matrix_shape(base)
        if rank < 2 or flat_in % rank:
            return f"OFT block size {rank} must be >= 2 and divide the layer's input size {flat_in}"
        return None

    @classmethod
    def problem(cls, tensors: dict[str, torch.Tensor], rank: int, **options: Any) -> str | None:
        t = tensors["oft_r.weight"]
        if t.dim() != 2 or t.shape[1] != rank * (rank - 1) // 2:
            return f"oft_r {tuple(t.shape)} is not [blocks, {rank * (rank - 1) // 2}] for block size {rank}"
        return None

    @property
    def scale(self) -> float:
        return 1.0  # a rotation has no scale; alpha is only recorded

    def delta_weight(self, multiplier: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier * (W0 R^T - W0) in fp32, R = block_diag(R_1 .. R_n) on the input side."""
        if base_weight is None:
            raise ValueError("OFT's ΔW depends on W0: pass base_weight")
        w0 = base_weight.float().reshape(self.weight_shape[0], -1)
        r = cayley(self.oft_r.weight.float(), self.rank)  # [n, b, b]
        blocks = w0.view(w0.shape[0], r.shape[0], self.rank)  # [out, n, b]
        turned = torch.einsum("onj,nij->oni", blocks, r).reshape(w0.shape)  # W0 R^T, block by block
        return ((turned - w0) * multiplier).view(self.weight_shape)
