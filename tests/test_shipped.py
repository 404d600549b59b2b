"""What `pip install .` ships: the base draws the asked digit, and the example adapters do what they say.

Small samples (2 per digit, DDIM 20, the default guidance, bf16) keep these quick; the full measurements
(1,000 samples) are in docs/base_model.md and benchmarks/RESULTS.md.
"""

import numpy as np
import pytest
import torch

from lora4diffusion.cli import main
from lora4diffusion.evaluate import evaluate_samples
from lora4diffusion.lora.adapters import base_fingerprint, read_adapter, shipped_adapters
from lora4diffusion.lora.layers import set_adapter_weight
from lora4diffusion.pipeline import Pipeline

LABELS = [d for d in range(10) for _ in range(2)]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()


@pytest.fixture(scope="module")
def base_images(pipe) -> torch.Tensor:
    return pipe.generate(LABELS, seed=1, bf16=True)[0]


def _slant(images: torch.Tensor) -> float:
    """Mean over images of d(x)/d(y) of the ink: > 0 when strokes lean right going up (italic)."""
    h, w = images.shape[-2:]
    ys = -(torch.arange(h, dtype=torch.float64) - (h - 1) / 2).view(h, 1).expand(h, w)  # up is positive
    xs = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2).view(1, w).expand(h, w)
    m = images.double() / images.double().sum((1, 2), keepdim=True)
    mx, my = (m * xs).sum((1, 2), keepdim=True), (m * ys).sum((1, 2), keepdim=True)
    cov = (m * (xs - mx) * (ys - my)).sum((1, 2))
    var = (m * (ys - my) ** 2).sum((1, 2))
    return float((cov / var).mean())


def test_shipped_base_draws_the_asked_digit(base_images):
    r = evaluate_samples(base_images, torch.tensor(LABELS))
    assert r["accuracy"] >= 0.9, r["accuracy"]  # 1,000 samples at these settings: see docs/base_model.md


def test_example_adapters_are_shipped_for_the_shipped_base(pipe):
    shipped = shipped_adapters()
    assert {"bold", "italic"} <= set(shipped)
    for name in ("bold", "italic"):
        adapter = read_adapter(shipped[name])
        assert adapter.fingerprint == base_fingerprint(pipe.unet)
        assert adapter.metadata()["style"] == name
        assert (shipped[name] / "README.md").is_file()  # the command that made it
        assert (shipped[name] / "adapter.safetensors").stat().st_size < 2**20


def test_bold_adapter_adds_ink_monotonically_and_keeps_the_digit(pipe, base_images):
    name = pipe.add_lora("bold", 0.0)  # a shipped adapter, loaded by name
    inks = []
    try:
        for scale in (0.0, 0.5, 1.0):
            set_adapter_weight(pipe.unet, name, scale)
            images = pipe.generate(LABELS, seed=1, bf16=True)[0]
            inks.append(float(images.mean()))
        r = evaluate_samples(images, torch.tensor(LABELS))
    finally:
        set_adapter_weight(pipe.unet, name, 0.0)
    assert inks[0] == pytest.approx(float(base_images.mean()), abs=1e-6)
    assert inks[0] < inks[1] < inks[2]
    assert inks[2] >= 1.3 * inks[0], inks  # 1,000 samples: see benchmarks/RESULTS.md
    assert r["accuracy"] >= 0.85


def test_italic_adapter_slants_the_strokes(pipe, base_images):
    name = pipe.add_lora("italic", 1.0)
    try:
        images = pipe.generate(LABELS, seed=1, bf16=True)[0]
    finally:
        set_adapter_weight(pipe.unet, name, 0.0)
    assert _slant(images) > _slant(base_images) + 0.15, (_slant(images), _slant(base_images))


def test_sample_cli_takes_a_shipped_adapter_by_name(tmp_path):
    inks = {}
    for extra in ([], ["--lora", "bold:1"]):
        out = tmp_path / str(len(extra))
        assert main(["-q", "sample", "--digits", "0,1", "--steps", "5", *extra, "--out", str(out)]) == 0
        with np.load(out / "samples.npz") as f:
            inks[len(extra)] = float(f["images"].mean())
    assert inks[2] > 1.2 * inks[0], inks
