"""LoRA files in diffusers' layout: ``pytorch_lora_weights.safetensors``, as ``save_lora_weights`` writes it.

Keys (diffusers >= 0.27 with the PEFT backend; checked against 0.42's ``lora_base.py`` / ``loaders/peft.py``):
    unet.<diffusers module path>.lora_A.weight   = our lora_down (A)
    unet.<diffusers module path>.lora_B.weight   = our lora_up (B)
    text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_A.weight   (text-encoder LoRA)
A bare model's ``save_lora_adapter`` writes the same keys without ``unet.``; both are read.

Alpha: carried, not folded. diffusers reads the safetensors metadata entry ``lora_adapter_metadata`` (JSON of
the PEFT ``LoraConfig``, keys prefixed ``unet.``) and builds the LoraConfig from it, so ``r``, ``lora_alpha``
and ``use_rslora`` arrive exactly. Folding alpha / r into B instead would round B (a float multiply is not
undone bit for bit), breaking the exact round trip, and is only needed by readers that ignore the metadata;
those assume alpha = rank, which is what our shipped adapters have (their scale is 1 either way).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import lora4diffusion.formats.ours as ours
from lora4diffusion.checkpoint import load_tensors, read_metadata, save_tensors
from lora4diffusion.errors import UserError
from lora4diffusion.formats.names import (
    from_diffusers,
    is_text_encoder,
    te_from_diffusers,
    te_to_diffusers,
    to_diffusers,
)
from lora4diffusion.lora.adapters import UNKNOWN, Adapter, check_adapter, require_float_tensors
from lora4diffusion.lora.peft_layout import lora_config_settings
from lora4diffusion.schema import shown

log = logging.getLogger("lora4diffusion")
WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "unet"
TE_PREFIX = "text_encoder"  # SD 1.x's text encoder: text_encoder.text_model.encoder.layers.N...
KEY_RX = re.compile(r"^(?:(unet|text_encoder(?:_2)?)\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


def lora_config(adapter: Adapter, targets: list[str]) -> dict:
    """The PEFT LoraConfig fields diffusers turns into the adapter's config."""
    return {
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.rslora,
        "target_modules": targets,
        "lora_dropout": adapter.dropout,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": "gaussian" if adapter.init == "normal" else True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write(adapter: Adapter, out_dir: str | Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors``; every module must have a diffusers name."""
    tensors, targets = {}, {PREFIX: [], TE_PREFIX: []}
    for m in adapter.modules:
        a, b = adapter.pair(m)
        part, d = (TE_PREFIX, te_to_diffusers(m)) if is_text_encoder(m) else (PREFIX, to_diffusers(m))
        # PEFT matches target_modules by name suffix: without "text_model." the name fits both transformers 4
        # (text_model.encoder...) and 5 (encoder..., flattened); diffusers strips the prefix from keys only
        targets[part].append(d.removeprefix("text_model.") if part == TE_PREFIX else d)
        tensors[f"{part}.{d}.lora_A.weight"], tensors[f"{part}.{d}.lora_B.weight"] = a, b
    # one LoraConfig per component, keys prefixed by it (diffusers' _pack_dict_with_prefix)
    config = {f"{part}.{k}": v for part, mods in targets.items() if mods
              for k, v in lora_config(adapter, mods).items()}
    meta = {
        "format": "pt",
        METADATA_KEY: json.dumps(config, indent=2, sort_keys=True),
        ours.META_KEY: ours.blob(adapter),
    }
    path = Path(out_dir) / WEIGHTS
    save_tensors(path, tensors, meta)
    return path


def looks_like(keys: list[str]) -> bool:
    return any(
        k.endswith((".lora_A.weight", ".lora_B.weight")) and not k.startswith("base_model.model.")
        for k in keys
    )


def read(path: str | Path) -> Adapter:
    """A diffusers LoRA file (ours or another tool's) as our Adapter."""
    path = Path(path)
    meta = read_metadata(path)
    require_float_tensors(path)  # from the header, before any tensor is read
    raw = load_tensors(path)
    pairs: dict[str, dict[str, object]] = {}
    for key, t in raw.items():
        match = KEY_RX.match(key)
        if not match:
            raise UserError(f"{path}: unexpected tensor {shown(key, 80)} (diffusers LoRA files hold"
                            " lora_A/lora_B weights)")
        if match[1] not in (None, PREFIX, TE_PREFIX):
            raise UserError(f"{path}: {match[1]} LoRA ({shown(key, 80)}) is not supported (one text encoder,"
                            " SD 1.x)")
        module = f"{TE_PREFIX}.{match[2]}" if match[1] == TE_PREFIX else match[2]
        pairs.setdefault(module, {})[match[3]] = t.float()
    tensors = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{path}: module {module} has lora_{'A' if 'A' in ab else 'B'} but not the other")
        te = module.startswith(f"{TE_PREFIX}.")
        mine = te_from_diffusers(module[len(TE_PREFIX) + 1 :]) if te else from_diffusers(module)
        tensors[f"{mine}.lora_down.weight"], tensors[f"{mine}.lora_up.weight"] = ab["A"], ab["B"]
    if not tensors:
        raise UserError(f"{path}: the file holds no LoRA tensors")
    rank = ours.common_rank({m: (ab["A"], ab["B"]) for m, ab in pairs.items()}, path)
    if ours.META_KEY in meta:
        adapter = ours.from_blob(tensors, meta[ours.META_KEY], path)
    else:
        settings = _config(meta, path, rank)
        if settings is None:
            log.warning("%s: no alpha in the file; using alpha = rank = %d, as diffusers does", path, rank)
            settings = {"rank": rank, "alpha": float(rank)}
        settings["init"] = "peft"
        adapter = Adapter(tensors, fingerprint=UNKNOWN, extra={"source": "diffusers"}, **settings)
    if adapter.rank != rank:
        raise UserError(f"{path}: the tensors have rank {rank}, the metadata says {adapter.rank}")
    return check_adapter(adapter, path)


def _config(meta: dict[str, str], path: Path, rank: int) -> dict | None:
    """The adapter's settings from diffusers' LoraConfig metadata (``unet.``/``text_encoder.``-prefixed
    sections, or bare keys), each section checked as PEFT's adapter_config.json is
    (``lora_config_settings``); None without metadata. Sections that disagree on rank, alpha or the scale
    rule are refused: our adapter has one of each."""
    if METADATA_KEY not in meta:
        return None
    try:
        full = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError):
        raise UserError(f"{path}: {METADATA_KEY} is not JSON ({shown(meta[METADATA_KEY])}); expected an"
                        " object of LoraConfig fields") from None
    if not isinstance(full, dict):
        raise UserError(f"{path}: {METADATA_KEY} must be a JSON object of LoraConfig fields, got"
                        f" {shown(full)}")
    if not full:
        return None
    sections: dict[str, dict] = {}
    for key, value in full.items():
        part, _, field = key.partition(".")
        if not field or part not in (PREFIX, TE_PREFIX, f"{TE_PREFIX}_2"):
            part, field = "", key
        sections.setdefault(part, {})[field] = value
    found = {}
    for part, config in sections.items():
        try:
            found[part] = lora_config_settings(config, rank, f"{part}." if part else "")
        except UserError as e:
            raise UserError(f"{path}: {METADATA_KEY}: {e}") from None
    first, *others = found.items()
    for part, settings in others:
        keys = ("rank", "alpha", "rslora")
        if any(settings[k] != first[1][k] for k in keys):
            raise UserError(f"{path}: {METADATA_KEY}: the {first[0] or 'bare'} and {part or 'bare'} sections"
                            " differ in r, lora_alpha or use_rslora; one rank and alpha per adapter is"
                            " supported")
    return first[1]


__all__ = ["WEIGHTS", "looks_like", "read", "write"]
