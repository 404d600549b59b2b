"""Quality scores while training (``--score-every K``): every K-th validation also draws a few images with
fixed prompts and a fixed seed and scores them with the project's classifier (``evaluate.style_scores``), so
the validation loss comes with what it is a proxy for.

What is drawn: ``--num-validation-images N`` (TrainConfig.validation_images, default 50) digits, N/10 of
each (``score_digits``), with DDIM at the sampling defaults (``DEFAULT_STEPS`` steps, eta 0, guidance
``DEFAULT_GUIDANCE``) from seed ``SCORE_SEED`` in one batch, in fp32: for up to 50 images (250 on a latent
model) the images ``lora4diffusion sample --seed 0`` draws for the same digits or prompts from that step's
export. A prompt model is asked the training templates cycled per digit (``captions.digit_prompts``), a
trigger LoRA with its trigger before the digit. The columns, per kind of run:

    base (train)                 accuracy, ink
    style LoRA (train-lora)      accuracy, ink_ratio, slant_diff: ink and slant against the base's images of
                                 the same digits, prompts and seed (its adapters switched off), so the
                                 seeds' own variation cancels, as benchmarks/trigger_specificity.py measures
    trigger LoRA (--trigger)     + plain_accuracy, plain_ink_ratio, plain_slant_diff: the same prompts WITHOUT
                                 the trigger: the leak (ink ratio 1 and slant difference 0: no leak)
    VAE (train-vae)              accuracy, recon_ink_ratio of its reconstructions (posterior mean) of the
                                 400 validation digits (plain, bold, thin, italic)

At the default 50 images a scoring costs a few seconds on 2 cores (the pixel base: 50 x 5 x 2 forwards at
0.41 GFLOP; a prompt LoRA: twice as many images at a tenth of the cost each).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from lora4diffusion.captions import EMPTY_PROMPT, digit_prompts
from lora4diffusion.classifier import load_classifier
from lora4diffusion.data import Digits
from lora4diffusion.diffusion import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    STEPS_OFFSET,
    DDIMSampler,
    NoiseSchedule,
    sample,
)
from lora4diffusion.evaluate import style_scores
from lora4diffusion.latents import decode_latents, reconstruct
from lora4diffusion.lora.layers import enable_lora
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.styles import STYLES, apply_style
from lora4diffusion.training.validation import heldout_rows

SCORE_SEED = 0

Draw = Callable[[nn.Module, list], torch.Tensor]  # (model, digits or prompts) -> images [N, H, W] in [0, 1]


def score_digits(n: int) -> list[int]:
    """n digits, as even over 0-9 as n allows, in digit order (n = 50: five 0s, five 1s, ...)."""
    return sorted(i % 10 for i in range(n))


@contextmanager
def evaluating(model: nn.Module, base: bool = False):
    """``model`` in eval mode (and with its adapters switched off: ``base``) for the block, then as before."""
    was = model.training
    model.eval()
    if base:
        enable_lora(model, False)
    try:
        yield model
    finally:
        if base:
            enable_lora(model, True)
        model.train(was)


def label_drawer(schedule: NoiseSchedule, vae=None) -> Draw:
    """Draw digits from a label UNet (pixels, or ``vae``'s latents) as ``Pipeline.generate`` does."""

    @torch.no_grad()
    def draw(model: nn.Module, digits: list) -> torch.Tensor:
        s = DDIMSampler(schedule, eta=0.0, clip_sample=vae is None)
        s.set_timesteps(DEFAULT_STEPS)
        dev = next(model.parameters()).device
        shape = (model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
        labels = torch.tensor(digits, dtype=torch.int64, device=dev)
        x, _ = sample(model, s, labels, shape, DEFAULT_GUIDANCE, torch.Generator().manual_seed(SCORE_SEED),
                      clip=vae is None)
        if vae is not None:
            return decode_latents(vae, x.float())
        return ((x.float().cpu() + 1) / 2).clamp(0, 1)[:, 0]

    return draw


def prompt_drawer(schedule: NoiseSchedule, tokenizer: Tokenizer, vae) -> Draw:
    """Draw prompts from a UNet + text encoder (models.prompt_unet) as ``Pipeline.generate`` does: the empty
    prompt as guidance's unconditional branch, SD's steps offset."""

    @torch.no_grad()
    def draw(model: nn.Module, prompts: list) -> torch.Tensor:
        s = DDIMSampler(schedule, eta=0.0, clip_sample=False, steps_offset=STEPS_OFFSET)
        s.set_timesteps(DEFAULT_STEPS)
        dev = next(model.parameters()).device
        cond = model.text_encoder(tokenizer.encode(prompts).to(dev))[0]
        uncond = model.text_encoder(tokenizer.encode([EMPTY_PROMPT] * len(prompts)).to(dev))[0]
        shape = (model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
        x, _ = sample(model.unet, s, cond, shape, DEFAULT_GUIDANCE, torch.Generator().manual_seed(SCORE_SEED),
                      clip=False, uncond=uncond)
        return decode_latents(vae, x.float())

    return draw


class SampleScores:
    """The scores of a diffusion model's samples (module docstring). ``asked``: what is drawn, one label or
    prompt per digit of ``digits``; ``style``: also against the base (``prime`` draws its images once);
    ``plain``: the trigger-less prompts of a trigger LoRA (the leak)."""

    def __init__(self, draw: Draw, digits: list[int], asked: list, style: bool = False,
                 base_asked: list | None = None, plain: list | None = None):
        self.draw, self.labels, self.asked = draw, torch.tensor(digits), asked
        self.style, self.base_asked, self.plain = style, base_asked or asked, plain
        self.classifier = load_classifier()
        self.base: dict | None = None
        self.columns = ["accuracy", *(("ink_ratio", "slant_diff") if style else ("ink",))]
        if plain is not None:
            self.columns += ["plain_accuracy", "plain_ink_ratio", "plain_slant_diff"]

    def prime(self, model: nn.Module) -> None:
        """Draw and score the base's images: ``model`` with its adapters off (as built, before training:
        a full fine-tune is the base then). Called when the run starts, so a resumed run draws the same."""
        if self.style:
            with evaluating(model, base=True):
                images = self.draw(model, self.base_asked)
            self.base = style_scores(images, self.labels, None, self.classifier)

    def __call__(self, model: nn.Module, device: torch.device, bf16: bool = False) -> dict[str, float]:
        with evaluating(model):
            got = style_scores(self.draw(model, self.asked), self.labels, self.base, self.classifier)
            out = {k: got[k] for k in self.columns if k in got}
            if self.plain is not None:
                leak = style_scores(self.draw(model, self.plain), self.labels, self.base, self.classifier)
                out.update({f"plain_{k}": leak[k] for k in ("accuracy", "ink_ratio", "slant_diff")})
        return out


def base_scores(draw: Draw, n: int, prompts: bool) -> SampleScores:
    """A base model's scores: accuracy and ink of n digits (prompts: the training templates, cycled)."""
    digits = score_digits(n)
    return SampleScores(draw, digits, digit_prompts(digits, None) if prompts else digits)


def style_lora_scores(draw: Draw, n: int, prompts: bool, trigger: str | None = None) -> SampleScores:
    """A style LoRA's scores against its base; with ``trigger`` also the leak without it."""
    digits = score_digits(n)
    if not prompts:
        return SampleScores(draw, digits, digits, style=True)
    plain = digit_prompts(digits, None)
    if trigger is None:
        return SampleScores(draw, digits, plain, style=True)
    return SampleScores(draw, digits, digit_prompts(digits, None, trigger), style=True, base_asked=plain,
                        plain=plain)


class ReconstructionScores:
    """A VAE's scores (module docstring): the classifier's accuracy on its reconstructions of the validation
    digits (``VALIDATION_PER_DIGIT`` per class of ``digits``, plain and in each built-in style) and their ink
    over the originals'."""

    def __init__(self, digits: Digits):
        rows = heldout_rows(digits.labels)
        plain = digits.images[rows]
        self.images = torch.cat([plain] + [apply_style(plain, s) for s in STYLES])
        self.labels = digits.labels[rows].repeat(1 + len(STYLES))
        self.ink = float((self.images.double() / 255).mean())
        self.classifier = load_classifier()
        self.columns = ["accuracy", "recon_ink_ratio"]

    def __call__(self, model: nn.Module, device: torch.device, bf16: bool = False) -> dict[str, float]:
        recons = reconstruct(model, self.images)  # eval mode inside, back to training after
        got = style_scores(recons, self.labels, None, self.classifier)
        return {"accuracy": got["accuracy"], "recon_ink_ratio": got["ink"] / self.ink}


__all__ = ["SCORE_SEED", "ReconstructionScores", "SampleScores", "base_scores", "evaluating",
           "label_drawer", "prompt_drawer", "score_digits", "style_lora_scores"]
