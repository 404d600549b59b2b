"""What a folder or file holds: the rows of ``list`` and everything ``info`` tells (and whether an adapter
fits a base). Names and paths come from ``catalog``; reading adapters and models from ``formats`` and
``pipeline``.

``list`` reads each item on its own: an adapter as ``sample --lora`` reads it, a model or VAE folder by its
configs and headers (no weights); an item that cannot be read (a damaged config, an unreadable file, a
folder that may not be entered) is one row saying why, and the listing goes on. ``info`` reads the whole
item with the same readers as ``sample``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora4diffusion.catalog import (
    EMBEDDINGS_FOLDER,
    KINDS,
    embeddings_in,
    folder_config,
    kind_of,
    named_embeddings,
    shipped,
    suggest,
)
from lora4diffusion.checkpoint import MAX_JSON_BYTES, WEIGHTS_NAME, path_kind, read_metadata, tensor_header
from lora4diffusion.errors import UserError, describe_os_error
from lora4diffusion.folders.model import read_model_config
from lora4diffusion.folders.text import embedding_parts, text_parts
from lora4diffusion.folders.vae import check_attached_vae, load_vae, read_vae_config
from lora4diffusion.formats import detect, read_any
from lora4diffusion.formats.embeddings import embedding_path, read_any_embedding
from lora4diffusion.lora.adapters import UNKNOWN
from lora4diffusion.pipeline import Pipeline

MAX_DEPTH = 8  # nesting shown by `info`; a deeper value (a hostile config or metadata entry) is summarised


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


def _size(path: Path) -> str:
    try:
        return _human(stored_size(path))
    except OSError:  # a file that vanished or may not be looked at: the row says so elsewhere
        return "?"


def _depth(value: object, limit: int = MAX_DEPTH) -> int:
    """How deeply ``value`` nests lists and dicts, counted without recursion, up to ``limit`` + 1."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            if d + 1 > limit:
                return limit + 1
            deepest = max(deepest, d + 1)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _shallow(value: object) -> object:
    """``value``, or a note where it nests deeper than MAX_DEPTH (printing it would recurse that deep)."""
    return value if _depth(value) <= MAX_DEPTH else f"(nested more than {MAX_DEPTH} levels deep: not shown)"


def _adapter_meta(path: Path) -> dict:
    """The metadata of an adapter's safetensors file (ours, diffusers', kohya's); {} for a PEFT folder."""
    try:
        _, f = detect(path)
        return dict(read_metadata(f)) if path_kind(f) == "file" else {}
    except UserError:
        return {}


def _adapter_facts(path: Path) -> dict:
    """What ``list`` shows of an adapter, read as ``sample --lora`` reads it (``formats.read_any``: every
    check of its layout); a UserError says what cannot be read."""
    layout, _ = detect(path)
    adapter = read_any(path)
    facts: dict = {} if layout == "ours" else {"format": layout}
    if adapter.method != "lora":
        facts["method"] = adapter.method
    if adapter.embeddings:
        facts["tokens"] = " ".join(adapter.embeddings)
    for key in ("style", "trigger", "rank", "target_spec", "base"):
        value = adapter.rank if key == "rank" else adapter.extra.get(key)
        if value:
            facts[key] = value
    return facts


def _embedding_facts(path: Path) -> dict:
    """What ``list`` shows of a textual-inversion embedding, read as ``sample --embedding`` reads it."""
    layout, _ = embedding_path(path)
    emb = read_any_embedding(path)
    facts: dict = {} if layout == "ours" else {"format": layout}
    facts.update(token=emb.token, vectors=emb.num_vectors)
    for key in ("style", "base"):
        if emb.extra.get(key):
            facts[key] = emb.extra[key]
    return facts


def _folder_facts(path: Path, kind: str) -> dict:
    """What ``list`` shows of a model or VAE folder, from its configs and headers (no weights read): the
    checks its loader makes on them (config fields, paths of its parts, the VAE's latents against the
    UNet) and readable weight files."""
    if kind == "model":
        unet, _diffusion, cfg = read_model_config(path)
        check_attached_vae(path, cfg)
        tokens = []
        if unet.conditioning == "text":
            _te, weights, _tokenizer = text_parts(path, cfg)
            tensor_header(weights)
            tokens = [read_metadata(p).get("token", "?") for p in embedding_parts(path, cfg)]
        facts = {"conditioning": unet.conditioning,
                 "latent": "yes" if isinstance(cfg.get("vae"), dict) or unet.in_channels != 1 else "no"}
        if tokens:  # a merged pivotal adapter's
            facts["tokens"] = " ".join(tokens)
    else:
        _vae, cfg = read_vae_config(path)
        facts = {}
    tensor_header(path / WEIGHTS_NAME)
    for key in ("preset", "step"):
        if isinstance(cfg.get(key), (str, int)) and not isinstance(cfg.get(key), bool):
            facts[key] = cfg[key]
    return facts


