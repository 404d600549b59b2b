"""Our VAE <-> diffusers' ``AutoencoderKL``: its config and its state-dict names.

``models/vae.py`` uses diffusers' module names (encoder.down_blocks.0.resnets.0.norm1, ...mid_block
.attentions.0.to_q, quant_conv, ...), so the weights map one to one, name for name, with identical shapes; the
conversion below is that map made explicit and checked, so a renamed module fails loudly here instead of
producing a silently half-loaded model in diffusers. Pure functions of names and configs: no diffusers import.
"""

from __future__ import annotations

import torch

from lora4diffusion.errors import UserError
from lora4diffusion.models.vae import VAE, VAEConfig


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


# AutoencoderKL settings our VAE has one value for: (key, accepted values; None = absent is fine).
_FIXED = [
    ("_class_name", ("AutoencoderKL",)),
    ("act_fn", ("silu", None)),
    ("use_quant_conv", (True, None)),
    ("use_post_quant_conv", (True, None)),
    ("shift_factor", (None,)),
    ("latents_mean", (None,)),
    ("latents_std", (None,)),
]


def config_from_diffusers(d: dict) -> VAEConfig:
    """Our VAEConfig from an ``AutoencoderKL`` config.json; a setting our VAE cannot compute is a UserError
    naming it (``vae/config.json: <key> ...``)."""

    def refuse(key: str, why: str) -> UserError:
        return UserError(f"vae/config.json: {key} {why}; our VAE cannot represent this autoencoder")

    for key, ok in _FIXED:
        if (key in d or None not in ok) and d.get(key) not in ok:
            raise refuse(key, f"is {d.get(key)!r} (ours: {ok[0]!r})")
    chans = d.get("block_out_channels")
    if not isinstance(chans, list) or not chans:
        raise refuse("block_out_channels", f"is {chans!r}")
    n = len(chans)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if d.get(key) != [kind] * n:
            raise refuse(key, f"is {d.get(key)!r} (ours: {n} x {kind})")
    if d.get("in_channels") != d.get("out_channels"):
        ins, outs = d.get("in_channels"), d.get("out_channels")
        raise refuse("out_channels", f"{outs!r} differs from in_channels {ins!r}")
    try:
        return VAEConfig(
            in_channels=d.get("in_channels", 3),
            latent_channels=d.get("latent_channels", 4),
            block_out_channels=tuple(chans),
            layers_per_block=d.get("layers_per_block", 1),
            norm_num_groups=d.get("norm_num_groups", 32),
            image_size=d.get("sample_size", 32),
            mid_block_add_attention=d.get("mid_block_add_attention", True),
            scaling_factor=d.get("scaling_factor", 0.18215),
        )
    except (UserError, TypeError) as e:
        raise UserError(f"vae/config.json: {e}") from None


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
