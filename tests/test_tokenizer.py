"""The word-level tokenizer, and transformers' CLIPTokenizer as the oracle for its CLIP BPE export."""

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora4diffusion.captions import iter_every_caption
from lora4diffusion.errors import UserError
from lora4diffusion.models.tokenizer import BOS, END_OF_WORD, EOS, Tokenizer, shipped_dir, split_pieces

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def clip(tok, tmp_path_factory):
    """transformers' CLIPTokenizer (in transformers 5 the tokenizers-backed class; CLIPTokenizerFast is the
    same class, there is no slow one left) and AutoTokenizer, both read from our exported files."""
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    out = tmp_path_factory.mktemp("clip_tok")
    tok.export_clip_bpe(out)
    a, b = CLIPTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert CLIPTokenizerFast is CLIPTokenizer and type(b) is CLIPTokenizer
    return a, b, out


def clip_ids(h, prompts: list[str], length: int) -> torch.Tensor:
    return h(prompts, padding="max_length", max_length=length, return_tensors="pt").input_ids


def test_shipped_vocabulary_file_is_one_token_a_line(tok):
    lines = (shipped_dir() / "vocab.txt").read_text().splitlines()
    assert lines == tok.tokens and lines[-2:] == [BOS, EOS]
    assert tok.bos_id == len(lines) - 2 and tok.eos_id == tok.pad_id == len(lines) - 1
    assert tok.vocab_size == len(lines)
    for d in "0123456789":
        assert d in tok.words
    for w in ("seven", "sks", "ohwx", "handwritten", ","):
        assert w in tok.words


def test_encode_layout_case_and_clip_splitting(tok):
    ids = tok.encode(["a handwritten seven", "", "THE Digit 17,handwritten"])
    assert ids.dtype == torch.long and ids.shape == (3, tok.context_length)
    idx = {w: i for i, w in enumerate(tok.words)}
    row = [tok.bos_id, idx["a"], idx["handwritten"], idx["seven"], tok.eos_id]
    assert ids[0].tolist() == row + [tok.pad_id] * (tok.context_length - len(row))
    assert ids[1].tolist() == [tok.bos_id] + [tok.eos_id] * (tok.context_length - 1)
    # numbers split into single digits, punctuation split off, case folded: CLIP's pre-tokenizer
    assert tok.tokenize("THE Digit 17,handwritten") == ["the", "digit", "1", "7", ",", "handwritten"]
    assert tok.encode("seven").shape == (1, tok.context_length)
    assert split_pieces("it's 42 ok?!") == ["it", "'s", "4", "2", "ok", "?!"]


def test_decode_round_trips(tok):
    prompts = ["a handwritten sks seven", "7 in ohwx bold style", "", "seven, 3"]
    ids = tok.encode(prompts)
    texts = tok.decode(ids)
    assert texts == [" ".join(tok.tokenize(p)) for p in prompts]
    assert torch.equal(tok.encode(texts), ids)
    assert tok.decode(ids[0]) == texts[0]
    with pytest.raises(UserError, match="outside this vocabulary"):
        tok.decode([tok.bos_id, 10_000])


