"""What a folder or file holds: the rows of ``list`` and everything ``info`` tells (and whether an adapter
fits a base). Names and paths come from ``catalog``; reading adapters and models from ``formats`` and
``pipeline``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora4diffusion.catalog import KINDS, folder_config, kind_of, shipped, suggest
from lora4diffusion.checkpoint import read_metadata
from lora4diffusion.errors import UserError
from lora4diffusion.formats import read_any
from lora4diffusion.lora.adapters import UNKNOWN
from lora4diffusion.pipeline import Pipeline


def stored_size(path: Path) -> int:
    """Bytes of a file; of a folder, its weights and config (not the pictures and logs of a run)."""
    if path.is_file():
        return path.stat().st_size
    if (path / "adapter.safetensors").is_file():
        return (path / "adapter.safetensors").stat().st_size
    kept = (".safetensors", ".json", ".txt")  # weights, configs, a tokenizer's vocabulary
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in kept)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _adapter_meta(path: Path) -> dict:
    f = path / "adapter.safetensors" if path.is_dir() else path
    if not f.is_file():
        return {}
    try:
        return dict(read_metadata(f))
    except UserError:
        return {}


def entry(path: Path, kind: str, name: str | None = None) -> dict:
    """One row of `list`: name, kind, path, size and the few facts that tell items apart."""
    row = {"name": name or path.name, "kind": kind, "path": str(path), "size": _human(stored_size(path))}
    if kind == "adapter":
        meta = _adapter_meta(path)
        for key in ("style", "trigger", "rank", "target_spec", "base"):
            if meta.get(key):
                row[key] = meta[key]
    else:
        cfg = folder_config(path)
        unet = cfg.get("unet") or {}
        if kind == "model":
            row["conditioning"] = unet.get("conditioning", "label")
            row["latent"] = "yes" if (path / "vae").is_dir() or unet.get("in_channels", 1) != 1 else "no"
        for key in ("preset", "step"):
            if key in cfg:
                row[key] = cfg[key]
    return row


def listing(folders: list[str | Path] = ()) -> list[dict]:
    """The shipped items, then every model, VAE and adapter found in ``folders`` (and one level below)."""
    rows = [entry(p, kind, name) for kind in KINDS for name, p in shipped(kind).items()]
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"list: {folder} does not exist")
        candidates = [folder] + (sorted(p for p in folder.iterdir()) if folder.is_dir() else [])
        for p in candidates:
            kind = kind_of(p)
            if kind is not None:
                rows.append(entry(p, kind, str(p)))
    return rows


def info(value: str | Path, checkpoint: str | None = None) -> dict:
    """Everything a model, VAE or adapter's metadata says; for an adapter and ``checkpoint``, whether it fits.

    ``value`` is a path or a shipped name (any kind).
    """
    p = Path(value)
    if not os.path.lexists(p):
        names = {n: q for k in KINDS for n, q in shipped(k).items()}
        if str(value) not in names:
            raise UserError(f"info {value}: not found (no such file or folder, and no shipped item of that"
                            " name)" + suggest(str(value), list(names)))
        p = names[str(value)]
    kind = kind_of(p)
    if kind is None:
        raise UserError(f"info {p}: not a model, VAE or adapter folder (nor an adapter file)")
    out: dict = {"path": str(p), "kind": kind, "size": _human(stored_size(p))}
    if kind == "adapter":
        adapter = read_any(p)
        out.update({"rank": adapter.rank, "alpha": adapter.alpha, "rslora": adapter.rslora,
                    "modules": len(adapter.modules), "fingerprint": adapter.fingerprint,
                    "parameters": sum(t.numel() for t in adapter.tensors.values())})
        meta = _adapter_meta(p)
        for key, text in meta.items():
            if key in ("format", "version") or key in out:
                continue
            try:
                out[key] = json.loads(text) if text[:1] in "[{" else text
            except ValueError:
                out[key] = text
        if "targets" in out and isinstance(out["targets"], list):
            out["targets"] = f"{len(out['targets'])} modules ({', '.join(out['targets'][:3])}, ...)"
        if checkpoint is not None:
            out["fits"] = _fits(adapter, checkpoint)
    else:
        out.update(folder_config(p))
        if kind == "model":
            out["fingerprint"] = Pipeline.load(p).fingerprint
    metrics = (p if p.is_dir() else p.parent) / "metrics.csv"
    if metrics.is_file():
        lines = metrics.read_text().strip().splitlines()
        if len(lines) > 1:
            out["last_metrics"] = dict(zip(lines[0].split(","), lines[-1].split(","), strict=False))
    return out


def _fits(adapter, checkpoint: str) -> str:
    pipe = Pipeline.load(checkpoint)
    names = pipe.module_names()
    missing = [m for m in adapter.modules if m not in names]
    if missing:
        return f"no: {len(missing)} of its modules are not in {checkpoint} (e.g. {missing[0]})"
    if adapter.fingerprint == UNKNOWN:
        return f"probably: every module exists in {checkpoint}; the adapter records no base fingerprint"
    if adapter.fingerprint == pipe.fingerprint:
        return f"yes: trained on exactly this base ({checkpoint})"
    return f"shapes fit but it was trained on another base than {checkpoint} (load with --force)"


def format_info(data: dict, indent: str = "") -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(format_info(value, indent + "  "))
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            lines.append(f"{indent}{key}: {text}")
    return "\n".join(lines)


_TITLES = {"model": "models (--checkpoint)", "vae": "VAEs (--vae)", "adapter": "adapters (--lora)"}


def format_listing(rows: list[dict]) -> str:
    lines = []
    for kind in KINDS:
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        lines.append(_TITLES[kind])
        for r in group:
            facts = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("name", "kind", "path", "size"))
            lines.append(f"  {r['name']:<16} {r['size']:>10}  {facts}")
    return "\n".join(lines) if lines else "nothing found"
