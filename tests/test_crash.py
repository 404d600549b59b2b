"""Crash safety: SIGKILL at random moments and a full disk never cost more than the work since
the last checkpoint.

``train`` and ``train-lora`` run as the CLI (``cli.main``) in a forked child, so each start skips Python's
and torch's imports. Half the kills come at a moment a seeded RNG picks (0-0.4 s after the child wrote one
more checkpoint), the other half while a checkpoint file is being written (its temporary file exists).
After every kill the last checkpoint must load (train_state.safetensors and the exported model/adapter),
and the next start is ``--resume``; the last one runs to the end. The tiny preset checkpoints every 2 steps
here (patched in the child: the CLI has no flag for it) and trains on a small synthetic IDX set so that
startup is fast.
"""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import time
from contextlib import redirect_stderr
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import lora4diffusion.checkpoint as checkpoint
from lora4diffusion import cli
from lora4diffusion.checkpoint import load_tensors, read_metadata
from lora4diffusion.folders.model import load_model
from lora4diffusion.lora.adapters import read_adapter
from lora4diffusion.training.run import STATE_NAME

SEED = 14
TRAIN_KILLS, LORA_KILLS = 6, 4


def idx(arr: np.ndarray) -> bytes:
    magic = 0x801 if arr.ndim == 1 else 0x803
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    """256 training and 500 test digits of noise: enough for the held-out split, read in milliseconds."""
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    (d / "train-images-idx3-ubyte").write_bytes(idx(rng.integers(0, 256, (256, 28, 28), dtype=np.uint8)))
    (d / "train-labels-idx1-ubyte").write_bytes(idx((np.arange(256) % 10).astype(np.uint8)))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx(rng.integers(0, 256, (500, 28, 28), dtype=np.uint8)))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx((np.arange(500) % 10).astype(np.uint8)))
    return d


def _child(argv: list[str]) -> None:  # pragma: no cover - runs in the forked child
    import torch

    import lora4diffusion.training.base as base_training
    import lora4diffusion.training.lora as lora_training

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (it can hang)
    presets, lora_default = base_training.presets, lora_training.default_lora_train_config
    base_training.presets = lambda: {
        k: (u, replace(t, checkpoint_every=2, sample_every=0, log_every=1)) for k, (u, t) in presets().items()
    }
    lora_training.default_lora_train_config = lambda: replace(lora_default(), checkpoint_every=2, log_every=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os._exit(cli.main(["--threads", "1", *argv]))  # the CLI would otherwise size the pool to the cores


def _start(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        try:
            _child(argv)
        finally:
            os._exit(70)
    return pid


def _saved_step(run: Path) -> int:
    try:
        return int(read_metadata(run / STATE_NAME)["step"])
    except Exception:  # noqa: BLE001 - not there yet (or, which the checks below would catch, unreadable)
        return -1


def _check_last_checkpoint(run: Path, kind: str) -> int:
    """Everything a kill may have left: the training state and the export load, or do not exist yet."""
    if not (run / STATE_NAME).exists():
        return -1
    step = int(read_metadata(run / STATE_NAME)["step"])
    load_tensors(run / STATE_NAME)
    if kind == "train" and (run / "model.safetensors").exists():
        load_model(run)
    if kind == "lora" and (run / "adapter.safetensors").exists():
        read_adapter(run)
    return step


def _kill_and_resume(argv: list[str], run: Path, kind: str, kills: int, total: int, rng: random.Random
                     ) -> tuple[int, int]:
    """-> (kills survived, kills that landed inside a checkpoint write: they left a temporary file)."""
    survived, mid_write, last = 0, 0, -1
    for i in range(kills):
        aim_at_write = i % 2 == 1  # odd rounds: the moment a checkpoint file is being written
        pid = _start(argv + (["--resume"] if (run / STATE_NAME).exists() else []))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                pytest.fail(f"{kind} exited before it was killed")
            if aim_at_write and any(run.glob(".*.tmp")):
                break
            if not aim_at_write and _saved_step(run) > last:  # one new checkpoint, then a random moment
                time.sleep(rng.uniform(0.0, 0.4))
                break
            time.sleep(0.001 if aim_at_write else 0.02)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        step = _check_last_checkpoint(run, kind)
        assert last <= step <= total and (aim_at_write or last < step)
        last, survived = step, survived + 1
        mid_write += any(run.glob(".*.tmp"))
    pid = _start(argv + ["--resume"])
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert _check_last_checkpoint(run, kind) == total
    assert not any(run.glob(".*.tmp"))  # what a kill left mid-write is cleaned up on resume
    return survived, mid_write


def test_sigkill_train_and_train_lora_then_resume(idx_dir, tmp_path):
    import matplotlib.pyplot  # noqa: F401 - imported once here, not in every child (loss.png)

    rng = random.Random(SEED)
    run, total = tmp_path / "base", 2 * TRAIN_KILLS + 6
    argv = ["-q", "train", "--preset", "tiny", "--image-size", "16", "--no-bf16", "--device", "cpu",
            "--data", str(idx_dir), "--max-train-steps", str(total), "--out", str(run)]
    survived, mid_write = _kill_and_resume(argv, run, "train", TRAIN_KILLS, total, rng)
    print(f"train: {survived} kills survived, {mid_write} inside a checkpoint write")  # for RELIABILITY.md
    assert survived == TRAIN_KILLS
    assert int(load_model(run)[2]["step"]) == total
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in metrics[1:]] == list(range(1, total + 1))  # no half or doubled rows

    lora_run, lora_total = tmp_path / "lora", 2 * LORA_KILLS + 6
    argv = ["-q", "train-lora", "--checkpoint", str(run), "--style", "bold", "--data", str(idx_dir),
            "--rank", "2", "--batch-size", "8", "--max-train-steps", str(lora_total), "--device", "cpu",
            "--out", str(lora_run)]
    survived, mid_write = _kill_and_resume(argv, lora_run, "lora", LORA_KILLS, lora_total, rng)
    print(f"train-lora: {survived} kills survived, {mid_write} inside a checkpoint write")
    assert survived == LORA_KILLS
    assert read_adapter(lora_run).extra["steps"] == str(lora_total)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(idx_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    argv = ["-q", "train", "--preset", "tiny", "--image-size", "16", "--no-bf16", "--device", "cpu",
            "--data", str(idx_dir), "--max-train-steps", "2", "--out", str(run)]
    assert cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {STATE_NAME, "model.safetensors", "config.json"} <= set(before)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli.main(argv[:-4] + ["--max-train-steps", "4", "--out", str(run), "--resume"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1, err.getvalue()
    assert STATE_NAME in lines[0] and "no space left on device" in lines[0]
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "metrics.csv"}
    assert after == {k: v for k, v in before.items() if k != "metrics.csv"}  # no temp file, nothing changed
    monkeypatch.undo()
    assert int(load_model(run)[2]["step"]) == 2
    assert cli.main(argv[:-4] + ["--max-train-steps", "4", "--out", str(run),
                         "--resume"]) == 0  # room again: goes on
    assert int(load_model(run)[2]["step"]) == 4
