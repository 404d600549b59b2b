"""A word-level tokenizer over a small fixed vocabulary, written so CLIP's BPE tokenizer reproduces it.

Stable Diffusion turns a prompt into token ids with CLIP's byte-pair-encoding tokenizer (Radford et al. 2021):
lower-case, split into pieces, BPE-merge each piece, wrap in <|startoftext|> ... <|endoftext|>, pad to 77.
Our prompts use a few dozen words, so BPE would only hide them: here every piece must be a whole vocabulary
word and gets that word's id. The splitting is CLIP's own, so the same text gives the same pieces:

    NFC, lower-case, then CLIP's pre-tokenizer regex
        's|'t|'re|'ve|'m|'ll|'d | [\\p{L}]+ | [\\p{N}] | [^\\s\\p{L}\\p{N}]+
    i.e. runs of letters, ONE digit at a time ("17" -> "1", "7"), runs of punctuation, whitespace dropped.

Ids (the vocabulary file lists them in order, one token a line; line i is id i):
    0 .. W-1   the words
    W          <|startoftext|>  (bos)
    W+1        <|endoftext|>    (eos; also the padding, as in SD 1.x's tokenizer)
A sequence is [bos, words..., eos, eos, ...] of exactly `context_length` ids.

Why this layout: `clip_bpe_files` writes the vocabulary as CLIP BPE files (vocab.json + merges.txt) in which
the words keep ids 0..W+1 and the BPE-only pieces (letters, word endings) take ids W+2 and up. Those pieces
never come out of a prompt we accept, so (1) the text encoder only needs W+2 embedding rows (the export pads
the rest with zeros), and (2) eos is the largest id in every valid sequence: the pooled end-of-text state is
the same whether a reader picks it as "first id == eos" (transformers' CLIPTextModel with eos_token_id set)
or as "argmax of the ids" (the original CLIP / open_clip code and transformers' legacy branch).

Added tokens (textual inversion, Gal et al. 2022; lora/embeddings.py): ``add_token("<bold-ti>", n)`` gives a
placeholder token n ids after every id of the exported CLIP vocabulary, the ids CLIPTokenizer.add_tokens
gives it (diffusers' load_textual_inversion: "<bold-ti>", "<bold-ti>_1", ...). It is matched in the
normalised prompt before CLIP's splitting, as added tokens are, and stands for its n ids. Added tokens are
not part of the tokenizer's files: they come with the embedding that defines them.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

from lora4diffusion.captions import PLACEHOLDER, check_placeholder
from lora4diffusion.checkpoint import atomic_write  # lazy: models/ stay free of file plumbing
from lora4diffusion.errors import UserError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"  # CLIP's BPE marks the last piece of a word with this suffix
VOCAB_NAME = "vocab.txt"
CONFIG_NAME = "config.json"
FORMAT = "lora4diffusion-tokenizer"
VERSION = 1

# Unicode White_Space, which is what the Rust regex's \s matches (Python's str.isspace also counts
# U+001C..U+001F, which CLIP's tokenizer treats as punctuation).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _is_letter(c: str) -> bool:
    return c.isalpha()  # general category L*: the regex's \p{L}


def _is_number(c: str) -> bool:
    return unicodedata.category(c).startswith("N")  # \p{N}


def normalize(text: str) -> str:
    """CLIP's normaliser in transformers: NFC, then lower-case (whitespace runs only separate pieces)."""
    return unicodedata.normalize("NFC", text).lower()


