"""LoRA files in kohya-ss/sd-scripts' layout (``networks.lora``): what civitai, ComfyUI and A1111 share.

One safetensors file; per adapted module, named ``lora_unet_`` + its diffusers path with ``.`` -> ``_``
(text-encoder modules: ``lora_te_`` + the CLIPTextModel path, e.g. ``lora_te_text_model_encoder_layers_0_
self_attn_q_proj``; formats/names.py):
    <name>.lora_down.weight   A [r, in] (conv: [r, in, kh, kw])   = our lora_down
    <name>.lora_up.weight     B [out, r] (conv: [out, r, 1, 1])   = our lora_up
    <name>.alpha              a 0-d tensor; kohya's scale is alpha / r (a missing alpha means alpha = r)
Metadata (strings): ``ss_network_module`` = networks.lora, ``ss_network_dim`` = r, ``ss_network_alpha``,
``ss_base_model_version``, ``ss_network_args`` (conv_dim/conv_alpha when convs are adapted),
``ss_tag_frequency`` and ``modelspec.trigger_phrase`` when the adapter has trigger words, ``modelspec.*``,
and ours: ``lora4diffusion.base_fingerprint`` and the ``lora4diffusion`` settings entry (formats/ours.py).
rsLoRA has no kohya equivalent: its scale alpha / sqrt(r) is written as the kohya alpha alpha * sqrt(r).
DoRA, LoHa and LoKr use the same names and metadata in LyCORIS's extension of this layout (lycoris.py).
A pivotal-tuning adapter's token rides along as A1111 reads it: ``bundle_emb.<token>.string_to_param.*``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

import lora4diffusion.formats.ours as ours
from lora4diffusion.checkpoint import FLOAT_DTYPES, load_tensors, read_metadata, save_tensors, tensor_header
from lora4diffusion.errors import UserError
from lora4diffusion.formats.names import KOHYA_TE, KOHYA_UNET, any_from_kohya, any_to_kohya
from lora4diffusion.lora.adapters import (
    MAX_ALPHA,
    UNKNOWN,
    Adapter,
    bundle_tensors,
    check_adapter,
    split_bundled,
)
from lora4diffusion.schema import number, shown

log = logging.getLogger("lora4diffusion")
BASE_MODEL_VERSION = "lora4diffusion_mnist_unet"  # not an SD version: A1111's SD 1.5 block map does not apply
ARCHITECTURE = "lora4diffusion-mnist-unet/lora"
INT_DTYPES = ("I64", "I32", "I16", "I8", "U8")  # safetensors codes of integer tensors (an integer alpha)
KEY_RX = re.compile(r"^(lora_[a-z0-9]+_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def write(adapter: Adapter, path: str | Path, title: str = "") -> Path:
    """Write one kohya LoRA file at ``path``; every module must have a diffusers (hence kohya) name."""
    alpha = kohya_alpha(adapter)
    tensors, convs = {}, False
    for m in adapter.modules:
        a, b = adapter.pair(m)
        k = any_to_kohya(m)  # lora_unet_* or, for text-encoder LoRA, lora_te_*
        tensors[f"{k}.lora_down.weight"], tensors[f"{k}.lora_up.weight"] = a, b
        tensors[f"{k}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        convs = convs or a.dim() == 4
    args = {"conv_dim": str(adapter.rank), "conv_alpha": repr(float(alpha))} if convs else {}
    path = Path(path)
    tensors.update(bundle_tensors(adapter.embeddings))
    save_tensors(path, tensors, network_metadata(adapter, title, "networks.lora", args))
    return path


def kohya_alpha(adapter: Adapter) -> float:
    """The alpha a kohya reader (scale = alpha / r) needs for our scale: rsLoRA's alpha / sqrt(r) is
    written as alpha * sqrt(r)."""
    return adapter.alpha * math.sqrt(adapter.rank) if adapter.rslora else adapter.alpha


def network_metadata(adapter: Adapter, title: str, network_module: str,
                     args: dict[str, str]) -> dict[str, str]:
    """The file's metadata: kohya-ss's ``ss_*`` entries (``ss_network_module``, and ``ss_network_args`` as
    JSON where ``args`` has any), modelspec, trigger words, and ours (fingerprint and settings entry)."""
    alpha = kohya_alpha(adapter)
    meta = {
        "ss_network_module": network_module,
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": repr(float(alpha)),
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": "lora4diffusion",
        "modelspec.title": title,
        "lora4diffusion.base_fingerprint": adapter.fingerprint,
        ours.META_KEY: ours.blob(adapter),
    }
    if args:
        meta["ss_network_args"] = json.dumps(args)
    words = ours.trigger_words(adapter)
    if words:  # kohya's dataset-tag counts; A1111 and civitai show these as the activation words
        meta["ss_tag_frequency"] = json.dumps({"trigger": {w: 1 for w in words}})
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    return meta


def trigger_extra(meta: dict[str, str]) -> dict[str, str]:
    """Our trigger-words entry from a kohya file's ``modelspec.trigger_phrase`` ({} without one)."""
    if not meta.get("modelspec.trigger_phrase"):
        return {}
    words = [w.strip() for w in meta["modelspec.trigger_phrase"].split(",") if w.strip()]
    return {ours.TRIGGER_KEY: json.dumps(words)}


