"""A VAE folder, and the VAE a latent model folder carries.

    config.json          {"format": "lora4diffusion-vae", "version", "vae": VAEConfig (with the measured
                         scaling_factor), "train", "step", ...}
    model.safetensors    the (EMA) weights
    train_state.safetensors, metrics.csv, loss.png, samples/   when it is a training run (``train-vae``)

A latent model folder holds its VAE in ``vae/`` and names it in config.json with a fingerprint (sha256 of the
VAE's config and weights), so a model never silently decodes with another VAE than the one it learned on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from lora4diffusion.catalog import pretrained_dir, resolve
from lora4diffusion.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_state_into,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from lora4diffusion.errors import UserError
from lora4diffusion.models.vae import VAE, VAEConfig

FORMAT = "lora4diffusion-vae"
VERSION = 1


def default_vae_dir() -> Path:
    """Where a shipped VAE would live (lora4diffusion/pretrained/vae)."""
    return pretrained_dir("vae")


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


def vae_fingerprint(vae: VAE) -> str:
    """sha256 of the config and every weight: names the exact VAE a latent model was trained with."""
    h = hashlib.sha256(json.dumps(vae.cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
