"""merge-lora (lora/combine.py): LoRA adapters at weights into one adapter, against closed forms and peft.

- concat is exact: the merged adapter at weight 1 draws the images of the sources stacked at their weights
  (fp32 rounding: the sum B A is formed in another order), and its ΔW is the weighted sum of theirs;
- svd is Eckart-Young's best rank-k approximation: the error it reports is the closed form
  sqrt(discarded s^2 / all s^2) of the summed delta's singular values, and the error its factors really make;
- peft's ``add_weighted_adapter`` on our PEFT exports of the same adapters gives the same tensors (cat) and
  the same ΔW within fp32 SVD rounding (svd);
- the result keeps both adapters' trigger words and where it came from; refusals are one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora4diffusion.cli import main
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import Adapter, export_peft, read_adapter, resolve_adapter
from lora4diffusion.lora.combine import MERGED_FROM, Source, merge_adapters
from lora4diffusion.lora.prompt_lora import trigger_words
from lora4diffusion.pipeline import Pipeline

peft = pytest.importorskip("peft")  # installed as a test oracle (pyproject [test])
pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = {"bold": 0.7, "italic": 0.5}
PROMPTS = ["a handwritten sks ohwx seven", "the digit 3 in ohwx sks style"]


@pytest.fixture(scope="module")
def sources() -> list[Source]:
    return [Source(read_adapter(resolve_adapter(n)), w, n) for n, w in WEIGHTS.items()]


def deltas(adapter: Adapter, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Each module's weight * scale * B A in fp64, [out, in * kh * kw]."""
    return {m: weight * adapter.scale * (b.double().flatten(1) @ a.double().flatten(1))
            for m, (a, b) in ((m, adapter.pair(m)) for m in adapter.modules)}


