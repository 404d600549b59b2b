"""A label-conditioned base UNet: its presets and the ``train`` command's Python API (``train_base``).

Pixel diffusion (DDPM, Ho et al. 2020) on 28x28 digits, or latent diffusion (Rombach et al. 2022) on a VAE's
cached latents with ``vae=``; the loop and its loss are training/loop.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.data import MNISTSplits, load_mnist, to_model_range
from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DDIMSampler, DiffusionConfig, NoiseSchedule, sample
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import save_model
from lora4diffusion.folders.vae import vae_fingerprint
from lora4diffusion.latents import decode_latents
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.plots import save_grid
from lora4diffusion.training.latents import cached_latents, latent_unet
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import TrainConfig, data_fingerprint, prepare_run
from lora4diffusion.training.scores import base_scores, label_drawer
from lora4diffusion.training.validation import DiffusionValidation, heldout_inputs


# ----- the base model: presets and the `train` command's Python API -----
def presets() -> dict[str, tuple[UNetConfig, TrainConfig]]:
    # `fast`/`base` share the architecture chosen by measurement (benchmarks/RESULTS.md): ~0.41 GFLOP/forward
    # at 28x28, Transformer blocks (self- + cross-attention) at 7x7 and in the middle.
    model = UNetConfig(
        image_size=28, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_levels=(2,)
    )
    return {
        "tiny": (
            UNetConfig(
                image_size=28,
                base_channels=16,
                channel_mults=(1, 2),
                num_res_blocks=1,
                attn_levels=(1,),
                context_dim=32,
            ),
            TrainConfig(
                steps=30,
                batch_size=32,
                lr=2e-3,
                warmup=5,
                ema_decay=0.9,
                log_every=5,
                checkpoint_every=10,
                sample_every=30,
            ),
        ),
        "fast": (
            model,
            TrainConfig(
                steps=1000,
                batch_size=128,
                lr=1e-3,
                warmup=100,
                ema_decay=0.995,
                checkpoint_every=100,
                sample_every=250,
            ),
        ),
        "base": (
            model,
            TrainConfig(
                steps=20000,
                batch_size=128,
                lr=5e-4,
                warmup=200,
                ema_decay=0.9995,
                checkpoint_every=200,
                sample_every=1000,
            ),
        ),
    }


PRESET_NAMES = ("tiny", "fast", "base")


def preview_grid(model: nn.Module, schedule: NoiseSchedule, path: Path, steps: int = 20, vae=None) -> None:
    """One DDIM sample per digit (fixed seed, default guidance), for watching training progress.

    ``vae``: the model denoises that VAE's latents: no [-1, 1] clipping, decoded to pixels for the picture.
    """
    s = DDIMSampler(schedule, clip_sample=vae is None)
    s.set_timesteps(steps)
    size = model.cfg.image_size
    labels = torch.arange(10, device=next(model.parameters()).device)  # sample() runs on the labels' device
    shape = (model.cfg.in_channels, size, size)
    with torch.no_grad():
        x, _ = sample(
            model, s, labels, shape, DEFAULT_GUIDANCE, torch.Generator().manual_seed(0), clip=vae is None
        )
    if vae is not None:
        save_grid(decode_latents(vae, x), 10, path)
    else:
        save_grid(((x[:, 0].cpu() + 1) / 2).clamp(0, 1), 10, path)


def train_base(
    preset: str,
    out: Path,
    data: str = "embedded",
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    image_size: int | None = None,
    diffusion_overrides: dict | None = None,
    device: str | torch.device = "auto",
    compile: bool = False,
    vae: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
    **overrides,
) -> dict:
    """Train a base UNet from a preset into run directory ``out``; returns a summary dict.

    ``device``: auto (CUDA if available) | cpu | cuda. Under torchrun every process calls this (see Trainer).
    ``vae``: a VAE folder: latent diffusion (Rombach et al. 2022): the UNet (in_channels = latent channels,
    image_size = latent size) denoises the VAE's scaled latents of the training digits, encoded once and
    cached; the run folder carries a copy of the VAE (``vae/``), named by its fingerprint in config.json.
    ``should_stop``, ``overwrite``, ``allow_changes``: see Trainer and prepare_run.
    """
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESET_NAMES)})")
    unet_cfg, cfg = presets()[preset]
    if image_size is not None:
        if vae is not None:
            raise UserError("--image-size does not apply with --vae: the latent size is the VAE's")
        unet_cfg = replace(unet_cfg, image_size=image_size)  # validated by UNetConfig.__post_init__
    autoencoder = None
    if vae is not None:
        autoencoder, unet_cfg = latent_unet(vae, unet_cfg)
    cfg, out, device = prepare_run(
        cfg, out, resume, device, overwrite=overwrite, allow_changes=allow_changes, steps=steps, **overrides
    )
    diffusion = DiffusionConfig(**(diffusion_overrides or {}))  # DDPM's linear schedule and MSE by default
    splits = load_mnist(data)
    if autoencoder is not None:
        images = cached_latents(autoencoder, splits.train.images)
    else:
        images = to_model_range(splits.train.images, unet_cfg.image_size)
    torch.manual_seed(cfg.seed)  # initial weights
    model = UNet(unet_cfg)
    schedule = NoiseSchedule(diffusion)
    run_info = base_run_info(unet_cfg, diffusion, preset, splits)
    if autoencoder is not None:
        run_info["vae"] = vae_fingerprint(autoencoder)  # --resume refuses another VAE
    preview_steps = 5 if preset == "tiny" else 20
    validation = None
    if cfg.validate_every:
        validation = DiffusionValidation(schedule, *heldout_inputs(splits.heldout, unet_cfg.image_size,
                                                                   autoencoder))
    scores = base_scores(label_drawer(schedule, autoencoder), cfg.validation_images, prompts=False) \
        if cfg.score_every else None
    return fit_base(
        model, schedule, images, splits, cfg, out, preset,
        save=lambda m, directory, extra: save_model(directory, m, diffusion, extra, vae=autoencoder),
        preview=lambda m, p: preview_grid(m, schedule, p, steps=preview_steps, vae=autoencoder),
        run_info=run_info, device=device, compile=compile, should_stop=should_stop, resume=resume,
        allow_changes=allow_changes, progress=progress, validation=validation, scores=scores,
    )


def base_run_info(unet_cfg: UNetConfig, diffusion: DiffusionConfig, preset: str, splits: MNISTSplits) -> dict:
    """What a base run records for --resume to compare: architecture, schedule, preset, data."""
    return {
        "unet": unet_cfg.to_dict(),
        "diffusion": diffusion.to_dict(),
        "preset": preset,
        "data": splits.source,
        "data_fingerprint": data_fingerprint(splits.train.images, splits.train.labels),
    }


def fit_base(
    model: nn.Module,
    task,
    images: torch.Tensor,
    splits: MNISTSplits,
    cfg: TrainConfig,
    out: Path,
    preset: str,
    save: Callable[[nn.Module, Path, dict], None],
    preview: Callable[[nn.Module, Path], None],
    run_info: dict,
    device: torch.device,
    compile: bool,
    should_stop: Callable[[], bool] | None,
    resume: bool,
    allow_changes: bool,
    progress: bool,
    validation=None,
    scores=None,
) -> dict:
    """What every base shares once its model, task and data are built: the Trainer over the training split,
    an export that saves the model folder with the run's record (settings, preset, data, step, seconds),
    resume, fit. ``save(model, directory, extra)`` writes the folder; ``validation``, ``scores``: see
    Trainer."""

    def export(m: nn.Module, directory: Path) -> None:
        extra = {
            "train": asdict(cfg),
            "preset": preset,
            "data": splits.source,
            "step": trainer.step,
            "train_seconds": round(trainer.train_seconds, 1),
        }
        save(m, directory, extra)

    trainer = Trainer(model, task, images, splits.train.labels, cfg, out, export, preview=preview,
                      run_info=run_info, device=device, compile=compile, should_stop=should_stop,
                      validation=validation, scores=scores)
    if resume:
        trainer.resume(allow_changes)
    summary = trainer.fit(progress=progress)
    summary["out"] = str(out)
    return summary
