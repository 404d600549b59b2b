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

from lora4diffusion.catalog import inside, pretrained_dir, resolve
from lora4diffusion.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_weights,
    path_kind,
    read_json,
    save_tensors,
    write_json,
)
from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import UNetConfig
from lora4diffusion.models.vae import VAE, VAEConfig
from lora4diffusion.schema import shown

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
    cfg, config = read_vae_config(directory)
    vae = load_weights(lambda: VAE(cfg), directory / WEIGHTS_NAME)  # the header is checked before allocating
    return vae.eval(), config


def read_vae_config(directory: Path) -> tuple[VAEConfig, dict]:
    """(the checked VAEConfig, the whole config.json) of a VAE folder, without reading its weights."""
    config = read_json(directory / CONFIG_NAME)
    if config.get("format") != FORMAT:
        what = f"format {shown(config['format'])}" if "format" in config else "no format field"
        raise UserError(f"{directory} is not a VAE folder ({CONFIG_NAME} has {what}, expected {FORMAT!r})")
    if config.get("version") != VERSION:
        raise UserError(f"{directory / CONFIG_NAME}: unsupported VAE format version"
                        f" {shown(config.get('version'))}")
    if not isinstance(config.get("vae"), dict):
        raise UserError(f"{directory / CONFIG_NAME}: 'vae' must be a JSON object of VAE settings, got"
                        f" {shown(config.get('vae'))}")
    try:
        cfg = VAEConfig.from_dict(config["vae"])
    except (UserError, TypeError) as e:
        raise UserError(f"{directory / CONFIG_NAME}: {e}") from None
    return cfg, config


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


def attached_vae_folder(directory: str | Path, config: dict) -> Path | None:
    """The folder of a latent model's VAE as its config.json names it (None for a pixel model): inside the
    model folder (``catalog.inside``), and there."""
    entry = config.get("vae")
    if entry is None:
        return None
    where = Path(directory) / CONFIG_NAME
    if not isinstance(entry, dict) or not isinstance(entry.get("folder"), str) or "fingerprint" not in entry:
        raise UserError(f"{where}: malformed 'vae' entry (expected an object with 'folder' and"
                        " 'fingerprint')")
    path = inside(directory, entry["folder"], f"{where}: vae.folder")
    if path_kind(path) != "dir":
        raise UserError(f"latent model {directory}: its VAE folder {path} is missing")
    return path


def check_attached_vae(directory: str | Path, config: dict) -> VAEConfig | None:
    """What loading a latent model's VAE checks, from the configs alone (no weights): the folder
    (``attached_vae_folder``), its config, and that its latents fit the UNet (``check_latents``)."""
    path = attached_vae_folder(directory, config)
    if path is None:
        return None
    cfg, _ = read_vae_config(path)
    check_latents(config.get("unet"), cfg, Path(directory) / CONFIG_NAME, path)
    return cfg


def load_attached_vae(directory: str | Path, config: dict) -> VAE | None:
    """The VAE of a latent model folder (None for a pixel model); UserError if missing, not the one, or its
    latents do not fit the UNet."""
    path = attached_vae_folder(directory, config)
    if path is None:
        return None
    vae, _ = load_vae(path)
    if vae_fingerprint(vae) != config["vae"]["fingerprint"]:
        raise UserError(f"latent model {directory}: the VAE in {path} is not the one it was trained with")
    check_latents(config.get("unet"), vae.cfg, Path(directory) / CONFIG_NAME, path)
    return vae


def check_latents(unet: object, vae: VAEConfig, where: Path, vae_path: Path) -> None:
    """A latent model's UNet works on its VAE's latents: ``in_channels`` x ``image_size``^2 must be the
    VAE's ``latent_channels`` x ``latent_size``^2, else sampling runs and decodes noise. Refused on load,
    naming both sizes."""
    try:
        cfg = UNetConfig.from_dict(unet) if isinstance(unet, dict) else None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if cfg is None:
        raise UserError(f"{where}: malformed config ('unet' must be a JSON object)")
    have = (cfg.in_channels, cfg.image_size)
    want = (vae.latent_channels, vae.latent_size)
    if have != want:
        raise UserError(
            f"{where}: the UNet works on {have[0]} x {have[1]} x {have[1]} inputs (unet.in_channels,"
            f" unet.image_size) but its VAE ({vae_path}) makes {want[0]} x {want[1]} x {want[1]} latents;"
            " a model whose sizes disagree samples noise"
        )
