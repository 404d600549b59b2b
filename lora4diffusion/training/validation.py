"""Validation while training (``--validate-every N``): a held-out loss that can be compared between steps,
runs and checkpoints, because nothing in it is random.

The training loss is a noisy curve: every step draws other digits, timesteps and noise. The validation loss
is the same computation every time: ``VALIDATION_PER_DIGIT`` held-out digits of each class (never trained
on), each noised with one fixed eps (drawn once from ``VALIDATION_SEED``) at each of five fixed timesteps,
t = 0.1, 0.3, 0.5, 0.7, 0.9 x T (100, 300, 500, 700, 900 of 1,000: the midpoints of five equal slices of the
schedule, as stable-audio-tools' validation; the loss differs by orders of magnitude over t, so a fixed set,
not a random draw, is what makes two values comparable). Two numbers come out:

    val_loss     the run's own objective (eps or v target, loss function, min-SNR weights) averaged over the
                 five timesteps: what training minimises, on digits it never saw
    val_eps_mse  ||eps_hat - eps||^2 (DDPM's L_simple) with eps_hat the noise the model's output implies (a v
                 model's: sqrt(abar) v + sqrt(1 - abar) x_t): one yardstick for every prediction type, loss
                 and weighting, for comparing objectives (x0's error would be eps's x (1 - abar) / abar, which
                 the noisiest timestep dominates)

plus ``val_loss_tT`` per timestep. A VAE (``VAEValidation``) is validated on the same held-out digits, plain
and in each built-in style, decoded from a fixed draw of its posterior: ``val_loss`` (its training loss, L1 +
the weighted KL) and ``val_l1`` (the reconstruction's mean |error| on [-1, 1] pixels).
The weights validated are the ones exported (the EMA when there is one).
They go to ``validation.csv`` in the run folder and to TensorBoard; on ``--resume`` rows past the resumed step
are dropped and recomputed, so a resumed run's file is the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.captions import captions_for
from lora4diffusion.checkpoint import write_text_atomic
from lora4diffusion.data import Digits, load_mnist, to_model_range
from lora4diffusion.diffusion import NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.latents import to_vae_input
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.models.vae import VAEConfig, kl_divergence
from lora4diffusion.objectives import row_losses, x0_and_eps
from lora4diffusion.styles import STYLES, apply_style, style_splits
from lora4diffusion.training.latents import cached_latents

VALIDATION_PER_DIGIT = 10  # 100 digits x 5 timesteps: ~2 s of forwards for the `fast` pixel base on 2 cores
VALIDATION_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
VALIDATION_SEED = 0
VALIDATION_FILE = "validation.csv"


def heldout_rows(labels: torch.Tensor, per_digit: int = VALIDATION_PER_DIGIT) -> torch.Tensor:
    """Indices of the first ``per_digit`` examples of each digit, in digit order (a fixed, balanced set)."""
    rows = [torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)]
    return torch.cat(rows)


def heldout_inputs(digits: Digits, image_size: int, vae=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, labels) of the validation digits of ``digits`` (a held-out split) as the model sees them: pixels
    in [-1, 1] at ``image_size``, or the VAE's scaled latents."""
    rows = heldout_rows(digits.labels)
    images = digits.images[rows]
    x0 = cached_latents(vae, images) if vae is not None else to_model_range(images, image_size)
    return x0, digits.labels[rows]


def heldout_style(style: str, data: str) -> Digits:
    """The held-out digits of a built-in style (MNIST's held-out split, restyled); a folder or table of
    images has no held-out part, so it is refused rather than validated on its training images."""
    if style not in STYLES:
        raise UserError(f"--validate-every needs held-out digits: style {style!r} is a folder or table of"
                        f" images (only the built-in styles {', '.join(STYLES)} have a held-out split)")
    return style_splits(load_mnist(data), style).heldout


def caption_ids(tokenizer: Tokenizer, labels: torch.Tensor, trigger: str | None = None) -> torch.Tensor:
    """One fixed caption per validation digit (drawn once from VALIDATION_SEED, with the trigger if any)."""
    texts = captions_for(labels, torch.Generator().manual_seed(VALIDATION_SEED), trigger=trigger)
    return tokenizer.encode(texts)


class DiffusionValidation:
    """The held-out loss of a diffusion model (module docstring). ``x0``: the clean held-out inputs (pixels
    or latents) [N, C, H, W]; ``cond``: what the model is conditioned on (labels [N], or token ids [N, L]
    for a model that reads prompts)."""

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor, cond: torch.Tensor, batch_size: int = 128):
        if x0.shape[0] == 0 or x0.shape[0] != cond.shape[0]:
            raise UserError(f"validation needs held-out inputs and conditions of one length, got"
                            f" {x0.shape[0]} and {cond.shape[0]}")
        self.schedule, self.x0, self.cond, self.batch_size = schedule, x0.float(), cond, batch_size
        self.noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(VALIDATION_SEED))
        self.timesteps = [min(schedule.T - 1, int(f * schedule.T)) for f in VALIDATION_FRACTIONS]
        self.columns = ["val_loss", "val_eps_mse", *(f"val_loss_t{t}" for t in self.timesteps)]

    @torch.no_grad()
    def __call__(self, model: nn.Module, device: torch.device, bf16: bool) -> dict[str, float]:
        schedule, out = self.schedule, {}
        losses, eps_errors = [], []
        for t in self.timesteps:
            loss_sum = err_sum = 0.0
            for i in range(0, self.x0.shape[0], self.batch_size):
                part = slice(i, i + self.batch_size)
                x0, noise, cond = self.x0[part].to(device), self.noise[part].to(device), self.cond[part]
                tt = torch.full((x0.shape[0],), t, dtype=torch.int64, device=device)
                x_t, abar = schedule.q_sample(x0, tt, noise), schedule.alphas_cumprod.to(device)[tt]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    output = model(x_t, tt, cond.to(device)).float()
                rows = row_losses(output, x0, noise, tt, abar, **schedule.cfg.loss_options())
                _, eps_hat = x0_and_eps(schedule.cfg.prediction_type, output, x_t, abar)
                loss_sum += float(rows.double().sum())
                err_sum += float(((eps_hat - noise) ** 2).flatten(1).mean(1).double().sum())
            n = self.x0.shape[0]
            losses.append(loss_sum / n)
            eps_errors.append(err_sum / n)
            out[f"val_loss_t{t}"] = loss_sum / n
        k = len(self.timesteps)
        return {"val_loss": sum(losses) / k, "val_eps_mse": sum(eps_errors) / k, **out}


