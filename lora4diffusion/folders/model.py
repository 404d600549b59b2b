"""A model folder: config.json + model.safetensors (+ vae/ for a latent model, + a prompt model's text parts).

    config.json          {"format", "version", "unet": UNetConfig, "diffusion": DiffusionConfig, ...extra}
    model.safetensors    the (EMA) UNet weights used for sampling
    vae/                 the VAE a latent model denoises the latents of (folders/vae.py)
    text_encoder.safetensors, tokenizer/   a prompt model's text parts (folders/text.py)
    embeddings/NAME.safetensors            tokens the text encoder knows besides its words (folders/text.py)

The config is validated by the config dataclasses; the weights' names, shapes and dtypes are checked against
the network built on the meta device before any memory is allocated (checkpoint.load_weights).
"""

from __future__ import annotations

from pathlib import Path

from lora4diffusion.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_weights,
    path_kind,
    read_json,
    save_tensors,
    write_json,
)
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.folders.text import save_text_parts
from lora4diffusion.folders.vae import attach_vae
from lora4diffusion.lora.adapters import UNKNOWN
from lora4diffusion.lora.prompt_lora import prompt_fingerprint
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.schema import shown

FORMAT = "lora4diffusion-model"
VERSION = 1


def save_model(
    directory: Path, model: UNet, diffusion: DiffusionConfig, extra: dict | None = None, vae=None,
    text: tuple | None = None,
) -> None:
    """``vae``: the VAE of a latent model, written into ``directory``/vae and named in config.json.
    ``text``: (text encoder, tokenizer) of a prompt model (folders/text.py: text_encoder.safetensors and
    tokenizer/ beside model.safetensors)."""
    directory = Path(directory)
    config = {"format": FORMAT, "version": VERSION, "unet": model.cfg.to_dict(),
              "diffusion": diffusion.to_dict()}
    config.update(extra or {})
    if (model.cfg.conditioning == "text") != (text is not None):
        raise UserError("a prompt model is saved with its text encoder and tokenizer, a label model without")
    if text is not None:  # added tokens (a merged pivotal adapter's) record this model's fingerprint
        fingerprint = prompt_fingerprint(model, text[0]) if len(text[0].added_tokens) else UNKNOWN
        config.update(save_text_parts(directory, *text, fingerprint=fingerprint))
    if vae is not None:
        config["vae"] = attach_vae(directory, vae)
    save_tensors(directory / WEIGHTS_NAME, {k: v.float() for k, v in model.state_dict().items()})
    write_json(directory / CONFIG_NAME, config)


def read_model_config(directory: Path) -> tuple[UNetConfig, DiffusionConfig, dict]:
    directory = Path(directory)
    kind = path_kind(directory)
    if kind == "missing":
        raise UserError(f"checkpoint {directory} does not exist")
    if kind != "dir":
        raise UserError(
            f"checkpoint {directory} is not a directory (expected a run directory with {CONFIG_NAME})"
        )
    where = directory / CONFIG_NAME
    config = read_json(where)
    if config.get("format") != FORMAT:
        raise UserError(f"{where}: not a lora4diffusion model config")
    if type(config.get("version")) is not int or config["version"] != VERSION:  # True == 1 in Python
        raise UserError(f"{where}: unsupported format version {shown(config.get('version'))}")
    for key in ("unet", "diffusion"):
        if not isinstance(config.get(key), dict):
            raise UserError(f"{where}: malformed config ({key!r} must be a JSON object)")
    try:  # the dataclasses check every field's type and range (UNetConfig / DiffusionConfig.validate)
        unet_cfg = UNetConfig.from_dict(config["unet"])
        diff_cfg = DiffusionConfig.from_dict(config["diffusion"])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return unet_cfg, diff_cfg, config


def load_model(directory: Path) -> tuple[UNet, DiffusionConfig, dict]:
    """Load a model directory written by ``save_model`` (or a training run directory).

    The config is validated, then the weights file's names, shapes and dtypes are checked against the
    network built on the meta device before any memory is allocated, then every tensor must be finite.
    """
    directory = Path(directory)
    unet_cfg, diff_cfg, config = read_model_config(directory)
    model = load_weights(lambda: UNet(unet_cfg), directory / WEIGHTS_NAME)
    return model.eval(), diff_cfg, config