def entry(path: Path, kind: str, name: str | None = None) -> dict:
    """One row of `list`: name, kind, path, size and the few facts that tell items apart; or, for an item
    that cannot be read, a ``problem`` saying why (one line)."""
    row = {"name": name or path.name, "kind": kind, "path": str(path), "size": _size(path)}
    try:
        facts = {"adapter": _adapter_facts, "embedding": _embedding_facts}.get(kind)
        row.update(facts(path) if facts else _folder_facts(path, kind))
    except UserError as e:
        row["problem"] = str(e)
    except OSError as e:  # a file that changed under us: this row, not the whole listing
        row["problem"] = f"{path}: cannot read ({describe_os_error(e)})"
    return row


def _unreadable(path: Path, why: str) -> dict:
    return {"name": str(path), "kind": "unknown", "path": str(path), "size": _size(path), "problem": why}


def _rows_for(path: Path) -> list[dict]:
    """The rows for one ``list`` argument: the item it is; else, for a folder, the items directly in it."""
    try:
        kind = kind_of(path)
    except UserError as e:
        return [_unreadable(path, str(e))]
    if kind is not None:
        return [entry(path, kind, str(path))]
    if path_kind(path) != "dir":
        return [_unreadable(path, f"{path}: not a model, VAE or adapter (list reads model, VAE and adapter"
                                  " folders, .safetensors LoRA files, and folders holding them)")]
    try:
        children = sorted(path.iterdir())
    except OSError as e:
        return [_unreadable(path, f"{path}: cannot read ({describe_os_error(e)})")]
    rows = []
    for child in children:
        if child.name == EMBEDDINGS_FOLDER and path.name != EMBEDDINGS_FOLDER:
            continue  # its items are listed below, each by its name
        try:
            kind = kind_of(child)
        except UserError as e:
            rows.append(_unreadable(child, str(e)))
            continue
        if kind is not None:
            rows.append(entry(child, kind, str(child)))
    if path.name != EMBEDDINGS_FOLDER:  # an adapters folder (serve --adapters DIR): its embeddings/ too
        rows.extend(entry(p, "embedding", str(p)) for p in embeddings_in(path / EMBEDDINGS_FOLDER).values())
    if not rows:
        rows.append(_unreadable(path, f"{path}: holds no model, VAE or adapter (nor does any folder directly"
                                      " in it)"))
    return rows


def listing(folders: list[str | Path] = ()) -> list[dict]:
    """The shipped items (and the embeddings of ./embeddings, as ``--embedding NAME`` finds them), then each
    of ``folders``: the item it is (a model, VAE or adapter folder, an adapter or embedding file), or the
    items directly inside it and inside its embeddings/ folder. An item that cannot be read is a row with a
    ``problem``; a path that does not exist is a UserError (before anything is read)."""
    paths = [Path(f) for f in folders]
    for p in paths:
        if path_kind(p) == "missing":
            raise UserError(f"{p} does not exist (no such file or folder)")
    rows = [entry(p, kind, name) for kind in KINDS
            for name, p in (named_embeddings() if kind == "embedding" else shipped(kind)).items()]
    for p in paths:
        rows.extend(_rows_for(p))
    return rows


def _last_metrics(metrics: Path) -> dict | str | None:
    """The last row of a run's metrics.csv by its header; a note where it cannot be read."""
    try:
        if path_kind(metrics) != "file":
            return None
        if metrics.stat().st_size > MAX_JSON_BYTES:
            return f"{metrics.name}: too large to show ({metrics.stat().st_size} bytes)"
        lines = metrics.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UserError, UnicodeDecodeError) as e:
        why = describe_os_error(e) if isinstance(e, OSError) else "not UTF-8 text" \
            if isinstance(e, UnicodeDecodeError) else str(e)
        return f"{metrics.name}: cannot read ({why})"
    if len(lines) > 1:
        return dict(zip(lines[0].split(","), lines[-1].split(","), strict=False))
    return None


