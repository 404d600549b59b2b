"""LoRA on a prompt model (UNet + text encoder): trigger-word captions, prior preservation, text-encoder LoRA.

DreamBooth-LoRA as SD users train it:
- the styled digits are captioned with a rare trigger word in the caption templates ("a handwritten sks
  seven", "the digit 7 in sks style"; captions.captions_for), so the adapter learns "sks = this style";
- ``--prior`` (prior preservation, Ruiz et al. 2023, eq. 2) adds to every step a second half batch of PLAIN
  digits with trigger-less captions, whose loss (weight ``prior_weight``) keeps the adapted model answering
  ordinary prompts as the base does: the remedy for LoRAs that act without their trigger;
- ``--text-encoder`` adds LoRA to the text encoder's attention (q/k/v/out_proj) and MLP (fc1/fc2), as
  kohya's ``lora_te_*`` modules, with its own learning rate.

Adapter file names: UNet modules keep exactly the names they have in a label model's adapter
(``down.1.0.attn.attn2.to_q``); text-encoder modules are prefixed ``text_encoder.``
(``text_encoder.layers.0.self_attn.q_proj``). The base fingerprint of a prompt model covers the UNet AND
the text encoder (``prompt_fingerprint``): an adapter is refused on a base whose text encoder differs.
A pivotal-tuning adapter also brings its placeholder token (``Adapter.embeddings``): loading it puts the
token into the tokenizer and the text encoder (lora/embeddings.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from torch import nn

from lora4diffusion.captions import check_trigger
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import (
    UNKNOWN,
    Adapter,
    adapter_settings,
    adapter_tensors,
    base_fingerprint,
    check_fits,
    default_name,
    load_adapter,
    read_adapter,
    resolve_adapter,
)
from lora4diffusion.lora.block_weights import AdapterWeight
from lora4diffusion.lora.embeddings import Embedding, load_embedding
from lora4diffusion.lora.layers import adapter_names, lora_layers, set_adapter_weight, set_adapter_weights
from lora4diffusion.models.prompt_unet import TextConditionedUNet

log = logging.getLogger("lora4diffusion")
TE_PREFIX = "text_encoder."
# CLIP's attention and MLP linears in every encoder layer (kohya's lora_te targets: CLIPAttention, CLIPMLP)
TE_TARGETS = r"re:layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
TRIGGER_KEY = "trigger_words"  # Adapter.extra entry: a JSON list of words (kohya exports it as metadata)


# ------------------------------------------------------------------------------------------ adapters
def prompt_fingerprint(unet: nn.Module, text_encoder: nn.Module) -> str:
    """The base fingerprint of a prompt model: UNet config + UNet and text-encoder base weights."""
    return base_fingerprint(TextConditionedUNet(unet, text_encoder))


def adapter_from_prompt_model(model: nn.Module, fingerprint: str, name: str = "default") -> Adapter:
    """One Adapter from a TextConditionedUNet's adapted layers: UNet names bare, text encoder's prefixed."""
    layers = [m for m in lora_layers(model).values() if name in m.adapters]
    if not layers:
        raise UserError(f"the model has no adapter named {name!r}")
    settings = adapter_settings(layers, name)
    tensors = {**adapter_tensors(model.unet, name), **adapter_tensors(model.text_encoder, name, TE_PREFIX)}
    return Adapter(tensors, fingerprint=fingerprint, **settings)


def split_adapter(adapter: Adapter) -> tuple[Adapter | None, Adapter | None]:
    """(UNet part, text-encoder part with the prefix removed); None for a part with no modules."""
    def part(keep: Callable[[str], bool], rename: Callable[[str], str]) -> Adapter | None:
        tensors = {rename(k): v for k, v in adapter.tensors.items() if keep(k)}
        if not tensors:
            return None
        return Adapter(tensors, adapter.rank, adapter.alpha, adapter.rslora, adapter.init, adapter.dropout,
                       UNKNOWN, dict(adapter.extra), adapter.method, dict(adapter.options))

    return (part(lambda k: not k.startswith(TE_PREFIX), lambda k: k),
            part(lambda k: k.startswith(TE_PREFIX), lambda k: k[len(TE_PREFIX):]))


def trigger_words(adapter: Adapter) -> list[str]:
    """The adapter's trigger words: its ``trigger_words`` entry, a JSON list of words (or, from other tools,
    comma-separated text). Entries that are not words (numbers, lists, deep nesting) are left out."""
    raw = adapter.extra.get(TRIGGER_KEY)
    if not raw or not isinstance(raw, str):
        return []
    try:
        words = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (kohya's "a, b"), too deep, or a 5000-digit number
        words = raw.split(",")
    words = words if isinstance(words, list) else [words] if isinstance(words, str) else []
    return [w.strip() for w in words if isinstance(w, str) and w.strip()]


def load_prompt_adapter(unet: nn.Module, text_encoder: nn.Module, path, weight: float = 1.0,
                        force: bool = False, reader: Callable | None = None, name: str | None = None,
                        tokenizer=None) -> tuple[str, Adapter]:
    """Load an adapter (any layout ``reader`` reads) into a prompt model's UNet and text encoder under one
    name; the fingerprint is checked against the whole prompt model. Its bundled tokens (pivotal tuning) go
    into ``tokenizer`` and the text encoder first. Returns (name, adapter)."""
    if isinstance(path, Adapter):
        adapter, where = path, "adapter"
    else:
        path = resolve_adapter(path)
        adapter, where = (reader or read_adapter)(path), str(path)
    if adapter.fingerprint != UNKNOWN:
        mine = prompt_fingerprint(unet, text_encoder)
        if adapter.fingerprint != mine and not force:
            raise UserError(f"{where}: adapter was trained on a different base model (fingerprint "
                            f"{adapter.fingerprint[:12]}, this base {mine[:12]}); use --force to load anyway")
        if adapter.fingerprint != mine:
            log.warning("%s: loading an adapter trained on a different base model (--force)", where)
    unet_part, te_part = split_adapter(adapter)
    if name is None:
        name = "default" if where == "adapter" else default_name(unet, path)
    if te_part is not None:  # check the text-encoder part fits before the UNet is touched
        check_fits(text_encoder, te_part, where)
    if adapter.embeddings and tokenizer is None:
        raise UserError(f"{where}: the adapter brings tokens ({', '.join(adapter.embeddings)}): load it with"
                        " its base's tokenizer")
    mine = prompt_fingerprint(unet, text_encoder) if adapter.embeddings else UNKNOWN
    for token, vectors in adapter.embeddings.items():
        emb = Embedding(token, vectors, adapter.fingerprint)
        load_embedding(text_encoder, tokenizer, emb, mine, where, force=True)  # fingerprint checked above
    if unet_part is not None:
        load_adapter(unet, unet_part, name, weight)
    if te_part is not None:
        load_adapter(text_encoder, te_part, name, weight)
    return name, adapter


def set_prompt_adapter_weight(unet: nn.Module, text_encoder: nn.Module | None, name: str,
                              weight: float | AdapterWeight) -> None:
    """Adapter ``name``'s weight: one number for every module, or an ``AdapterWeight`` (text encoder, UNet,
    UNet blocks: lora/block_weights.py). ``text_encoder`` None: a label model's UNet alone."""
    found = False
    for part in (unet, text_encoder):
        if part is None or not any(name in m.adapters for m in lora_layers(part).values()):
            continue
        if isinstance(weight, AdapterWeight):
            te = part is text_encoder
            set_adapter_weights(part, name, lambda path, te=te: weight.module(path, text_encoder=te))
        else:
            set_adapter_weight(part, name, weight)
        found = True
    if not found:
        have = [n for part in (unet, text_encoder) if part is not None for n in adapter_names(part)]
        raise UserError(f"the model has no adapter named {name!r} (have {list(dict.fromkeys(have))})")


def missing_triggers(triggers: dict[str, list[str]], prompts: list[str]) -> list[tuple[str, str]]:
    """(adapter name, prompt) for each loaded adapter whose trigger words appear in none of a prompt's words;
    ``prompts`` are the prompts without their tags."""
    out = []
    for name, words in triggers.items():
        if not words:
            continue
        for p in prompts:
            if not set(words) & set(p.lower().replace(",", " ").split()):
                out.append((name, p))
                break
    return out


# ------------------------------------------------------------------------------------------ training
def check_trigger_in(trigger: str, tokenizer) -> str:
    """A trigger must be a reserved rare word (captions.check_trigger) AND a word of the base's vocabulary."""
    word = check_trigger(trigger)
    if word not in tokenizer.words:
        raise UserError(f"trigger {trigger!r} is not in the base model's vocabulary ({tokenizer.source})")
    return word


__all__ = ["TE_PREFIX", "TE_TARGETS", "adapter_from_prompt_model", "check_trigger_in",
           "load_prompt_adapter", "missing_triggers", "prompt_fingerprint", "set_prompt_adapter_weight",
           "split_adapter", "trigger_words"]
