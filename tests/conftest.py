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


@pytest.fixture(scope="session")
def tiny_prompt_model(tmp_path_factory):
    """A tiny prompt-conditioned latent model (tiny VAE, tiny UNet + text encoder; seconds), built once per
    session for the tests that only need *a* prompt model (the serve tests)."""
    from lora4diffusion.cli import main

    root = tmp_path_factory.mktemp("tiny_prompt_model")
    vae, base = str(root / "vae"), root / "base"
    assert main(["-q", "train-vae", "--preset", "tiny", "--out", vae, "--device", "cpu"]) == 0
    argv = ["-q", "train", "--conditioning", "text", "--preset", "tiny", "--vae", vae, "--out", str(base)]
    assert main([*argv, "--device", "cpu"]) == 0
    return base
