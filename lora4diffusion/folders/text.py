"""A prompt model's text parts: text_encoder.safetensors (CLIPTextModel's names minus prefixes) and
tokenizer/ (vocab.txt + config.json, models/tokenizer.py), named in the model's config.json; and the added
tokens it knows (a merged pivotal adapter's, textual inversion's): embeddings/NAME.safetensors, one embedding
file each (lora/embeddings.py), named in config.json's "embeddings" list and loaded with the text encoder.

Why beside, not inside: an added token's ids come after every id of the exported CLIP vocabulary (its BPE
pieces included), and the tokenizer's vocab.txt holds words only. Rows in text_encoder.safetensors and a line
in vocab.txt would change both files' layout (and the CLIP export's); an embedding file beside them leaves the
base's files exactly as every reader knows them, is the file other tools read (export-embedding), and a reader
that does not know the "embeddings" entry still loads the model (without the token).
"""

from __future__ import annotations

from pathlib import Path

from lora4diffusion.catalog import EMBEDDINGS_FOLDER, inside
from lora4diffusion.checkpoint import load_weights, save_tensors
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import UNKNOWN
from lora4diffusion.lora.embeddings import TENSOR, Embedding, add_token, read_embedding
from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.schema import shown

TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"
TOKENIZER_FOLDER = "tokenizer"


MAX_TOKENS = 64  # added tokens a model folder may name


def save_text_parts(directory: str | Path, text_encoder: TextEncoder, tokenizer: Tokenizer,
                    fingerprint: str = UNKNOWN) -> dict:
    """Write text_encoder.safetensors, tokenizer/ and, for each added token, embeddings/NAME.safetensors
    (recording ``fingerprint``, the model's) into ``directory``; returns the config.json entries."""
    directory = Path(directory)
    weights = {k: v.float() for k, v in text_encoder.state_dict().items()}
    save_tensors(directory / TEXT_ENCODER_WEIGHTS, weights)
    tokenizer.save(directory / TOKENIZER_FOLDER)
    entries = {
        "text_encoder": {"config": text_encoder.cfg.to_dict(), "weights": TEXT_ENCODER_WEIGHTS},
        "tokenizer": {"folder": TOKENIZER_FOLDER},
    }
    files = []
    for token in text_encoder.added_tokens.tokens:
        name = f"{EMBEDDINGS_FOLDER}/{token[1:-1]}.safetensors"  # in embeddings/: it goes by <name>
        emb = Embedding(token, text_encoder.added_tokens.vector(token).detach().float().cpu().contiguous(),
                        fingerprint, extra={"part_of": "the model folder beside it"})
        save_tensors(directory / name, {TENSOR: emb.vectors}, emb.metadata())
        files.append(name)
    if files:
        entries["embeddings"] = files
    return entries


def embedding_parts(directory: str | Path, config: dict) -> list[Path]:
    """The embedding files config.json's "embeddings" names (each inside the model folder); [] for none."""
    names = config.get("embeddings", [])
    where = Path(directory) / "config.json"
    if not isinstance(names, list) or len(names) > MAX_TOKENS:
        raise UserError(f"{where}: embeddings must be a list of at most {MAX_TOKENS} paths, got"
                        f" {shown(names)}")
    return [inside(directory, name, f"{where}: embeddings") for name in names]


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
    for path in embedding_parts(directory, config):  # the folder's own tokens: no fingerprint to check
        emb = read_embedding(path)
        add_token(text_encoder, tokenizer, emb.token, emb.vectors)
    return text_encoder.eval(), tokenizer
