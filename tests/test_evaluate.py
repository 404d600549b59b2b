"""Evaluation: Fréchet distance, the shipped MNIST classifier, sample loading, scores, the CLI entry points.

All offline and fast: real digits come from the embedded subset; the only training runs on 200 digits.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from lora4diffusion import classifier as classifier_mod
from lora4diffusion import evaluate
from lora4diffusion.classifier import default_dir, load_classifier
from lora4diffusion.cli import evaluate as evaluate_cli
from lora4diffusion.data import Digits, MNISTSplits, from_model_range, load_mnist, to_model_range
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import evaluate_samples, format_report, frechet_distance, load_samples
from lora4diffusion.folders.model import load_model, save_model
from lora4diffusion.lora.adapters import save_adapter
from lora4diffusion.lora.layers import inject_lora, lora_layers
from lora4diffusion.models.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def splits() -> MNISTSplits:
    return load_mnist("embedded")


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def real_result(splits, clf) -> dict:
    # 500 train digits (every 9th: the file is sorted by label), scored against the held-out digits
    return evaluate_samples(splits.train.images[::9].float() / 255, splits.train.labels[::9], clf, splits)


def _cli(*argv: str) -> argparse.Namespace:
    from lora4diffusion.cli import build_parser  # --device and --bf16/--no-bf16 come from the CLI's parser

    return build_parser().parse_args(list(argv))


# ---------------------------------------------------------------------------------------------- Fréchet


def _random_cov(rng: np.random.Generator, d: int, rank: int) -> np.ndarray:
    a = rng.normal(size=(d, rank))
    return a @ a.T / rank


@pytest.mark.parametrize("d,rank", [(1, 1), (5, 5), (16, 40), (16, 6)])  # last: singular covariances
def test_frechet_matches_scipy(d, rank):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(d * 100 + rank)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d, rank), _random_cov(rng, d, rank)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6, abs=1e-8)


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    s = _random_cov(rng, 8, 20)
    mu = rng.normal(size=8)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    shift = rng.normal(size=8)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(shift @ shift, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sigma1 - sigma2)^2
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0)
    with pytest.raises(ValueError):
        frechet_distance(mu, s, mu[:4], s)


# ---------------------------------------------------------------------------------------------- classifier


def test_shipped_classifier_accuracy_is_reproducible(splits, clf):
    d = default_dir()
    assert (d / "classifier.safetensors").stat().st_size < 2_000_000
    info = json.loads((d / "classifier.json").read_text())
    assert info["train_command"] and info["train_seconds"] > 0 and info["heldout_digits"] == 500
    pred, probs = clf.predict(splits.heldout.images.float() / 255)
    measured = float((pred == splits.heldout.labels).double().mean())
    assert measured == pytest.approx(info["heldout_accuracy"], abs=1e-6)
    assert measured >= 0.985
    assert probs.shape == (500, 10) and torch.allclose(probs.sum(1), torch.ones(500), atol=1e-5)
    assert clf.features(splits.heldout.images[:3].float() / 255).shape == (3, clf.cfg.feature_dim)


def test_classifier_resizes_model_sized_samples(splits, clf):
    held = splits.heldout
    for size in (32, 48):  # the UNet's sizes: uint8 -> [-1, 1] at size S -> [0, 1], as sampled images come
        x = from_model_range(to_model_range(held.images, size))[:, 0]
        pred, _ = clf.predict(x)
        assert float((pred == held.labels).double().mean()) >= 0.97


def test_load_classifier_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_classifier(tmp_path / "nope")
    (tmp_path / "classifier.json").write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="not a lora4diffusion classifier"):
        load_classifier(tmp_path)


def test_train_classifier_cli_on_a_small_subset(tmp_path, monkeypatch, splits):
    # 200 train digits, 1 epoch: checks the plumbing (files, JSON, reload), not the accuracy
    train, held = splits.train, splits.heldout  # sorted by label: stride through them for every class
    small = MNISTSplits(
        Digits(train.images[::22][:200], train.labels[::22][:200], "small"),
        Digits(held.images[::10], held.labels[::10], "small held-out"),
        "small",
    )
    monkeypatch.setattr(classifier_mod, "load_mnist", lambda source: small)
    args = _cli("train-classifier", "--out", str(tmp_path / "c"), "--epochs", "1")
    assert args.func(args) == 0
    info = json.loads((tmp_path / "c" / "classifier.json").read_text())
    assert info["train_command"].startswith("lora4diffusion train-classifier --out ")
    assert info["train_digits"] == 200 and info["heldout_digits"] == 50
    reloaded = load_classifier(tmp_path / "c" / "classifier.safetensors")
    pred, _ = reloaded.predict(small.heldout.images.float() / 255)
    assert float((pred == small.heldout.labels).double().mean()) == pytest.approx(info["heldout_accuracy"])


# ---------------------------------------------------------------------------------------------- scores


def test_real_digits_score_well(real_result, clf):
    r, ref = real_result, real_result["reference"]
    assert r["n"] == 500 and r["fid_n"] == {"samples": 500, "heldout": 500}
    assert r["accuracy"] >= 0.97 and all(a >= 0.85 for a in r["per_digit_accuracy"].values())
    assert ref["real_vs_real_n"]["train_slice"] == 500  # same label mix and size as the samples
    assert 0 < ref["real_vs_real_fid"] and r["fid_classifier"] < 2 * ref["real_vs_real_fid"]
    assert ref["heldout_accuracy"] == pytest.approx(clf.info["heldout_accuracy"], abs=1e-6)
    assert abs(r["mean_ink"] - ref["heldout_mean_ink"]) < 0.02
    json.loads(format_report(r, as_json=True))
    table = format_report(r)
    assert "FID" in table and "floor" in table and "500 train vs 500" in table


def test_heldout_against_itself_has_zero_fid(splits, clf):
    r = evaluate_samples(splits.heldout.images.float() / 255, splits.heldout.labels, clf, splits)
    assert r["fid_classifier"] == pytest.approx(0.0, abs=1e-6)
    assert r["accuracy"] == pytest.approx(r["reference"]["heldout_accuracy"])


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_garbage_scores_badly(kind, splits, clf, real_result):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(200, 32, 32, generator=g) if kind == "noise" else torch.zeros(200, 32, 32)
    labels = torch.arange(10).repeat_interleave(20)
    r = evaluate_samples(images, labels, clf, splits)
    assert r["accuracy"] <= 0.2
    floor = r["reference"]["real_vs_real_fid"]
    assert r["reference"]["real_vs_real_n"]["train_slice"] == 200
    assert r["fid_classifier"] > 20 * floor and r["fid_classifier"] > 20 * real_result["fid_classifier"]


def test_evaluate_samples_rejects_bad_input(splits, clf):
    with pytest.raises(UserError, match="at least 2"):
        evaluate_samples(torch.zeros(1, 28, 28), torch.zeros(1, dtype=torch.int64), clf, splits)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        evaluate_samples(torch.full((4, 28, 28), 2.0), torch.zeros(4, dtype=torch.int64), clf, splits)


# ---------------------------------------------------------------------------------------------- load_samples


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_samples_roundtrip_and_squeeze(tmp_path):
    images = np.random.default_rng(0).random((6, 1, 32, 32), dtype=np.float32)
    x, y = load_samples(_npz(tmp_path / "s.npz", images=images, labels=np.arange(6)))
    assert x.shape == (6, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(images[:, 0])) and y.tolist() == list(range(6))


GOOD = np.full((4, 28, 28), 0.5, dtype=np.float32)
LABELS = np.arange(4, dtype=np.int64)
BAD_ARRAYS = {
    "no labels": ({"images": GOOD}, "no array 'labels'"),
    "no images": ({"labels": LABELS}, "no array 'images'"),
    "length mismatch": ({"images": GOOD, "labels": LABELS[:3]}, "4 images but 3 labels"),
    "2-D images": ({"images": GOOD[0], "labels": LABELS}, r"\[N, H, W\]"),
    "RGB images": ({"images": np.zeros((4, 3, 28, 28), np.float32), "labels": LABELS}, r"\[N, H, W\]"),
    "too small": ({"images": np.zeros((4, 4, 4), np.float32), "labels": LABELS}, "H, W >= 8"),
    "empty": ({"images": GOOD[:0], "labels": LABELS[:0]}, "no images"),
    "0..255 range": ({"images": GOOD * 255, "labels": LABELS}, r"in \[0, 1\]"),
    "negative": ({"images": GOOD - 1, "labels": LABELS}, r"in \[0, 1\]"),
    "NaN": ({"images": np.where(GOOD > 0, np.nan, GOOD), "labels": LABELS}, "NaN or infinite"),
    "inf": ({"images": np.full_like(GOOD, np.inf), "labels": LABELS}, "NaN or infinite"),
    "float labels": ({"images": GOOD, "labels": LABELS.astype(float)}, "integer"),
    "2-D labels": ({"images": GOOD, "labels": LABELS[:, None]}, "1-D integer"),
    "label 10": ({"images": GOOD, "labels": LABELS + 7}, "digits 0..9"),
    "string images": ({"images": np.full((4, 28, 28), "a"), "labels": LABELS}, "dtype"),
    "object images": ({"images": np.array([None] * 4, dtype=object), "labels": LABELS}, "not a readable"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_load_samples_bad_arrays(case, tmp_path):
    arrays, message = BAD_ARRAYS[case]
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)  # object arrays are pickled on save; load refuses to unpickle
    with pytest.raises(UserError, match=message) as e:
        load_samples(path)
    assert "\n" not in str(e.value)


def test_load_samples_bad_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_samples(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="not a file"):
        load_samples(tmp_path)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError, match="not a readable"):
        load_samples(tmp_path / "text.npz")
    np.save(tmp_path / "plain.npy", GOOD)
    with pytest.raises(UserError, match="not an .npz archive"):
        load_samples(tmp_path / "plain.npy")
    good = _npz(tmp_path / "good.npz", images=GOOD, labels=LABELS).read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="not a readable"):
        load_samples(tmp_path / "cut.npz")


# ---------------------------------------------------------------------------------------------- CLI run(args)


@pytest.fixture(scope="module")
def real_npz(tmp_path_factory, splits):
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    images = (splits.train.images[::15].float() / 255).numpy()  # 300 digits, all classes
    return _npz(path, images=images, labels=splits.train.labels[::15].numpy())


@pytest.fixture
def no_reload(monkeypatch, splits):
    monkeypatch.setattr(evaluate, "load_mnist", lambda source: splits)  # the CLI would re-read the CSV


def test_run_json_and_table(real_npz, capsys, no_reload):
    assert evaluate_cli.run(_cli("evaluate", "--samples", str(real_npz), "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 300 and out["accuracy"] >= 0.97 and out["source"] == {"samples": str(real_npz)}
    assert set(out["per_digit_accuracy"]) == {str(d) for d in range(10)}
    args = _cli("evaluate", "--samples", str(real_npz))
    assert args.func is evaluate_cli.run and args.func(args) == 0
    table = capsys.readouterr().out
    assert "classifier accuracy" in table and "300 train vs 500" in table and "samples from samples " in table


def test_run_bad_input(tmp_path, real_npz):
    with pytest.raises(UserError, match="file not found"):
        evaluate_cli.run(_cli("evaluate", "--samples", str(tmp_path / "missing.npz")))
    for extra in (["--steps", "5"], ["--bf16"], ["--lora", "a"]):
        with pytest.raises(UserError, match="only applies with --checkpoint"):
            evaluate_cli.run(_cli("evaluate", "--samples", str(real_npz), *extra))
    with pytest.raises(UserError, match="does not exist"):
        evaluate_cli.run(_cli("evaluate", "--samples", str(real_npz), "--classifier", str(tmp_path / "none")))
    with pytest.raises(UserError):
        evaluate_cli.run(_cli("evaluate", "--checkpoint", str(tmp_path / "no-model")))
    for argv in (
        ["evaluate"],
        ["evaluate", "--samples", "a.npz", "--checkpoint", "d"],
        ["evaluate", "--checkpoint", "d", "--per-digit", "0"],
    ):
        with pytest.raises(SystemExit):
            _cli(*argv)


@pytest.fixture
def small_model(tmp_path):
    torch.manual_seed(0)
    cfg = UNetConfig(
        image_size=16,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attn_levels=(1,),
        context_dim=16,
        groups=4,
    )
    model = UNet(cfg)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # zero-initialised: eps would not depend on x
    save_model(tmp_path / "m", model, DiffusionConfig(timesteps=10))
    return tmp_path / "m"


def test_run_samples_a_checkpoint_first(tmp_path, small_model, capsys, no_reload):
    args = _cli("evaluate", "--checkpoint", str(tmp_path / "m"), "--per-digit", "2", "--steps", "2", "--json")
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 20 and out["image_size"] == [16, 16]
    assert out["source"]["steps"] == 2 and out["source"]["per_digit"] == 2
    assert out["reference"]["real_vs_real_n"]["train_slice"] == 20
    with pytest.raises(UserError, match="exceeds"):
        evaluate_cli.run(_cli("evaluate", "--checkpoint", str(tmp_path / "m"), "--steps", "11"))


def test_run_scores_a_checkpoint_with_adapters(tmp_path, small_model, capsys, no_reload):
    model, _, _ = load_model(small_model)
    inject_lora(model, "attention", 2, 2.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_up["default"].weight, std=0.5)
    save_adapter(model, tmp_path / "a")

    def scores(*extra):
        argv = ["evaluate", "--checkpoint", str(small_model), "--per-digit", "2", "--steps", "2", "--json"]
        assert evaluate_cli.run(_cli(*argv, *extra)) == 0
        return json.loads(capsys.readouterr().out)

    plain, off, on = scores(), scores("--lora", f"{tmp_path / 'a'}:0"), scores("--lora", str(tmp_path / "a"))
    assert off["mean_ink"] == plain["mean_ink"] and off["fid_classifier"] == plain["fid_classifier"]
    assert on["mean_ink"] != plain["mean_ink"]
    assert on["source"]["loras"] == [f"{tmp_path / 'a'}:1"]
    fp32 = scores("--no-bf16")["source"]
    assert scores("--bf16")["source"]["bf16"] is True and fp32["bf16"] is False
    assert fp32["precision"] == "fp32 (asked for)"  # the reason is said
