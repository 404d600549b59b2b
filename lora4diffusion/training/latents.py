"""The latents a latent UNet trains on: the VAE's scaled posterior means of the training digits, encoded once
and cached on disk, and the UNet config fitted to the VAE's latent shape."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import torch

from lora4diffusion.checkpoint import load_tensors, save_tensors
from lora4diffusion.data import cache_root
from lora4diffusion.folders.vae import load_vae, vae_fingerprint
from lora4diffusion.latents import check_encodable, to_vae_input
from lora4diffusion.models.unet import UNetConfig
from lora4diffusion.models.vae import VAE, encode_dataset

log = logging.getLogger("lora4diffusion")


def latent_unet(vae: str | Path | None, unet_cfg: UNetConfig) -> tuple[VAE, UNetConfig]:
    """Load the VAE a latent base trains on and fit the UNet to it: in_channels = latent channels,
    image_size = latent size (Rombach et al. 2022: the UNet denoises the autoencoder's latents)."""
    autoencoder, _ = load_vae(vae)
    check_encodable(autoencoder.cfg)
    lat = autoencoder.cfg
    return autoencoder, replace(unet_cfg, in_channels=lat.latent_channels, image_size=lat.latent_size)


def latent_cache_dir() -> Path:
    """``$LORA4DIFFUSION_CACHE/latents`` (default ``~/.cache/lora4diffusion/latents``); data.cache_root
    refuses a variable naming a file."""
    return cache_root() / "latents"


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
