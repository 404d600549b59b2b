"""Textual-inversion files other tools load: diffusers' ``learned_embeds.safetensors`` and AUTOMATIC1111's
embedding file; reading any of them (ours included, detected) and writing the two others.

    layout     file                         tensors                     the token
    ours       embedding.safetensors        emb_params [n, D]           metadata "token" (lora/embeddings.py)
    diffusers  learned_embeds.safetensors   {token: [n, D]} (or [D])    the key (textual_inversion.py's
                                                                        save_progress; load_textual_inversion)
    a1111      NAME.safetensors             emb_params [n, D] (kohya's  the file name, A1111's prompt word;
                                            name) or string_to_param.*  our export also writes "name"

AUTOMATIC1111 names an embedding by its file and matches that text in prompts; ours are placeholders written
``<name>``, so ``bold-ti.safetensors`` is our ``<bold-ti>``; any embedding in an ``embeddings/`` folder goes
by its name's token (catalog.embedding_name), as A1111's do. Both writers also store our own metadata as one
``lora4diffusion`` entry (the other tools ignore it), so ours -> X -> ours keeps the base fingerprint, the
init word and the training record. SDXL's two-encoder files (clip_l / clip_g) are refused: one encoder here.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora4diffusion.captions import check_placeholder
from lora4diffusion.catalog import EMBEDDING_FILES, embedding_layout, embedding_name, resolve
from lora4diffusion.checkpoint import load_tensors, path_kind, read_metadata, save_tensors, tensor_header
from lora4diffusion.errors import UserError
from lora4diffusion.finite import require_finite
from lora4diffusion.lora.adapters import UNKNOWN
from lora4diffusion.lora.embeddings import TENSOR, Embedding, check_embedding, read_embedding
from lora4diffusion.schema import shown

EMBEDDING_FORMATS = ("diffusers", "a1111")
DIFFUSERS_FILE = "learned_embeds.safetensors"
BLOB_KEY = "lora4diffusion"


def _token(name: str, where: object) -> str:
    """A placeholder from another tool's name: kept as it is when written <name>, else <name>."""
    token = name if name.startswith("<") else f"<{name.strip().lower()}>"
    try:
        return check_placeholder(token)
    except UserError:
        raise UserError(f"{where}: embedding name {shown(name, 60)} cannot be a placeholder token (letters,"
                        " digits, '-', '_'); pass --token <name>") from None


def embedding_path(path: str | Path) -> tuple[str, Path]:
    """(layout, file): an embedding file, or a folder holding ours or diffusers' (or exactly one embedding
    .safetensors); a name that is no path is a shipped embedding's (catalog.resolve)."""
    path = resolve(path, "embedding")
    if path_kind(path) == "dir":
        found = [path / n for n in EMBEDDING_FILES if path_kind(path / n) == "file"]
        if not found:
            found = [p for p in sorted(path.glob("*.safetensors")) if embedding_layout(p)]
        if len(found) != 1:
            raise UserError(f"{path}: {len(found) or 'no'} embedding files found (expected"
                            f" {' or '.join(EMBEDDING_FILES)}, or one embedding .safetensors)")
        path = found[0]
    if path_kind(path) != "file":
        raise UserError(f"embedding {path}: file not found")
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: only .safetensors embeddings are read (no pickled .pt/.bin)")
    keys = set(tensor_header(path))
    if {"clip_l", "clip_g"} <= keys:
        raise UserError(f"{path}: an SDXL embedding (clip_l and clip_g); this model has one text encoder")
    layout = embedding_layout(path)
    if layout is None:
        raise UserError(f"{path}: not an embedding file (expected ours, diffusers' {{token: vectors}} or"
                        f" A1111's {TENSOR}; found {len(keys)} tensors, e.g. {shown(sorted(keys)[:1], 60)})")
    return layout, path


def _ours_from_blob(tensor, meta: dict[str, str], where: object) -> Embedding | None:
    """Our Embedding from the ``lora4diffusion`` entry another layout's file carries, if any."""
    if BLOB_KEY not in meta:
        return None
    try:
        ours = json.loads(meta[BLOB_KEY])
    except (ValueError, RecursionError):
        raise UserError(f"{where}: malformed '{BLOB_KEY}' metadata (not JSON)") from None
    if not isinstance(ours, dict) or not all(isinstance(v, str) for v in ours.values()):
        raise UserError(f"{where}: malformed '{BLOB_KEY}' metadata (not an object of text)")
    reserved = ("format", "version", "token", "vectors", "width", "init_word", "base_fingerprint")
    extra = {k: v for k, v in ours.items() if k not in reserved}
    return Embedding(str(ours.get("token", "")), tensor, ours.get("base_fingerprint", UNKNOWN),
                     ours.get("init_word", ""), extra)


def read_any_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read an embedding of any layout (detected); ``token`` renames it (diffusers' ``token=``). One lying in
    an ``embeddings/`` folder (found by its name, ``catalog.resolve``, or by its path) goes by the token
    <name>, whatever its file says, as AUTOMATIC1111's prompt word is its file's name."""
    item = resolve(path, "embedding")  # a name that is nothing known: the error naming the nearest ones
    layout, file = embedding_path(item)
    name = embedding_name(item)
    if token is None and name is not None:
        token = _token(name, item)
    if layout == "ours":
        emb = read_embedding(file)
    else:
        meta = read_metadata(file)
        key, tensor = next(iter(load_tensors(file).items()))
        tensor = (tensor.unsqueeze(0) if tensor.dim() == 1 else tensor).float()
        emb = _ours_from_blob(tensor, meta, file)
        if emb is None:
            name = key if layout == "diffusers" else meta.get("name") or file.stem
            emb = Embedding(_token(name, file), tensor, extra={"source": layout})
    if token is not None:
        emb.token = token
    return check_embedding(emb, file)


def write_embedding(emb: Embedding, fmt: str, out_dir: str | Path) -> Path:
    """``emb`` as diffusers' learned_embeds.safetensors or an A1111 embedding (``NAME.safetensors``, NAME the
    token without its brackets) in ``out_dir``; returns the file."""
    check_embedding(emb, "embedding")
    require_finite({"vectors": emb.vectors}, f"export-embedding {emb.token}")
    blob = json.dumps(emb.metadata(), sort_keys=True)
    vectors = emb.vectors.detach().float().cpu().contiguous()
    if fmt == "diffusers":
        path = Path(out_dir) / DIFFUSERS_FILE
        save_tensors(path, {emb.token: vectors}, {"format": "pt", BLOB_KEY: blob})
        return path
    if fmt == "a1111":
        name = emb.token.strip("<>")
        meta = {"name": name, BLOB_KEY: blob, "format": "pt"}
        for ours, theirs in (("steps", "step"), ("base", "sd_checkpoint_name")):
            if ours in emb.extra:
                meta[theirs] = emb.extra[ours]
        path = Path(out_dir) / f"{name}.safetensors"
        save_tensors(path, {TENSOR: vectors}, meta)
        return path
    raise UserError(f"unknown embedding format {fmt!r} (choose {', '.join(EMBEDDING_FORMATS)})")


__all__ = ["DIFFUSERS_FILE", "EMBEDDING_FORMATS", "embedding_path", "read_any_embedding", "write_embedding"]
