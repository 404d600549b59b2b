"""Names for the shipped models, VAEs and adapters, and the paths they stand for.

:func:`resolve` is the one place a ``--checkpoint``, ``--vae``, ``--lora`` or ``--embedding`` value becomes a
path: an existing path wins; otherwise a shipped name (``base``, ``vae``, ``bold``; an embedding's name also
in an ``embeddings/`` folder, as AUTOMATIC1111 finds them); otherwise a one-line error that suggests the
nearest known names (difflib), as git does for a mistyped command. The CLI, ``Pipeline.load``,
the adapter readers and the server all go through it.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from lora4diffusion.checkpoint import path_kind, read_json, read_metadata, tensor_header
from lora4diffusion.errors import UserError, describe_os_error
from lora4diffusion.schema import shown

PRETRAINED = Path(__file__).parent / "pretrained"
DEFAULT_BASE = "base"  # the prompt-conditioned latent model; "pixel-base" is the label-conditioned pixel one
KINDS = ("model", "vae", "adapter", "embedding")
PLACEHOLDER_NAME = re.compile(r"<[^<>]{1,64}>")  # an embedding named by its token
_FLAG = {"model": "--checkpoint", "vae": "--vae", "adapter": "--lora", "embedding": "--embedding"}
_WHAT = {"model": "model", "vae": "VAE", "adapter": "adapter", "embedding": "embedding"}
# files that make a folder an adapter: ours, PEFT's config, diffusers' LoRA weights (formats/ reads them)
_ADAPTER_FILES = ("adapter.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors")
# ... and an embedding (textual inversion): ours (train-embedding), diffusers' textual_inversion.py output
EMBEDDING_FILES = ("embedding.safetensors", "learned_embeds.safetensors")
EMBEDDING_FORMAT = "lora4diffusion-embedding"
# AUTOMATIC1111's folder of embeddings: an item's name there (file stem or folder name) is its prompt word,
# here the token <name>
EMBEDDINGS_FOLDER = "embeddings"


def embedding_layout(path: Path) -> str | None:
    """'ours' | 'a1111' | 'diffusers' for a textual-inversion file, from its header (no tensor read); None
    for anything else. Ours says so in its metadata; AUTOMATIC1111's holds ``emb_params`` (kohya's name) or
    ``string_to_param.*``; diffusers' ``learned_embeds`` maps ONE token to its vectors ([D] or [n, D]). A
    LoRA file always holds pairs of tensors, so a one-tensor file is never one."""
    if read_metadata(path).get("format") == EMBEDDING_FORMAT:
        return "ours"
    header = tensor_header(path)
    if len(header) != 1:
        return None
    key, (shape, _dtype) = next(iter(header.items()))
    if len(shape) not in (1, 2):
        return None
    return "a1111" if key in ("emb_params", "string_to_param.*") else "diffusers"


def kind_of(path: Path) -> str | None:
    """'model' | 'vae' | 'adapter' | 'embedding' for a folder or file we can read, else None (looks at names,
    the config's format and a .safetensors header only; what the files hold is checked by their readers).
    An embedding is a one-tensor .safetensors file (``embedding_layout``) or a folder holding one of
    EMBEDDING_FILES. An adapter is any other .safetensors file, or a folder holding adapter.safetensors, a
    PEFT adapter_config.json, diffusers' pytorch_lora_weights.safetensors, or (without .json files or
    subfolders) exactly one .safetensors file: the folders ``--lora`` reads. A folder that may not be looked
    into is a UserError ("permission denied")."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "file":
        if path.suffix != ".safetensors":
            return None
        try:
            return "embedding" if embedding_layout(path) else "adapter"
        except UserError:  # unreadable: its reader says why
            return "adapter"
    if kind != "dir":
        return None
    if any(path_kind(path / name) == "file" for name in _ADAPTER_FILES):
        return "adapter"
    if any(path_kind(path / name) == "file" for name in EMBEDDING_FILES):
        return "embedding"
    if folder_config(path).get("format") == "lora4diffusion-vae":  # a VAE folder holds model.safetensors too
        return "vae"
    if path_kind(path / "model.safetensors") == "file":
        return "model"
    try:  # a downloaded LoRA's folder: x.safetensors, a preview, a README (no configs, no subfolders)
        entries = [(p.suffix, path_kind(p)) for p in path.iterdir()]
    except OSError as e:
        raise UserError(f"{path}: cannot read ({describe_os_error(e)})") from None
    if entries.count((".safetensors", "file")) == 1 and all(k != "dir" and s != ".json" for s, k in entries):
        return kind_of(next(path.glob("*.safetensors")))  # an adapter, or an embedding
    return None


def folder_config(folder: Path) -> dict:
    """A folder's config.json as a dict; {} where there is none or it is not a readable JSON object (the
    size limit, depth and permission checks of ``checkpoint.read_json``)."""
    try:
        return read_json(Path(folder) / "config.json")
    except UserError:
        return {}


def shipped(kind: str) -> dict[str, Path]:
    """The shipped items of ``kind`` by name: models and VAEs are folders of ``pretrained/``, adapters the
    folders of ``pretrained/adapters/``."""
    if kind in ("adapter", "embedding"):
        root = PRETRAINED / f"{kind}s"
        items = sorted(root.glob("*")) if root.is_dir() else []
        return {(p.stem if p.is_file() else p.name): p for p in items if kind_of(p) == kind}
    found = {p.name: p for p in sorted(PRETRAINED.glob("*")) if p.is_dir() and kind_of(p) == kind}
    return found


