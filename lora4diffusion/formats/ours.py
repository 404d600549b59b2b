"""Our own adapter settings, carried inside foreign LoRA files so that ours -> X -> ours is exact.

diffusers' and kohya's files hold the LoRA factors A, B (bit for bit) and their own idea of alpha; our
Adapter also has a scale rule (rsLoRA), an init record, dropout, the base fingerprint and the caller's
metadata (style, trigger words, ...). All of it goes, as the JSON of ``Adapter.metadata()``, into one
safetensors metadata entry ``lora4diffusion``; other tools ignore it, our reader restores it.
"""

from __future__ import annotations

import json
import logging

import torch

from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import METHOD_KEY, OPTIONS_KEY, Adapter, check_adapter, parse_metadata
from lora4diffusion.lora.prompt_lora import TRIGGER_KEY, trigger_words  # one parser of the trigger entry
from lora4diffusion.schema import shown

log = logging.getLogger("lora4diffusion")
META_KEY = "lora4diffusion"
_RESERVED = frozenset({*Adapter({}, 1, 1.0).metadata(), METHOD_KEY, OPTIONS_KEY})  # the rest: the caller's


def blob(adapter: Adapter) -> str:
    return json.dumps(adapter.metadata(), sort_keys=True)


def from_blob(tensors: dict[str, torch.Tensor], text: str, where: object) -> Adapter:
    """An Adapter from our tensor names and the ``lora4diffusion`` metadata entry: the same settings, parsed
    and checked by the same function as an adapter.safetensors header (``parse_metadata``)."""
    try:
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError):
            raise UserError(f"not JSON ({shown(text)})") from None
        if not isinstance(meta, dict):
            raise UserError(f"expected a JSON object, got {shown(meta)}")
        odd = next((k for k, v in meta.items() if not isinstance(v, str)), None)
        if odd is not None:  # Adapter.metadata() is text -> text, as safetensors metadata
            raise UserError(f"{shown(odd)} must be text, got {shown(meta[odd])}")
        settings = parse_metadata(meta)
    except UserError as e:
        raise UserError(f"{where}: malformed '{META_KEY}' metadata ({e})") from None
    order = settings.pop("targets")
    extra = {k: v for k, v in meta.items() if k not in _RESERVED}
    adapter = Adapter(tensors, extra=extra, **settings)
    if set(order) == set(adapter.modules):  # the file's tensor order is sorted: restore the model's
        adapter.tensors = {f"{m}.{k}": t for m in order for k, t in adapter.module_tensors(m).items()}
    return check_adapter(adapter, where)


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
