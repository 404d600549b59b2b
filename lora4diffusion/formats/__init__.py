"""File formats: our adapter files <-> PEFT, diffusers and kohya LoRA files; our model <-> a diffusers folder.

Arrows point down: ``formats`` imports ``lora`` and ``models``, never the reverse. ``read_any`` is the one
entry for reading an adapter of any layout; ``Pipeline.add_lora`` (and so every ``--lora``) hands it to
``lora.adapters.load_adapter`` as its reader. Adding a format = a module with ``looks_like(keys)``,
``read(path)`` and ``write(adapter, out)`` plus one line in ``LORA_FORMATS`` and ``_FILE_READERS``.

The kohya layout has two writers and readers: kohya-ss's own LoRA files (kohya.py) and LyCORIS's extension
of them for DoRA, LoHa and LoKr (lycoris.py), told apart by the tensor names (hada_*, lokr_*, dora_scale).
Which methods each layout holds: ``METHODS_BY_FORMAT``.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from lora4diffusion.checkpoint import read_metadata
from lora4diffusion.errors import UserError
from lora4diffusion.formats import diffusers_lora, kohya, lycoris, peft
from lora4diffusion.lora.adapters import ADAPTER_FILE, BUNDLE, FORMAT, Adapter, read_adapter, resolve_adapter

LORA_FORMATS = ("diffusers", "kohya", "peft")
_FILE_READERS = {"diffusers": diffusers_lora, "kohya": kohya, "peft": peft}
METHODS_BY_FORMAT = {
    # diffusers 0.42 loads LoRA pairs only from an SD UNet's files: its kohya converter drops dora_scale
    # (loaders/lora_pipeline.py lora_state_dict) and refuses hada_* / lokr_* keys
    # (loaders/lora_conversion_utils.py _convert_non_diffusers_lora_to_diffusers)
    "diffusers": ("lora",),
    "kohya": ("lora", "dora", "loha", "lokr"),  # LyCORIS's names for the last three (lycoris.py)
    "peft": ("lora", "dora", "loha", "lokr"),  # LoraConfig (use_dora), LoHaConfig, LoKrConfig
}
_WHY_NOT = {
    "diffusers": "diffusers loads LoRA pairs only from this layout (it drops a kohya file's dora_scale and"
                 " refuses hada_/lokr_ keys for an SD UNet); write kohya or peft instead",
    # OFT: LyCORIS's diag-oft and PEFT's OFT files exist, but are not written yet (ours only)
    "kohya": "that layout holds LoRA, DoRA, LoHa and LoKr",
    "peft": "that layout holds LoRA, DoRA, LoHa and LoKr",
}


def _keys(path: Path) -> list[str]:
    read_metadata(path)  # a corrupt file: one line naming it
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def detect(path: str | Path) -> tuple[str, Path]:
    """(layout, file or folder to read): ours | peft | diffusers | kohya; unknown or mixed layouts refused."""
    path = resolve_adapter(path)
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return "ours", path / ADAPTER_FILE
        if peft.is_folder(path):
            return "peft", path
        found = sorted(path.glob("*.safetensors"))
        if (path / diffusers_lora.WEIGHTS).is_file():
            found = [path / diffusers_lora.WEIGHTS]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise UserError(
                f"{path}: {what} LoRA files found (expected {ADAPTER_FILE}, a PEFT folder, or one"
                " .safetensors file)"
            )
        path = found[0]
    if not path.is_file():
        raise UserError(f"adapter {path}: file not found")
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: only .safetensors LoRA files are read (no pickled .bin/.pt/.ckpt)")
    if read_metadata(path).get("format") == FORMAT:
        return "ours", path
    keys = [k for k in _keys(path) if not k.startswith(BUNDLE)]  # A1111's bundled embeddings: any layout
    hits = [name for name, mod in _FILE_READERS.items()
            if mod.looks_like(keys) or (name == "kohya" and lycoris.looks_like(keys))]
    if len(hits) > 1:
        raise UserError(f"{path}: mixed LoRA layouts in one file ({' and '.join(hits)} keys)")
    if not hits:
        example = keys[0] if keys else "no tensors"
        raise UserError(
            f"{path}: unknown LoRA layout (first key {example!r}); expected ours, PEFT, diffusers or kohya"
        )
    if hits == ["peft"]:
        if not (path.parent / "adapter_config.json").is_file():
            raise UserError(f"{path}: PEFT weights without their adapter_config.json beside them")
        return "peft", path.parent
    kinds = {"diffusers": r"\.lora_[AB]\.", "kohya": r"\.(lora_down|lora_up|lora_mid)\.weight$|\.alpha$"
             r"|\.dora_scale$|\.hada_[wt][12](_[ab])?$|\.lokr_[wt][12](_[ab])?$"}
    stray = [k for k in keys if not re.search(kinds[hits[0]], k)]
    if stray:
        raise UserError(f"{path}: mixed LoRA layouts in one file ({hits[0]} keys and {stray[0]!r})")
    return hits[0], path


def read_any(path: str | Path) -> Adapter:
    """Read an adapter of any supported layout as our Adapter (module names translated to ours)."""
    layout, where = detect(path)
    if layout == "ours":
        return read_adapter(where)
    if layout == "kohya" and lycoris.looks_like(_keys(where)):
        return lycoris.read(where)
    return _FILE_READERS[layout].read(where)


def write_lora(adapter: Adapter, fmt: str, out_dir: str | Path, title: str = "adapter") -> Path:
    """Write ``adapter`` as ``fmt`` (diffusers | kohya | peft) in ``out_dir``; returns the file or folder.

    A method a layout cannot hold (``METHODS_BY_FORMAT``) is refused rather than written under other names;
    so is what one layout cannot say of a method (PEFT: DoRA's input norm axis), before anything is written.
    """
    out_dir = Path(out_dir)
    if fmt in METHODS_BY_FORMAT and adapter.method not in METHODS_BY_FORMAT[fmt]:
        article = "an" if adapter.method[:1] in "aeiou" else "a"
        raise UserError(f"{article} {adapter.method} adapter cannot be written as {fmt}: {_WHY_NOT[fmt]}")
    if adapter.embeddings and (fmt != "kohya" or adapter.method != "lora"):
        raise UserError(f"the adapter carries tokens ({', '.join(adapter.embeddings)}, pivotal tuning) that"
                        " only the kohya layout of a LoRA holds here (A1111's bundle_emb); write --format"
                        " kohya")
    if fmt == "diffusers":
        return diffusers_lora.write(adapter, out_dir)
    if fmt == "kohya":
        writer = kohya.write if adapter.method == "lora" else lycoris.write
        return writer(adapter, out_dir / f"{title}.safetensors", title)
    if fmt == "peft":
        return peft.write(adapter, out_dir)
    raise UserError(f"unknown LoRA format {fmt!r} (choose {', '.join(LORA_FORMATS)})")


__all__ = ["LORA_FORMATS", "METHODS_BY_FORMAT", "detect", "read_any", "write_lora"]
