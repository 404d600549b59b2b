"""Caption templates, trigger words and digit_of, checked exhaustively against the shipped vocabulary."""

import re

import pytest
import torch

from lora4diffusion.captions import (
    DIGIT_WORDS,
    EMPTY_PROMPT,
    HELD_OUT,
    HELD_OUT_TEMPLATES,
    NUMERALS,
    STYLE_WORDS,
    TEMPLATES,
    TRIGGER_WORDS,
    all_captions,
    caption,
    caption_words,
    captions_for,
    check_style,
    check_trigger,
    digit_of,
    family_templates,
    iter_every_caption,
)
from lora4diffusion.errors import UserError
from lora4diffusion.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def _digit_in(text: str) -> int:
    """The digit a generated caption was built for, read back independently of digit_of."""
    hits = [i for i in range(10) if re.search(rf"(^|\W){NUMERALS[i]}(\W|$)|\b{DIGIT_WORDS[i]}\b", text)]
    assert len(hits) == 1, text
    return hits[0]


def test_every_caption_tokenizes_and_names_its_digit(tok):
    seen_words: set[str] = set()
    n = 0
    for text in iter_every_caption():
        words = tok.tokenize(text)  # raises on an unknown word or a prompt over the context length
        seen_words.update(words)
        n += 1
        if text:
            assert digit_of(text) == _digit_in(text)
    templates = len(family_templates(None)) + len(HELD_OUT_TEMPLATES)
    modifiers = (1 + len(TRIGGER_WORDS)) * (1 + len(STYLE_WORDS)) - 1  # trigger and/or style
    assert n == 10 * templates * (1 + 2 * modifiers) + 1  # two placements per modifier, plus ""
    # and the vocabulary holds no word the captions never use (it would keep an untrained embedding)
    assert seen_words == set(tok.words)


def test_trigger_and_style_placement():
    assert caption(7, "a handwritten {w}", "sks") == "a handwritten sks seven"
    assert caption(7, "the digit {n}", "sks", form="style") == "the digit 7 in sks style"
    assert caption(3, "{n}", "ohwx", "bold") == "ohwx bold 3"
    styled = caption(3, "{w}, handwritten", None, "italic", form="style")
    assert styled == "three, handwritten in italic style"
    assert caption(0, "a picture of a {w}") == "a picture of a zero"
    for d in range(10):
        for trigger in TRIGGER_WORDS:
            for text in all_captions(d, trigger):
                assert text.split().count(trigger) == 1
        for text in all_captions(d):
            assert not set(text.split()) & set(TRIGGER_WORDS)
    with pytest.raises(UserError, match="form"):
        caption(1, "{n}", "sks", form="after")


def test_held_out_family_is_new_phrasing_of_trained_words():
    train = set(family_templates(None))
    assert not train & set(HELD_OUT_TEMPLATES)
    held_words: set[str] = set()
    for d in range(10):
        for text in all_captions(d, family=HELD_OUT):
            held_words.update(re.findall(r"[a-z]+|[0-9]|,", text))
    trained: set[str] = set()
    for d in range(10):
        for text in all_captions(d):
            trained.update(re.findall(r"[a-z]+|[0-9]|,", text))
    assert held_words <= trained


def test_captions_for_draws_are_reproducible_and_cover_families():
    labels = torch.arange(10).repeat(60)
    a = captions_for(labels, torch.Generator().manual_seed(0))
    assert a == captions_for(labels.tolist(), torch.Generator().manual_seed(0))
    assert a != captions_for(labels, torch.Generator().manual_seed(1))
    assert [digit_of(c) for c in a] == labels.tolist()
    train = {t: f for f, ts in TEMPLATES.items() for t in ts}
    drawn_templates = set()
    for d, text in zip(labels.tolist(), a, strict=True):
        matches = [t for t in train if caption(d, t) == text]
        assert matches, text  # never a held-out phrasing
        drawn_templates.update(matches)
    assert drawn_templates == set(train)
    held = captions_for(labels, torch.Generator().manual_seed(0), family=HELD_OUT)
    assert set(held) <= {c for d in range(10) for c in all_captions(d, family=HELD_OUT)}
    digit = captions_for(labels, torch.Generator().manual_seed(0), family="digit")
    assert all(text.startswith(("the digit", "a digit")) for text in digit)


def test_triggered_draws_use_both_placements():
    labels = [7] * 200
    texts = captions_for(labels, torch.Generator().manual_seed(0), trigger="sks", style="bold")
    assert all(t.split().count("sks") == 1 and "bold" in t.split() for t in texts)
    assert any(t.endswith(" in sks bold style") for t in texts)
    assert any("sks bold seven" in t or "sks bold 7" in t for t in texts)


def test_empty_prompt_for_guidance():
    labels = torch.zeros(4000, dtype=torch.long)
    assert captions_for(labels[:50], torch.Generator().manual_seed(0), p_empty=1.0) == [EMPTY_PROMPT] * 50
    assert EMPTY_PROMPT not in captions_for(labels[:500], torch.Generator().manual_seed(0))
    texts = captions_for(labels, torch.Generator().manual_seed(0), p_empty=0.1)
    frac = texts.count(EMPTY_PROMPT) / len(texts)
    assert abs(frac - 0.1) < 4 * (0.1 * 0.9 / len(texts)) ** 0.5  # within 4 binomial standard deviations
    assert digit_of(EMPTY_PROMPT) == -1
    with pytest.raises(UserError, match="p_empty"):
        captions_for([1], p_empty=1.5)


@pytest.mark.parametrize(
    "prompt, digit",
    [("7", 7), ("SEVEN", 7), ("seven, 7", 7), ("the digit 17", -1), ("77", -1), ("a 3 and a 4", -1),
     ("one two", -1), ("", -1), ("a handwritten digit", -1), ("<lora:bold:0.8> a sks 3", 3),
     ("sevenfold", -1), ("the number zero", 0)],
)
def test_digit_of(prompt, digit):
    assert digit_of(prompt) == digit


def test_trigger_validation():
    assert check_trigger("sks") == "sks" and check_trigger("OHWX") == "ohwx"
    for word in ("seven", "7", "handwritten", "the", "bold", ","):
        with pytest.raises(UserError, match="ordinary caption word"):
            check_trigger(word)
    for word in ("xyzzy", "sks dog", ""):
        with pytest.raises(UserError, match="not a reserved trigger word"):
            check_trigger(word)
    with pytest.raises(UserError, match="ordinary caption word"):
        captions_for([1], trigger="seven")
    assert not set(TRIGGER_WORDS) & (caption_words() | set(STYLE_WORDS))
    assert check_style("bold") == "bold"
    with pytest.raises(UserError, match="style word"):
        check_style("wavy")


@pytest.mark.parametrize("labels", [[10], [-1], [1.5], [True]])
def test_bad_labels(labels):
    with pytest.raises(UserError, match="digit 0-9"):
        captions_for(labels)


def test_unknown_family():
    with pytest.raises(UserError, match="unknown caption family"):
        captions_for([1], family="poems")