def stacked(sources: list[Source]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for s in sources:
        for m, d in deltas(s.adapter, s.weight).items():
            out[m] = out.get(m, 0) + d
    return out


def images(*loras: tuple[str, float]) -> np.ndarray:
    pipe = Pipeline.load()
    for path, weight in loras:
        pipe.add_lora(path, weight)
    x, _ = pipe.generate(PROMPTS * 2, steps=5, seed=3, negative="the digit 1")
    return x.numpy()


def test_concat_draws_the_stacked_images_and_keeps_triggers_and_provenance(tmp_path, capsys):
    argv = ["-q", "merge-lora", "--lora", "bold:0.7", "--lora", "italic:0.5", "--out", str(tmp_path / "m")]
    assert main(argv) == 0
    assert "exact" in capsys.readouterr().out
    merged = read_adapter(tmp_path / "m")
    assert (merged.rank, merged.alpha, merged.rslora) == (32, 32.0, False)  # 16 + 16, scale 1
    assert trigger_words(merged) == ["sks", "ohwx"]
    history = json.loads(merged.extra[MERGED_FROM])
    want = [("bold", 0.7, 16), ("italic", 0.5, 16)]
    assert [(h["adapter"], h["weight"], h["rank"]) for h in history] == want
    assert history[0]["metadata"]["style"] == "bold" and history[1]["trigger_words"] == ["ohwx"]
    assert merged.fingerprint == read_adapter(resolve_adapter("bold")).fingerprint
    stack = images(("bold", 0.7), ("italic", 0.5))
    one = images((str(tmp_path / "m"), 1.0))
    base = images()
    assert np.abs(one - stack).max() <= 1e-5  # fp32 rounding (measured ~1e-6)
    assert np.abs(stack - base).max() > 0.1  # the adapters do change the digits


def test_concat_delta_is_the_weighted_sum(sources):
    merged, errors = merge_adapters(sources, "concat")
    want = stacked(sources)
    got = deltas(merged)
    assert set(got) == set(want) and errors["overall"] == 0.0
    worst = max(float((got[m] - want[m]).abs().max() / want[m].abs().max()) for m in want)
    assert worst <= 1e-6  # fp32 factors; the sum itself is exact


def test_svd_reports_the_eckart_young_error(sources):
    merged, errors = merge_adapters(sources, "svd", rank=8)
    assert merged.rank == 8 and merged.alpha == 8.0
    want, got = stacked(sources), deltas(merged)
    tails, totals = 0.0, 0.0
    for m, d in want.items():
        s = torch.linalg.svdvals(d)
        closed = float((s[8:] ** 2).sum().sqrt() / (s**2).sum().sqrt())  # Eckart-Young
        made = float((got[m] - d).norm() / d.norm())  # what the factors really miss
        assert abs(errors[m] - closed) <= 1e-9 and abs(made - closed) <= 1e-5, m
        tails, totals = tails + float((s[8:] ** 2).sum()), totals + float((s**2).sum())
    assert abs(errors["overall"] - (tails / totals) ** 0.5) <= 1e-9
    assert 0.01 < errors["overall"] < 0.9  # rank 8 of a rank-32 sum: some error, not all
    full, none = merge_adapters(sources, "svd", rank=32)  # the whole sum's rank: no error
    assert none["overall"] <= 1e-6
    assert max(float((deltas(full)[m] - d).abs().max()) for m, d in want.items()) <= 1e-5


def _peft_model(tmp_path, sources):
    """PeftModel over the shipped base (UNet, with the text encoder as its ``text_encoder`` child so module
    paths are the adapter files'), with our PEFT exports of the sources loaded as their labels."""
    pipe = Pipeline.load()
    host = pipe.unet
    host.add_module("text_encoder", pipe.text_encoder)
    for s in sources:
        export_peft(s.adapter, tmp_path / s.label)
    first = sources[0].label
    model = peft.PeftModel.from_pretrained(host, str(tmp_path / first), adapter_name=first)
    for s in sources[1:]:
        model.load_adapter(str(tmp_path / s.label), adapter_name=s.label)
    return model


def _peft_factors(model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    inner = model.base_model.model
    return {p: (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach())
            for p, m in inner.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


def test_peft_add_weighted_adapter_agrees(tmp_path, sources):
    model = _peft_model(tmp_path, sources)
    names, weights = [s.label for s in sources], [s.weight for s in sources]
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    model.add_weighted_adapter(names, weights, "svd", combination_type="svd", svd_rank=8)
    cat, _ = merge_adapters(sources, "concat")
    theirs = _peft_factors(model, "cat")
    assert sorted(theirs) == sorted(cat.modules)
    for m, (a, b) in theirs.items():  # the same tensors: peft's A * weight * scaling, B side by side
        assert torch.equal(a, cat.pair(m)[0]) and torch.equal(b, cat.pair(m)[1]), m
    svd, errors = merge_adapters(sources, "svd", rank=8)
    want, ours = stacked(sources), deltas(svd)
    for m, (a, b) in _peft_factors(model, "svd").items():  # peft: lora_alpha = r, scaling 1
        d = b.double().flatten(1) @ a.double().flatten(1)
        # both are the best rank-8 approximation (unique here): they differ by peft's fp32 SVD rounding only,
        # far below the truncation error itself
        assert float((d - ours[m]).norm()) <= 1e-4 * float(want[m].norm()) + 1e-7, m
        assert abs(float((d - want[m]).norm() / want[m].norm()) - errors[m]) <= 1e-4, m


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, sources):
    out = tmp_path / "o"
    for argv, needle in (
        (["--lora", "bold", "--lora", "italic", "--lora", "bold:0.2"], "exceeds the rank 32 of module"),
        (["--lora", "bold", "--lora", "bold-pixel"], "trained on different bases"),
        (["--lora", "bold", "--lora", "italic", "--rank", "4"], "--rank is for --method svd"),
        (["--lora", "bold", "--method", "svd", "--rank", "40"], "merged rank 40 exceeds"),
        (["--lora", "bold:3"], "bold:3"),
    ):
        assert main(["-q", "merge-lora", *argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, (argv, err)
        assert not out.exists()
    dora = Adapter({}, 1, 1.0, method="dora")
    with pytest.raises(UserError, match=r"x is a dora adapter: .*resize --lora x") as e:
        merge_adapters([sources[0], Source(dora, 1.0, "x")])
    assert "\n" not in str(e.value)
    token = torch.ones(1, 64)
    a = Adapter(dict(sources[0].adapter.tensors), 16, 16.0, embeddings={"<t>": token})
    b = Adapter(dict(sources[1].adapter.tensors), 16, 16.0, embeddings={"<t>": token * 2})
    with pytest.raises(UserError, match="both bring token <t> with different vectors"):
        merge_adapters([Source(a, 1.0, "a"), Source(b, 1.0, "b")])
    same, _ = merge_adapters([Source(a, 1.0, "a"), Source(a, 0.5, "a2")])
    assert list(same.embeddings) == ["<t>"]