def check_header(path: Path) -> None:
    """Every tensor is floats, an ``.alpha`` may be an integer too; from the header, before any is read."""
    for key, (_shape, dtype) in tensor_header(path).items():
        ok = FLOAT_DTYPES + INT_DTYPES if key.endswith(".alpha") else FLOAT_DTYPES
        if dtype not in ok:
            what = "a number" if key.endswith(".alpha") else "floats (LoRA weights)"
            raise UserError(f"{path}: tensor {shown(key, 80)} has dtype {dtype}; it must hold {what}")


def looks_like(keys: list[str]) -> bool:
    return any(
        k.startswith("lora_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys
    )


def read_alpha(t: torch.Tensor, key: str, path: Path) -> float:
    """A module's ``.alpha``: one number (kohya writes a 0-d float tensor; an integer one is read too, as
    sd-scripts and ComfyUI read it), in our range for alpha (``check_settings``). 0 is kohya's "alpha = r"."""
    if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
        raise UserError(f"{path}: tensor {key} must hold one number (kohya's alpha), got shape"
                        f" {tuple(t.shape)} of {t.dtype}")
    value = t.item()
    if value == 0:
        return 0.0
    try:
        return number(value, f"tensor {key}", 0.0, MAX_ALPHA, lo_open=True)
    except UserError as e:
        raise UserError(f"{path}: {e} (kohya's alpha)") from None


def read(path: str | Path) -> Adapter:
    """A kohya LoRA file as our Adapter (``lora_unet_*`` and the text encoder's ``lora_te_*`` modules)."""
    path = Path(path)
    meta = read_metadata(path)
    check_header(path)
    raw, embeddings = split_bundled(load_tensors(path), path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        match = KEY_RX.match(key)
        if not match:
            raise UserError(f"{path}: unexpected tensor {shown(key, 80)} (kohya LoRA: lora_down/lora_up/alpha"
                            " only)")
        if not match[1].startswith((KOHYA_UNET, KOHYA_TE)):  # lora_te1_/lora_te2_: SDXL's two encoders
            raise UserError(f"{path}: module {shown(match[1], 80)} is not supported (lora_unet_* and"
                            " lora_te_* only)")
        parts.setdefault(match[1], {})[match[2]] = t
    tensors, pairs, alphas, missing = {}, {}, {}, []
    for name, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            raise UserError(f"{path}: module {name} lacks its lora_down or lora_up weight")
        mine = any_from_kohya(name)
        a, b = p["lora_down.weight"].float(), p["lora_up.weight"].float()
        tensors[f"{mine}.lora_down.weight"], tensors[f"{mine}.lora_up.weight"] = a, b
        pairs[name] = (a, b)
        alpha = read_alpha(p["alpha"], f"{name}.alpha", path) if "alpha" in p else 0.0
        if alpha:
            alphas[name] = alpha
        else:
            missing.append(name)
    if not tensors:
        raise UserError(f"{path}: the file holds no LoRA tensors")
    rank = ours.common_rank(pairs, path)
    if ours.META_KEY in meta:
        adapter = ours.from_blob(tensors, meta[ours.META_KEY], path)
        if adapter.rank != rank:
            raise UserError(f"{path}: the tensors have rank {rank}, the metadata says {adapter.rank}")
        adapter.embeddings = embeddings
        return adapter
    if missing:
        log.warning(
            "%s: %d module(s) without .alpha or with alpha 0 (e.g. %s): alpha = rank = %d, as kohya does",
            path,
            len(missing),
            missing[0],
            rank,
        )
        alphas.update(dict.fromkeys(missing, float(rank)))
    distinct = dict(zip(alphas.values(), alphas.keys(), strict=True))
    if len(distinct) > 1:
        (a1, m1), (a2, m2) = list(distinct.items())[:2]
        raise UserError(
            f"{path}: modules have different alphas ({m1}: {a1:g}, {m2}: {a2:g}); one alpha per"
            " adapter is supported"
        )
    extra = {"source": "kohya", **trigger_extra(meta)}
    adapter = Adapter(tensors, rank, next(iter(distinct)), init="kohya", fingerprint=UNKNOWN, extra=extra,
                      embeddings=embeddings)
    return check_adapter(adapter, path)


__all__ = ["check_header", "kohya_alpha", "looks_like", "network_metadata", "read", "read_alpha",
           "trigger_extra", "write"]
