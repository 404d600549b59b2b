"""Our VAE <-> diffusers' ``AutoencoderKL``: its config and its state-dict names.

``models/vae.py`` uses diffusers' module names (encoder.down_blocks.0.resnets.0.norm1, ...mid_block
.attentions.0.to_q, quant_conv, ...), so the weights map one to one, name for name, with identical shapes; the
conversion below is that map made explicit and checked, so a renamed module fails loudly here instead of
producing a silently half-loaded model in diffusers. Pure functions of names and configs: no diffusers import.
"""

from __future__ import annotations

import torch

from lora4diffusion.errors import UserError
from lora4diffusion.models.vae import VAEConfig


def diffusers_config(cfg: VAEConfig) -> dict:
    """``AutoencoderKL(**diffusers_config(cfg))`` builds our network (its config.json, less the class)."""
    n = len(cfg.block_out_channels)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.image_size,
        "scaling_factor": cfg.scaling_factor,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": cfg.mid_block_add_attention,
    }


def diffusers_name(name: str) -> str:
    """Our parameter name -> diffusers' (the same string: our modules carry diffusers' names)."""
    return name


def our_name(name: str) -> str:
    """diffusers' parameter name -> ours. Checkpoints of diffusers < 0.14 named the mid-block attention
    query/key/value/proj_attn (and group_norm the same): those are accepted too."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    for old, new in legacy.items():
        if ".attentions." in name and old in name:
            return name.replace(old, new)
    return name


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our VAE state dict -> diffusers ``AutoencoderKL`` state dict (same tensors, diffusers' names)."""
    return {diffusers_name(k): v for k, v in state.items()}


def from_diffusers(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> ours, checked against ``cfg``'s names and shapes."""
    from lora4diffusion.models.vae import VAE

    with torch.device("meta"):  # names and shapes only: no memory, no init
        own = VAE(cfg).state_dict()
    out = {}
    for k, v in state.items():
        if v.dim() == 4 and ".attentions." in k and v.shape[-2:] == (1, 1):
            v = v[:, :, 0, 0]  # very old checkpoints stored the attention projections as 1x1 convs
        out[our_name(k)] = v
    missing, unexpected = sorted(set(own) - set(out)), sorted(set(out) - set(own))
    if missing or unexpected:
        raise UserError(
            f"not an AutoencoderKL for this config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in out.items():
        if tuple(v.shape) != tuple(own[k].shape):
            want = tuple(own[k].shape)
            raise UserError(f"AutoencoderKL weight {k} has shape {tuple(v.shape)}, expected {want}")
    return out