def embeddings_in(folder: str | Path) -> dict[str, Path]:
    """The embeddings directly in ``folder`` by name: a one-tensor .safetensors file by its stem, a folder
    holding one (a train-embedding run, diffusers' output) by its name; {} where there is no such folder. An
    entry that cannot be read (``kind_of`` raises) is left to its reader to report."""
    folder = Path(folder)
    if path_kind(folder) != "dir":
        return {}
    found: dict[str, Path] = {}
    try:
        items = sorted(folder.iterdir())
    except OSError:
        return {}
    for p in items:
        try:
            if p.name.startswith(".") or kind_of(p) != "embedding":
                continue
        except UserError:
            continue
        found.setdefault(p.stem if path_kind(p) == "file" else p.name, p)
    return found


def embedding_name(item: str | Path) -> str | None:
    """The name an embedding lying directly in an ``embeddings/`` folder goes by (its file's stem, or its
    folder's name), as AUTOMATIC1111 names everything in its embeddings folder; None elsewhere."""
    item = Path(item).absolute()
    if item.parent.name != EMBEDDINGS_FOLDER:
        return None
    return item.stem if path_kind(item) == "file" else item.name


def embedding_folders(adapters: str | Path | None = None) -> list[Path]:
    """Where an embedding is found by its name (first match wins), as AUTOMATIC1111 finds its embeddings:
    ``adapters``/embeddings (``serve --adapters DIR``), then ./embeddings (the working folder, as A1111's
    embeddings/ beside its models), then the shipped ones (pretrained/embeddings, beside the shipped
    adapters)."""
    first = [Path(adapters) / EMBEDDINGS_FOLDER] if adapters is not None else []
    return [*first, Path(EMBEDDINGS_FOLDER), PRETRAINED / EMBEDDINGS_FOLDER]


def named_embeddings(folders: list[Path] | None = None) -> dict[str, Path]:
    """Name -> path of every embedding in ``folders`` (default ``embedding_folders()``); an earlier folder's
    item wins a clash of names."""
    found: dict[str, Path] = {}
    for folder in embedding_folders() if folders is None else folders:
        for name, p in embeddings_in(folder).items():
            found.setdefault(name, p)
    return found


def suggest(name: str, known: list[str]) -> str:
    """'; did you mean X? (known: a, b, c)' or '; nothing of that kind is shipped'."""
    if not known:
        return ""
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{hint} (known: {', '.join(known)}; `lora4diffusion list` shows them)"


def resolve(value: str | Path | None, kind: str, default: str | None = None) -> Path:
    """A ``--checkpoint`` / ``--vae`` / ``--lora`` / ``--embedding`` value -> a path: an existing path, else a
    shipped name (an embedding's name or its token ``<name>``, also one in ./embeddings: named_embeddings).

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
    names = named_embeddings() if kind == "embedding" else shipped(kind)
    if kind == "embedding" and PLACEHOLDER_NAME.fullmatch(str(value)):  # "<bold-ti>": the name bold-ti
        value = str(value)[1:-1]
    if str(value) in names:
        return names[str(value)]
    what = _WHAT[kind]
    other = next((k for k in KINDS if k != kind and str(value) in shipped(k)), None)
    if other is not None:  # `--vae pixel-base`: a name we know, of another kind
        known = ", ".join(names) or "none"
        article = "an" if kind in ("adapter", "embedding") else "a"
        raise UserError(f"{_FLAG[kind]} {value}: {value} is a shipped {_WHAT[other]} (for {_FLAG[other]}),"
                        f" not {article} {what} (shipped {what}s: {known})")
    missing = "file not found" if kind in ("adapter", "embedding") else "does not exist"
    where = f", nor one in {EMBEDDINGS_FOLDER}/" if kind == "embedding" else ""
    if "/" in str(value) or os.sep in str(value):  # clearly a path: no name to suggest
        raise UserError(f"{_FLAG[kind]} {value}: {missing}")
    raise UserError(
        f"{_FLAG[kind]} {value}: {missing} (no such file or folder, and no shipped {what} of that name"
        f"{where})"
        + suggest(str(value), list(names))
    )


def inside(folder: str | Path, name: object, what: str) -> Path:
    """``folder``/``name``, where ``name`` is a part's path that a file in ``folder`` chose (config.json's
    ``"vae": {"folder": "vae"}``): a relative path without '..' whose real location (symbolic links
    followed) lies inside ``folder``. Parts of a model folder are read only from inside it, never from a path
    a downloaded file chose; anything else is a UserError naming ``what`` (the file and the key)."""
    if not isinstance(name, str) or not name.strip() or "\0" in name or len(name) > 255:
        raise UserError(f"{what} must be a path inside {folder}, got {shown(name, 80)}")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\", "~")) or ":" in parts[0] or ".." in parts:
        raise UserError(f"{what} {shown(name, 80)} is not a path inside {folder}: parts of a model are read"
                        " only from inside its folder (no absolute path, no '..')")
    root = Path(folder).resolve()
    try:
        real = (Path(folder) / name).resolve()
    except (OSError, RuntimeError) as e:  # a symbolic-link loop
        raise UserError(f"{what} {shown(name, 80)}: cannot follow it (a symbolic-link loop: {e})") from None
    if real != root and root not in real.parents:
        raise UserError(f"{what} {shown(name, 80)} leads outside {folder} (to {real}, through a symbolic"
                        " link): parts of a model are read only from inside its folder")
    return Path(folder) / name


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
