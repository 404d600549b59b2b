"""Our text encoder <-> transformers' CLIPTextModel (weights and config.json), and its tokenizer files.

Names map one to one (ours on the left, the on-disk CLIPTextModel names that SD's `text_encoder/` folders
and kohya's `lora_te_*` keys use on the right):

    token_embedding.weight           text_model.embeddings.token_embedding.weight
    position_embedding.weight        text_model.embeddings.position_embedding.weight
    layers.{i}.<rest>                text_model.encoder.layers.{i}.<rest>
                                       (<rest>: layer_norm1/2, self_attn.{q,k,v,out}_proj, mlp.fc1/fc2)
    final_layer_norm.<w|b>           text_model.final_layer_norm.<w|b>

The token embedding is the one shape that differs: CLIPTokenizer's vocab.json also holds the BPE-only pieces
(ids after eos, see models/tokenizer.py) which no valid prompt produces; the export gives them zero rows and
the import drops them. transformers 5 loads the `text_model.` layout (it strips the prefix on load), as
every earlier version does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora4diffusion.checkpoint import save_tensors, write_json
from lora4diffusion.errors import UserError
from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.schema import integer, number

PREFIX = "text_model."
_TOP = {
    "token_embedding.": "embeddings.token_embedding.",
    "position_embedding.": "embeddings.position_embedding.",
    "layers.": "encoder.layers.",
    "final_layer_norm.": "final_layer_norm.",
}
TOKEN_EMBEDDING = "token_embedding.weight"


def to_transformers_name(name: str) -> str:
    """Our parameter or module name -> CLIPTextModel's (with the `text_model.` prefix)."""
    for ours, theirs in _TOP.items():
        if (name + ".").startswith(ours):
            return PREFIX + theirs + name[len(ours):] if name + "." != ours else PREFIX + theirs[:-1]
    raise UserError(f"text encoder parameter {name!r} has no CLIPTextModel name")


def from_transformers_name(name: str) -> str:
    """CLIPTextModel's name (with or without `text_model.`) -> ours."""
    bare = name[len(PREFIX):] if name.startswith(PREFIX) else name
    for ours, theirs in _TOP.items():
        if (bare + ".").startswith(theirs):
            return ours + bare[len(theirs):] if bare + "." != theirs else ours[:-1]
    raise UserError(f"CLIPTextModel weight {name!r} has no counterpart in our text encoder")


def clip_vocab_size(tokenizer: Tokenizer) -> int:
    """Rows CLIPTextModel's token embedding needs: every id in the exported vocab.json."""
    return len(json.loads(tokenizer.clip_bpe_files()["vocab.json"]))


def to_transformers(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our state dict -> CLIPTextModel's; the token embedding is padded with zero rows to vocab_size."""
    out = {}
    for k, v in state.items():
        if k == TOKEN_EMBEDDING:
            if vocab_size < v.shape[0]:
                raise UserError(f"CLIP vocabulary of {vocab_size} ids is smaller than the model's"
                                f" {v.shape[0]}")
            v = torch.cat([v, v.new_zeros(vocab_size - v.shape[0], v.shape[1])])
        out[to_transformers_name(k)] = v
    return out


def from_transformers(state: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """CLIPTextModel's state dict -> ours for `cfg` (token rows past cfg.vocab_size, the BPE-only pieces,
    are dropped). Keys we do not have (a projection head, position_ids) or shapes that differ are refused."""
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):  # a buffer older transformers saved; it is just arange
            continue
        ours = from_transformers_name(k)
        if ours == TOKEN_EMBEDDING:
            if v.shape[0] < cfg.vocab_size:
                raise UserError(f"{k}: {v.shape[0]} token rows, the tokenizer needs {cfg.vocab_size}")
            v = v[: cfg.vocab_size]
        out[ours] = v
    expected = TextEncoder(cfg).state_dict()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise UserError(
            f"CLIPTextModel weights lack {to_transformers_name(missing[0])} (and {len(missing) - 1} more)"
        )
    for k, v in out.items():
        if k not in expected:
            raise UserError(f"CLIPTextModel weight {to_transformers_name(k)} does not fit the config")
        if v.shape != expected[k].shape:
            raise UserError(
                f"CLIPTextModel weight {to_transformers_name(k)} has shape {tuple(v.shape)},"
                f" the config needs {tuple(expected[k].shape)}"
            )
    return out


def transformers_config(cfg: TextEncoderConfig, tokenizer: Tokenizer) -> dict:
    """config.json for CLIPTextModel. eos_token_id is set (not the legacy 2), so transformers pools at the
    first eos exactly as we do; the argmax-of-ids rule agrees too, eos being the largest id in every valid
    sequence."""
    if tokenizer.vocab_size != cfg.vocab_size or tokenizer.eos_id != cfg.eos_token_id:
        raise UserError("the tokenizer does not fit this text encoder (vocabulary size or eos id differ)")
    if tokenizer.context_length > cfg.context_length:
        raise UserError(
            f"tokenizer context {tokenizer.context_length} exceeds the encoder's {cfg.context_length}"
        )
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": clip_vocab_size(tokenizer),
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_ratio * cfg.width,
        "projection_dim": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
    }


def config_from_transformers(config: dict) -> TextEncoderConfig:
    """Our config from a CLIPTextModel config.json written by `transformers_config` (vocab_size = eos + 1:
    the ids our tokenizer produces)."""
    act = config.get("hidden_act", "quick_gelu")
    if config.get("model_type", "clip_text_model") != "clip_text_model" or act != "quick_gelu":
        raise UserError(f"text encoder config: model_type {config.get('model_type')!r} / hidden_act {act!r}"
                        " is not a CLIP text model with quick-GELU")
    fields = ("hidden_size", "num_attention_heads", "intermediate_size", "eos_token_id",
              "max_position_embeddings", "num_hidden_layers")
    missing = [k for k in fields if k not in config]
    if missing:
        raise UserError(f"text encoder config: missing {', '.join(missing)}")
    width, heads, inter, eos, length, layers = (
        integer(config[k], f"text encoder config: {k}", int(k != "eos_token_id"), 1 << 20) for k in fields
    )
    eps = number(config.get("layer_norm_eps", 1e-5), "text encoder config: layer_norm_eps", 0.0, 1.0,
                 lo_open=True)
    cfg = {"vocab_size": eos + 1, "eos_token_id": eos, "width": width, "heads": heads,
           "context_length": length, "layers": layers, "layer_norm_eps": eps}
    if inter % width:
        raise UserError(
            f"text encoder config: intermediate_size {inter} is not a multiple of hidden_size {width}"
        )
    return TextEncoderConfig(mlp_ratio=inter // width, **cfg)


def export_text_encoder(model: TextEncoder, tokenizer: Tokenizer, out_dir: str | Path) -> None:
    """Write `out_dir/text_encoder/{config.json, model.safetensors}` and `out_dir/tokenizer/` (CLIP BPE
    files): the two folders of a diffusers Stable Diffusion pipeline."""
    out_dir = Path(out_dir)
    config = transformers_config(model.cfg, tokenizer)
    write_json(out_dir / "text_encoder" / "config.json", config)
    save_tensors(out_dir / "text_encoder" / "model.safetensors",
                 to_transformers(model.state_dict(), config["vocab_size"]), metadata={"format": "pt"})
    tokenizer.export_clip_bpe(out_dir / "tokenizer")


__all__ = [
    "clip_vocab_size", "config_from_transformers", "export_text_encoder", "from_transformers",
    "from_transformers_name", "to_transformers", "to_transformers_name", "transformers_config",
]
