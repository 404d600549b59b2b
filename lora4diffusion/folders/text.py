"""A prompt model's text parts: text_encoder.safetensors (CLIPTextModel's names minus prefixes) and
tokenizer/ (vocab.txt + config.json, models/tokenizer.py), named in the model's config.json."""

from __future__ import annotations

from pathlib import Path

from lora4diffusion.catalog import inside
from lora4diffusion.checkpoint import load_weights, save_tensors
from lora4diffusion.errors import UserError
from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.schema import shown

TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"
TOKENIZER_FOLDER = "tokenizer"


def save_text_parts(directory: str | Path, text_encoder: TextEncoder, tokenizer: Tokenizer) -> dict:
    """Write text_encoder.safetensors and tokenizer/ into ``directory``; returns the config.json entries."""
    directory = Path(directory)
    weights = {k: v.float() for k, v in text_encoder.state_dict().items()}
    save_tensors(directory / TEXT_ENCODER_WEIGHTS, weights)
    tokenizer.save(directory / TOKENIZER_FOLDER)
    return {
        "text_encoder": {"config": text_encoder.cfg.to_dict(), "weights": TEXT_ENCODER_WEIGHTS},
        "tokenizer": {"folder": TOKENIZER_FOLDER},
    }


def text_parts(directory: str | Path, config: dict) -> tuple[TextEncoderConfig, Path, Path]:
    """(the text encoder's config, its weights file, the tokenizer folder) as a prompt model's config.json
    names them, checked without reading them: the config's fields, and both paths inside the model folder
    (``catalog.inside``: never a path the file chose elsewhere)."""
    directory = Path(directory)
    te_entry, tok_entry = config.get("text_encoder"), config.get("tokenizer")
    if not isinstance(te_entry, dict) or not isinstance(tok_entry, dict):
        raise UserError(f"prompt model {directory}: config.json has no 'text_encoder'/'tokenizer' entries")
    where = directory / "config.json"
    if not isinstance(te_entry.get("config"), dict):
        raise UserError(f"{where}: text_encoder.config must be a JSON object, got"
                        f" {shown(te_entry.get('config'))}")
    try:
        te_cfg = TextEncoderConfig.from_dict(te_entry["config"])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    weights = inside(directory, te_entry.get("weights"), f"{where}: text_encoder.weights")
    folder = inside(directory, tok_entry.get("folder"), f"{where}: tokenizer.folder")
    return te_cfg, weights, folder


def load_text_parts(directory: str | Path, config: dict) -> tuple[TextEncoder, Tokenizer]:
    """The text encoder (eval mode) and tokenizer of a prompt model folder; UserError naming what is wrong."""
    directory = Path(directory)
    te_cfg, weights, folder = text_parts(directory, config)
    tokenizer = Tokenizer.load(folder)
    if (tokenizer.vocab_size, tokenizer.context_length, tokenizer.eos_id) != (
        te_cfg.vocab_size, te_cfg.context_length, te_cfg.eos_token_id
    ):
        raise UserError(f"prompt model {directory}: the tokenizer in {folder} does not fit its text encoder")
    text_encoder = load_weights(lambda: TextEncoder(te_cfg), weights)  # header checked before allocating
    return text_encoder.eval(), tokenizer
