"""Using the VAE (models/vae.py): its folder on disk, training it, reconstructing digits, caching latents.

A VAE folder holds
    config.json          {"format": "lora4diffusion-vae", "version", "vae": VAEConfig (with the measured
                         scaling_factor), "train", "step", ...}
    model.safetensors    the (EMA) weights
    train_state.safetensors, metrics.csv, loss.png, samples/   when it is a training run (``train-vae``)

Training (``train_vae``) runs the project's one loop (train.Trainer) with ``VAETask``'s loss:

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

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_state_into,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from lora4diffusion.data import from_model_range, load_mnist, to_model_range
from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import UNetConfig
from lora4diffusion.models.vae import VAE, VAEConfig, crop_to, encode_dataset, kl_divergence, pad_to
from lora4diffusion.styles import STYLES, apply_style
from lora4diffusion.train import TrainConfig, Trainer, prepare_run

log = logging.getLogger("lora4diffusion")

FORMAT = "lora4diffusion-vae"
VERSION = 1
LOSS = "l1"
DEFAULT_KL_WEIGHT = 1e-6  # LDM's kl_weight (configs/autoencoder/*kl*.yaml), with its loss normalisation
SCALE_DIGITS = 1000  # train digits whose latent means measure scaling_factor (256k numbers: std to ~0.2 %)
PRESET_NAMES = ("tiny", "base")


# ----------------------------------------------------------------------------------------------- files


def default_vae_dir() -> Path:
    """Where a shipped VAE would live (lora4diffusion/pretrained/vae)."""
    return Path(__file__).parent / "pretrained" / "vae"


def save_vae(
    directory: str | Path, vae: VAE, extra: dict | None = None, scaling_factor: float | None = None
) -> None:
    """Write ``vae`` as a VAE folder; ``scaling_factor`` (measured) replaces the one in its config."""
    directory = Path(directory)
    cfg = vae.cfg if scaling_factor is None else replace(vae.cfg, scaling_factor=scaling_factor)
    config = {"format": FORMAT, "version": VERSION, "vae": cfg.to_dict(), **(extra or {})}
    save_tensors(directory / WEIGHTS_NAME, {k: v.float() for k, v in vae.state_dict().items()})
    write_json(directory / CONFIG_NAME, config)


def load_vae(path: str | Path | None = None) -> tuple[VAE, dict]:
    """A VAE folder (None: the shipped one) -> (VAE in eval mode, its config.json); UserError naming it."""
    from lora4diffusion.catalog import resolve

    directory = resolve(path, "vae") if path is not None else default_vae_dir()
    if path is None and not (directory / CONFIG_NAME).is_file():
        raise UserError("no shipped VAE in this install; pass --vae DIR (train one with `train-vae`)")
    if not directory.exists():
        raise UserError(f"VAE {directory} does not exist")
    if not directory.is_dir():
        raise UserError(f"VAE {directory} is not a directory (expected a VAE folder with {CONFIG_NAME})")
    config = read_json(directory / CONFIG_NAME)
    if config.get("format") != FORMAT:
        what = f"format {config['format']!r}" if "format" in config else "no format field"
        raise UserError(f"{directory} is not a VAE folder ({CONFIG_NAME} has {what}, expected {FORMAT!r})")
    if config.get("version") != VERSION:
        raise UserError(f"{directory / CONFIG_NAME}: unsupported VAE format version {config.get('version')}")
    try:
        cfg = VAEConfig.from_dict(config.get("vae"))
    except (UserError, TypeError) as e:
        raise UserError(f"{directory / CONFIG_NAME}: {e}") from None
    vae = VAE(cfg)
    load_state_into(vae, load_tensors(directory / WEIGHTS_NAME), directory / WEIGHTS_NAME)
    return vae.eval(), config


# ----------------------------------------------------------------------------------------------- data


def to_vae_input(images_uint8: torch.Tensor, cfg: VAEConfig) -> torch.Tensor:
    """uint8 digits [N, h, w] -> float32 [N, 1, S, S] in [-1, 1], padded with background to the VAE's S."""
    h, w = images_uint8.shape[-2:]
    check_encodable(cfg, h, w)
    return pad_to(to_model_range(images_uint8, h), cfg.image_size)


def check_encodable(cfg: VAEConfig, h: int = 28, w: int = 28) -> None:
    """UserError unless this VAE can encode 1-channel h x w digits (padded to its image_size)."""
    if cfg.in_channels != 1:
        raise UserError(f"this VAE takes {cfg.in_channels}-channel images; digits have 1 channel")
    if h != w:
        raise UserError(f"images of {h}x{w} are not square")
    if h > cfg.image_size:
        raise UserError(
            f"this VAE encodes images of at most {cfg.image_size}x{cfg.image_size}; these are {h}x{w}"
        )


