"""Using the VAE (models/vae.py): its folder on disk, training it, reconstructing digits, caching latents.

A VAE folder holds
    config.json          {"format": "lora4diffusion-vae", "version", "vae": VAEConfig (with the measured
                         scaling_factor), "train", "step", ...}
    model.safetensors    the (EMA) weights
    train_state.safetensors, metrics.csv, loss.png, samples/   when it is a training run (``train-vae``)

Training (``train_vae``) runs the project's one loop (training/loop.py) with ``VAETask``'s loss:

    L = mean |x - D(z)| + kl_weight * KL(q(z|x) || N(0, I)) / (H * W),   z = mean + std * eps

L1, not MSE: LDM's autoencoder uses L1 (plus a perceptual and a GAN term we do not have at 28 px);
squared error forgives small errors spread everywhere, i.e. blur, while a digit is mostly sharp stroke
edges. The KL is summed over the latent per sample and divided by the number of pixels so that ``kl_weight``
has LDM's meaning (its loss sums the L1 over pixels): 1e-6, LDM's default, only keeps the latent from
drifting; its scale is then fixed by ``scaling_factor`` (1 / std of the training latents, stored in
config.json at every checkpoint).

Augmentation (``augment``): every training digit gets, from the step's generator, a stroke width (plain 1/2,
``bold`` 1/4, ``thin`` 1/4) and independently ``italic`` slant (3/10), with the very transforms of styles.py,
so that the styles LoRA teaches survive the encode/decode round trip. A third of the batch stays plain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.checkpoint import (
    CONFIG_NAME,
    read_json,
)
from lora4diffusion.data import load_mnist
from lora4diffusion.errors import UserError
from lora4diffusion.folders.vae import save_vae
from lora4diffusion.latents import check_encodable, measure_scaling, reconstruct, to_vae_input
from lora4diffusion.models.vae import VAE, VAEConfig, kl_divergence
from lora4diffusion.plots import save_comparison
from lora4diffusion.styles import STYLES, apply_style
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import TrainConfig, prepare_run
from lora4diffusion.training.scores import ReconstructionScores
from lora4diffusion.training.validation import VAEValidation

log = logging.getLogger("lora4diffusion")

LOSS = "l1"
DEFAULT_KL_WEIGHT = 1e-6  # LDM's kl_weight (configs/autoencoder/*kl*.yaml), with its loss normalisation
SCALE_DIGITS = 1000  # train digits whose latent means measure scaling_factor (256k numbers: std to ~0.2 %)
PRESET_NAMES = ("tiny", "base")


# ----------------------------------------------------------------------------------------------- files


# ----------------------------------------------------------------------------------------------- data


def augment(images_uint8: torch.Tensor, width: torch.Tensor, slant: torch.Tensor) -> torch.Tensor:
    """Restyle row i: ``width[i]`` 0 plain, 1 bold, 2 thin; ``slant[i]`` True: italic (after the width)."""
    out = images_uint8.clone()
    for code, style in ((1, "bold"), (2, "thin")):
        rows = width == code
        if rows.any():
            out[rows] = apply_style(out[rows], style)
    if slant.any():
        out[slant] = apply_style(out[slant], "italic")
    return out


def draw_augmentation(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per digit: width code (plain 1/2, bold 1/4, thin 1/4) and italic (3/10); see the module docstring."""
    u = torch.rand(n, generator=generator)
    width = (u >= 0.5).long() + (u >= 0.75).long()
    return width, torch.rand(n, generator=generator) < 0.3


# ----------------------------------------------------------------------------------------------- training


