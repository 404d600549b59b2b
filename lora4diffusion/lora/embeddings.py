"""Textual-inversion embeddings (Gal et al. 2022): a placeholder token's learned vectors, their file, and
putting them in place in a text encoder and its tokenizer.

A new token S* ("<bold-ti>") gets n vectors v_1..v_n in the text encoder's input space; everything else is
frozen, so a prompt without the token gives the base's context bit for bit (models/text_encoder.py
AddedTokens: the vectors are apart from the base's rows and out of its state dict). Training finds
v* = argmin_v E ||eps - eps_theta(z_t, t, c_theta(y(S*)))||^2 (training/embedding.py).

Our file, ``embedding.safetensors``:

    emb_params           [n, D] float32: the token's vectors (kohya's tensor name; AUTOMATIC1111 reads a
                         one-tensor file as an embedding named after the file)
    metadata             format lora4diffusion-embedding, version, token, vectors (n), width (D),
                         init_word, base_fingerprint (the prompt model's, as adapters record it), plus the
                         caller's (style, steps, base, train, ...)

diffusers' and AUTOMATIC1111's own layouts: formats/embeddings.py. A pivotal-tuning adapter carries its
token's vectors in the adapter file (``Adapter.embeddings``, A1111's bundled layout: lora/adapters.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.captions import check_placeholder
from lora4diffusion.checkpoint import load_tensors, path_kind, read_metadata, save_tensors, tensor_header
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import UNKNOWN, check_settings
from lora4diffusion.models.text_encoder import TextEncoder
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.schema import int_text, shown

FORMAT = "lora4diffusion-embedding"
VERSION = 1
EMBEDDING_FILE = "embedding.safetensors"
TENSOR = "emb_params"
_RESERVED = ("format", "version", "token", "vectors", "width", "init_word", "base_fingerprint")


@dataclass
class Embedding:
    token: str  # the placeholder, "<bold-ti>"
    vectors: torch.Tensor  # [n, D]
    fingerprint: str = UNKNOWN  # the base it was trained on (lora.prompt_lora.prompt_fingerprint)
    init_word: str = ""  # the word its vectors started from ("" = the mean of the word rows)
    extra: dict[str, str] = field(default_factory=dict)  # the caller's metadata (style, steps, train, ...)

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "version": str(VERSION), "token": self.token,
                "vectors": str(self.num_vectors), "width": str(int(self.vectors.shape[1])),
                "init_word": self.init_word, "base_fingerprint": self.fingerprint}
        clash = set(self.extra) & set(meta)
        if clash:
            raise ValueError(f"metadata keys {sorted(clash)} are reserved")
        return {**meta, **self.extra}

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/embedding.safetensors``; returns the file."""
        path = Path(directory) / EMBEDDING_FILE
        save_tensors(path, {TENSOR: self.vectors.detach().float().cpu().contiguous()}, self.metadata())
        return path


def check_embedding(emb: Embedding, where: object) -> Embedding:
    """What every reader hands back passes here: a placeholder token, [n, D] finite float vectors with
    1 <= n <= 64, text metadata, a fingerprint of 64 hex digits or 'unknown'."""
    try:
        check_placeholder(emb.token)
        check_settings(1, 1.0, fingerprint=emb.fingerprint)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    v = emb.vectors
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        what = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
        raise UserError(f"{where}: the embedding's vectors have dtype {what}; they must be floats")
    if v.dim() != 2 or not 1 <= v.shape[0] <= 64 or not 1 <= v.shape[1] <= 8192:
        raise UserError(f"{where}: the embedding's vectors have shape {tuple(v.shape)}; expected [n, width]"
                        " with 1 <= n <= 64")
    if not torch.isfinite(v).all():
        raise UserError(f"{where}: the embedding's vectors hold NaN or inf")
    for key, value in emb.extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UserError(f"{where}: metadata {shown(key)} must be text, got {shown(value)}")
    return emb


def embedding_file(path: str | Path) -> Path:
    """Our embedding file, or the folder (a train-embedding run) holding it."""
    path = Path(path)
    if path_kind(path) == "dir":
        path = path / EMBEDDING_FILE
    if path_kind(path) != "file":
        raise UserError(f"embedding {path}: file not found")
    return path


def is_our_embedding(path: str | Path) -> bool:
    return read_metadata(Path(path)).get("format") == FORMAT