def latent_unet(vae: str | Path | None, unet_cfg: UNetConfig) -> tuple[VAE, UNetConfig]:
    """Load the VAE a latent base trains on and fit the UNet to it: in_channels = latent channels,
    image_size = latent size (Rombach et al. 2022: the UNet denoises the autoencoder's latents)."""
    autoencoder, _ = load_vae(vae)
    check_encodable(autoencoder.cfg)
    lat = autoencoder.cfg
    return autoencoder, replace(unet_cfg, in_channels=lat.latent_channels, image_size=lat.latent_size)


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


def _presets() -> dict[str, tuple[VAEConfig, TrainConfig]]:
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


def save_comparison(originals: torch.Tensor, recons: torch.Tensor, per_row: int, path: Path) -> None:
    """Rows of ``per_row`` originals, each above its row of reconstructions ([N, H, W] in [0, 1])."""
    from lora4diffusion.plots import save_grid

    chunks = []
    for i in range(0, len(originals), per_row):
        o, r = originals[i : i + per_row], recons[i : i + per_row]
        pad = per_row - len(o)
        if pad:
            o, r = (torch.cat([t, torch.zeros(pad, *t.shape[1:])]) for t in (o, r))
        chunks += [o, r]
    save_grid(torch.cat(chunks), per_row, path)


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
    ``should_stop``, ``overwrite``, ``allow_changes``: as for ``train.train_base``.
    """
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESET_NAMES)})")
    preset_vae, preset_train = _presets()[preset]
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

    trainer = Trainer(model, task, splits.train.images, splits.train.labels, cfg, out, export,
                      preview=show, run_info=run_info, device=device, compile=compile,
                      should_stop=should_stop)
    if resume:
        trainer.resume(allow_changes)
    summary = trainer.fit(progress=progress)
    summary["out"] = str(out)
    if (Path(out) / CONFIG_NAME).is_file():
        summary["scaling_factor"] = read_json(Path(out) / CONFIG_NAME)["vae"]["scaling_factor"]
    return summary


# ----------------------------------------------------------------------------------------------- latents


def measure_scaling(vae: VAE, images: torch.Tensor) -> float:
    """``scaling_factor`` for ``vae``: 1 / std of the posterior means of ``images`` ([N, 1, S, S])."""
    from lora4diffusion.models.vae import measure_scaling_factor

    return measure_scaling_factor(encode_dataset(vae, images))


@torch.no_grad()
def reconstruct(vae: VAE, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 digits [N, h, w] -> decode(mode(encode(x))), cropped back to h x w, float32 in [0, 1] (CPU)."""
    h, w = images_uint8.shape[-2:]
    x = to_vae_input(images_uint8, vae.cfg)
    was_training, device = vae.training, next(vae.parameters()).device
    vae.eval()
    out = []
    for i in range(0, len(x), batch_size):
        z = vae.encode(x[i : i + batch_size].to(device)).mode()
        out.append(from_model_range(crop_to(vae.decode(z), h, w))[:, 0].cpu())
    vae.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, h, w)


