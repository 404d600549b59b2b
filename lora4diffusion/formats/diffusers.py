"""Our model <-> a diffusers folder: ``unet/`` (UNet2DConditionModel), ``scheduler/`` (DDIMScheduler) and the
label context that conditions the UNet (the UNet and scheduler converters: formats/diffusers_unet.py).

A label model has no text encoder, so there is no diffusers pipeline class for it and no ``model_index.json``
is written (one would claim a pipeline that cannot load); the context table goes to
``label_context.safetensors``. A prompt model is a whole ``StableDiffusionPipeline`` (unet/, vae/,
text_encoder/, tokenizer/, scheduler/, model_index.json): formats/stable_diffusion.py, which
``export_diffusers`` and ``import_diffusers`` hand such a model or folder to.
"""

from __future__ import annotations

from pathlib import Path

from lora4diffusion.checkpoint import atomic_write, load_tensors, read_json, save_tensors, write_json
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import save_model
from lora4diffusion.formats.diffusers_unet import (
    SCHEDULER_CONFIG,
    SCHEDULER_DIR,
    UNET_CONFIG,
    UNET_DIR,
    UNET_WEIGHTS,
    diffusion_from_scheduler,
    load_unet_weights,
    scheduler_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_state_to_diffusers,
)
from lora4diffusion.formats.stable_diffusion import export_sd_pipeline, import_sd_pipeline, is_sd_pipeline
from lora4diffusion.models.unet import NULL_LABEL, UNet

LABEL_CONTEXT = "label_context.safetensors"

_README = """# {name}: a lora4diffusion UNet in diffusers' layout

Exported by `lora4diffusion export-diffusers` from `{source}`. This is a *label* model (MNIST digits 0-9;
label {null} is the learned "no label" context used for classifier-free guidance), so there is no text
encoder, no VAE and no diffusers pipeline class for it: no `model_index.json`. Load the parts:

```python
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

unet = UNet2DConditionModel.from_pretrained("{name}", subfolder="unet")
scheduler = DDIMScheduler.from_pretrained("{name}", subfolder="scheduler")
context = load_file("{name}/label_context.safetensors")["label_context"]  # [11, {tokens}, {dim}]

labels = torch.tensor([3, 5, 7])
ctx = context[labels]                                   # encoder_hidden_states [B, {tokens}, {dim}]
x = torch.randn(len(labels), {ch}, {size}, {size})
scheduler.set_timesteps(20)
for t in scheduler.timesteps:
    out = unet(x, t, encoder_hidden_states=ctx, class_labels=ctx.mean(1)).sample  # eps, or v: the
    x = scheduler.step(out, t, x).prev_sample            # scheduler config's prediction_type says which
images = (x.clamp(-1, 1) + 1) / 2                       # [B, {ch}, {size}, {size}] in [0, 1]
```

Classifier-free guidance with weight w: also run the null label (`context[{null}]`) and use
`out_null + w * (out_label - out_null)`; lora4diffusion samples with w = 1.25 by default. Numbers against
ours: docs/INTEROP.md in the lora4diffusion repository. `lora4diffusion import-diffusers DIR --out MODEL`
converts this folder back.
"""


