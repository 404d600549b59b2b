"""The UNet + text encoder pair of a prompt model, as one module (SD 1.x's design at MNIST scale).

There is no pretrained CLIP here, so the text encoder is trained jointly with the UNet from scratch: one
module, so the optimizer, the EMA, DDP and the checkpoints see both.
"""

from __future__ import annotations

import torch
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.models.text_encoder import TextEncoder
from lora4diffusion.models.unet import UNet, UNetConfig


class TextConditionedUNet(nn.Module):
    """UNet + text encoder as one module: forward(x, t, ids) = unet(x, t, text_encoder(ids).last_hidden)."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder):
        super().__init__()
        if unet.cfg.conditioning != "text":
            raise UserError("TextConditionedUNet needs a UNet with conditioning='text'")
        if text_encoder.cfg.width != unet.cfg.context_dim:
            raise UserError(
                f"text encoder width {text_encoder.cfg.width} != the UNet's context_dim"
                f" {unet.cfg.context_dim}"
            )
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def cfg(self) -> UNetConfig:
        return self.unet.cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, self.text_encoder(ids)[0])
