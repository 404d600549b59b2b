"""Validation while training (training/validation.py): a deterministic held-out loss, written beside the
training metrics, that leaves training untouched and resumes bit for bit."""

from __future__ import annotations

import pytest
import torch

from lora4diffusion.checkpoint import load_tensors
from lora4diffusion.cli import main
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.training.validation import (
    VALIDATION_FILE,
    DiffusionValidation,
    heldout_rows,
    trim_validation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["-q", "train", "--preset", "tiny", "--batch-size", "8", "--device", "cpu"]


def test_the_held_out_set_and_the_zero_models_loss():
    labels = torch.arange(300) % 10
    rows = heldout_rows(labels)
    assert rows.shape == (100,) and torch.equal(labels[rows], torch.arange(10).repeat_interleave(10))
    schedule = NoiseSchedule(DiffusionConfig())
    x0 = torch.rand(100, 1, 4, 4) * 2 - 1
    val = DiffusionValidation(schedule, x0, labels[rows], batch_size=32)
    assert val.timesteps == [100, 300, 500, 700, 900]
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    got = val(zero, torch.device("cpu"), False)
    want = float((val.noise.double() ** 2).mean())  # an eps model that predicts 0: E||eps||^2 at every t
    assert got["val_loss"] == pytest.approx(want, rel=1e-6)
    assert got["val_eps_mse"] == pytest.approx(want, rel=1e-6)
    assert got == val(zero, torch.device("cpu"), False)  # fixed noise, fixed timesteps: the same numbers
    v = DiffusionValidation(NoiseSchedule(DiffusionConfig(prediction_type="v_prediction")), x0, labels[rows])
    got_v = v(zero, torch.device("cpu"), False)
    abar = schedule.alphas_cumprod[300].double()
    vel = abar.sqrt() * v.noise.double() - (1 - abar).sqrt() * x0.double()  # its target at t = 300
    assert got_v["val_loss_t300"] == pytest.approx(float((vel**2).mean()), rel=1e-5)


def test_validation_leaves_training_alone_and_resumes_bit_for_bit(tmp_path):
    """One run validates at steps 2, 4, 6; another trains 4 steps without validation, is killed (leaving rows
    past its checkpoint and half a row), and resumes to 6 validating: its weights and its step-6 row are the
    first run's, bit for bit, so validating neither drew a random number nor touched the state."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*TINY, "--max-train-steps", "6", "--validate-every", "2", "--out", str(one)]) == 0
    rows = (one / VALIDATION_FILE).read_text().splitlines()
    assert rows[0].startswith("step,val_loss,val_eps_mse,val_loss_t100")
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]
    assert main([*TINY, "--max-train-steps", "4", "--out", str(two)]) == 0
    assert not (two / VALIDATION_FILE).exists()
    (two / VALIDATION_FILE).write_text(f"{rows[0]}\n5,0.5,0.5,0.5,0.5,0.5,0.5,0.5\n6,0.4")
    resume = ["--max-train-steps", "6", "--validate-every", "2", "--resume", "--out", str(two)]
    assert main([*TINY, *resume]) == 0
    assert (two / VALIDATION_FILE).read_text().splitlines() == [rows[0], rows[3]]
    a, b = load_tensors(one / "model.safetensors"), load_tensors(two / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trim_keeps_whole_rows_up_to_the_step(tmp_path):
    (tmp_path / VALIDATION_FILE).write_text("step,val_loss\n2,0.5\n4,nan\n6,0.25\n8,0.1\n9,")
    trim_validation(tmp_path, 6)
    assert (tmp_path / VALIDATION_FILE).read_text() == "step,val_loss\n2,0.5\n6,0.25\n"


def test_lora_validation_and_styles_without_held_out_digits(tiny_label_run, tmp_path, capsys):
    out = tmp_path / "lora"
    t = ["-q", "train-lora", "--checkpoint", str(tiny_label_run), "--batch-size", "4", "--rank", "2",
         "--max-train-steps", "2", "--validate-every", "1", "--device", "cpu", "--out", str(out)]
    assert main([*t, "--style", "thin"]) == 0
    assert [r.split(",")[0] for r in (out / VALIDATION_FILE).read_text().splitlines()[1:]] == ["1", "2"]
    folder = tmp_path / "mine"
    for d in range(10):
        (folder / str(d)).mkdir(parents=True)
    assert main([*t, "--style", str(folder), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--validate-every needs held-out digits" in err and not (tmp_path / "x").exists()


def test_vae_validation(tmp_path):
    out = tmp_path / "vae"
    assert main(["-q", "train-vae", "--preset", "tiny", "--max-train-steps", "4", "--validate-every", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    lines = (out / VALIDATION_FILE).read_text().splitlines()
    assert lines[0] == "step,val_loss,val_l1"
    rows = [[float(c) for c in line.split(",")] for line in lines[1:]]
    assert [r[0] for r in rows] == [2, 4]
    assert all(r[1] >= r[2] > 0 for r in rows) and rows[1][2] < rows[0][2]  # L1 + KL >= L1; it learns
