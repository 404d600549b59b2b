"""A training run's settings and folder: TrainConfig, what ``--resume`` may change, and preparing or
tidying the run directory (checkpoint, metrics.csv, loss.png, TensorBoard) before the loop starts.

A run directory holds train_state.safetensors (weights, EMA, optimizer, step, with the TrainConfig and the
run's architecture as metadata), metrics.csv and loss.png, and what the task exports (a model folder or an
adapter). Only rank 0 writes it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lora4diffusion import distributed
from lora4diffusion.checkpoint import read_metadata, write_text_atomic
from lora4diffusion.errors import UserError
from lora4diffusion.plots import plot_training
from lora4diffusion.schema import int_text
from lora4diffusion.training.best import SCORE_METRICS, parse_metric
from lora4diffusion.training.validation import read_validation

STATE_NAME = "train_state.safetensors"
MAX_VALIDATION_IMAGES = 1000
# TrainConfig fields a resumed run may change freely: how long it runs and how often it reports. Any other
# change (batch, lr, seed, ...) alters the trajectory, so --resume refuses it unless told to go on.
# Keeping the best and stopping early watch the run without changing its weights: free as well.
RESUME_FREE = ("steps", "log_every", "checkpoint_every", "sample_every", "validate_every", "score_every",
               "validation_images", "keep_best", "patience")
# run_info entries that can never change on resume: the weights would not fit, or would mean something else.
RESUME_FIXED = ("unet", "diffusion", "lora", "vae", "base_fingerprint")  # architecture: resume() refuses


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables the EMA
    label_dropout: float = 0.1  # share of labels replaced by the null label (CFG training)
    seed: int = 0
    # bf16 autocast (the master weights stay fp32): True / False as asked, None the device's default
    # (precision.py: only where the hardware has native bf16)
    bf16: bool | None = None
    # Off: on CPU, GroupNorm's channels_last kernel is 4.6x slower than NCHW and costs more than the convs
    # gain (bf16 step, batch 128, 2 cores: 0.81 s channels_last vs 0.71 s NCHW). Worth trying on CUDA.
    channels_last: bool = False
    log_every: int = 10
    checkpoint_every: int = 250
    sample_every: int = 500  # 0 disables the periodic sample grid
    validate_every: int = 0  # held-out loss every N steps (training/validation.py); 0 = off
    score_every: int = 0  # every K-th validation also samples and scores (training/scores.py); 0 = off
    # images per scoring: 5 per digit, accuracy in steps of 2 %, a few seconds (training/scores.py)
    validation_images: int = 50
    keep_best: str = ""  # METRIC[:min|max]: keep RUN/best/ (training/best.py); "" = off
    patience: int = 0  # stop after P validations of keep_best without improvement; 0 = never

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not (0 < self.lr < float("inf")):
            raise UserError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"seed must satisfy 0 <= seed < 2**63, got {self.seed}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.label_dropout <= 1:
            raise UserError(f"label dropout must be in [0, 1], got {self.label_dropout}")
        for name in ("validate_every", "score_every", "patience"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.validation_images <= MAX_VALIDATION_IMAGES:
            raise UserError(f"num-validation-images must be in 1..{MAX_VALIDATION_IMAGES}, got"
                            f" {self.validation_images}")
        needs = [f"--{n.replace('_', '-')}" for n in ("score_every", "keep_best", "patience")
                 if getattr(self, n)]
        if needs and not self.validate_every:
            raise UserError(f"{', '.join(needs)} need(s) --validate-every N (they act at validations)")
        if self.patience and not self.keep_best:
            raise UserError("--patience needs --keep-best METRIC: the metric whose improvement it waits for")
        if self.keep_best:
            metric, _ = parse_metric(self.keep_best)
            if metric in SCORE_METRICS and not self.score_every:
                raise UserError(f"--keep-best {metric}: a score, measured with --score-every K (the"
                                " validation loss is val_loss)")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint (if any was written) is kept."""


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 (16 hex digits) of the training images and labels: --resume notices changed data."""
    h = hashlib.sha256()
    for t in (images, labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def seed_value(value: int) -> int:
    """A derived seed folded into manual_seed's 64-bit range (the identity for every seed below ~2**43)."""
    return value % 2**64


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temporary files a killed run left mid-write (``atomic_write``'s ``.NAME.XXXX.tmp``): the
    renamed files are the checkpoint, these never became one."""
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file() and tmp.name.split(".")[1] in RUN_FILES:
            tmp.unlink(missing_ok=True)


RUN_FILES = ("train_state", "model", "config", "adapter", "embedding", "metrics", "loss", "validation")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the well-formed rows of metrics.csv up to ``step`` (where training resumes): after a SIGKILL
    the file can end in half a row, and rows logged after the last checkpoint will be logged again."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    keep = lines[:1]
    for line in lines[1:]:
        cells = line.split(",")
        if len(cells) == 6 and cells[0].isdigit() and int(cells[0]) <= step and _finite_cell(cells[1]):
            keep.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in keep))


def _finite_cell(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def plot_metrics(metrics_path: Path, out: Path) -> None:
    """loss.png: metrics.csv's training loss, and, where the run validates, validation.csv's loss and scores
    with the best step of RUN/best/best.json (plots.plot_training)."""
    rows = list(csv.DictReader(metrics_path.open()))
    run_dir = metrics_path.parent
    table = read_validation(run_dir)
    if not rows and not table:
        return
    validation = {"step": [step for step, _ in table]}
    for _, row in table:
        for key in row:
            validation.setdefault(key, [])
    for key in list(validation)[1:]:
        validation[key] = [row.get(key) for _, row in table]
    try:
        best_step = json.loads((run_dir / "best" / "best.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        best_step = None
    plot_training([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], out, validation,
                  best_step if isinstance(best_step, int) else None, title=f"training: {run_dir.name}")


def _saved_config(path: Path) -> dict:
    """The TrainConfig a run was saved with (known fields of the right type only; {} if unreadable)."""
    try:
        saved = json.loads(read_metadata(path).get("config", "{}"))
    except json.JSONDecodeError:
        raise UserError(f"{path}: malformed 'config' metadata (not JSON)") from None
    defaults = asdict(TrainConfig())
    ok = {}
    for k, v in (saved.items() if isinstance(saved, dict) else ()):
        if k == "bf16" and (v is None or type(v) is bool):  # the one optional field: None, the default
            ok[k] = v
        elif k in defaults and type(v) is type(defaults[k]):
            ok[k] = v
    return ok


def _check_resume_target(state: Path, steps: int) -> None:
    """--resume to fewer steps than the run has done is refused: it cannot un-train, and going on would cut
    metrics.csv back to the target and report a loss of nothing. (Resuming a run at exactly its target trains
    nothing and changes nothing: allowed, so a script may always pass --resume.)"""
    try:
        done = int_text(read_metadata(state).get("step"), "step", 0, 2**62)
    except UserError as e:
        raise UserError(f"--resume: {state}: malformed metadata ({e})") from None
    if done > steps:
        raise UserError(f"--resume: the run in {state.parent} is at step {done}, past --max-train-steps "
                        f"{steps}; pass more than {done} steps to continue it (nothing was changed)")


def prepare_run(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    allow_changes: bool = False,
    **overrides,
) -> tuple[TrainConfig, Path, torch.device]:
    """Apply overrides (None = keep), validate, and check the run directory before anything is written.

    ``resume``: the run's saved settings are the defaults; an override that changes one (other than the
    step count and reporting intervals) is refused unless ``allow_changes``. Without ``resume`` a folder
    holding a run or a model is refused unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    given = {k: v for k, v in overrides.items() if v is not None}
    if resume:
        state = out / STATE_NAME
        if not state.is_file():
            raise UserError(f"--resume: no training state at {state} (start the run without --resume)")
        saved = _saved_config(state)
        cfg = replace(cfg, **saved)
        changed = [f"{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in given.items()
                   if k in saved and k not in RESUME_FREE and saved[k] != v]  # fmt: skip
        if changed and not allow_changes:
            raise UserError(
                f"--resume: the run used other settings ({', '.join(changed)});"
                " pass --allow-changes to continue with the new ones"
            )
    elif not overwrite:
        if (out / STATE_NAME).exists():
            raise UserError(
                f"--out {out} already holds a training run; pass --resume to continue it, --overwrite to"
                " start over, or pick another --out"
            )
        held = [n for n in ("config.json", "model.safetensors", "adapter.safetensors") if (out / n).exists()]
        if held:
            raise UserError(
                f"--out {out} holds a model ({', '.join(held)}); pass --overwrite or pick another --out"
            )
    cfg = replace(cfg, **given)
    cfg.validate()
    if resume:
        _check_resume_target(out / STATE_NAME, cfg.steps)
    device = distributed.resolve_device(device)  # fail before loading anything
    distributed.init(device)  # under torchrun; from here on only rank 0 logs
    return cfg, out, device