def test_unknown_word_names_it_and_nearest_words(tok):
    with pytest.raises(UserError, match=r"unknown word 'sevn'.*nearest: seven") as e:
        tok.encode(["a handwritten sevn"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"unknown word 'qqqqqqqq'.*no vocabulary word is close"):
        tok.encode("qqqqqqqq")
    with pytest.raises(UserError, match=r"unknown word '!'"):
        tok.encode("seven!")
    with pytest.raises(UserError, match="must be text"):
        tok.encode([7])


def test_too_long_prompt_says_the_limit(tok):
    limit = tok.context_length - 2
    tok.encode(" ".join(["seven"] * limit))  # exactly at the limit is fine
    with pytest.raises(UserError, match=rf"{limit + 1} tokens; the limit is {limit}"):
        tok.encode(" ".join(["seven"] * (limit + 1)))
    with pytest.raises(UserError, match="limit is"):
        tok.encode("1" * (limit + 1))  # one word on screen, limit+1 CLIP tokens


@pytest.mark.parametrize(
    "words, match",
    [(["a", "a"], "twice"), (["Seven"], "single"), (["17"], "single"), (["a b"], "single"),
     (["seven,"], "single"), ([EOS], "single"), (["sevén"], "single"), ([], "no words")],
)
def test_bad_word_lists_are_refused(words, match):
    with pytest.raises(UserError, match=match):
        Tokenizer(words)


def test_save_load_round_trip_and_bad_folders(tok, tmp_path):
    small = Tokenizer(["a", "seven", "7", ","], context_length=8)
    small.save(tmp_path / "t")
    again = Tokenizer.load(tmp_path / "t")
    assert again.words == small.words and again.context_length == 8
    with pytest.raises(UserError, match="file not found"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "t" / "vocab.txt").write_text("a\nseven\n")
    with pytest.raises(UserError, match="last two lines"):
        Tokenizer.load(tmp_path / "t")
    small.save(tmp_path / "u")
    (tmp_path / "u" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a lora4diffusion-tokenizer config"):
        Tokenizer.load(tmp_path / "u")
    with pytest.raises(UserError, match="context length"):
        Tokenizer(["a"], context_length=1)


def test_clip_files_hold_every_merge_piece_and_keep_word_ids(tok, clip):
    files = tok.clip_bpe_files()
    vocab = json.loads(files["vocab.json"])
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for i, w in enumerate(tok.words):
        assert vocab[w + END_OF_WORD] == i
    assert vocab[BOS] == tok.bos_id and vocab[EOS] == tok.eos_id
    assert max(vocab.values()) > tok.eos_id  # BPE-only pieces exist and come after eos
    for line in files["merges.txt"].splitlines()[1:]:
        a, b = line.split(" ")
        assert a in vocab and b in vocab and a + b in vocab  # transformers 5 needs every piece
    h = clip[0]
    assert h.bos_token_id == tok.bos_id and h.eos_token_id == tok.eos_id and h.pad_token_id == tok.pad_id
    assert h.model_max_length == tok.context_length


def test_clip_tokenizer_gives_our_ids_for_every_template_prompt(tok, clip):
    prompts = list(iter_every_caption())
    assert len(prompts) > 5000
    prompts += [p.upper() for p in prompts[::7]] + [p.replace(" ", "  \t") for p in prompts[::11]]
    ours = tok.encode(prompts)
    for h in clip[:2]:
        assert torch.equal(clip_ids(h, prompts, tok.context_length), ours)
    # eos is the largest id of every valid sequence: argmax-of-ids pooling finds the same position
    first_eos = (ours == tok.eos_id).int().argmax(-1)
    assert torch.equal(ours.argmax(-1), first_eos)


def test_merge_order_does_not_matter(tok, tmp_path):
    """The design claim behind the export: with suffix-first merges only one pair is ever mergeable, so any
    ranking of the merges (a reversed or shuffled merges.txt) gives the same ids."""
    from transformers import CLIPTokenizer

    tok.export_clip_bpe(tmp_path)
    header, *merges = (tmp_path / "merges.txt").read_text().splitlines()
    prompts = [p for p in iter_every_caption() if p][::5]
    ours = tok.encode(prompts)
    order = torch.randperm(len(merges), generator=torch.Generator().manual_seed(0)).tolist()
    for lines in (merges[::-1], [merges[i] for i in order]):
        (tmp_path / "merges.txt").write_text("\n".join([header, *lines]) + "\n")
        h = CLIPTokenizer.from_pretrained(tmp_path)
        assert torch.equal(clip_ids(h, prompts, tok.context_length), ours)


def test_clip_tokenizer_decodes_our_ids(tok, clip):
    prompts = ["a handwritten sks seven", "the digit 7 in bold style"]
    assert clip[0].batch_decode(tok.encode(prompts), skip_special_tokens=True) == [
        " ".join(tok.tokenize(p)) for p in prompts
    ]


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _agree(tok, h, text: str) -> None:
    """We accept text iff CLIP's ids are bos, words only, eos, within the context; then the ids are equal."""
    theirs = h(text).input_ids
    clip_ok = (
        len(theirs) <= tok.context_length
        and theirs[0] == tok.bos_id
        and theirs[-1] == tok.eos_id
        and all(i < tok.bos_id for i in theirs[1:-1])
    )
    try:
        ours = tok.encode(text)
    except UserError:
        assert not clip_ok, f"we refuse {text!r}, CLIP reads it as words {theirs}"
        return
    assert clip_ok, f"we accept {text!r}, CLIP gives {theirs}"
    assert ours[0].tolist() == theirs + [tok.pad_id] * (tok.context_length - len(theirs))


@_FUZZ
@given(data=st.data())
def test_random_word_sequences_match_clip(tok, clip, data):
    words = data.draw(st.lists(st.sampled_from(tok.words), max_size=16))
    seps = data.draw(st.lists(st.sampled_from(["", " ", "  ", "\t", "\n", " \u00a0"]), min_size=len(words),
                              max_size=len(words)))
    cased = [w.upper() if i % 3 == 0 else w for i, w in enumerate(words)]
    text = "".join(s + w for s, w in zip(seps, cased, strict=True))
    _agree(tok, clip[0], text)


@_FUZZ
@given(text=st.text(alphabet="sevnadigt0179 ,.'!\t\x1f\u00a0\u212a\u0130\u00b2<|>", max_size=20))
def test_random_text_is_accepted_exactly_when_clip_reads_words(tok, clip, text):
    _agree(tok, clip[0], text)


def test_reader_of_exported_clip_folder(tok, clip, tmp_path):
    again = Tokenizer.from_clip_bpe(clip[2])
    assert again.words == tok.words and again.context_length == tok.context_length
    clip[0].save_pretrained(tmp_path / "resaved")  # transformers 5 writes tokenizer.json only
    assert not (tmp_path / "resaved" / "vocab.json").exists()
    assert Tokenizer.from_clip_bpe(tmp_path / "resaved").words == tok.words
    tok.export_clip_bpe(tmp_path)
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    (tmp_path / "merges.txt").write_text("\n".join(merges[:-1]) + "\n")
    with pytest.raises(UserError, match="cannot reproduce"):
        Tokenizer.from_clip_bpe(tmp_path)
    with pytest.raises(UserError, match="not a readable CLIP tokenizer folder"):
        Tokenizer.from_clip_bpe(tmp_path / "nothing")
