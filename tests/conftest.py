import os

import pytest
import torch

from lora4diffusion.models.unet import UNetConfig
from lora4diffusion.precision import ENV as CPU_BF16_ENV

# CI has 2 cores: use both, unless the caller pinned a thread count (OMP_NUM_THREADS=1 beside a training job).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(2)
# bf16 was the CPU default on every CPU when the suite's tolerances and figures were set (on an AMD EPYC with
# avx512_bf16). Pin it, so that a test leaving --bf16 unsaid means the same on a CPU without native bf16,
# where precision.py now chooses fp32; the session fixtures and the CLI's subprocesses see it too. The tests
# of the choice itself (test_precision.py) set or clear it.
os.environ[CPU_BF16_ENV] = "1"


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
def tiny_label_training(tmp_path_factory):
    """(run folder, summary) of ``train_base("tiny", run, progress=False)``: a tiny label model at the
    preset's full length (seconds), trained once per session; test_train checks that training, the CLI and
    LoRA tests use the model (tiny_label_run). They read it, never write into it."""
    from lora4diffusion.training.base import train_base

    run = tmp_path_factory.mktemp("tiny_label_run") / "run"
    return run, train_base("tiny", run, progress=False)


@pytest.fixture(scope="session")
def tiny_label_run(tiny_label_training):
    return tiny_label_training[0]


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """`train-vae --preset tiny` (seconds), built once per session for the tests that only need *a* VAE (the
    prompt-model, export and demo tests); they read it, never write into it."""
    from lora4diffusion.cli import main

    vae = tmp_path_factory.mktemp("tiny_vae") / "vae"
    assert main(["-q", "train-vae", "--preset", "tiny", "--out", str(vae), "--device", "cpu"]) == 0
    return vae


@pytest.fixture(scope="session")
def tiny_prompt_model(tiny_vae, tmp_path_factory):
    """`train --conditioning text --preset tiny` on ``tiny_vae`` (tiny UNet + text encoder; seconds), built
    once per session for the tests that only need *a* prompt model (prompt models, the diffusers export,
    serve); they read it, never write into it."""
    from lora4diffusion.cli import main

    base = tmp_path_factory.mktemp("tiny_prompt_model") / "base"
    argv = ["-q", "train", "--conditioning", "text", "--preset", "tiny", "--vae", str(tiny_vae), "--out",
            str(base)]
    assert main([*argv, "--device", "cpu"]) == 0
    return base


@pytest.fixture(scope="session")
def shipped_sd_export(tmp_path_factory):
    """The shipped base (`base`) exported by `export-diffusers` (a StableDiffusionPipeline folder), once per
    session for the tests that load it into diffusers; they read it, never write into it."""
    from lora4diffusion.cli import main

    out = tmp_path_factory.mktemp("shipped_sd") / "sd"
    assert main(["-q", "export-diffusers", "--checkpoint", "base", "--out", str(out)]) == 0
    return out


def _random_prompt_lora(base, scale: float):
    """Random rank-2 all-linear factors on a prompt base's UNet (lora_up ~ N(0, scale^2), seed 0).
    -> (the adapter, recording the UNet's fingerprint; the base's prompt fingerprint, UNet + text encoder)."""
    from lora4diffusion.lora.adapters import adapter_from_model
    from lora4diffusion.lora.layers import inject_lora, lora_layers
    from lora4diffusion.lora.prompt_lora import prompt_fingerprint
    from lora4diffusion.pipeline import Pipeline

    pipe = Pipeline.load(base)
    fingerprint = prompt_fingerprint(pipe.unet, pipe.text_encoder)
    inject_lora(pipe.unet, "all-linear", rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(pipe.unet).values():
            w = layer.lora_up["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)
    return adapter_from_model(pipe.unet), fingerprint


@pytest.fixture(scope="session")
def random_prompt_lora():
    """random_prompt_lora(base, scale) -> (adapter, prompt fingerprint): a stand-in adapter for a prompt
    base (the serve tests save copies of it with chosen fingerprints and trigger words)."""
    return _random_prompt_lora


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a busy machine, several OpenMP threads spin for seconds per call."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
