import csv
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lora4diffusion.checkpoint import read_metadata
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model
from lora4diffusion.training.base import train_base
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import STATE_NAME, NonFiniteLoss


def _losses(run):
    return [float(r["loss"]) for r in csv.DictReader((run / "metrics.csv").open())]


def test_tiny_training_lowers_loss_and_writes_run_dir(tiny_label_training):
    run, summary = tiny_label_training  # train_base("tiny", run, progress=False), once per session
    losses = _losses(run)
    assert summary["step"] == 30 and len(losses) == 6
    assert losses[-1] < 0.5 * losses[0]
    for name in ("config.json", "model.safetensors", STATE_NAME, "loss.png", "samples/step_0000030.png"):
        assert (run / name).is_file(), name
    model, diffusion, config = load_model(run)
    assert config["step"] == 30 and diffusion.timesteps == 1000


def test_resume_equals_uninterrupted_run(tmp_path):
    train_base("tiny", tmp_path / "a", steps=16, progress=False, checkpoint_every=8)
    train_base("tiny", tmp_path / "b", steps=8, progress=False)
    train_base("tiny", tmp_path / "b", steps=16, resume=True, progress=False)
    a = load_file(tmp_path / "a" / STATE_NAME)
    b = load_file(tmp_path / "b" / STATE_NAME)
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(
        load_file(tmp_path / "a" / "model.safetensors")["conv_in.weight"],
        load_file(tmp_path / "b" / "model.safetensors")["conv_in.weight"],
    )


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    train_base("tiny", tmp_path / "a", steps=2, progress=False)
    with pytest.raises(UserError, match="--resume"):
        train_base("tiny", tmp_path / "a", steps=2, progress=False)
    with pytest.raises(UserError, match="no training state"):
        train_base("tiny", tmp_path / "empty", steps=2, resume=True, progress=False)


def test_ctrl_c_saves_resumable_checkpoint(tmp_path, monkeypatch):
    real = Trainer._loss

    def interrupt_at_5(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(Trainer, "_loss", interrupt_at_5)
    summary = train_base("tiny", tmp_path / "a", steps=10, progress=False)
    assert summary["interrupted"] and summary["step"] == 5
    monkeypatch.setattr(Trainer, "_loss", real)
    assert train_base("tiny", tmp_path / "a", steps=10, resume=True, progress=False)["step"] == 10


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = Trainer._loss

    def nan_at_13(self, step):
        loss = real(self, step)
        return loss * float("nan") if step == 13 else loss

    monkeypatch.setattr(Trainer, "_loss", nan_at_13)
    with pytest.raises(NonFiniteLoss, match="step 13"):
        train_base("tiny", tmp_path / "a", steps=30, progress=False)  # checkpoints every 10 steps
    state = load_file(tmp_path / "a" / STATE_NAME)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    _, _, config = load_model(tmp_path / "a")
    assert config["step"] == 10


def test_bad_train_options(tmp_path):
    with pytest.raises(UserError, match="preset"):
        train_base("huge", tmp_path / "a")
    with pytest.raises(UserError, match="divisible"):
        train_base("tiny", tmp_path / "a", image_size=27)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train_base("tiny", tmp_path / "file")


def test_schedule_and_loss_options_are_recorded_and_checked_on_resume(tmp_path):
    from lora4diffusion.cli import main

    run = tmp_path / "a"
    assert (
        main(
            [
                "-q",
                "train",
                "--preset",
                "tiny",
                "--max-train-steps",
                "2",
                "--loss",
                "l1",
                "--schedule",
                "cosine",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    _, diffusion, _ = load_model(run)
    assert (diffusion.loss, diffusion.schedule) == ("l1", "cosine")
    with pytest.raises(UserError, match="different diffusion config"):
        train_base("tiny", run, steps=4, resume=True, progress=False)


def test_sigterm_stops_between_steps_with_a_resumable_checkpoint(tmp_path):
    """`kill` (a scheduler's preemption) of a background run: exit 75 (interrupted, resumable), checkpoint at
    a whole step."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora4diffusion", "train", "--preset", "tiny", "--max-train-steps", "100000",
           "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_losses(run) if (run / "metrics.csv").is_file() else []) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err  # cli.EXIT_INTERRUPTED
    assert "interrupted at step" in err
    meta_step = int(read_metadata(run / STATE_NAME)["step"])
    assert 10 <= meta_step < 100000
    summary = train_base("tiny", run, steps=meta_step + 2, resume=True, progress=False)
    assert summary["step"] == meta_step + 2 and not summary["interrupted"]