class VAEValidation:
    """A VAE's held-out loss (module docstring): ``digits`` (a held-out split) -> VALIDATION_PER_DIGIT per
    class, plain and in each built-in style, with one fixed posterior draw each."""

    def __init__(self, digits: Digits, cfg: VAEConfig, kl_weight: float, batch_size: int = 128):
        plain = digits.images[heldout_rows(digits.labels)]
        self.x = to_vae_input(torch.cat([plain] + [apply_style(plain, s) for s in STYLES]), cfg)
        self.noise = torch.randn((self.x.shape[0], *cfg.latent_shape),
                                 generator=torch.Generator().manual_seed(VALIDATION_SEED))
        self.kl_weight, self.batch_size = kl_weight, batch_size
        self.columns = ["val_loss", "val_l1"]

    @torch.no_grad()
    def __call__(self, model: nn.Module, device: torch.device, bf16: bool) -> dict[str, float]:
        l1 = kl = 0.0
        for i in range(0, self.x.shape[0], self.batch_size):
            part = slice(i, i + self.batch_size)
            x, noise = self.x[part].to(device), self.noise[part].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                recon, mean, logvar = model(x, noise)
            l1 += float((recon.float() - x).abs().flatten(1).mean(1).double().sum())
            pixels = x.shape[-2] * x.shape[-1]  # the KL per pixel, as VAETask weighs it
            kl += float(kl_divergence(mean.float(), logvar.float()).double().sum()) / pixels
        n = self.x.shape[0]
        return {"val_loss": (l1 + self.kl_weight * kl) / n, "val_l1": l1 / n}


def cell(value: float) -> str:
    """A value as validation.csv holds it, 8 significant digits (and as --keep-best compares it)."""
    return f"{value:.8g}"


def write_validation_row(run_dir: Path, step: int, values: dict[str, float | None]) -> None:
    """Append one row (step, then the values in their order; None: an empty cell, e.g. the scores of a
    validation that did not score) to validation.csv, with a header when new. A file with other columns (a
    run resumed with other --score-every settings) is rewritten once under the union of both headers."""
    path = run_dir / VALIDATION_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    old = lines[0].split(",") if lines else []
    header = ["step", *values]
    header += [c for c in old if c not in header]
    if header == old or set(header) == set(old):
        header = old
    else:
        rows = [dict(zip(old, line.split(","), strict=False)) for line in lines[1:]]
        text = "".join(",".join(r.get(c, "") for c in header) + "\n" for r in rows)
        write_text_atomic(path, ",".join(header) + "\n" + text)
    cells = {"step": str(step), **{k: "" if v is None else cell(v) for k, v in values.items()}}
    with path.open("a") as f:
        f.write(",".join(cells.get(c, "") for c in header) + "\n")


def read_validation(run_dir: Path, upto: int | None = None) -> list[tuple[int, dict[str, float | None]]]:
    """validation.csv's well-formed rows (up to step ``upto``): (step, column -> value or None if empty)."""
    path = run_dir / VALIDATION_FILE
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    header = lines[0].split(",") if lines else []
    out = []
    for line in lines[1:]:
        cells = line.split(",")
        if not _well_formed(cells, len(header)) or (upto is not None and int(cells[0]) > upto):
            continue
        out.append((int(cells[0]), {c: float(v) if v else None for c, v in zip(header[1:], cells[1:],
                                                                                strict=True)}))
    return out


def trim_validation(run_dir: Path, step: int) -> None:
    """Keep validation.csv's well-formed rows up to ``step`` (where a resumed run goes on): later rows are
    computed again, and a killed run may have left half a row."""
    path = run_dir / VALIDATION_FILE
    if not path.exists():
        return
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    width = len(lines[0].split(",")) if lines else 0
    keep = lines[:1]
    for line in lines[1:]:
        cells = line.split(",")
        if _well_formed(cells, width) and int(cells[0]) <= step:
            keep.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in keep))


def _well_formed(cells: list[str], width: int) -> bool:
    """A whole row: a step, then finite numbers or empty cells (not measured at that validation)."""
    if len(cells) != width or not cells[0].isdigit():
        return False
    try:
        return all(math.isfinite(float(c)) for c in cells[1:] if c)
    except ValueError:
        return False


__all__ = [
    "VALIDATION_FILE", "VALIDATION_FRACTIONS", "VALIDATION_PER_DIGIT", "DiffusionValidation", "VAEValidation",
    "cell",
    "caption_ids", "heldout_inputs", "heldout_rows", "heldout_style", "read_validation", "trim_validation",
    "write_validation_row",
]
