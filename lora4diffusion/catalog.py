"""Names for the shipped models, VAEs and adapters, and the paths they stand for.

:func:`resolve` is the one place a ``--checkpoint``, ``--vae`` or ``--lora`` value becomes a path: an
existing path wins; otherwise a shipped name (``base``, ``vae``, ``bold``); otherwise a one-line error that
suggests the nearest known names (difflib), as git does for a mistyped command. The CLI, ``Pipeline.load``,
the adapter readers and the server all go through it.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from lora4diffusion.checkpoint import path_kind
from lora4diffusion.errors import UserError

PRETRAINED = Path(__file__).parent / "pretrained"
DEFAULT_BASE = "base"  # the prompt-conditioned latent model; "pixel-base" is the label-conditioned pixel one
KINDS = ("model", "vae", "adapter")
_FLAG = {"model": "--checkpoint", "vae": "--vae", "adapter": "--lora"}


def kind_of(path: Path) -> str | None:
    """'model' | 'vae' | 'adapter' for a folder or file we can read, else None (looks at names only)."""
    path = Path(path)
    if path.is_file():
        return "adapter" if path.suffix == ".safetensors" else None
    if (path / "adapter.safetensors").is_file() or (path / "adapter_config.json").is_file():
        return "adapter"
    if folder_config(path).get("format") == "lora4diffusion-vae":  # a VAE folder holds model.safetensors too
        return "vae"
    if (path / "model.safetensors").is_file():
        return "model"
    return None


def folder_config(folder: Path) -> dict:
    try:
        with (Path(folder) / "config.json").open() as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def shipped(kind: str) -> dict[str, Path]:
    """The shipped items of ``kind`` by name: models and VAEs are folders of ``pretrained/``, adapters the
    folders of ``pretrained/adapters/``."""
    if kind == "adapter":
        root = PRETRAINED / "adapters"
        return {p.name: p for p in sorted(root.glob("*")) if kind_of(p) == "adapter"} if root.is_dir() else {}
    found = {p.name: p for p in sorted(PRETRAINED.glob("*")) if p.is_dir() and kind_of(p) == kind}
    return found


def suggest(name: str, known: list[str]) -> str:
    """'; did you mean X? (known: a, b, c)' or '; nothing of that kind is shipped'."""
    if not known:
        return ""
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{hint} (known: {', '.join(known)}; `lora4diffusion list` shows them)"


def resolve(value: str | Path | None, kind: str, default: str | None = None) -> Path:
    """A ``--checkpoint`` / ``--vae`` / ``--lora`` value -> a path: an existing path, else a shipped name.

    ``None`` means ``default`` (a shipped name). An unknown name raises UserError naming the flag and the
    nearest known names.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if value is None:
        if default is None:
            raise UserError(f"{_FLAG[kind]}: no value and no default")
        value = default
    p = Path(value)
    if path_kind(p) != "missing":
        return p
    names = shipped(kind)
    if str(value) in names:
        return names[str(value)]
    what = {"model": "model", "vae": "VAE", "adapter": "adapter"}[kind]
    missing = "file not found" if kind == "adapter" else "does not exist"
    if "/" in str(value) or os.sep in str(value):  # clearly a path: no name to suggest
        raise UserError(f"{_FLAG[kind]} {value}: {missing}")
    raise UserError(
        f"{_FLAG[kind]} {value}: {missing} (no such file or folder, and no shipped {what} of that name)"
        + suggest(str(value), list(names))
    )


def pretrained_dir(name: str = DEFAULT_BASE) -> Path:
    """A model shipped inside the package, by name: ``base`` (the default, the prompt-conditioned latent
    model) or ``pixel-base`` (the label-conditioned pixel model, the reference's design)."""
    return PRETRAINED / name


def shipped_models() -> dict[str, Path]:
    """The diffusion models shipped inside the package, by name (``shipped``: not the VAE folder)."""
    return shipped("model")


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """A ``--checkpoint`` value -> a model directory: None is the shipped default base; an existing path wins;
    else the name of a shipped model (``base``, ``pixel-base``); else one line naming the nearest names
    (``resolve``, the one resolver of names)."""
    return resolve(checkpoint, "model", default="base")
