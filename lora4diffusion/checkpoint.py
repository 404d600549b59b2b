"""Weights on disk: safetensors for tensors, JSON for configs. No pickle anywhere.

A model directory holds
    config.json          {"format", "version", "unet": UNetConfig, "diffusion": DiffusionConfig, ...extra}
    model.safetensors    the (EMA) weights used for sampling
Every write goes to a temporary file first and is renamed into place, so a crash never leaves a half file.
Every read failure is a UserError naming the file and the problem: never a silent fresh start.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import UNet, UNetConfig

FORMAT = "lora4diffusion-model"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; weights are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is a UserError naming it."""
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Strict load that names what does not fit instead of raising torch's long RuntimeError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{where}: weights do not match the config"
            f" (missing {missing[:3]}{'...' if len(missing) > 3 else ''},"
            f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UserError(
                f"{where}: weight {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}"
            )
    module.load_state_dict(state)


def save_model(
    directory: Path, model: UNet, diffusion: DiffusionConfig, extra: dict | None = None, vae=None,
    text: tuple | None = None,
) -> None:
    """``vae``: the VAE of a latent model, written into ``directory``/vae and named in config.json.
    ``text``: (text encoder, tokenizer) of a prompt model (prompt_model.py: text_encoder.safetensors and
    tokenizer/ beside model.safetensors)."""
    directory = Path(directory)
    config = {"format": FORMAT, "version": VERSION, "unet": model.cfg.to_dict(), "diffusion": vars(diffusion)}
    config.update(extra or {})
    if (model.cfg.conditioning == "text") != (text is not None):
        raise UserError("a prompt model is saved with its text encoder and tokenizer, a label model without")
    if text is not None:
        from lora4diffusion.prompt_model import save_text_parts

        config.update(save_text_parts(directory, *text))
    if vae is not None:
        from lora4diffusion.autoencoder import attach_vae

        config["vae"] = attach_vae(directory, vae)
    save_tensors(directory / WEIGHTS_NAME, {k: v.float() for k, v in model.state_dict().items()})
    write_json(directory / CONFIG_NAME, config)


def read_model_config(directory: Path) -> tuple[UNetConfig, DiffusionConfig, dict]:
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise UserError(
            f"checkpoint {directory} is not a directory (expected a run directory with {CONFIG_NAME})"
        )
    config = read_json(directory / CONFIG_NAME)
    if config.get("format") != FORMAT:
        raise UserError(f"{directory / CONFIG_NAME}: not a lora4diffusion model config")
    if config.get("version") != VERSION:
        raise UserError(f"{directory / CONFIG_NAME}: unsupported format version {config.get('version')}")
    try:
        unet_cfg = UNetConfig.from_dict(config["unet"])
        diff_cfg = DiffusionConfig(**config["diffusion"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{directory / CONFIG_NAME}: malformed config ({e})") from None
    return unet_cfg, diff_cfg, config


def load_model(directory: Path) -> tuple[UNet, DiffusionConfig, dict]:
    """Load a model directory written by ``save_model`` (or a training run directory)."""
    directory = Path(directory)
    unet_cfg, diff_cfg, config = read_model_config(directory)
    model = UNet(unet_cfg)
    load_state_into(model, load_tensors(directory / WEIGHTS_NAME), directory / WEIGHTS_NAME)
    return model.eval(), diff_cfg, config


def pretrained_dir() -> Path:
    """The base model shipped inside the package (lora4diffusion/pretrained/base)."""
    return Path(__file__).parent / "pretrained" / "base"
