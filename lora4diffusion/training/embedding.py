"""Textual inversion (Gal et al. 2022): teach the frozen prompt model a NEW token, learning only its vectors.

A placeholder token S* ("<bold-ti>") gets ``num_vectors`` new rows in the text encoder's input space
(lora/embeddings.py: beside the base's rows, never in its files), started from ``init_word``'s row. The
styled digits are captioned with S* where a trigger word would go ("a handwritten <bold-ti> seven",
"the digit 7 in <bold-ti> style": the trigger task of training/lora.py, the same captions and draws), and
only the new vectors are trained, on the diffusion loss (Gal et al. 2022, eq. 2):

    v* = argmin_v  E_{z ~ E(x), y, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2

where c_theta(y) is the frozen text encoder reading caption y, whose S* positions hold v. Every other
parameter is frozen (requires_grad False: no gradient reaches the base rows, the text encoder or the UNet)
and ends bit-identical; the base file is never written. The same one training loop as LoRA (training/
loop.py): warm-up, clipping, EMA, resume. Writes ``out/embedding.safetensors`` (lora/embeddings.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.captions import check_placeholder
from lora4diffusion.catalog import PRETRAINED
from lora4diffusion.diffusion import NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.folders.text import load_text_parts
from lora4diffusion.folders.vae import load_attached_vae
from lora4diffusion.lora.embeddings import add_token, embedding_from_model, init_vectors
from lora4diffusion.lora.prompt_lora import prompt_fingerprint
from lora4diffusion.models.prompt_unet import TextConditionedUNet
from lora4diffusion.styles import load_style_data
from lora4diffusion.training.latents import cached_latents
from lora4diffusion.training.lora import (
    TriggerTask,
    default_trigger_train_config,
    fit_adapter,
    load_base,
    style_run_info,
)
from lora4diffusion.training.prompt_base import preview_prompts
from lora4diffusion.training.run import TrainConfig, prepare_run

log = logging.getLogger("lora4diffusion")
# One 64-wide vector learns fast: 500 steps of 64 at lr 5e-3 (Gal et al. used 5e-3 too, at batch 8).
EMBEDDING_LR = 5e-3
EMBEDDING_STEPS = 500


def default_embedding_train_config() -> TrainConfig:
    """The prompt-LoRA recipe (batch 64, no caption dropout, EMA 0.995), at textual inversion's rate."""
    return replace(default_trigger_train_config(), lr=EMBEDDING_LR, steps=EMBEDDING_STEPS)


def base_label(base: str | Path | None, path: Path) -> str:
    """What an embedding records as its base: no machine path for a shipped model."""
    if base is None:
        return "shipped base"
    return f"shipped {path.name}" if path.resolve().parent == PRETRAINED.resolve() else str(path)


def new_token(text_encoder: nn.Module, tokenizer, token: str, num_vectors: int,
              init_word: str | None) -> nn.Parameter:
    """Add ``token`` (``num_vectors`` rows from ``init_word``) to the tokenizer and text encoder,
    trainable."""
    token = check_placeholder(token)
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
        raise UserError(f"--num-vectors must be a positive integer, got {num_vectors!r}")
    param = add_token(text_encoder, tokenizer, token, init_vectors(text_encoder, tokenizer, num_vectors,
                                                                   init_word))
    return param.requires_grad_(True)


def train_embedding(
    style: str,
    out: Path,
    token: str,
    base: str | Path | None = None,
    init_word: str | None = None,
    num_vectors: int = 1,
    data: str = "embedded",
    per_digit: int | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "auto",
    compile: bool = False,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
    **overrides,
) -> dict:
    """Learn ``token``'s vectors for ``style`` on a prompt base into run directory ``out``; writes
    ``out/embedding.safetensors``. Run folder, resume and stop contract as ``training.lora.train_lora``."""
    token = check_placeholder(token)
    unet, diffusion, base_config, base_path = load_base(base)
    if unet.cfg.conditioning != "text":
        raise UserError(f"{base_path}: a label model has no text encoder; textual inversion needs a prompt"
                        " base (train --conditioning text)")
    te, tokenizer = load_text_parts(base_path, base_config)
    fingerprint = prompt_fingerprint(unet, te)  # of the base alone, before the token exists
    model = TextConditionedUNet(unet, te)
    for p in model.parameters():
        p.requires_grad_(False)
    vector = new_token(te, tokenizer, token, num_vectors, init_word)  # checked before anything is written
    cfg, out, device = prepare_run(default_embedding_train_config(), out, resume, device, overwrite=overwrite,
                                   allow_changes=allow_changes, **overrides)
    styled = load_style_data(style, data=data, per_digit=per_digit, seed=cfg.seed)
    vae = load_attached_vae(base_path, base_config)
    if vae is None:
        raise UserError(f"{base_path}: a prompt model without its VAE")
    images = cached_latents(vae, styled.images)
    name = base_label(base, base_path)
    run_info = {**style_run_info(name, fingerprint, style, styled, per_digit, False), "token": token,
                "num_vectors": num_vectors, "init_word": init_word or ""}
    summary = {"trainable_params": vector.numel(), "share": vector.numel() / sum(
        p.numel() for p in model.parameters() if p is not vector), "modules": 0}
    log.info("textual inversion: token %s, %d vector(s), %d trainable parameters", token, num_vectors,
             vector.numel())
    schedule = NoiseSchedule(diffusion)
    model.train()

    def export(m: nn.Module, directory: Path, step: int) -> None:
        meta = {"style": style, "steps": step, "base": name, "data": styled.source, "train": asdict(cfg),
                "conditioning": "text"}
        embedding_from_model(m.text_encoder, token, fingerprint, init_word or "", meta).save(directory)

    preview = [f"the digit {token} {d}" for d in range(10)]
    return fit_adapter(
        model, TriggerTask(schedule, tokenizer, token), images, styled.labels, cfg, out, export,
        preview=lambda m, p: preview_prompts(m, tokenizer, schedule, vae, p, prompts=preview),
        run_info=run_info, summary=summary, device=device, compile=compile, should_stop=should_stop,
        resume=resume, allow_changes=allow_changes, progress=progress,
    )


__all__ = ["EMBEDDING_LR", "EMBEDDING_STEPS", "base_label", "default_embedding_train_config", "new_token",
           "train_embedding"]
