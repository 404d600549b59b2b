"""Embeddings for ``serve``: the textual-inversion files the page can use, and which tokens a request needs.

The embeddings are found as ``sample`` finds them by name (catalog.embedding_folders): ``--adapters
DIR``/embeddings, ./embeddings, the shipped ones; each goes by the token ``<name>`` of its file or folder
name, as AUTOMATIC1111's embeddings folder names them. A request never names an embedding: its prompt does.
A token ``<name>`` in the prompt (or the negative prompt) brings the embedding of that name, as a
``<lora:...>`` tag brings its adapter, and a pivotal adapter's tag brings the tokens bundled in its file.
What a request uses is checked before anything is queued (``request_tokens``), against the base's own tokens
only, and each job puts its own tokens' vectors in place (``place_token``), so a request gets the same images
whatever earlier requests loaded.
"""

from __future__ import annotations

import copy
import difflib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lora4diffusion.captions import PLACEHOLDER
from lora4diffusion.catalog import EMBEDDINGS_FOLDER, PRETRAINED, embedding_folders, named_embeddings
from lora4diffusion.errors import UserError
from lora4diffusion.formats.embeddings import embedding_path, read_any_embedding
from lora4diffusion.lora.adapters import UNKNOWN
from lora4diffusion.lora.embeddings import Embedding, add_token
from lora4diffusion.models.tokenizer import Tokenizer


@dataclass
class EmbeddingInfo:
    name: str
    path: Path  # the file or folder found by name
    source: str  # "folder" (--adapters DIR/embeddings) | "working folder" (./embeddings) | "shipped"
    embedding: Embedding | None  # None: unreadable (reason says why)
    fits: bool | None  # None: no fingerprint recorded (imported from another tool), the width is checked
    reason: str = ""

    @property
    def token(self) -> str:
        return self.embedding.token if self.embedding is not None else f"<{self.name.lower()}>"

    def public(self, loaded: bool) -> dict:
        emb = self.embedding
        return {"name": self.name, "token": self.token, "source": self.source,
                "vectors": emb.num_vectors if emb is not None else 0,
                "style": (emb.extra.get("style", "") if emb is not None else "").rsplit("/", 1)[-1],
                "fits": self.fits, "reason": self.reason, "loaded": loaded}


class EmbeddingRegistry:
    """The embeddings the page may use, by token, read once per file version (a small file: its vectors)."""

    def __init__(self, adapters: Path | None, fingerprint: str, width: int):
        self.folders = embedding_folders(adapters)
        self.fingerprint, self.width = fingerprint, width  # the loaded base's (pipe_fingerprint), its D
        self._cache: dict[Path, tuple[int, EmbeddingInfo]] = {}
        self._lock = threading.Lock()

    def _source(self, path: Path) -> str:
        if path.parent == self.folders[0]:
            return "folder"
        return "shipped" if path.parent == PRETRAINED / EMBEDDINGS_FOLDER else "working folder"

    def _info(self, name: str, path: Path) -> EmbeddingInfo:
        try:
            _, file = embedding_path(path)
            mtime = file.stat().st_mtime_ns
        except (OSError, UserError) as e:
            return EmbeddingInfo(name, path, self._source(path), None, False, str(e).split(": ")[-1])
        hit = self._cache.get(path)
        if hit and hit[0] == mtime:
            return hit[1]
        try:
            emb = read_any_embedding(path)  # in an embeddings/ folder: the token <name>
        except UserError as e:
            info = EmbeddingInfo(name, path, self._source(path), None, False, str(e).split(": ")[-1])
        else:
            fits = None if emb.fingerprint == UNKNOWN else emb.fingerprint == self.fingerprint
            reason = "" if fits is not False else f"trained on another base ({emb.fingerprint[:12]})"
            if emb.vectors.shape[1] != self.width:
                fits, reason = False, f"vectors of width {emb.vectors.shape[1]}, this base's are {self.width}"
            info = EmbeddingInfo(name, path, self._source(path), emb, fits, reason)
        self._cache[path] = (mtime, info)
        return info

    def all(self) -> dict[str, EmbeddingInfo]:
        """Token -> the embedding found by that name (the first folder's wins a clash)."""
        with self._lock:
            found: dict[str, EmbeddingInfo] = {}
            for name, path in named_embeddings(self.folders).items():
                if PLACEHOLDER.fullmatch(f"<{name.lower()}>"):  # a name no prompt can write: not listed
                    info = self._info(name, path)
                    found.setdefault(info.token, info)
            return found


def bundled_vectors(adapters: dict[str, dict[str, int]]) -> dict[str, tuple[str, int]]:
    """Token -> (adapter, vectors) of the tokens the named adapters bundle (pivotal tuning); a token two of
    them bundle is a UserError (one set of vectors per token)."""
    out: dict[str, tuple[str, int]] = {}
    for name, tokens in adapters.items():
        for token, n in tokens.items():
            if token in out:
                raise UserError(f"adapters {out[token][0]!r} and {name!r} both bring token {token}; use one")
            out[token] = (name, n)
    return out


def request_tokens(texts: list[str], base: Tokenizer, bundled: dict[str, tuple[str, int]],
                   available: dict[str, EmbeddingInfo]) -> tuple[Tokenizer, dict[str, str]]:
    """The tokens a request's prompts use, each from its source: the base's own, an adapter the request names
    (``bundled``: token -> (adapter, vectors)), else the embedding of that name (``available``). Returns (the
    base's tokenizer with those tokens added, to check the prompts with; token -> the embedding's name for
    those that come from an embeddings folder). A token of no source is a UserError naming the nearest."""
    wanted = base.unknown_tokens(texts)
    check = copy.deepcopy(base)
    from_folder: dict[str, str] = {}
    for token in wanted:
        if token in bundled:
            check.add_token(token, bundled[token][1])
            continue
        info = available.get(token)
        if info is None:
            known = [*base.added, *bundled, *available]
            near = difflib.get_close_matches(token, known, n=3, cutoff=0.5)
            hint = f"nearest: {', '.join(near)}" if near else "no known token is close"
            raise UserError(f"unknown token {token!r} in the prompt: no embedding of that name, and no"
                            f" adapter of the prompt brings it ({hint})")
        if info.embedding is None or info.fits is False:
            raise UserError(f"embedding {info.name!r} ({token}) cannot be used: {info.reason}")
        check.add_token(token, info.embedding.num_vectors)
        from_folder[token] = info.name
    return check, from_folder


def place_token(text_encoder, tokenizer: Tokenizer, token: str, vectors: torch.Tensor) -> None:
    """Make ``token`` stand for ``vectors`` in the shared model: added the first time, its vectors set in
    place afterwards (as each job sets every adapter's weight), so each request gets exactly the vectors its
    own sources hold. A token cannot change its number of vectors while the server runs (ids are in order)."""
    vectors = vectors.detach().float()
    if token not in tokenizer.added:
        add_token(text_encoder, tokenizer, token, vectors.to(text_encoder.token_embedding.weight.device))
        return
    param = text_encoder.added_tokens.vector(token)
    if param.shape != vectors.shape:
        raise UserError(f"token {token} is loaded with {param.shape[0]} vector(s), this source has"
                        f" {vectors.shape[0]}: restart the server to use it")
    with torch.no_grad():
        param.copy_(vectors)


__all__ = ["EmbeddingInfo", "EmbeddingRegistry", "bundled_vectors", "place_token", "request_tokens"]
