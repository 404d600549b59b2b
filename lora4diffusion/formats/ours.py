"""Our own adapter settings, carried inside foreign LoRA files so that ours -> X -> ours is exact.

diffusers' and kohya's files hold the LoRA factors A, B (bit for bit) and their own idea of alpha; our
Adapter also has a scale rule (rsLoRA), an init record, dropout, the base fingerprint and the caller's
metadata (style, trigger words, ...). All of it goes, as the JSON of ``Adapter.metadata()``, into one
safetensors metadata entry ``lora4diffusion``; other tools ignore it, our reader restores it.
"""

from __future__ import annotations

import logging

import torch

from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import BLOB_KEY, adapter_from_blob, settings_blob
from lora4diffusion.lora.prompt_lora import TRIGGER_KEY, trigger_words  # one parser of the trigger entry

log = logging.getLogger("lora4diffusion")
META_KEY = BLOB_KEY
blob = settings_blob  # Adapter -> the entry's text
from_blob = adapter_from_blob  # (our tensors, the entry's text, where) -> Adapter, checked


def common_rank(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], where: object, name=str) -> int:
    """The one rank all modules share (our Adapter has one rank); a module with another is named."""
    ranks: dict[int, str] = {}
    for module, (a, b) in pairs.items():
        if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != b.shape[1]:
            raise UserError(
                f"{where}: module {name(module)}: tensors {tuple(a.shape)}/{tuple(b.shape)} are"
                " not a LoRA pair"
            )
        ranks.setdefault(int(a.shape[0]), module)
    if len(ranks) > 1:
        (r1, m1), (r2, m2) = list(ranks.items())[:2]
        raise UserError(
            f"{where}: modules have different ranks ({name(m1)}: {r1}, {name(m2)}: {r2}); one rank"
            " per adapter is supported"
        )
    return next(iter(ranks))


__all__ = ["META_KEY", "TRIGGER_KEY", "blob", "common_rank", "from_blob", "trigger_words"]
