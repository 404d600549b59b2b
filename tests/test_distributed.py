"""Two CPU processes (gloo), set up the way torchrun sets them up, against one process; and the device option.

The DDP runs must keep both ranks bit-identical after every step and match the single-process run with the
same global batch up to float rounding (fp32 here, so the tolerance can be tight).
"""

import csv
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lora4diffusion import distributed
from lora4diffusion.cli import main
from lora4diffusion.errors import UserError
from lora4diffusion.training.base import train_base
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.lora import train_lora
from lora4diffusion.training.run import STATE_NAME

WORLD = 2
ATOL = 1e-5
BASE = {"bf16": False, "progress": False, "device": "cpu", "sample_every": 4}
LORA = {"bf16": False, "progress": False, "device": "cpu", "batch_size": 16, "steps": 3}


def _train_all(tmp, base_dir, tag: str) -> dict[str, torch.Tensor]:
    """Base (2 steps, then resumed to 4) and LoRA (3 steps); returns the trained weights before every step."""
    snaps: dict[str, torch.Tensor] = {}
    real_loss, real_fit = Trainer._loss, Trainer.fit

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params.values()]).clone()

    def loss(self, step):
        snaps[f"{self.run_dir.name}/{step}"] = flat(self)
        return real_loss(self, step)

    def fit(self, progress=True):
        out = real_fit(self, progress)
        snaps[f"{self.run_dir.name}/{self.step}"] = flat(self)
        return out

    Trainer._loss, Trainer.fit = loss, fit
    try:
        train_base("tiny", tmp / f"base_{tag}", steps=2, **BASE)
        train_base("tiny", tmp / f"base_{tag}", steps=4, resume=True, **BASE)
        train_lora("bold", tmp / f"lora_{tag}", base=base_dir, **LORA)
    finally:
        Trainer._loss, Trainer.fit = real_loss, real_fit
    return snaps


def _worker(rank: int, port: int, tmp, base_dir) -> None:
    # What torchrun puts in each process's environment.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    snaps = _train_all(tmp, base_dir, "ddp")
    result = {"snaps": snaps, "rank": distributed.rank(), "world": distributed.world_size()}
    try:
        train_base("tiny", tmp / "odd", steps=1, batch_size=31, **BASE)
    except UserError as e:
        result["error"] = str(e)
    torch.save(result, tmp / f"rank{rank}.pt")
    distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp, base_dir, timeout: float = 120.0) -> None:
    ctx = mp.start_processes(
        _worker, args=(_free_port(), tmp, base_dir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:  # a deadlocked collective must fail the test, not hang it
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"DDP workers did not finish in {timeout:.0f} s")


def _losses(run):
    return [float(r["loss"]) for r in csv.DictReader((run / "metrics.csv").open())]


def test_ddp_two_processes_match_one_process(tmp_path):
    base_dir = tmp_path / "base_for_lora"
    train_base("tiny", base_dir, steps=2, progress=False, device="cpu", sample_every=0)
    _spawn(tmp_path, base_dir)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _train_all(tmp_path, base_dir, "single")

    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == WORLD for r in ranks)
    # batch 31 cannot be split over 2 ranks: the same UserError on every rank, no hang
    assert all("not divisible by the 2 processes" in r["error"] for r in ranks)
    expected = {f"base_{{}}/{s}" for s in range(5)} | {f"lora_{{}}/{s}" for s in range(4)}
    assert set(single) == {k.format("single") for k in expected}
    assert set(ranks[0]["snaps"]) == set(ranks[1]["snaps"]) == {k.format("ddp") for k in expected}
    worst = 0.0
    for key in sorted(expected):
        a, b = ranks[0]["snaps"][key.format("ddp")], ranks[1]["snaps"][key.format("ddp")]
        assert torch.equal(a, b), f"ranks differ at {key}"  # DDP keeps replicas bit-identical
        ref = single[key.format("single")]
        worst = max(worst, (a - ref).abs().max().item())
        torch.testing.assert_close(a, ref, rtol=0, atol=ATOL, msg=f"DDP != single process at {key}")
    print(f"max |DDP - single| over all steps: {worst:.2e}")

    # Rank 0 alone wrote the run directories: one metrics row per log point, the global-batch loss in it.
    ddp, one = tmp_path / "base_ddp", tmp_path / "base_single"
    assert len(_losses(ddp)) == 2
    assert _losses(ddp) == pytest.approx(_losses(one), abs=1e-5)
    assert (ddp / "samples" / "step_0000004.png").is_file()
    state_ddp, state_one = load_file(ddp / STATE_NAME), load_file(one / STATE_NAME)
    assert state_ddp.keys() == state_one.keys()
    for k in state_ddp:
        torch.testing.assert_close(state_ddp[k], state_one[k], rtol=0, atol=ATOL)
    assert (tmp_path / "lora_ddp" / "adapter.safetensors").is_file()
    assert not (tmp_path / "odd").exists()