def info(value: str | Path, checkpoint: str | None = None) -> dict:
    """Everything a model, VAE or adapter's metadata says; for an adapter and ``checkpoint``, whether it fits.

    ``value`` is a path or a shipped name (any kind). The item is read whole, by the readers ``sample`` uses;
    one that cannot be read is a UserError saying why.
    """
    p = Path(value)
    if not os.path.lexists(p):
        names = named_embeddings() | {n: q for k in KINDS for n, q in shipped(k).items()}
        if str(value) not in names:
            raise UserError(f"info {value}: not found (no such file or folder, and no shipped item of that"
                            " name)" + suggest(str(value), list(names)))
        p = names[str(value)]
    kind = kind_of(p)
    if kind is None:
        raise UserError(f"info {p}: not a model, VAE, adapter or embedding folder (nor such a file)")
    out: dict = {"path": str(p), "kind": kind, "size": _size(p)}
    if kind == "adapter":
        adapter = read_any(p)
        out.update({"method": adapter.method, **({"options": adapter.options} if adapter.options else {}),
                    "rank": adapter.rank, "alpha": adapter.alpha, "rslora": adapter.rslora,
                    "modules": len(adapter.modules), "fingerprint": adapter.fingerprint,
                    "parameters": sum(t.numel() for t in adapter.tensors.values())})
        if adapter.embeddings:  # pivotal tuning: tokens the adapter brings
            out["embeddings"] = {t: f"{v.shape[0]} vector(s) of width {v.shape[-1]}"
                                 for t, v in adapter.embeddings.items()}
        meta = _adapter_meta(p)
        for key, text in meta.items():
            if key in ("format", "version") or key in out:
                continue
            try:
                out[key] = json.loads(text) if text[:1] in "[{" else text
            except (ValueError, RecursionError):
                out[key] = text
        if "targets" in out and isinstance(out["targets"], list):
            out["targets"] = f"{len(out['targets'])} modules ({', '.join(map(str, out['targets'][:3]))}, ...)"
        if checkpoint is not None:
            out["fits"] = _fits(adapter, checkpoint)
    elif kind == "embedding":
        emb = read_any_embedding(p)
        out.update({"format": embedding_path(p)[0], "token": emb.token, "vectors": emb.num_vectors,
                    "width": int(emb.vectors.shape[1]), "init_word": emb.init_word or "(mean of the words)",
                    "fingerprint": emb.fingerprint, "parameters": emb.vectors.numel()})
        for key, text in emb.extra.items():
            try:
                out.setdefault(key, json.loads(text) if text[:1] in "[{" else text)
            except (ValueError, RecursionError):
                out.setdefault(key, text)
        if checkpoint is not None:
            out["fits"] = _embedding_fits(emb, checkpoint)
    elif kind == "model":
        fingerprint = Pipeline.load(p).fingerprint  # the whole model, as sample reads it
        out.update(folder_config(p))
        out["fingerprint"] = fingerprint
    else:
        _, config = load_vae(p)
        out.update(config)
    metrics = _last_metrics((p if p.is_dir() else p.parent) / "metrics.csv")
    if metrics is not None:
        out["last_metrics"] = metrics
    return {k: _shallow(v) for k, v in out.items()}


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


def _embedding_fits(emb, checkpoint: str) -> str:
    pipe = Pipeline.load(checkpoint)
    if not pipe.is_prompt_model:
        return f"no: {checkpoint} is a label model (no text encoder)"
    if emb.vectors.shape[1] != pipe.text_encoder.cfg.width:
        width = pipe.text_encoder.cfg.width
        return f"no: vectors of width {emb.vectors.shape[1]}, {checkpoint}'s text encoder is {width}"
    if emb.fingerprint == UNKNOWN:
        return f"probably: the width fits {checkpoint}; the embedding records no base fingerprint"
    if emb.fingerprint == pipe.fingerprint:
        return f"yes: trained on exactly this base ({checkpoint})"
    return f"the width fits but it was trained on another base than {checkpoint} (load with --force)"


def format_info(data: dict, indent: str = "") -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and len(indent) < 2 * MAX_DEPTH:
            lines.append(f"{indent}{key}:")
            lines.append(format_info(value, indent + "  "))
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            lines.append(f"{indent}{key}: {text}")
    return "\n".join(lines)


_TITLES = {"model": "models (--checkpoint)", "vae": "VAEs (--vae)", "adapter": "adapters (--lora)",
           "embedding": "embeddings (--embedding; their tokens work in prompts)"}
_UNREADABLE = "not readable (each line says why)"
_NOT_FACTS = ("name", "kind", "path", "size", "problem")


def format_listing(rows: list[dict]) -> str:
    lines = []
    for kind in KINDS:
        group = [r for r in rows if r["kind"] == kind and "problem" not in r]
        if not group:
            continue
        lines.append(_TITLES[kind])
        for r in group:
            facts = ", ".join(f"{k} {v}" for k, v in r.items() if k not in _NOT_FACTS)
            lines.append(f"  {r['name']:<16} {r['size']:>10}  {facts}")
    bad = [r for r in rows if "problem" in r]
    if bad:
        lines.append(_UNREADABLE)
        lines.extend(f"  {r['problem']}" for r in bad)
    return "\n".join(lines) if lines else "nothing found"


__all__ = ["entry", "format_info", "format_listing", "info", "listing", "stored_size"]
