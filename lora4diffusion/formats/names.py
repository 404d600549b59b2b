"""Our UNet's module names <-> diffusers' ``UNet2DConditionModel`` names <-> kohya's ``lora_unet_*`` names.

The two networks are the same function (docs/INTEROP.md), so the map is a pure renaming, the same for every
``UNetConfig``: our levels ``down.L`` are diffusers' ``down_blocks.L``, a Stage ``down.L.i`` is the pair
``resnets.i`` (+ ``attentions.i``), our Transformer block's inner layers sit in its one
``transformer_blocks.0``, and a few layers have other names (``emb_proj`` = ``time_emb_proj``, ...).
kohya-ss names a module ``lora_unet_`` + its diffusers path with every ``.`` replaced by ``_``.

Every function works on module paths (``down.1.0.attn.attn2.to_q``) and on parameter keys (the same plus
``.weight``/``.bias``); a name with no counterpart is a UserError naming it.
"""

from __future__ import annotations

import re

from lora4diffusion.errors import UserError

# Block-level renames, applied to "<path>." (the trailing dot lets one rule cover modules and parameters).
_BLOCKS = [
    (r"^time_mlp\.0\.", "time_embedding.linear_1."),
    (r"^time_mlp\.2\.", "time_embedding.linear_2."),
    (r"^context_pool\.", "class_embedding."),  # class_embed_type="simple_projection"
    (r"^conv_in\.", "conv_in."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^conv_out\.", "conv_out."),
    (r"^down\.(\d+)\.(\d+)\.res\.", r"down_blocks.\1.resnets.\2."),
    (r"^down\.(\d+)\.(\d+)\.attn\.", r"down_blocks.\1.attentions.\2."),
    (r"^downsample\.(\d+)\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^mid_res1\.", "mid_block.resnets.0."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^mid_res2\.", "mid_block.resnets.1."),
    (r"^up\.(\d+)\.(\d+)\.res\.", r"up_blocks.\1.resnets.\2."),
    (r"^up\.(\d+)\.(\d+)\.attn\.", r"up_blocks.\1.attentions.\2."),
    (r"^upsample\.(\d+)\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
]
# Inside a ResBlock (diffusers' ResnetBlock2D) and a Transformer block (Transformer2DModel with one
# BasicTransformerBlock; its feed-forward is FeedForward.net = [GEGLU, Dropout, Linear]).
_INNER = [
    (r"\.resnets\.(\d+)\.emb_proj\.", r".resnets.\1.time_emb_proj."),
    (r"\.resnets\.(\d+)\.skip\.", r".resnets.\1.conv_shortcut."),
    (r"\.attentions\.(\d+)\.(norm[123]|attn[12]|ff)\.", r".attentions.\1.transformer_blocks.0.\2."),
    (r"\.(attn[12])\.to_out\.", r".\1.to_out.0."),
    (r"\.ff\.0\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.1\.", ".ff.net.2."),
]
_RESNET_LEAVES = ("norm1", "conv1", "emb_proj", "norm2", "conv2", "skip")
_ATTN_LEAVES = (
    "norm",
    "proj_in",
    "norm1",
    "norm2",
    "norm3",
    "proj_out",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out",
    "ff.0.proj",
    "ff.1",
)
_PARAM = r"(?:\.(?:weight|bias))?"


def _ours_ok(path: str) -> bool:
    """Is ``path`` (without .weight/.bias) one of the names our UNet can have?"""
    res = "|".join(re.escape(x) for x in _RESNET_LEAVES)
    att = "|".join(re.escape(x) for x in _ATTN_LEAVES)
    rx = (
        rf"^(?:time_mlp\.[02]|context_pool|conv_in|norm_out|conv_out"
        rf"|(?:(?:down|up)\.\d+\.\d+\.res|mid_res[12])\.(?:{res})"
        rf"|(?:(?:down|up)\.\d+\.\d+\.attn|mid_attn)\.(?:{att})"
        rf"|(?:downsample|upsample)\.\d+\.conv){_PARAM}$"
    )
    return re.fullmatch(rx, path) is not None


def is_conv(path: str) -> bool:
    """Is our module path one of the UNet's nn.Conv2d layers (a ResBlock's conv1 / conv2 / skip, conv_in,
    conv_out, a down- or upsampler's conv)? A LoHa's or low-rank LoKr's factors do not show it."""
    leaf = r"(?:^|\.)(?:conv1|conv2|skip|conv_in|conv_out|conv)$"
    return _ours_ok(path) and re.search(leaf, path) is not None


def to_diffusers(path: str) -> str:
    """Our module path or parameter key -> diffusers' (``down.1.0.attn.ff.1`` -> ``...ff.net.2``)."""
    if not _ours_ok(path):
        raise UserError(f"module {path} has no counterpart in diffusers' UNet2DConditionModel")
    s = path + "."
    for rx, rep in _BLOCKS:
        s, n = re.subn(rx, rep, s)
        if n:
            break
    for rx, rep in _INNER:
        s = re.sub(rx, rep, s)
    return s[:-1]


# The inverse rules: diffusers -> ours (applied in this order; inner renames first, then the blocks).
_INNER_BACK = [
    (r"\.ff\.net\.0\.proj\.", ".ff.0.proj."),
    (r"\.ff\.net\.2\.", ".ff.1."),
    (r"\.(attn[12])\.to_out\.0\.", r".\1.to_out."),
    (r"\.attentions\.(\d+)\.transformer_blocks\.0\.", r".attentions.\1."),
    (r"\.resnets\.(\d+)\.time_emb_proj\.", r".resnets.\1.emb_proj."),
    (r"\.resnets\.(\d+)\.conv_shortcut\.", r".resnets.\1.skip."),
]
_BLOCKS_BACK = [
    (r"^time_embedding\.linear_1\.", "time_mlp.0."),
    (r"^time_embedding\.linear_2\.", "time_mlp.2."),
    (r"^class_embedding\.", "context_pool."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.\2.res."),
    (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", r"down.\1.\2.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"downsample.\1.conv."),
    (r"^mid_block\.resnets\.0\.", "mid_res1."),
    (r"^mid_block\.attentions\.0\.", "mid_attn."),
    (r"^mid_block\.resnets\.1\.", "mid_res2."),
    (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", r"up.\1.\2.res."),
    (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", r"up.\1.\2.attn."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"upsample.\1.conv."),
]


def from_diffusers(path: str) -> str:
    """diffusers' module path or parameter key -> ours; a name our UNet cannot have is a UserError."""
    s = path + "."
    for rx, rep in _INNER_BACK:
        s = re.sub(rx, rep, s)
    for rx, rep in _BLOCKS_BACK:
        s, n = re.subn(rx, rep, s)
        if n:
            break
    ours = s[:-1]
    if not _ours_ok(ours) or to_diffusers(ours) != path:
        raise UserError(f"diffusers module {path} has no counterpart in our UNet")
    return ours


KOHYA_UNET = "lora_unet_"
# diffusers name parts that contain "_": kohya's "." -> "_" loses the boundary, so these are re-joined
# (longest first) when a kohya name is read back.
_COMPOUNDS = sorted(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "time_embedding",
        "linear_1",
        "linear_2",
        "class_embedding",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_emb_proj",
        "conv_shortcut",
        "proj_in",
        "proj_out",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
    ],
    key=lambda c: -c.count("_"),
)


def to_kohya(path: str) -> str:
    """Our module path -> kohya's LoRA module name (``lora_unet_down_blocks_1_attentions_0_..._to_q``)."""
    return KOHYA_UNET + to_diffusers(path).replace(".", "_")


def from_kohya(name: str) -> str:
    """kohya's ``lora_unet_...`` module name -> our module path (via the diffusers path)."""
    if not name.startswith(KOHYA_UNET):
        raise UserError(f"kohya module {name} is not a UNet module (lora_unet_*)")
    parts, out, i = name[len(KOHYA_UNET) :].split("_"), [], 0
    while i < len(parts):
        for c in _COMPOUNDS:
            k = c.count("_") + 1
            if "_".join(parts[i : i + k]) == c:
                out.append(c)
                i += k
                break
        else:
            out.append(parts[i])
            i += 1
    diffusers_path = ".".join(out)
    try:
        ours = from_diffusers(diffusers_path)
    except UserError:
        raise UserError(f"kohya module {name} has no counterpart in our UNet") from None
    if to_kohya(ours) != name:
        raise UserError(f"kohya module {name} has no counterpart in our UNet")
    return ours


# ----- text-encoder LoRA (train-lora --text-encoder): our adapter names "text_encoder.<path in TextEncoder>"
# Our TextEncoder's layers are CLIPTextModel's minus "text_model.encoder." (formats/transformers_clip.py), so
#   ours      text_encoder.layers.0.self_attn.q_proj
#   diffusers text_encoder.text_model.encoder.layers.0.self_attn.q_proj   (+ .lora_A.weight; SD 1.x's one
#             text encoder; SDXL's second is text_encoder_2, which we do not have)
#   kohya     lora_te_text_model_encoder_layers_0_self_attn_q_proj         (networks/lora.py: "lora_te" + the
#             CLIPTextModel path with "." -> "_"; SDXL uses lora_te1_/lora_te2_)
# Only the LoRA-adaptable linears of an encoder layer have names here: attention q/k/v/out_proj, MLP fc1/fc2.
TE = "text_encoder."
KOHYA_TE = "lora_te_"
_TE_LEAF = r"(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
_TE_OURS = re.compile(rf"^text_encoder\.layers\.(\d+)\.({_TE_LEAF})$")
_TE_DIFFUSERS = re.compile(rf"^text_model\.encoder\.layers\.(\d+)\.({_TE_LEAF})$")
_TE_KOHYA = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")


def is_text_encoder(path: str) -> bool:
    return path.startswith(TE)


def te_to_diffusers(path: str) -> str:
    """``text_encoder.layers.0.self_attn.q_proj`` -> ``text_model.encoder.layers.0.self_attn.q_proj`` (the
    path inside diffusers' ``text_encoder``; LoRA files prefix it with ``text_encoder.``)."""
    m = _TE_OURS.match(path)
    if not m:
        raise UserError(f"text-encoder module {path} has no LoRA counterpart in CLIPTextModel")
    return f"text_model.encoder.layers.{m[1]}.{m[2]}"


def te_from_diffusers(path: str) -> str:
    m = _TE_DIFFUSERS.match(path)
    if not m:
        raise UserError(f"text-encoder module {path} has no counterpart in our text encoder")
    return f"{TE}layers.{m[1]}.{m[2]}"


def te_to_kohya(path: str) -> str:
    return "lora_te_" + te_to_diffusers(path).replace(".", "_")


def te_from_kohya(name: str) -> str:
    m = _TE_KOHYA.match(name)
    if not m:
        raise UserError(f"kohya module {name} has no counterpart in our text encoder")
    leaf = m[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"{TE}layers.{m[1]}.{leaf}"


def any_to_kohya(path: str) -> str:
    """Our adapter module (UNet or text encoder) -> kohya's name."""
    return te_to_kohya(path) if is_text_encoder(path) else to_kohya(path)


def any_from_kohya(name: str) -> str:
    return te_from_kohya(name) if name.startswith(KOHYA_TE) else from_kohya(name)


__all__ = ["KOHYA_TE", "KOHYA_UNET", "TE", "any_from_kohya", "any_to_kohya", "from_diffusers", "from_kohya",
           "is_conv", "is_text_encoder", "te_from_diffusers", "te_from_kohya", "te_to_diffusers",
           "te_to_kohya", "to_diffusers", "to_kohya"]
