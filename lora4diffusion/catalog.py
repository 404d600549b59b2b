"""Names for the shipped models, VAEs and adapters, and what a folder or file holds (`list`, `info`).

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

from lora4diffusion.errors import UserError

PRETRAINED = Path(__file__).parent / "pretrained"
KINDS = ("model", "vae", "adapter")
_FLAG = {"model": "--checkpoint", "vae": "--vae", "adapter": "--lora"}


def kind_of(path: Path) -> str | None:
    """'model' | 'vae' | 'adapter' for a folder or file we can read, else None (looks at names only)."""
    path = Path(path)
    if path.is_file():
        return "adapter" if path.suffix == ".safetensors" else None
    if (path / "adapter.safetensors").is_file() or (path / "adapter_config.json").is_file():
        return "adapter"
    if _config(path).get("format") == "lora4diffusion-vae":  # a VAE folder holds model.safetensors too
        return "vae"
    if (path / "model.safetensors").is_file():
        return "model"
    return None


def _config(folder: Path) -> dict:
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
    from lora4diffusion.checkpoint import path_kind

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


# ----------------------------------------------------------------------------------------- list / info


def _size(path: Path) -> int:
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
    from lora4diffusion.checkpoint import read_metadata

    f = path / "adapter.safetensors" if path.is_dir() else path
    if not f.is_file():
        return {}
    try:
        return dict(read_metadata(f))
    except UserError:
        return {}


def entry(path: Path, kind: str, name: str | None = None) -> dict:
    """One row of `list`: name, kind, path, size and the few facts that tell items apart."""
    row = {"name": name or path.name, "kind": kind, "path": str(path), "size": _human(_size(path))}
    if kind == "adapter":
        meta = _adapter_meta(path)
        for key in ("style", "trigger", "rank", "target_spec", "base"):
            if meta.get(key):
                row[key] = meta[key]
    else:
        cfg = _config(path)
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
    out: dict = {"path": str(p), "kind": kind, "size": _human(_size(p))}
    if kind == "adapter":
        from lora4diffusion.formats import read_any

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
        out.update(_config(p))
        if kind == "model":
            from lora4diffusion.lora.adapters import base_fingerprint
            from lora4diffusion.pipeline import Pipeline

            out["fingerprint"] = base_fingerprint(Pipeline.load(p).unet)
    metrics = (p if p.is_dir() else p.parent) / "metrics.csv"
    if metrics.is_file():
        lines = metrics.read_text().strip().splitlines()
        if len(lines) > 1:
            out["last_metrics"] = dict(zip(lines[0].split(","), lines[-1].split(","), strict=False))
    return out


def _fits(adapter, checkpoint: str) -> str:
    from lora4diffusion.lora.adapters import UNKNOWN, base_fingerprint
    from lora4diffusion.pipeline import Pipeline

    pipe = Pipeline.load(checkpoint)
    missing = [m for m in adapter.modules if m not in dict(pipe.unet.named_modules())]
    if missing:
        return f"no: {len(missing)} of its modules are not in {checkpoint} (e.g. {missing[0]})"
    if adapter.fingerprint == UNKNOWN:
        return f"probably: every module exists in {checkpoint}; the adapter records no base fingerprint"
    if adapter.fingerprint == base_fingerprint(pipe.unet):
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