def split_pieces(text: str) -> list[str]:
    """CLIP's pre-tokenizer on normalised text, as a scanner (Python's `re` has no \\p{L} classes).

    Leftmost alternative first, as the regex: a contraction, a run of letters, one number character,
    or a run of anything that is neither whitespace, letter nor number.
    """
    pieces: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WHITESPACE:
            i += 1
            continue
        j = i + 1
        contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
        if contraction is not None:
            j = i + len(contraction)
        elif _is_letter(c):
            while j < n and _is_letter(text[j]):
                j += 1
        elif not _is_number(c):
            while j < n and not (text[j] in _WHITESPACE or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class Tokenizer:
    """Prompts -> [B, context_length] ids over a fixed word list (see the module docstring)."""

    def __init__(self, words: Sequence[str], context_length: int = 16, source: str = "vocabulary"):
        words = list(words)
        if context_length < 2:
            raise UserError(f"tokenizer context length {context_length} leaves no room for bos and eos")
        seen: set[str] = set()
        for w in words:
            if w in seen:
                raise UserError(f"{source}: word {w!r} appears twice")
            seen.add(w)
            # A word must come out of CLIP's splitting as exactly itself, in printable ASCII (where CLIP's
            # byte-level alphabet is the identity), or CLIP's tokenizer could never produce its id.
            if w in (BOS, EOS) or not (w.isascii() and w.isprintable()) or split_pieces(normalize(w)) != [w]:
                raise UserError(f"{source}: {w!r} is not a single lower-case CLIP piece; it cannot be a word")
        if not words:
            raise UserError(f"{source}: no words")
        self.words = words
        self.context_length = context_length
        self.source = source
        self._ids = {w: i for i, w in enumerate(words)}
        self.bos_id = len(words)
        self.eos_id = len(words) + 1
        self.pad_id = self.eos_id
        self.added: dict[str, list[int]] = {}  # placeholder token -> its ids (add_token)
        self._added_rx: re.Pattern | None = None
        self._clip_size: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids a prompt can produce (words + bos + eos): the text encoder's embedding rows."""
        return len(self.words) + 2

    @property
    def clip_vocab_size(self) -> int:
        """Ids of the exported CLIP vocabulary (words, bos, eos, then the BPE-only pieces): the first id an
        added token gets, as CLIPTokenizer.add_tokens gives it."""
        if self._clip_size is None:
            self._clip_size = len(self._clip_vocab())
        return self._clip_size

    # ---- added tokens (textual inversion) ----
    def add_token(self, token: str, vectors: int = 1) -> list[int]:
        """Add placeholder ``token`` standing for ``vectors`` new ids (after every id used so far); returns
        them. A token already added, or more vectors than a prompt can hold, is a UserError."""
        token = check_placeholder(token)
        if token in self.added:
            raise UserError(f"token {token} is already loaded (one embedding per token)")
        limit = self.context_length - 2
        if isinstance(vectors, bool) or not isinstance(vectors, int) or not 1 <= vectors <= limit:
            raise UserError(f"token {token}: {vectors!r} vectors; a prompt holds 1..{limit}")
        start = self.clip_vocab_size + sum(len(ids) for ids in self.added.values())
        self.added[token] = list(range(start, start + vectors))
        self._added_rx = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
        return self.added[token]

    def remove_token(self, token: str) -> None:
        """Forget the LAST added token (ids go in order: only the last can go without renumbering)."""
        if not self.added or list(self.added)[-1] != token:
            raise UserError(f"token {token} is not the last added token; it cannot be removed")
        del self.added[token]
        rx = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self._added_rx = re.compile(rx) if rx else None

    def unknown_tokens(self, prompts: Sequence[str]) -> list[str]:
        """The placeholder tokens of ``prompts`` that no loaded embedding defines, in order of appearance:
        what an embeddings/ folder may supply (pipeline.Pipeline.load_prompt_embeddings)."""
        found: list[str] = []
        for p in prompts:
            for m in PLACEHOLDER.finditer(normalize(p) if isinstance(p, str) else ""):
                if m.group(0) not in self.added and m.group(0) not in found:
                    found.append(m.group(0))
        return found

    def _pieces(self, text: str) -> list[str]:
        """CLIP's pieces of normalised text, added tokens split out first (whole, longest first)."""
        if self._added_rx is None:
            return split_pieces(text)
        out, i = [], 0
        for m in self._added_rx.finditer(text):
            out += [*split_pieces(text[i : m.start()]), m.group(0)]
            i = m.end()
        return out + split_pieces(text[i:])

    @property
    def tokens(self) -> list[str]:
        """Every id's token, in id order (what vocab.txt holds)."""
        return [*self.words, BOS, EOS]

    # ---- text -> ids ----
    def tokenize(self, prompt: str) -> list[str]:
        """The words of one prompt; an unknown word or a too-long prompt is a UserError."""
        if not isinstance(prompt, str):
            raise UserError(f"a prompt must be text, got {type(prompt).__name__}")
        text = normalize(prompt)
        pieces = self._pieces(text)
        known = [*self.words, *self.added]
        for m in PLACEHOLDER.finditer(PLACEHOLDER.sub(lambda m: " " * len(m.group(0)) if m.group(0) in
                                                      self.added else m.group(0), text)):
            near = difflib.get_close_matches(m.group(0), known, n=3, cutoff=0.5)
            hint = f"nearest: {', '.join(near)}" if near else "no known token is close"
            raise UserError(f"unknown token {m.group(0)!r} in prompt {prompt!r}: no embedding for it is"
                            f" loaded ({hint}; load its file with --embedding, or put it in an embeddings/"
                            f" folder as {m.group(0)[1:-1]}.safetensors)")
        for p in pieces:
            if p not in self._ids and p not in self.added:
                near = difflib.get_close_matches(p, known, n=3, cutoff=0.5)
                hint = f"nearest: {', '.join(near)}" if near else "no vocabulary word is close"
                raise UserError(
                    f"unknown word {p!r} in prompt {prompt!r} ({hint}; the words are in {self.source})"
                )
        limit = self.context_length - 2
        count = sum(len(self.added[p]) if p in self.added else 1 for p in pieces)
        if count > limit:
            raise UserError(
                f"prompt {prompt!r} has {count} tokens; the limit is {limit}"
                f" (context length {self.context_length} including start and end of text)"
            )
        return pieces

    def encode_one(self, prompt: str) -> list[int]:
        pieces = self.tokenize(prompt)
        words = [i for w in pieces for i in (self.added[w] if w in self.added else [self._ids[w]])]
        ids = [self.bos_id, *words, self.eos_id]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> LongTensor [B, context_length]: bos, words, eos, then eos padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([self.encode_one(p) for p in prompts], dtype=torch.long).reshape(
            len(prompts), self.context_length
        )

    # ---- ids -> text ----
    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Ids -> words joined by spaces, up to the first eos (bos skipped). [B, L] gives a list."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return [self._decode_one(row) for row in ids]
        return self._decode_one(ids)

    def _decode_one(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        first = {v[0]: t for t, v in self.added.items()}  # a token's later ids add nothing to the text
        rest = {i for v in self.added.values() for i in v[1:]}
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i == self.bos_id or i in rest:
                continue
            if i in first:
                out.append(first[i])
                continue
            if not 0 <= i < len(self.words):
                raise UserError(f"token id {i} is outside this vocabulary (0..{self.vocab_size - 1})")
            out.append(self.words[i])
        return " ".join(out)

    # ---- files ----
    def files(self) -> dict[str, str]:
        """Our folder's files: vocab.txt (one token a line, line i = id i) and config.json."""
        config = {"format": FORMAT, "version": VERSION, "context_length": self.context_length}
        return {
            VOCAB_NAME: "\n".join(self.tokens) + "\n",
            CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n",
        }

    def save(self, folder: str | Path) -> None:
        for name, text in self.files().items():
            atomic_write(Path(folder) / name, lambda p, t=text: p.write_text(t))

    @classmethod
    def load(cls, folder: str | Path | None = None) -> Tokenizer:
        """Read a tokenizer folder (vocab.txt + config.json); None = the shipped one."""
        folder = Path(folder) if folder is not None else shipped_dir()
        vocab_path, config_path = folder / VOCAB_NAME, folder / CONFIG_NAME
        for p in (vocab_path, config_path):
            if not p.is_file():
                raise UserError(
                    f"{p}: file not found (a tokenizer folder holds {VOCAB_NAME} and {CONFIG_NAME})"
                )
        try:
            config = json.loads(config_path.read_text())
            lines = vocab_path.read_text().splitlines()
        except (OSError, ValueError) as e:  # not UTF-8, not JSON (ValueErrors both)
            raise UserError(f"{folder}: unreadable tokenizer file ({str(e).splitlines()[0][:120]})") from None
        except RecursionError:
            raise UserError(f"{config_path}: not readable JSON (nested too deeply)") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise UserError(f"{config_path}: not a {FORMAT} config")
        if config.get("version") != VERSION:
            raise UserError(f"{config_path}: tokenizer version {config.get('version')!r}, expected {VERSION}")
        length = config.get("context_length")
        if not isinstance(length, int) or isinstance(length, bool):
            raise UserError(f"{config_path}: context_length must be an integer")
        if lines[-2:] != [BOS, EOS]:
            raise UserError(f"{vocab_path}: the last two lines must be {BOS} and {EOS}")
        return cls(lines[:-2], context_length=length, source=str(vocab_path))

    # ---- CLIP BPE ----
    def clip_bpe_files(self) -> dict[str, str]:
        """This vocabulary as the files transformers' CLIPTokenizer reads, giving our ids exactly.

        The merges build each word from its END: word c1..cn starts as c1, ..., c(n-1), cn</w>, and the only
        merges are (c_j, c_(j+1)..cn</w>) -> c_j..cn</w>. Every merge's right side ends in </w>, so at every
        step exactly one adjacent pair can be a merge (the last plain letter and the suffix piece): the result
        does not depend on merge ranks and is always the whole word. Every intermediate piece is in
        vocab.json, as the tokenizers-backed BPE needs. Words keep their ids; the BPE-only pieces come after
        eos.
        """
        vocab, merges = self._clip_vocab(), self._clip_merges()
        # Shorter results first, as a trained BPE would list them (the order does not change any result).
        ordered = sorted(merges, key=lambda ab: (len(merges[ab]), merges[ab]))
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ordered)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
        tokenizer_config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
            **special,
        }
        return {
            "vocab.json": json.dumps(vocab, indent=1, ensure_ascii=False) + "\n",
            "merges.txt": merges_txt,
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        }

    def _clip_merges(self) -> dict[tuple[str, str], str]:
        merges: dict[tuple[str, str], str] = {}
        for w in self.words:
            for j in range(len(w) - 2, -1, -1):
                merges[(w[j], w[j + 1 :] + END_OF_WORD)] = w[j:] + END_OF_WORD
        return merges

    def _clip_vocab(self) -> dict[str, int]:
        """vocab.json of ``clip_bpe_files``: words (with </w>), bos, eos, then the BPE-only pieces."""
        vocab = {w + END_OF_WORD: i for i, w in enumerate(self.words)}
        vocab[BOS], vocab[EOS] = self.bos_id, self.eos_id
        pieces: set[str] = set()
        for w in self.words:
            pieces.update(w[:-1])  # letters that start a merge (never the last one: that carries </w>)
            pieces.update(w[j:] + END_OF_WORD for j in range(len(w)))
        for p in sorted(pieces - set(vocab), key=lambda s: (len(s), s)):
            vocab[p] = len(vocab)
        return vocab

    def export_clip_bpe(self, out_dir: str | Path) -> None:
        """Write `clip_bpe_files` into out_dir (atomically, file by file)."""
        for name, text in self.clip_bpe_files().items():
            atomic_write(Path(out_dir) / name, lambda p, t=text: p.write_text(t))

    @classmethod
    def from_clip_bpe(cls, folder: str | Path, context_length: int | None = None) -> Tokenizer:
        """Read back a CLIP tokenizer folder that `export_clip_bpe` wrote (e.g. a diffusers `tokenizer/`):
        vocab.json + merges.txt, or the tokenizer.json alone that transformers 5's save_pretrained writes.

        The words are the tokens with ids below bos; the folder is accepted only if exporting those words
        again gives the same vocabulary and merges, so a CLIP tokenizer we would tokenize differently is
        refused rather than half-read.
        """
        folder = Path(folder)
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
                vocab = json.loads((folder / "vocab.json").read_text())
                merges = _merge_pairs((folder / "merges.txt").read_text().splitlines())
            else:
                model = json.loads((folder / "tokenizer.json").read_text()).get("model") or {}
                if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
                    raise UserError(f"{folder}/tokenizer.json: not CLIP's BPE with {END_OF_WORD} word ends")
                vocab, merges = model.get("vocab"), _merge_pairs(model.get("merges") or [])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
            raise UserError(f"{folder}: not a readable CLIP tokenizer folder ({e})") from None
        if not isinstance(vocab, dict) or vocab.get(BOS) is None or vocab.get(EOS) != vocab[BOS] + 1:
            raise UserError(f"{folder}: vocabulary not written by lora4diffusion (bos/eos ids do not fit)")
        by_id = {i: t for t, i in vocab.items()}
        words = [by_id.get(i, "") for i in range(vocab[BOS])]
        if not all(t.endswith(END_OF_WORD) for t in words):
            raise UserError(f"{folder}: ids below bos must all be whole words ending in {END_OF_WORD}")
        length = context_length if context_length is not None else config.get("model_max_length")
        if not isinstance(length, int) or isinstance(length, bool):
            raise UserError(f"{folder}/tokenizer_config.json: no integer model_max_length")
        words = [t[: -len(END_OF_WORD)] for t in words]
        tok = cls(words, context_length=length, source=f"{folder} (CLIP vocabulary)")
        again = tok.clip_bpe_files()
        same_merges = _merge_pairs(again["merges.txt"].splitlines()) == merges
        if json.loads(again["vocab.json"]) != vocab or not same_merges:
            raise UserError(f"{folder}: a CLIP tokenizer this word-level tokenizer cannot reproduce")
        return tok


def _merge_pairs(lines: list) -> list[tuple[str, str]]:
    """merges.txt lines ("a b", a "#version" header) or tokenizer.json merges ("a b" or [a, b])."""
    pairs = []
    for line in lines:
        if isinstance(line, str):
            if line.startswith("#version") or not line.strip():
                continue
            line = line.split(" ")
        if len(line) != 2:
            raise UserError(f"malformed BPE merge {line!r}")
        pairs.append((str(line[0]), str(line[1])))
    return pairs


def shipped_dir() -> Path:
    """The tokenizer folder shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "pretrained" / "tokenizer"


__all__ = ["BOS", "EOS", "Tokenizer", "normalize", "shipped_dir", "split_pieces"]
