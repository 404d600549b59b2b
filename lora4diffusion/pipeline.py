"""Sampling API: a loaded model plus its noise schedule, turning digit labels (label models) or prompts
(prompt models, prompt_model.py) into images."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lora4diffusion.checkpoint import load_model, pretrained_dir
from lora4diffusion.diffusion import DDIMSampler, DDPMSampler, DiffusionConfig, NoiseSchedule, sample
from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import UNet

# Measured on the shipped base (benchmarks/RESULTS.md, sampling sweep): 20 DDIM steps score as well as 50, and
# guidance above ~1.5 over-saturates this model's strokes (its label also enters the timestep embedding).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 1.25


@dataclass
class Pipeline:
    unet: UNet
    diffusion: DiffusionConfig
    config: dict
    vae: object = None  # models.vae.VAE for a latent model (trained with --vae), None for a pixel model
    text_encoder: object = None  # models.text_encoder.TextEncoder of a prompt model, None for a label model
    tokenizer: object = None  # models.tokenizer.Tokenizer of a prompt model

    @property
    def is_prompt_model(self) -> bool:
        return self.text_encoder is not None

    @property
    def text(self) -> tuple | None:
        """(text encoder, tokenizer) of a prompt model (what checkpoint.save_model takes), else None."""
        return (self.text_encoder, self.tokenizer) if self.is_prompt_model else None

    @classmethod
    def load(cls, checkpoint: str | Path | None = None) -> Pipeline:
        """Load a model directory or a shipped model's name (``base``; `lora4diffusion list`); None means the
        base model shipped with the package."""
        if checkpoint is None:
            checkpoint = pretrained_dir()
            if not (checkpoint / "config.json").is_file():
                raise UserError(
                    "no shipped base model in this install; pass --checkpoint DIR (train one first)"
                )
        else:
            from lora4diffusion.catalog import resolve

            checkpoint = resolve(checkpoint, "model")
        from lora4diffusion.autoencoder import load_attached_vae

        unet, diffusion, config = load_model(Path(checkpoint))
        vae = load_attached_vae(checkpoint, config)  # None for a pixel model
        if vae is None and unet.cfg.in_channels != 1:
            raise UserError(f"{checkpoint}: a latent model ({unet.cfg.in_channels} channels) without its VAE")
        if unet.cfg.conditioning == "text":
            from lora4diffusion.prompt_model import load_text_parts

            text_encoder, tokenizer = load_text_parts(checkpoint, config)
            return cls(unet, diffusion, config, vae, text_encoder, tokenizer)
        return cls(unet, diffusion, config, vae)

    def add_lora(self, path: str | Path, weight: float = 1.0, force: bool = False) -> str:
        """Load an adapter (ours, PEFT's, diffusers' or kohya's layout: detected) into the UNet at ``weight``;
        returns its name."""
        from lora4diffusion.formats import read_any
        from lora4diffusion.lora.adapters import load_adapter

        return load_adapter(self.unet, path, weight=weight, force=force, reader=read_any)

    def set_lora_weight(self, name: str, weight: float) -> None:
        """Change a loaded adapter's weight (the name add_lora returned); 0 gives the base's images."""
        from lora4diffusion.lora.layers import set_adapter_weight

        set_adapter_weight(self.unet, name, weight)

    def remove_lora(self, name: str) -> None:
        """Unload adapter ``name``; once every adapter is removed the UNet is the plain base model again."""
        from lora4diffusion.lora.layers import delete_adapter

        delete_adapter(self.unet, name)

    @property
    def loras(self) -> dict[str, float]:
        """The loaded adapters and their weights, by name."""
        from lora4diffusion.lora.layers import adapter_names, lora_layers

        weights: dict[str, float] = {}
        for layer in lora_layers(self.unet).values():
            weights.update(layer.weight)
        return {n: weights[n] for n in adapter_names(self.unet)}

    def to(self, device: str | torch.device) -> Pipeline:
        """Move the UNet (adapters included) to ``device``: auto | cpu | cuda or a torch.device."""
        from lora4diffusion.distributed import resolve_device

        self.unet.to(resolve_device(device))
        for part in (self.vae, self.text_encoder):
            if part is not None:
                part.to(resolve_device(device))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_size(self) -> int:
        return self.unet.cfg.image_size

    def sampler(self, kind: str = "ddim", steps: int | None = DEFAULT_STEPS, eta: float = 0.0):
        schedule = NoiseSchedule(self.diffusion)
        clip = self.vae is None  # pixels live in [-1, 1]; latents have no such range (SD does not clip them)
        if kind == "ddim":
            s = DDIMSampler(schedule, eta=eta, clip_sample=clip)
        elif kind == "ddpm":
            s = DDPMSampler(schedule, clip_sample=clip)
        else:
            raise UserError(f"unknown sampler {kind!r} (choose ddim or ddpm)")
        s.set_timesteps(steps)
        return s

    @torch.no_grad()
    def generate(
        self,
        labels: list[int] | list[str] | torch.Tensor,
        sampler: str = "ddim",
        steps: int | None = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        eta: float = 0.0,
        batch_size: int = 50,
        trajectory_every: int = 0,
        bf16: bool = False,
        progress: bool = False,
        callback: Callable[[int, int, int, torch.Tensor], None] | None = None,
        negative: str | list[str] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample one image per label; returns (images [N, H, W] in [0, 1], trajectory of every image).

        The same seed gives the same images bit for bit (on one device). Batches are seeded (seed, batch
        index), so the result does not depend on how many other digits are asked for in later batches. Noise
        is drawn by a CPU generator on every device, so a GPU run starts from the same x_T as a CPU run.
        ``batch_size`` 50 (100 rows with guidance) keeps every activation under glibc's 32 MiB mmap ceiling:
        250 was 1.4x slower on CPU, most of it page faults (benchmarks/RESULTS.md). Raise it on a GPU.
        Non-finite results (an overflowing model, adapter or guidance) raise UserError instead of returning.
        ``callback(first_index, step, steps, x0_hat)``: after every step of every batch, the predicted clean
        images of the batch starting at ``first_index`` ([b, C, H, W] in [-1, 1]; latents for latent models);
        for live previews. The trajectory (``trajectory_every`` > 0) is a list of frames [N, 1, H, W] in
        [-1, 1], one row per label: ``[x[::k] for x in trajectory]`` shows every k-th sample's denoising.

        Prompt models: ``labels`` are prompts (strings), or digits, which become prompts of the "digit"
        family (prompt_model.digit_prompts). ``negative`` (one string, or one per prompt) replaces the empty
        prompt as the unconditional branch of guidance. A bad prompt raises UserError before any sampling.
        """
        device = self.device
        contexts = None
        if self.is_prompt_model:
            contexts = self._contexts(labels, negative)
            labels = torch.zeros(len(contexts[0]), dtype=torch.int64, device=device)  # only its length counts
        else:
            if negative is not None or any(isinstance(v, str) for v in labels):
                raise UserError("this is a label model: it takes digits, not prompts (use --digits)")
            labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        s = self.sampler(sampler, steps, eta)
        self.unet.eval()
        shape = (self.unet.cfg.in_channels, self.image_size, self.image_size)
        out, traj = [], []
        for b, start in enumerate(range(0, len(labels), batch_size)):
            g = torch.Generator().manual_seed((seed * 1_000_003 + b) % 2**64)  # manual_seed takes 64 bits
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                cond, uncond = labels[start : start + batch_size], None
                if contexts is not None:  # the text encoder runs once per batch, not once per step
                    ids, neg_ids = (c[start : start + batch_size].to(device) for c in contexts)
                    cond, uncond = self.text_encoder(ids)[0], self.text_encoder(neg_ids)[0]
                x, t = sample(
                    self.unet,
                    s,
                    cond,
                    shape,
                    guidance,
                    g,
                    trajectory_every,
                    progress,
                    clip=self.vae is None,
                    uncond=uncond,
                    callback=None if callback is None else functools.partial(callback, start),
                )
            if not torch.isfinite(x).all():  # clamp() below would hide inf as 0/1 and keep NaN: refuse
                raise UserError(
                    f"sampling produced non-finite values (NaN/inf) at guidance {guidance:g}: the model or an"
                    " adapter overflows; lower --guidance or the --lora scales (nothing was written)"
                )
            out.append(x.float().cpu())
            traj.append(t)
        traj = [torch.cat(frames) for frames in zip(*traj, strict=True)] if trajectory_every else []
        if self.vae is not None:  # latent diffusion: the decoder turns the sampled latents into digits
            from lora4diffusion.autoencoder import decode_latents

            images = torch.cat([decode_latents(self.vae, x) for x in out])
            # the denoising strip shows decoded latents: plots expect [B, 1, H, W] in [-1, 1]
            return images, [decode_latents(self.vae, x)[:, None] * 2 - 1 for x in traj]
        images = ((torch.cat(out) + 1) / 2).clamp(0, 1)[:, 0]
        return images, traj

    def _contexts(self, prompts, negative) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the prompts and of their unconditional branch (a bad word is a UserError)."""
        from lora4diffusion.prompt_model import digit_prompts, negative_prompts

        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            if any(isinstance(p, str) for p in prompts):
                raise UserError("give prompts (strings) or digits, not a mix")
            prompts = digit_prompts(prompts)
        if not prompts:
            raise UserError("no prompts to sample")
        return self.tokenizer.encode(prompts), self.tokenizer.encode(negative_prompts(negative, len(prompts)))