def vae_fingerprint(vae: VAE) -> str:
    """sha256 of the config and every weight: names the exact VAE a latent model was trained with."""
    h = hashlib.sha256(json.dumps(vae.cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def decode_latents(vae: VAE, z: torch.Tensor, h: int = 28, w: int = 28, bf16: bool = False) -> torch.Tensor:
    """Scaled latents (what the latent UNet samples) -> images float32 [N, h, w] in [0, 1] on the CPU.

    ``bf16``: decode under bf16 autocast, as bf16 sampling runs the UNet (2.5x faster for 500 latents on the
    2-core CPU; pixels differ by <= 0.013, mean 0.001: benchmarks/RESULTS.md)."""
    device = next(vae.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        x = vae.decode(z.to(device).float() / vae.cfg.scaling_factor)
    return from_model_range(crop_to(x.float(), h, w))[:, 0].cpu()


# A latent model folder carries its VAE in this subfolder, and its config.json names it with a fingerprint.
ATTACHED = "vae"


def attach_vae(directory: str | Path, vae: VAE) -> dict:
    """Write ``vae`` into ``directory``/vae; returns the entry for the model's config.json."""
    save_vae(Path(directory) / ATTACHED, vae, {"role": "the VAE this latent model was trained with"})
    return {"folder": ATTACHED, "fingerprint": vae_fingerprint(vae)}


def load_attached_vae(directory: str | Path, config: dict) -> VAE | None:
    """The VAE of a latent model folder (None for a pixel model); UserError if missing or not the one."""
    entry = config.get("vae")
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("folder"), str) or "fingerprint" not in entry:
        raise UserError(f"{Path(directory) / CONFIG_NAME}: malformed 'vae' entry")
    path = Path(directory) / entry["folder"]
    if not path.exists():
        raise UserError(f"latent model {directory}: its VAE folder {path} is missing")
    vae, _ = load_vae(path)
    if vae_fingerprint(vae) != entry["fingerprint"]:
        raise UserError(f"latent model {directory}: the VAE in {path} is not the one it was trained with")
    return vae


def latent_cache_dir() -> Path:
    from lora4diffusion.data import default_cache_dir

    return default_cache_dir().parent / "latents"


def cached_latents(
    vae: VAE, images_uint8: torch.Tensor, cache_dir: str | Path | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Scaled latents (scaling_factor * posterior mean) of digits [N, h, w], computed once per (VAE weights,
    data set): kept in ``cache_dir`` (default ~/.cache/lora4diffusion/latents) as safetensors, keyed by a
    hash of both, so the latent UNet's every epoch (and every later run) reads them instead of encoding."""
    h = hashlib.sha256(vae_fingerprint(vae).encode())
    h.update(str(tuple(images_uint8.shape)).encode())
    h.update(images_uint8.contiguous().numpy().tobytes())
    path = Path(cache_dir or latent_cache_dir()) / f"latents-{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        return load_tensors(path)["latents"]
    latents = encode_dataset(vae, to_vae_input(images_uint8, vae.cfg), batch_size) * vae.cfg.scaling_factor
    save_tensors(path, {"latents": latents}, metadata={"n": str(len(latents))})
    log.info("cached %d latents in %s", len(latents), path)
    return latents


# ----------------------------------------------------------------------------------------------- held-out


def heldout_digits(
    style: str | None = None, per_digit: int | None = None, digits: list[int] | None = None,
    data: str = "embedded",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_digit`` held-out digits of each of ``digits`` (all if None), in a built-in
    ``style`` (None: plain) -> (uint8 [N, 28, 28], labels int64 [N]), grouped by digit."""
    if style is not None and style not in STYLES:
        raise UserError(f"unknown style {style!r} (choose from {', '.join(STYLES)})")
    held = load_mnist(data).heldout
    picks = [torch.nonzero(held.labels == d).flatten()[:per_digit] for d in (digits or range(10))]
    idx = torch.cat(picks)
    if len(idx) == 0:
        raise UserError(f"no held-out digits in {held.source}")
    images = held.images[idx]
    return (apply_style(images, style) if style else images), held.labels[idx]


def reconstruction_report(
    vae: VAE, data: str = "embedded", per_digit: int | None = None, classifier=None
) -> dict:
    """For plain held-out digits and each built-in style: the classifier's accuracy and FID on originals and
    reconstructions (evaluate.evaluate_samples), their mean ink and slant (styles.slant), and the ratios
    reconstruction / original, so the numbers of issue 10 can go into benchmarks/RESULTS.md."""
    from lora4diffusion.classifier import load_classifier
    from lora4diffusion.evaluate import evaluate_samples
    from lora4diffusion.styles import slant

    clf = classifier if classifier is not None else load_classifier()
    splits = load_mnist(data)
    report = {}
    for style in (None, *STYLES):
        images, labels = heldout_digits(style, per_digit, data=data)
        originals, recons = images.float() / 255, reconstruct(vae, images)
        o = evaluate_samples(originals, labels, clf, splits)
        r = evaluate_samples(recons, labels, clf, splits)
        so, sr = slant(originals), slant(recons)
        report[style or "plain"] = {
            "n": len(labels),
            "accuracy_originals": o["accuracy"],
            "accuracy_reconstructions": r["accuracy"],
            "fid_originals": o["fid_classifier"],
            "fid_reconstructions": r["fid_classifier"],
            "ink_originals": o["mean_ink"],
            "ink_reconstructions": r["mean_ink"],
            "ink_ratio": r["mean_ink"] / o["mean_ink"],
            "slant_originals": so,
            "slant_reconstructions": sr,
            "slant_ratio": sr / so if abs(so) > 1e-6 else None,
            "l1_error": float((recons - originals).abs().mean()),
        }
    return report


def format_reconstruction_report(report: dict) -> str:
    """``reconstruction_report``'s dict as an aligned table."""
    head = ("style", "n", "acc orig", "acc rec", "ink ratio", "slant orig/rec", "L1")
    lines = ["{:<8} {:>5} {:>9} {:>8} {:>9} {:>15} {:>7}".format(*head)]
    for style, r in report.items():
        acc_o, acc_r = 100 * r["accuracy_originals"], 100 * r["accuracy_reconstructions"]
        lines.append(
            f"{style:<8} {r['n']:>5} {acc_o:>8.1f}% {acc_r:>7.1f}% {r['ink_ratio']:>9.3f}"
            f" {r['slant_originals']:>7.2f}/{r['slant_reconstructions']:<7.2f} {r['l1_error']:>7.4f}"
        )
    return "\n".join(lines)
