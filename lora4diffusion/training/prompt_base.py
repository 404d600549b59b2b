"""Training a prompt-conditioned latent base: SD 1.x's design at MNIST scale.

    prompt --tokenizer--> ids [B, 16] --text encoder--> last hidden state [B, 16, D] = the UNet's context
    eps_theta(z_t, t, context): a UNet with conditioning="text" (cross-attention only; nothing is added to
    the timestep embedding, as SD 1.x: diffusers' StableDiffusionPipeline passes no class_labels)

There is no pretrained CLIP here, so the text encoder is trained jointly with the UNet from scratch
(`TextConditionedUNet`: one module, so the optimizer, the EMA, DDP and the checkpoints see both). Each step
draws one caption per training digit from the template families (`captions.captions_for`, with the step's
generator: `--resume` stays bit-exact) and replaces `label_dropout` (10 %) of them by the empty prompt "",
the unconditional branch of classifier-free guidance, as SD does (Ho & Salimans 2022). The caption set is
finite (10 digits x 17 templates + ""), so every caption is tokenized once, up front.

A prompt model folder (maps one to one onto diffusers' unet/, text_encoder/, tokenizer/, vae/):
    config.json                {"unet": {..., "conditioning": "text"}, "diffusion", "text_encoder": {"config",
                                "weights"}, "tokenizer": {"folder"}, "vae": {"folder", "fingerprint"}, ...}
    model.safetensors          the UNet (EMA) weights, our names (as every model folder)
    text_encoder.safetensors   the text encoder (EMA) weights, CLIPTextModel's names minus prefixes
    tokenizer/                 vocab.txt + config.json (models/tokenizer.py)
    vae/                       the VAE it denoises the latents of (folders/vae.py)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from lora4diffusion.captions import EMPTY_PROMPT, all_captions, captions_for
from lora4diffusion.data import load_mnist
from lora4diffusion.diffusion import (
    DEFAULT_GUIDANCE,
    STEPS_OFFSET,
    DDIMSampler,
    DiffusionConfig,
    NoiseSchedule,
    sample,
)
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import save_model
from lora4diffusion.folders.vae import vae_fingerprint
from lora4diffusion.latents import decode_latents
from lora4diffusion.models.prompt_unet import TextConditionedUNet
from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.plots import save_grid
from lora4diffusion.training.base import base_run_info, fit_base
from lora4diffusion.training.latents import cached_latents, latent_unet
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import TrainConfig, prepare_run
from lora4diffusion.training.scores import base_scores, prompt_drawer
from lora4diffusion.training.validation import DiffusionValidation, caption_ids, heldout_inputs

log = logging.getLogger("lora4diffusion")


# ------------------------------------------------------------------------------------------ prompts


# ------------------------------------------------------------------------------------------ files


# ------------------------------------------------------------------------------------------ training


class PromptTask:
    """The diffusion loss on captions (the Trainer's task; see training.loop.DiffusionTask for the contract).

    The step's generator draws t, eps and the dropout mask exactly as DiffusionTask does, then one caption
    per digit of the global batch; every rank keeps its rows, so K ranks see what one process sees.
    """

    def __init__(self, schedule: NoiseSchedule, tokenizer: Tokenizer):
        self.schedule = schedule
        # Every caption a step can draw (untriggered, unstyled training families) and the empty prompt,
        # tokenized once: row 0 is "".
        texts = [EMPTY_PROMPT, *sorted({c for d in range(10) for c in all_captions(d)})]
        self.row = {c: i for i, c in enumerate(texts)}
        self.ids = tokenizer.encode(texts)
        self._ids_on: dict[torch.device, torch.Tensor] = {}

    def captions(self, labels: torch.Tensor, generator: torch.Generator,
                 drop: torch.Tensor | None) -> list[str]:
        texts = captions_for(labels.cpu(), generator)
        if drop is not None:
            texts = [EMPTY_PROMPT if d else c for c, d in zip(texts, drop.tolist(), strict=True)]
        return texts

    def loss(self, trainer: Trainer, step: int) -> torch.Tensor:
        cfg, schedule = trainer.cfg, self.schedule
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = trainer.batch_indices(step)
        n = idx.shape[0]
        t, noise, drop = schedule.draw_training_inputs((n, *trainer.images.shape[1:]), g, cfg.label_dropout)
        rows_all = torch.tensor([self.row[c] for c in self.captions(trainer.labels[idx], g, drop)])
        rows = slice(trainer.rank * n // trainer.world, (trainer.rank + 1) * n // trainer.world)
        dev = trainer.device
        if dev not in self._ids_on:
            self._ids_on[dev] = self.ids.to(dev)
        ids = self._ids_on[dev][rows_all[rows].to(dev)]
        x0 = trainer.images[idx[rows].to(dev)]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=trainer.use_bf16):
            return schedule.loss(trainer.net(), x0, ids, t[rows].to(dev), noise[rows].to(dev), None)


def presets() -> dict[str, tuple[UNetConfig, dict, TrainConfig]]:
    """Latent (4x8x8) prompt models: (UNet config, text encoder size, training recipe).

    Chosen by measured CPU time, not FLOPs (`benchmarks/latent_arch.py`, benchmarks/RESULTS.md): at 8x8 the
    64-token Transformer blocks (softmax, GEGLU, LayerNorm on small tensors) took 39 % of the old base's
    forward for 18 % of its FLOPs, and 40/80 channels ran no faster than 48/96 (oneDNN's bf16 kernels want
    multiples of 16/32). So `base` has three levels, 8x8 (32 channels), 4x4 and 2x2 (64), with Transformer
    blocks (self-attention, cross-attention to the prompt, GEGLU) at 4x4, 2x2 and in the middle, none at the
    full latent resolution: SDXL's layout (no attention at its highest resolution), and our pixel base's
    (7x7 + mid). 0.043 GFLOP per forward at batch 1 against the pixel base's 0.406. `fast` (32/64 channels,
    attention at 8x8 and 4x4) is the 10-minute preset.
    """
    latent = dict(image_size=8, in_channels=4, num_res_blocks=1, conditioning="text")
    return {
        "tiny": (  # seconds: tests and smoke runs
            UNetConfig(base_channels=16, channel_mults=(1, 2), attn_levels=(1,), context_dim=32, **latent),
            dict(width=32, layers=1, heads=2),
            TrainConfig(steps=30, batch_size=32, lr=2e-3, warmup=5, ema_decay=0.9, log_every=5,
                        checkpoint_every=10, sample_every=30),
        ),
        "fast": (  # 4,600 x 0.127 s = 9.7 min on 2 quiet cores: 98.5 % on 1,000 samples, FID 0.187 (4,000
            # steps, 8.4 min: 97.5 %); benchmarks/RESULTS.md. The aim: >= 98 % within 10 minutes
            UNetConfig(base_channels=32, channel_mults=(1, 2), attn_levels=(0, 1), context_dim=64, **latent),
            dict(width=64, layers=2, heads=4),
            TrainConfig(steps=4600, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999,
                        checkpoint_every=250, sample_every=1000),
        ),
        "base": (  # the shipped one: 8x8, 4x4, 2x2; Transformer blocks below 8x8 (SDXL's layout)
            UNetConfig(base_channels=32, channel_mults=(1, 2, 2), attn_levels=(1, 2), context_dim=64,
                       **latent),
            dict(width=64, layers=2, heads=4),
            TrainConfig(steps=14000, batch_size=128, lr=5e-4, warmup=200, ema_decay=0.9995,
                        checkpoint_every=250, sample_every=1000),
        ),
    }


PRESET_NAMES = ("tiny", "fast", "base")


@torch.no_grad()
def preview_prompts(model: TextConditionedUNet, tokenizer: Tokenizer, schedule: NoiseSchedule, vae,
                    path: Path, steps: int = 20, prompts: list[str] | None = None) -> None:
    """One DDIM sample per digit ("the digit 0" ... "the digit 9", or ``prompts``: ten of them, e.g. with a
    LoRA's trigger), fixed seed, for watching training."""
    s = DDIMSampler(schedule, clip_sample=False, steps_offset=STEPS_OFFSET)
    s.set_timesteps(steps)
    dev = next(model.parameters()).device
    ids = tokenizer.encode((prompts or [f"the digit {d}" for d in range(10)]) + [EMPTY_PROMPT]).to(dev)
    ctx = model.text_encoder(ids)[0]
    cond, uncond = ctx[:10], ctx[10:].expand(10, -1, -1)
    shape = (model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
    x, _ = sample(model.unet, s, cond, shape, DEFAULT_GUIDANCE, torch.Generator().manual_seed(0), clip=False,
                  uncond=uncond)
    save_grid(decode_latents(vae, x), 10, path)


def train_prompt_base(
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
    """Train a prompt-conditioned latent base (UNet + text encoder, jointly, from scratch) into ``out``.

    Same contract as training.base.train_base (run folder, EMA export, --resume bit-exact); ``vae`` is
    required: the prompt presets are latent models, as SD.
    """
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESET_NAMES)})")
    if vae is None:
        raise UserError("--conditioning text trains a latent model: pass --vae DIR (a VAE from train-vae)")
    if image_size is not None:
        raise UserError("--image-size does not apply with --vae: the latent size is the VAE's")
    unet_cfg, te_size, cfg = presets()[preset]
    autoencoder, unet_cfg = latent_unet(vae, unet_cfg)
    cfg, out, device = prepare_run(
        cfg, out, resume, device, overwrite=overwrite, allow_changes=allow_changes, steps=steps, **overrides
    )
    tokenizer = Tokenizer.load()
    te_cfg = TextEncoderConfig.for_tokenizer(tokenizer, **te_size)
    diffusion = DiffusionConfig(**(diffusion_overrides or {}))
    splits = load_mnist(data)
    images = cached_latents(autoencoder, splits.train.images)
    torch.manual_seed(cfg.seed)  # initial weights: the UNet's, then the text encoder's
    model = TextConditionedUNet(UNet(unet_cfg), TextEncoder(te_cfg))
    schedule = NoiseSchedule(diffusion)
    run_info = base_run_info(unet_cfg, diffusion, preset, splits)
    run_info["text_encoder"] = te_cfg.to_dict()
    run_info["vae"] = vae_fingerprint(autoencoder)  # --resume refuses another VAE
    validation = None
    if cfg.validate_every:
        x0, labels = heldout_inputs(splits.heldout, unet_cfg.image_size, autoencoder)
        validation = DiffusionValidation(schedule, x0, caption_ids(tokenizer, labels))
    scores = base_scores(prompt_drawer(schedule, tokenizer, autoencoder), cfg.validation_images,
                         prompts=True) if cfg.score_every else None
    return fit_base(
        model, PromptTask(schedule, tokenizer), images, splits, cfg, out, preset,
        save=lambda m, directory, extra: save_model(directory, m.unet, diffusion, extra, vae=autoencoder,
                                                    text=(m.text_encoder, tokenizer)),
        preview=lambda m, p: preview_prompts(m, tokenizer, schedule, autoencoder, p,
                                             steps=5 if preset == "tiny" else 20),
        run_info=run_info, device=device, compile=compile, should_stop=should_stop, resume=resume,
        allow_changes=allow_changes, progress=progress, validation=validation, scores=scores,
    )

__all__ = ["PRESET_NAMES", "PromptTask", "preview_prompts", "train_prompt_base"]
