"""Deprecated: LoRA training moved to ``lora4diffusion.training.lora`` (the training layer). This module
re-exports what the README showed (``train_lora``, ``LoRAConfig``) for one release, then goes away."""

import warnings

from lora4diffusion.training.lora import LoRAConfig, train_lora

warnings.warn(
    "lora4diffusion.lora.finetune is deprecated: import train_lora and LoRAConfig from"
    " lora4diffusion.training.lora",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["LoRAConfig", "train_lora"]