def test_trainer_loss_is_bit_identical_to_training_loss(tmp_path):
    """The Trainer draws t/noise/dropout itself (to slice them per rank); one process must not notice."""
    from lora4diffusion.data import load_mnist, to_model_range
    from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
    from lora4diffusion.models.unet import UNet, UNetConfig
    from lora4diffusion.training.run import TrainConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,)))
    schedule = NoiseSchedule(DiffusionConfig())
    splits = load_mnist("embedded")
    cfg = TrainConfig(batch_size=8, bf16=False, channels_last=False, label_dropout=0.5, seed=3)
    tr = Trainer(
        model,
        schedule,
        to_model_range(splits.train.images, 28),
        splits.train.labels,
        cfg,
        tmp_path,
        lambda m, d: None,
        device="cpu",
    )
    for step in (0, 7):
        idx = tr.batch_indices(step)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        want = schedule.training_loss(model, tr.images[idx], tr.labels[idx], g, cfg.label_dropout)
        assert torch.equal(tr._loss(step), want)


def test_device_option(tmp_path, monkeypatch, capsys):
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        distributed.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        distributed.resolve_device("cuda")
    with pytest.raises(UserError, match="CUDA is not available"):
        train_base("tiny", tmp_path / "x", steps=1, device="cuda")
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    for argv in (
        ["train", "--preset", "tiny", "--max-train-steps", "1", "--out", str(run), "--device", "cuda"],
        [
            "train-lora",
            "--style",
            "bold",
            "--checkpoint",
            "pixel-base",  # a real base: the device is what is refused
            "--out",
            str(tmp_path / "l"),
            "--device",
            "cuda",
        ],
        ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s"), "--device", "cuda"],
    ):
        assert main(["-q", *argv]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not run.exists()
    assert (
        main(["-q", "train", "--preset", "tiny", "--max-train-steps", "2", "--out", str(run), "--device",
              "cpu"]) == 0
    )
    assert (
        main(
            [
                "-q",
                "sample",
                "--checkpoint",
                str(run),
                "--digits",
                "3",
                "--per-digit",
                "2",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s"),
                "--device",
                "auto",
            ]
        )
        == 0
    )
    assert (tmp_path / "s" / "samples.npz").is_file()


_FAULTS = """
import resource, sys, torch
from lora4diffusion.distributed import keep_freed_memory
from lora4diffusion.pipeline import Pipeline
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
p = Pipeline.load("pixel-base")  # the label pixel model the fault counts were measured on
p.generate(list(range(10)), steps=2, batch_size=20)  # warm-up: the allocator has seen every buffer size once
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p.generate(list(range(10)) * 4, steps=3, batch_size=20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faulting_the_activations_in_again():
    """After warm-up, sampling page-faults its activations in on every forward unless glibc keeps them."""
    procs = {mode: subprocess.Popen([sys.executable, "-c", _FAULTS, mode], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for mode in ("default", "keep")}  # fmt: skip
    faults = {}
    for mode, p in procs.items():  # one thread each: side by side, each counts its own page faults
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        faults[mode] = int(out)
    assert faults["keep"] < faults["default"] / 3, faults  # measured: 18.7 k vs 124 k
