"""The KL autoencoder: shapes, diffusers' AutoencoderKL as the oracle, the KL term in closed form, train-vae
(through the one Trainer) with bit-exact resume and the measured scaling factor, reconstruct's files, the
latent cache, and one line + exit 2 for bad input."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora4diffusion.cli import main
from lora4diffusion.data import load_mnist
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import load_samples
from lora4diffusion.folders import vae as vae_folders
from lora4diffusion.folders.vae import load_vae
from lora4diffusion.formats.diffusers_vae import diffusers_config, from_diffusers, to_diffusers
from lora4diffusion.latents import reconstruct, to_vae_input
from lora4diffusion.models import vae as vae_model
from lora4diffusion.models.vae import VAE, DiagonalGaussian, VAEConfig, measure_scaling_factor
from lora4diffusion.reconstruction import reconstruction_report
from lora4diffusion.styles import apply_style, slant
from lora4diffusion.training import latents as training_latents
from lora4diffusion.training.latents import cached_latents
from lora4diffusion.training.run import STATE_NAME
from lora4diffusion.training.vae import augment, draw_augmentation, train_vae

TINY = VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4)


def _randomised(cfg: VAEConfig, seed: int = 0) -> VAE:
    """A VAE whose every weight (GroupNorm affines, biases too) is random, so a wrong name or op shows."""
    torch.manual_seed(seed)
    vae = VAE(cfg).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae


# tiny_vae: `train-vae --preset tiny --device cpu`, conftest's (once per session, shared)


def _snapshot(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------ network


def test_default_latent_is_4x8x8_and_shapes_flow():
    assert VAEConfig().latent_shape == (4, 8, 8) and VAEConfig().factor == 4
    vae = VAE(TINY)
    digits = load_mnist("embedded").heldout.images[:3]
    x = to_vae_input(digits, TINY)
    assert x.shape == (3, 1, 32, 32) and x[..., :2, :].eq(-1).all() and x[..., :, -2:].eq(-1).all()
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (3, 4, 8, 8)
    assert vae.decode(post.mode()).shape == (3, 1, 32, 32)
    assert reconstruct(vae, digits).shape == (3, 28, 28)
    with pytest.raises(UserError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 1, 30, 30))
    with pytest.raises(UserError, match="at most 16x16"):
        to_vae_input(digits, VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, image_size=16))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(norm_num_groups=5), "divisible by norm_num_groups"),
        (dict(image_size=30), "divisible by 4"),
        (dict(scaling_factor=0.0), "scaling_factor"),
        (dict(scaling_factor=float("nan")), "scaling_factor"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(block_out_channels=()), "block_out_channels"),
        (dict(latent_channels=2.5), "latent_channels"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(UserError, match=match):
        VAEConfig(**bad)


def test_config_json_round_trip_and_unknown_fields():
    cfg = VAEConfig(scaling_factor=0.5)
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown field"):
        VAEConfig.from_dict({**cfg.to_dict(), "double_z": True})


@pytest.mark.parametrize(
    "cfg",
    [
        VAEConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, image_size=16),
        VAEConfig(block_out_channels=(8, 16), layers_per_block=2, latent_channels=3, norm_num_groups=4,
                  image_size=16, mid_block_add_attention=False),
    ],
)
def test_matches_diffusers_autoencoderkl(cfg):
    """Our weights, renamed by formats/diffusers_vae, load strictly into diffusers' AutoencoderKL built from
    the equivalent config; encode's mean/logvar, the KL and decode agree in fp32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL

    ours = _randomised(cfg)
    ref = AutoencoderKL(**diffusers_config(cfg)).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    x = torch.rand(3, 1, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(3, *cfg.latent_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p, q = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(p.mean, q.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(p.logvar, q.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(p.kl(), q.kl(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-5)
        assert p.mean.abs().max() > 0.1  # a non-trivial comparison
    # and back: diffusers' state dict converts to ours, tensor for tensor
    back = from_diffusers(ref.state_dict(), cfg)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_from_diffusers_accepts_legacy_attention_names_and_refuses_others():
    cfg = VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, image_size=16)
    state = _randomised(cfg).state_dict()
    legacy = {}
    for k, v in state.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            k = k.replace(new, old)
        legacy[k] = v[:, :, None, None] if v.dim() == 2 else v  # pre-0.14 1x1-conv attention weights
    assert any(".query." in k for k in legacy)
    back = from_diffusers(legacy, cfg)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(UserError, match="missing"):
        from_diffusers({k: v for k, v in state.items() if "quant_conv" not in k}, cfg)
    with pytest.raises(UserError, match="shape"):
        from_diffusers({**state, "quant_conv.bias": torch.zeros(3)}, cfg)


def test_kl_and_sampling_closed_forms():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(5, 8, 3, 3, generator=g) * 2
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    normal = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    want = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(post.kl().double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(post.mode(), mean)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    z = post.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mean + (0.5 * logvar).exp() * eps)
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), 100.0)).logvar.max() == 20.0  # LDM's clamp


def test_scaling_factor_is_one_over_latent_std():
    latents = torch.randn(200, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert measure_scaling_factor(latents) == pytest.approx(1 / float(latents.double().std()), rel=1e-12)
    with pytest.raises(UserError):
        measure_scaling_factor(torch.zeros(3, 4, 2, 2))


def test_augmentation_uses_the_style_transforms():
    digits = load_mnist("embedded").train.images[:64]
    width, italic = draw_augmentation(64, torch.Generator().manual_seed(0))
    assert set(width.tolist()) == {0, 1, 2} and 0 < int(italic.sum()) < 64
    out = augment(digits, width, italic)
    for i in range(64):
        want = digits[i : i + 1]
        if width[i]:
            want = apply_style(want, ("bold", "thin")[int(width[i]) - 1])
        if italic[i]:
            want = apply_style(want, "italic")
        assert torch.equal(out[i : i + 1], want), i


# ------------------------------------------------------------------------------------------ training


def test_train_vae_writes_a_vae_folder_with_measured_scale(tiny_vae):
    for name in ("config.json", "model.safetensors", STATE_NAME, "metrics.csv", "loss.png",
                 "samples/step_0000020.png"):
        assert (tiny_vae / name).is_file(), name
    losses = [float(r.split(",")[1]) for r in (tiny_vae / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0]
    vae, config = load_vae(tiny_vae)
    assert config["step"] == 20 and config["loss"] == "l1" and config["kl_weight"] == 1e-6
    # the stored scale is 1 / std of the (EMA) model's latent means of the first 1000 train digits
    first = load_mnist("embedded").train.images[:1000]
    latents = vae_model.encode_dataset(vae, to_vae_input(first, vae.cfg))
    assert vae.cfg.scaling_factor == pytest.approx(1 / float(latents.double().std()), rel=1e-4)


def test_train_vae_resume_is_bit_exact(tmp_path):
    kw = dict(preset="tiny", progress=False, device="cpu", sample_every=0)
    train_vae(tmp_path / "a", steps=12, checkpoint_every=6, **kw)
    train_vae(tmp_path / "b", steps=6, **kw)
    with pytest.raises(UserError, match="--resume"):
        train_vae(tmp_path / "b", steps=12, **kw)
    train_vae(tmp_path / "b", steps=12, resume=True, **kw)
    a, b = load_file(tmp_path / "a" / STATE_NAME), load_file(tmp_path / "b" / STATE_NAME)
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "a" / "config.json").read_text())["vae"] == json.loads(
        (tmp_path / "b" / "config.json").read_text()
    )["vae"]
    other = VAEConfig(**{**TINY.to_dict(), "latent_channels": 2})
    with pytest.raises(UserError, match="different vae"):
        train_vae(tmp_path / "b", steps=14, resume=True, vae_config=other, **kw)
    with pytest.raises(UserError, match="different vae"):
        train_vae(tmp_path / "b", steps=14, resume=True, kl_weight=1e-3, **kw)


# ------------------------------------------------------------------------------------------ reconstruct


def test_reconstruct_writes_the_samples_contract(tiny_vae, tmp_path, capsys):
    out = tmp_path / "rec"
    args = ["-q", "reconstruct", "--vae", str(tiny_vae), "--style", "bold", "--digits", "3,7",
            "--per-digit", "4", "--no-bf16", "--out", str(out), "--device", "cpu"]  # fp32: compared exactly
    assert main(args) == 0
    orig, labels = load_samples(out / "originals.npz")  # the validator evaluate uses on samples.npz
    recon, labels2 = load_samples(out / "reconstructions.npz")
    assert orig.shape == recon.shape == (8, 28, 28) and labels.tolist() == [3] * 4 + [7] * 4
    assert torch.equal(labels, labels2)
    for f in ("originals.npz", "reconstructions.npz"):
        data = np.load(out / f)
        assert data["images"].dtype == np.float32 and data["labels"].dtype == np.int64
    held = load_mnist("embedded").heldout
    want = torch.cat([held.images[held.labels == d][:4] for d in (3, 7)])
    assert torch.equal(orig, apply_style(want, "bold").float() / 255)
    vae, _ = load_vae(tiny_vae)
    assert torch.equal(recon, reconstruct(vae, apply_style(want, "bold")))
    from PIL import Image

    with Image.open(out / "reconstructions.png") as im:  # 4 per row, 4 rows: (originals, recons) x 2 digits
        assert im.size == (2 * (4 * 30 + 2), 2 * (4 * 30 + 2))
    assert main([*args[:-4], "--out", str(out), "--device", "cpu"]) == 2  # non-empty --out, no --overwrite


def test_reconstruction_report_numbers(tiny_vae):
    vae, _ = load_vae(tiny_vae)
    report = reconstruction_report(vae, per_digit=2)
    assert list(report) == ["plain", "bold", "thin", "italic"]
    for r in report.values():
        assert r["n"] == 20 and 0 <= r["accuracy_reconstructions"] <= 1
        assert r["ink_ratio"] == pytest.approx(r["ink_reconstructions"] / r["ink_originals"])
    assert report["plain"]["accuracy_originals"] >= 0.9
    assert report["italic"]["slant_originals"] > report["plain"]["slant_originals"] + 2
    assert report["bold"]["ink_originals"] > 1.5 * report["plain"]["ink_originals"]
    held = load_mnist("embedded").heldout
    italic = apply_style(torch.cat([held.images[held.labels == d][:2] for d in range(10)]), "italic")
    assert report["italic"]["slant_originals"] == pytest.approx(slant(italic.float() / 255))


def test_cached_latents_are_computed_once(tiny_vae, tmp_path, monkeypatch):
    vae, _ = load_vae(tiny_vae)
    digits = load_mnist("embedded").heldout.images[:10]
    first = cached_latents(vae, digits, tmp_path)
    want = vae_model.encode_dataset(vae, to_vae_input(digits, vae.cfg)) * vae.cfg.scaling_factor
    assert torch.equal(first, want) and len(list(tmp_path.iterdir())) == 1

    def no_encoding(*a, **k):
        raise AssertionError("encoded again")

    monkeypatch.setattr(training_latents, "encode_dataset", no_encoding)
    assert torch.equal(cached_latents(vae, digits, tmp_path), first)
    with pytest.raises(AssertionError):  # other data: a new entry
        cached_latents(vae, digits[:5], tmp_path)


# ------------------------------------------------------------------------------------------ bad input


def _bad(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def test_bad_inputs_exit_2_and_write_nothing(tiny_vae, tmp_path, capsys):
    out = tmp_path / "o"
    before = _snapshot(tiny_vae)
    rec = ["reconstruct", "--out", str(out), "--device", "cpu"]
    _bad(capsys, [*rec, "--vae", str(tiny_vae), "--style", "fancy"], "unknown style 'fancy'")
    _bad(capsys, [*rec, "--vae", str(tmp_path / "nope")], "does not exist")
    not_vae = tmp_path / "unet"
    not_vae.mkdir()
    (not_vae / "config.json").write_text(json.dumps({"format": "lora4diffusion-model", "version": 1}))
    _bad(capsys, [*rec, "--vae", str(not_vae)], f"{not_vae} is not a VAE folder")
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((tiny_vae / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((tiny_vae / "model.safetensors").read_bytes()[:300])
    _bad(capsys, [*rec, "--vae", str(truncated)], "model.safetensors")
    small = tmp_path / "small"  # a valid VAE for 16x16 images: cannot take 28x28 digits
    vae_folders.save_vae(small, VAE(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, image_size=16)))
    _bad(capsys, [*rec, "--vae", str(small)], "at most 16x16")
    assert not out.exists()
    f = tmp_path / "file"
    f.write_text("x")
    _bad(capsys, ["train-vae", "--preset", "tiny", "--out", str(f)], "is a file")
    tv = ["train-vae", "--preset", "tiny", "--out", str(tiny_vae)]
    _bad(capsys, [*tv, "--resume", "--overwrite"], "one of them")
    _bad(capsys, ["train-vae", "--preset", "tiny", "--out", str(tiny_vae)], "--overwrite")
    for flag in ("--lr", "--kl-weight"):
        with pytest.raises(SystemExit) as e:  # argparse's own one-line error
            main(["train-vae", "--preset", "tiny", "--out", str(out), flag, "-1"])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert _snapshot(tiny_vae) == before and not out.exists() and f.read_text() == "x"


# ------------------------------------------------------------------------------------------ latent diffusion


def test_latent_base_trains_samples_and_stays_self_contained(tiny_vae, tmp_path, monkeypatch, capsys):
    """train --vae: the UNet denoises the VAE's cached latents; the folder carries the VAE (fingerprinted),
    sampling decodes to 28x28 digits, and train-lora / merge keep working on it."""
    from lora4diffusion.folders.model import load_model
    from lora4diffusion.pipeline import Pipeline
    from lora4diffusion.training.base import train_base

    monkeypatch.setenv("LORA4DIFFUSION_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "latent"
    train_base("tiny", run, steps=4, progress=False, device="cpu", vae=tiny_vae, sample_every=4)
    vae, _ = load_vae(tiny_vae)
    unet, _, config = load_model(run)
    assert (unet.cfg.in_channels, unet.cfg.image_size) == (4, 8)
    assert config["vae"] == {"folder": "vae", "fingerprint": vae_folders.vae_fingerprint(vae)}
    assert (run / "samples" / "step_0000004.png").is_file()
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 1  # encoded once, cached
    images, traj = Pipeline.load(run).generate([3, 5], steps=3, trajectory_every=1)
    assert images.shape == (2, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert traj[-1].shape == (2, 1, 28, 28)

    lora = ["--style", "bold", "--max-train-steps", "2", "--batch-size", "4", "--device", "cpu"]
    assert main(["-q", "train-lora", "--checkpoint", str(run), *lora, "--out", str(tmp_path / "bold")]) == 0
    assert main(["-q", "merge", "--checkpoint", str(run), "--lora", str(tmp_path / "bold"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert Pipeline.load(tmp_path / "merged").vae is not None

    with pytest.raises(UserError, match="different vae"):  # resume with another VAE
        other = tmp_path / "other_vae"
        vae_folders.save_vae(other, VAE(TINY))
        train_base("tiny", run, steps=6, resume=True, progress=False, device="cpu", vae=other)
    with pytest.raises(UserError, match="--image-size"):
        train_base("tiny", tmp_path / "x", steps=2, progress=False, image_size=32, vae=tiny_vae)
    (run / "vae" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    sample = ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s")]
    _bad(capsys, sample, "not the one it was trained")
    for f in (run / "vae").iterdir():
        f.unlink()
    (run / "vae").rmdir()
    _bad(capsys, sample, "is missing")
    assert not (tmp_path / "s").exists()


def test_decode_latents_bf16_is_close_to_fp32_and_float32():
    """bf16 sampling decodes under bf16 autocast too: the images stay float32 in [0, 1], within a few grey
    levels of the fp32 decode (the shipped VAE: max 0.013, benchmarks/RESULTS.md), and the flag does act."""
    from lora4diffusion.latents import decode_latents

    vae, _ = load_vae("vae")
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, half = decode_latents(vae, z), decode_latents(vae, z, bf16=True)
    assert full.dtype == half.dtype == torch.float32 and full.shape == half.shape == (6, 28, 28)
    assert 0 < (full - half).abs().max() < 0.05
    assert 0.0 <= half.min() and half.max() <= 1.0
