"""PEFT's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), as ``PeftModel`` saves it.

The converters live in ``lora/adapters.py`` (``export_peft`` / ``import_peft``; each method's PEFT names and
config fields in ``lora/peft_layout.py``: LoRA, DoRA, LoHa, LoKr); this module gives them the same ``write`` /
``read`` / ``looks_like`` shape as the other formats so ``formats.read_any`` can dispatch.
"""

from __future__ import annotations

from pathlib import Path

from lora4diffusion.lora.adapters import Adapter, export_peft, import_peft
from lora4diffusion.lora.peft_layout import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS


def write(adapter: Adapter, out_dir: str | Path) -> Path:
    return export_peft(adapter, out_dir)


def is_folder(path: Path) -> bool:
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


def looks_like(keys: list[str]) -> bool:
    return any(k.startswith(PEFT_PREFIX) for k in keys)


def read(path: str | Path) -> Adapter:
    return import_peft(path)


__all__ = ["PEFT_WEIGHTS", "is_folder", "looks_like", "read", "write"]