class VAETask:
    """The VAE's loss for the one training loop: L1 reconstruction + kl_weight * KL (module docstring).

    The step's generator (seed, step) draws the augmentation and eps for the whole global batch; each rank
    keeps its rows, as DiffusionTask does, so resume is bit-exact and K ranks see what one process sees.
    """

    def __init__(self, images_uint8: torch.Tensor, cfg: VAEConfig, kl_weight: float, augment: bool = True):
        if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
            raise UserError(f"kl weight must be a finite number >= 0, got {kl_weight!r}")
        self.images = images_uint8.cpu()  # styles.py's transforms run on the CPU
        self.cfg, self.kl_weight, self.augment = cfg, float(kl_weight), augment

    def loss(self, trainer: Trainer, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(trainer.cfg.seed * 1_000_003 + step)
        idx = trainer.batch_indices(step)
        n = idx.shape[0]
        width, slant = draw_augmentation(n, g)
        eps = torch.randn((n, *self.cfg.latent_shape), generator=g)
        rows = slice(trainer.rank * n // trainer.world, (trainer.rank + 1) * n // trainer.world)
        digits = self.images[idx[rows]]
        if self.augment:
            digits = augment(digits, width[rows], slant[rows])
        x = to_vae_input(digits, self.cfg).to(trainer.device)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.use_bf16):
            recon, mean, logvar = trainer.net()(x, eps[rows].to(trainer.device))
        rec = (recon.float() - x).abs().mean()
        kl = kl_divergence(mean.float(), logvar.float()).mean() / (x.shape[-2] * x.shape[-1])
        return rec + self.kl_weight * kl


def presets() -> dict[str, tuple[VAEConfig, TrainConfig]]:
    common = dict(label_dropout=0.0, weight_decay=0.0, grad_clip=1.0)
    return {
        "tiny": (  # seconds: a smoke test of the whole path
            VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4),
            TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup=5, ema_decay=0.9, log_every=5,
                        checkpoint_every=10, sample_every=20, **common),
        ),
        "base": (  # provisional, to be measured by the integrator (benchmarks/RESULTS.md)
            VAEConfig(),
            TrainConfig(steps=2000, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.999, log_every=10,
                        checkpoint_every=250, sample_every=500, **common),
        ),
    }


def _preview_digits(data_heldout) -> torch.Tensor:
    """The first held-out digit of each class, plain then bold, thin and italic: 40 digits."""
    first = torch.stack([data_heldout.images[data_heldout.labels == d][0] for d in range(10)])
    return torch.cat([first] + [apply_style(first, s) for s in STYLES])


def train_vae(
    out: str | Path,
    preset: str = "base",
    data: str = "embedded",
    resume: bool = False,
    progress: bool = True,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    augment: bool = True,
    vae_config: VAEConfig | None = None,
    device: str | torch.device = "auto",
    compile: bool = False,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
    **overrides,
) -> dict:
    """Train a VAE into run directory ``out`` (a VAE folder plus train state); returns a summary dict.

    ``overrides``: TrainConfig fields (steps, batch_size, lr, seed, bf16, ...; None keeps the preset's).
    ``should_stop``, ``overwrite``, ``allow_changes``: as for ``training.base.train_base``.
    """
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESET_NAMES)})")
    preset_vae, preset_train = presets()[preset]
    vae_cfg = vae_config or preset_vae
    check_encodable(vae_cfg)
    VAETask(torch.zeros(0, 28, 28, dtype=torch.uint8), vae_cfg, kl_weight)  # checks kl_weight before any IO
    cfg, out, device = prepare_run(
        preset_train, out, resume, device, overwrite=overwrite, allow_changes=allow_changes, **overrides
    )
    splits = load_mnist(data)
    task = VAETask(splits.train.images, vae_cfg, kl_weight, augment)
    scale_images = to_vae_input(splits.train.images[:SCALE_DIGITS], vae_cfg)
    preview = _preview_digits(splits.heldout)
    torch.manual_seed(cfg.seed)  # initial weights
    model = VAE(vae_cfg)
    recipe = {"loss": LOSS, "kl_weight": task.kl_weight, "augment": augment}
    # resume refuses a run whose "vae" differs: the architecture and the loss recipe
    run_info = {"vae": {**vae_cfg.to_dict(), **recipe}, "preset": preset, "data": splits.source}

    def export(m: nn.Module, directory: Path) -> None:
        save_vae(directory, m, scaling_factor=measure_scaling(m, scale_images), extra={
            "train": asdict(cfg), **recipe, "preset": preset, "data": splits.source, "step": trainer.step,
            "train_seconds": round(trainer.train_seconds, 1),
            "scaling_factor_from": f"posterior means of the first {len(scale_images)} train digits (plain)",
        })

    def show(m: nn.Module, path: Path) -> None:
        recons = reconstruct(m, preview)
        save_comparison(preview.float() / 255, recons, 10, path)

    validation = VAEValidation(splits.heldout, vae_cfg, task.kl_weight) if cfg.validate_every else None
    scores = ReconstructionScores(splits.heldout) if cfg.score_every else None
    trainer = Trainer(model, task, splits.train.images, splits.train.labels, cfg, out, export,
                      preview=show, run_info=run_info, device=device, compile=compile,
                      should_stop=should_stop, validation=validation, scores=scores)
    if resume:
        trainer.resume(allow_changes)
    summary = trainer.fit(progress=progress)
    summary["out"] = str(out)
    if (Path(out) / CONFIG_NAME).is_file():
        summary["scaling_factor"] = read_json(Path(out) / CONFIG_NAME)["vae"]["scaling_factor"]
    return summary


# ----------------------------------------------------------------------------------------------- latents


# ----------------------------------------------------------------------------------------------- held-out


