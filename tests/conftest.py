import os

import pytest
import torch

from lora4diffusion.models.unet import UNetConfig

# CI has 2 cores: use both, unless the caller pinned a thread count (OMP_NUM_THREADS=1 beside a training job).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(2)


@pytest.fixture
def small_cfg() -> UNetConfig:
    """A tiny UNet with every kind of block (ResBlocks, down/up, Transformer at the lower level)."""
    return UNetConfig(
        image_size=16,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attn_levels=(1,),
        context_dim=32,
    )