def export_diffusers(
    model: UNet, diffusion: DiffusionConfig, out: str | Path, source: str = "", vae=None,
    text: tuple | None = None,
) -> list[Path]:
    """Label model: write ``out/unet/``, ``out/scheduler/``, ``out/label_context.safetensors`` and
    ``out/README.md`` (a latent label model's VAE is not exported: no diffusers pipeline takes labels and
    latents; this is the UNet export as before). Prompt model (``text`` = (text encoder, tokenizer), ``vae``
    its VAE): a whole StableDiffusionPipeline folder (formats/stable_diffusion.py)."""
    out = Path(out)
    cfg = model.cfg
    if cfg.conditioning == "text":
        if text is None:
            raise UserError("a prompt model is exported with its text encoder and tokenizer")
        return export_sd_pipeline(model, diffusion, vae, *text, out, source=source)
    weights = {k: v.float() for k, v in unet_state_to_diffusers(model).items()}
    context = model.label_context.weight.detach().float().reshape(-1, cfg.context_tokens, cfg.context_dim)
    written = [
        out / UNET_DIR / UNET_WEIGHTS,
        out / UNET_DIR / UNET_CONFIG,
        out / SCHEDULER_DIR / SCHEDULER_CONFIG,
        out / LABEL_CONTEXT,
        out / "README.md",
    ]
    save_tensors(written[0], weights, {"format": "pt"})
    write_json(written[1], unet_config_to_diffusers(cfg))
    write_json(written[2], scheduler_config(diffusion))
    save_tensors(
        written[3],
        {"label_context": context},
        {
            "format": "pt",
            "null_label": str(NULL_LABEL),
            "usage": "encoder_hidden_states = label_context[labels]; class_labels = its mean over dim 1",
        },
    )
    text = _README.format(
        name=out.name or str(out),
        source=source or "a lora4diffusion model",
        null=NULL_LABEL,
        tokens=cfg.context_tokens,
        dim=cfg.context_dim,
        ch=cfg.in_channels,
        size=cfg.image_size,
    )
    atomic_write(written[4], lambda p: p.write_text(text))
    return written


def read_diffusers(folder: str | Path) -> tuple[UNet, DiffusionConfig]:
    """Read a folder of ``export_diffusers``' shape (also after training with diffusers' own scripts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory")
    if not (folder / UNET_DIR / UNET_CONFIG).is_file():
        raise UserError(f"{folder}: not a diffusers model folder (no {UNET_DIR}/{UNET_CONFIG})")
    weights_file = folder / UNET_DIR / UNET_WEIGHTS
    if not weights_file.is_file():
        bins = [p.name for p in (folder / UNET_DIR).glob("*.bin")]
        extra = f" (pickled {bins[0]} is not read)" if bins else ""
        raise UserError(f"{folder}: no {UNET_DIR}/{UNET_WEIGHTS}{extra}")
    if not (folder / LABEL_CONTEXT).is_file():
        raise UserError(f"{folder}: no {LABEL_CONTEXT} (the label context tokens our UNet is conditioned on)")
    context = load_tensors(folder / LABEL_CONTEXT).get("label_context")
    if context is None or context.dim() != 3 or context.shape[0] < 2:
        raise UserError(f"{folder / LABEL_CONTEXT}: needs a tensor 'label_context' [labels + 1, tokens, dim]")
    cfg = unet_config_from_diffusers(
        read_json(folder / UNET_DIR / UNET_CONFIG), context.shape[1], context.shape[0] - 1
    )
    if context.shape[2] != cfg.context_dim:
        raise UserError(
            f"{folder / LABEL_CONTEXT}: context dim {context.shape[2]} differs from the UNet's"
            f" cross_attention_dim {cfg.context_dim}"
        )
    diffusion = diffusion_from_scheduler(read_json(folder / SCHEDULER_DIR / SCHEDULER_CONFIG))
    table = {"label_context.weight": context.reshape(context.shape[0], -1)}
    return load_unet_weights(cfg, weights_file, table), diffusion


def import_diffusers(folder: str | Path, out: str | Path) -> Path:
    """``read_diffusers`` and write our model directory (config.json + model.safetensors) to ``out``; a
    folder with a model_index.json is a StableDiffusionPipeline and becomes a prompt model folder."""
    if Path(folder).is_dir() and is_sd_pipeline(folder):
        return import_sd_pipeline(folder, out)
    model, diffusion = read_diffusers(folder)
    save_model(Path(out), model, diffusion, {"imported_from": str(folder)})
    return Path(out)


__all__ = [
    "export_diffusers",
    "import_diffusers",
    "read_diffusers",
    "scheduler_config",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_state_to_diffusers",
]