def read_embedding(path: str | Path) -> Embedding:
    """Read and check our embedding file (or its folder); the header is checked before the tensor is read."""
    path = embedding_file(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a lora4diffusion embedding (format {shown(meta.get('format'))})")
    if meta.get("version") != str(VERSION):
        raise UserError(f"{path}: unsupported embedding version {shown(meta.get('version'))}")
    missing = [k for k in _RESERVED if k not in meta]
    if missing:
        raise UserError(f"{path}: malformed embedding metadata (missing {', '.join(missing)})")
    header = tensor_header(path)
    if list(header) != [TENSOR]:
        raise UserError(f"{path}: an embedding file holds one tensor, {TENSOR!r}; found {sorted(header)[:4]}")
    try:
        n = int_text(meta["vectors"], "vectors", 1, 64)
        width = int_text(meta["width"], "width", 1, 8192)
    except UserError as e:
        raise UserError(f"{path}: malformed embedding metadata ({e})") from None
    if tuple(header[TENSOR][0]) != (n, width):
        raise UserError(f"{path}: {TENSOR} has shape {tuple(header[TENSOR][0])}, the metadata says"
                        f" {n} x {width}")
    extra = {k: v for k, v in meta.items() if k not in _RESERVED}
    emb = Embedding(meta["token"], load_tensors(path)[TENSOR].float(), meta["base_fingerprint"],
                    meta["init_word"], extra)
    return check_embedding(emb, path)


def init_vectors(text_encoder: TextEncoder, tokenizer: Tokenizer, num_vectors: int,
                 init_word: str | None) -> torch.Tensor:
    """A new token's starting vectors [n, D]: every one the init word's row (diffusers' textual_inversion.py
    copies its initializer token's row the same way), or without one the mean of the word rows."""
    rows = text_encoder.token_embedding.weight.detach().float()
    if init_word:
        word = init_word.strip().lower()
        if word not in tokenizer.words:
            raise UserError(f"--init-word {init_word!r} is not a word of the base's vocabulary"
                            f" ({tokenizer.source})")
        start = rows[tokenizer.words.index(word)]
    else:
        start = rows[: len(tokenizer.words)].mean(0)
    return start.expand(num_vectors, -1).clone()


def add_token(text_encoder: TextEncoder, tokenizer: Tokenizer, token: str,
              vectors: torch.Tensor) -> nn.Parameter:
    """Put ``token`` with ``vectors`` [n, D] into the tokenizer and the text encoder; returns its parameter
    (frozen; set requires_grad to train it). The base's own rows are untouched."""
    if vectors.shape[1] != text_encoder.cfg.width:
        raise UserError(f"token {token}: vectors of width {vectors.shape[1]}, this text encoder's is"
                        f" {text_encoder.cfg.width}")
    tokenizer.add_token(token, int(vectors.shape[0]))
    try:
        return text_encoder.added_tokens.add(token, vectors, tokenizer.clip_vocab_size)
    except UserError:
        tokenizer.remove_token(token)
        raise


def load_embedding(text_encoder: TextEncoder, tokenizer: Tokenizer, emb: Embedding, fingerprint: str,
                   where: object = "embedding", force: bool = False) -> str:
    """Put a checked embedding in place; ``fingerprint`` is the loaded base's (prompt_fingerprint). One
    trained on another base is refused unless ``force``; a token loaded already with the same vectors is
    left as it is (an adapter and --embedding may bring the same one). Returns the token."""
    check_embedding(emb, where)
    if emb.fingerprint not in (UNKNOWN, fingerprint) and not force:
        raise UserError(f"{where}: embedding {emb.token} was trained on a different base model (fingerprint"
                        f" {emb.fingerprint[:12]}, this base {fingerprint[:12]}); use --force to load anyway")
    if emb.token in tokenizer.added:
        have = text_encoder.added_tokens.vector(emb.token).detach().cpu()
        if have.shape == emb.vectors.shape and torch.equal(have, emb.vectors.float().cpu()):
            return emb.token
        raise UserError(f"{where}: token {emb.token} is already loaded with other vectors (one embedding per"
                        " token)")
    device = text_encoder.token_embedding.weight.device
    add_token(text_encoder, tokenizer, emb.token, emb.vectors.float().to(device))
    return emb.token


def embedding_from_model(text_encoder: TextEncoder, token: str, fingerprint: str, init_word: str = "",
                         extra: dict | None = None) -> Embedding:
    """Token ``token``'s current vectors as an Embedding (what train-embedding writes)."""
    vectors = text_encoder.added_tokens.vector(token).detach().float().cpu().clone()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()}
    return Embedding(token, vectors, fingerprint, init_word or "", meta)


__all__ = ["EMBEDDING_FILE", "FORMAT", "TENSOR", "Embedding", "add_token", "check_embedding",
           "embedding_file", "embedding_from_model", "init_vectors", "is_our_embedding", "load_embedding",
           "read_embedding"]
