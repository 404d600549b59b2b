"""Our UNet <-> diffusers' ``UNet2DConditionModel`` and our noise schedule <-> its DDIM / DDPM scheduler: the
converters that both a label model's folder (formats/diffusers.py) and a ``StableDiffusionPipeline`` folder
(formats/stable_diffusion.py) use, and the names of the files they go in. Pure functions of configs, names
and tensors: diffusers is never imported.

The UNet maps one to one onto diffusers' ``UNet2DConditionModel`` (names in ``formats/names.py``):
    our label context tokens [B, T, D]  -> ``encoder_hidden_states`` (cross-attention keys/values)
    their mean over tokens [B, D]       -> ``class_labels`` with ``class_embed_type="simple_projection"``,
                                           added to the timestep embedding as our ``context_pool`` does
    our heads per level (channels // head_dim) -> ``attention_head_dim`` (which, in this class, is the number
                                           of heads: diffusers keeps the old misnomer)
A prompt model's UNet adds nothing to the timestep embedding (``class_embed_type`` None), as SD 1.x.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora4diffusion.checkpoint import load_tensors
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.formats.names import from_diffusers, to_diffusers
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.objectives import PREDICTION_TYPES
from lora4diffusion.schema import integer, number, shown

DIFFUSERS_VERSION = "0.42.0"  # the version the export is tested against (tests/test_formats.py)
UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
UNET_CONFIG, UNET_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
NORM_EPS = 1e-5  # our ResBlock GroupNorms and LayerNorms (PyTorch's default); diffusers' `norm_eps`


def _heads(channels: int, head_dim: int) -> int:
    return max(1, channels // head_dim)  # as models/unet.py's Attention


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """Our UNetConfig -> the ``config.json`` of an equivalent ``UNet2DConditionModel``."""
    chans = [cfg.base_channels * m for m in cfg.channel_mults]
    levels = range(len(chans))
    label = cfg.conditioning == "label"
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # our timestep embedding is [cos, sin]
        "freq_shift": 0,
        "down_block_types": [
            "CrossAttnDownBlock2D" if lv in cfg.attn_levels else "DownBlock2D" for lv in levels
        ],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [
            "CrossAttnUpBlock2D" if lv in cfg.attn_levels else "UpBlock2D" for lv in reversed(levels)
        ],
        "only_cross_attention": False,
        "block_out_channels": chans,
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "norm_num_groups": cfg.groups,
        "norm_eps": NORM_EPS,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": 1,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "attention_head_dim": [_heads(c, cfg.head_dim) for c in chans],  # = number of heads (see above)
        "num_attention_heads": None,
        "dual_cross_attention": False,
        "use_linear_projection": True,  # our proj_in/proj_out are Linear layers
        # label models add their pooled context (class_labels); prompt models add nothing, as SD 1.x
        "class_embed_type": "simple_projection" if label else None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "num_class_embeds": None,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": cfg.context_dim if label else None,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64,
        "reverse_transformer_layers_per_block": None,
    }


# Settings our UNet has exactly one value for: (key, accepted values). A missing key takes diffusers' default,
# so only defaults we share may be missing (None in the tuple means "absent is fine").
_FIXED = [
    ("center_input_sample", (False, None)),
    ("flip_sin_to_cos", (True, None)),
    ("freq_shift", (0, None)),
    ("mid_block_type", ("UNetMidBlock2DCrossAttn", None)),
    ("only_cross_attention", (False, None)),
    ("downsample_padding", (1, None)),
    ("mid_block_scale_factor", (1, 1.0, None)),
    ("act_fn", ("silu", None)),
    ("norm_eps", (NORM_EPS, None)),
    ("encoder_hid_dim", (None,)),
    ("encoder_hid_dim_type", (None,)),
    ("dual_cross_attention", (False, None)),
    ("use_linear_projection", (True,)),
    ("addition_embed_type", (None,)),
    ("num_class_embeds", (None,)),
    ("upcast_attention", (False, None)),
    ("resnet_time_scale_shift", ("default", None)),
    ("resnet_skip_time_act", (False, None)),
    ("resnet_out_scale_factor", (1, 1.0, None)),
    ("time_embedding_type", ("positional", None)),
    ("time_embedding_dim", (None,)),
    ("time_embedding_act_fn", (None,)),
    ("timestep_post_act", (None,)),
    ("time_cond_proj_dim", (None,)),
    ("conv_in_kernel", (3, None)),
    ("conv_out_kernel", (3, None)),
    ("attention_type", ("default", None)),
    ("class_embeddings_concat", (False, None)),
    ("mid_block_only_cross_attention", (None, False)),
    ("cross_attention_norm", (None,)),
    ("reverse_transformer_layers_per_block", (None,)),
    ("num_attention_heads", (None,)),
]


def _typed(d: dict, key: str, default: object, kind: str) -> object:
    """``d[key]`` (``default`` where absent or null, as diffusers' defaults) checked against what
    UNet2DConditionModel takes there: "int" (a positive integer, not a bool), "number" (finite, >= 0), "ints"
    (a non-empty list of positive integers), "names" (a list of strings). A value of another type is one
    line naming the key, the value and what was expected: never Python's own TypeError text."""
    value = d.get(key)
    if value is None:
        return default
    where = f"unet/{UNET_CONFIG}: {key}"
    if kind == "int":
        return integer(value, where, 1, 1 << 20)
    if kind == "number":
        return number(value, where, 0.0, 1.0)
    ok = isinstance(value, list) and (
        (kind == "ints" and value and all(type(v) is int and v > 0 for v in value))
        or (kind == "names" and all(isinstance(v, str) for v in value))
    )
    if not ok:
        what = "a non-empty list of positive integers" if kind == "ints" else "a list of block class names"
        raise UserError(f"{where} is {shown(value)}; expected {what}")
    return value


def unet_config_from_diffusers(
    d: dict, context_tokens: int = 4, num_classes: int = 10, conditioning: str = "label"
) -> UNetConfig:
    """The UNetConfig our UNet needs to compute what this ``UNet2DConditionModel`` config computes; an
    architecture we cannot represent is a UserError naming the setting, and a value of the wrong type one
    naming the key and what was expected (``_typed``). ``conditioning`` "label": the pooled label context
    enters as ``class_labels`` (simple_projection); "text": nothing is added to the timestep embedding (SD
    1.x), ``context_tokens`` / ``num_classes`` are unused (our UNetConfig's defaults)."""

    def refuse(part: str, why: str) -> UserError:
        return UserError(f"unet/{UNET_CONFIG}: {part} {why}; our UNet cannot represent this architecture")

    if d.get("_class_name") != "UNet2DConditionModel":
        raise refuse("_class_name", f"is {shown(d.get('_class_name'))}, not UNet2DConditionModel")
    label = conditioning == "label"
    fixed = [*_FIXED, ("class_embed_type", ("simple_projection",) if label else (None,))]
    if not label:
        fixed.append(("projection_class_embeddings_input_dim", (None,)))
    for key, ok in fixed:
        if key not in d and None in ok:
            continue
        if d.get(key) not in ok:
            raise refuse(key, f"is {shown(d.get(key))} (ours: {ok[0]!r})")
    per_block = d.get("transformer_layers_per_block", 1)
    if any(x != 1 for x in (per_block if isinstance(per_block, list) else [per_block])):
        raise refuse("transformer_layers_per_block", f"is {shown(per_block)} (ours: 1)")
    chans = _typed(d, "block_out_channels", None, "ints")
    if chans is None:
        raise refuse("block_out_channels", "is missing")
    if any(c % chans[0] for c in chans):
        raise refuse("block_out_channels", f"{chans} are not multiples of the first")
    in_channels, out_channels = _typed(d, "in_channels", 4, "int"), _typed(d, "out_channels", 4, "int")
    if in_channels != out_channels:
        raise refuse("out_channels", f"{out_channels} differs from in_channels {in_channels}")
    n = len(chans)
    down, up = _typed(d, "down_block_types", [], "names"), _typed(d, "up_block_types", [], "names")
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if len(down) != n or any(b not in kinds for b in down):
        raise refuse("down_block_types", f"{down} are not {n} of CrossAttnDownBlock2D/DownBlock2D")
    attn = [kinds[b] for b in down]
    want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up != want_up:
        raise refuse("up_block_types", f"{up} do not mirror the down blocks (ours: {want_up})")
    layers = d.get("layers_per_block")
    if not isinstance(layers, int):
        raise refuse("layers_per_block", f"is {shown(layers)} (ours: one integer for every block)")
    heads = d.get("attention_head_dim")
    heads = [heads] * n if isinstance(heads, int) else heads if isinstance(heads, list) else []
    if len(heads) != n or any(not isinstance(h, int) or h <= 0 or c % h
                              for h, c in zip(heads, chans, strict=True)):
        raise refuse("attention_head_dim", f"{heads} is not a head count dividing each block's channels")
    head_dim = chans[-1] // heads[-1]  # the mid block's heads are the last level's
    for lv, (h, c) in enumerate(zip(heads, chans, strict=True)):
        if (attn[lv] or lv == n - 1) and _heads(c, head_dim) != h:
            raise refuse(
                "attention_head_dim", f"{heads}: our UNet uses one head size ({head_dim}) everywhere"
            )
    ctx = d.get("cross_attention_dim")
    if not isinstance(ctx, int) or isinstance(ctx, bool):
        raise refuse("cross_attention_dim", f"is {shown(ctx)} (ours: one integer)")
    if label and d.get("projection_class_embeddings_input_dim") != ctx:
        raise refuse(
            "projection_class_embeddings_input_dim",
            "must equal cross_attention_dim (our pooled context is the mean of the context tokens)",
        )
    size = d.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:  # diffusers allows (height, width)
        size = size[0]
    return UNetConfig(
        image_size=_typed({"sample_size": size}, "sample_size", 28, "int"),
        in_channels=in_channels,
        base_channels=chans[0],
        channel_mults=tuple(c // chans[0] for c in chans),
        num_res_blocks=layers,
        attn_levels=tuple(lv for lv in range(n) if attn[lv]),
        head_dim=head_dim,
        context_tokens=context_tokens,
        context_dim=ctx,
        num_classes=num_classes,
        groups=_typed(d, "norm_num_groups", 32, "int"),
        dropout=_typed(d, "dropout", 0.0, "number"),
        conditioning=conditioning,
    )


def scheduler_config(diffusion: DiffusionConfig, prompt_model: bool = False) -> dict:
    """A DDIMScheduler config with our noise schedule and our samplers' timestep spacing (diffusion.py):
    "leading" steps (n-1) r, ..., r, 0 with r = T // n, offset 0, clip x0 to [-1, 1], and the last step
    going to abar = 1 (``set_alpha_to_one``). diffusers' "squaredcos_cap_v2" is our cosine schedule
    (Nichol & Dhariwal eq. 17 with s = 0.008 and betas capped at 0.999). ``prompt_model``: latents are not
    clipped and the steps are offset by 1 (prompt_model.STEPS_OFFSET), as StableDiffusionPipeline needs.
    ``prediction_type`` is the model's (epsilon or v_prediction): the scheduler reads the UNet's output so."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": diffusion.timesteps,
        "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "beta_schedule": {"linear": "linear", "cosine": "squaredcos_cap_v2"}[diffusion.schedule],
        "trained_betas": None,
        "clip_sample": not prompt_model,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 1 if prompt_model else 0,
        "prediction_type": diffusion.prediction_type,
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }


_SCHEDULER_FIXED = [
    ("trained_betas", None),
    ("thresholding", False),
    ("rescale_betas_zero_snr", False),
]


def diffusion_from_scheduler(d: dict) -> DiffusionConfig:
    """The DiffusionConfig of a DDPM/DDIM scheduler config; settings we do not have are refused by name."""
    if d.get("_class_name") not in ("DDIMScheduler", "DDPMScheduler"):
        raise UserError(
            f"{SCHEDULER_DIR}/{SCHEDULER_CONFIG}: _class_name {d.get('_class_name')!r} is not"
            " DDIMScheduler or DDPMScheduler"
        )
    where = f"{SCHEDULER_DIR}/{SCHEDULER_CONFIG}"
    for key, value in _SCHEDULER_FIXED:
        if d.get(key, value) != value:
            raise UserError(f"{where}: {key} {shown(d[key])} is not supported (ours: {value!r})")
    prediction = d.get("prediction_type", "epsilon")  # "sample" (x0 prediction) we do not have
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"{where}: prediction_type {shown(prediction)} is not supported (ours:"
                        f" {' or '.join(PREDICTION_TYPES)})")
    beta_schedule = d.get("beta_schedule", "linear")
    schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(beta_schedule) \
        if isinstance(beta_schedule, str) else None
    if schedule is None:
        raise UserError(f"{where}: beta_schedule {shown(beta_schedule)} is not supported (linear or"
                        " squaredcos_cap_v2)")
    try:  # DiffusionConfig checks each type and range: 999.5 steps are not truncated to 999
        return DiffusionConfig(timesteps=d.get("num_train_timesteps", 1000), schedule=schedule,
                               beta_start=d.get("beta_start", 1e-4), beta_end=d.get("beta_end", 0.02),
                               prediction_type=prediction)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def unet_state_to_diffusers(model: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under diffusers' names (the label context table is not part of diffusers' UNet)."""
    return {to_diffusers(k): v for k, v in model.state_dict().items() if not k.startswith("label_context.")}


def load_unet_weights(
    cfg: UNetConfig, weights_file: Path, state: dict[str, torch.Tensor] | None = None
) -> UNet:
    """Our UNet for ``cfg`` (eval mode) with the weights of a diffusers ``unet/`` safetensors file (plus
    ``state``, weights that live outside diffusers' UNet); a weight with no counterpart, a shape that does
    not fit or a missing weight is a UserError naming it."""
    model = UNet(cfg)
    own = model.state_dict()
    state = dict(state or {})
    for key, t in load_tensors(weights_file).items():
        ours = from_diffusers(key)
        if ours not in own:
            raise UserError(
                f"{weights_file}: weight {key} has no counterpart in the UNet its config describes"
            )
        if t.shape != own[ours].shape:
            raise UserError(
                f"{weights_file}: weight {key} has shape {tuple(t.shape)}, the config needs"
                f" {tuple(own[ours].shape)}"
            )
        state[ours] = t
    missing = [to_diffusers(k) for k in own if k not in state]
    if missing:
        raise UserError(
            f"{weights_file}: missing weight {missing[0]}"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.eval()


__all__ = [
    "DIFFUSERS_VERSION",
    "NORM_EPS",
    "SCHEDULER_CONFIG",
    "SCHEDULER_DIR",
    "UNET_CONFIG",
    "UNET_DIR",
    "UNET_WEIGHTS",
    "diffusion_from_scheduler",
    "load_unet_weights",
    "scheduler_config",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_state_to_diffusers",
]
