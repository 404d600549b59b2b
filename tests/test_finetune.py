"""train-lora / merge / sample --lora / extract / resize / PEFT export through the CLI and the Python API."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lora4diffusion.cli import main
from lora4diffusion.lora.layers import lora_layers
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.base import train_base
from lora4diffusion.training.lora import LoRAConfig, train_lora


@pytest.fixture(scope="module")
def base(tiny_label_run):
    return tiny_label_run  # train_base("tiny") (conftest's, shared)


@pytest.fixture(scope="module")
def bold(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "bold"
    assert (
        main(
            [
                "-q",
                "train-lora",
                "--checkpoint",
                str(base),
                "--style",
                "bold",
                "--max-train-steps",
                "12",
                "--rank",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def _sample(ckpt, out, *extra):  # fp32: the checks below are exact or 1e-4
    assert (
        main(
            [
                "-q",
                "sample",
                "--no-bf16",
                "--checkpoint",
                str(ckpt),
                "--digits",
                "1,7",
                "--per-digit",
                "2",
                "--steps",
                "4",
                "--out",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    return np.load(out / "samples.npz")["images"]


def test_adapter_file_holds_only_lora_tensors_and_metadata(base, bold):
    with safe_open(str(bold / "adapter.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(".lora_down.weight" in k or ".lora_up.weight" in k for k in keys)
    assert meta["style"] == "bold" and meta["steps"] == "12" and meta["rank"] == "2"
    assert len(meta["base_fingerprint"]) == 64 and json.loads(meta["targets"])
    with safe_open(str(bold / "adapter.safetensors"), "pt") as f:
        n_values = sum(f.get_tensor(k).numel() for k in keys)
    assert (bold / "adapter.safetensors").stat().st_size < 4 * n_values + 32 * 1024  # fp32 tensors + metadata
    assert (bold / "adapter.safetensors").stat().st_size < 0.1 * (base / "model.safetensors").stat().st_size


def test_lora_training_keeps_base_bit_identical_and_learns(base, tmp_path):
    pipe = Pipeline.load(base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    r = train_lora(
        "bold", tmp_path / "a", base=base, lora=LoRAConfig(rank=2, alpha=2.0), progress=False, steps=6
    )
    assert r["trainable_params"] > 0 and r["share"] < 0.2
    after = Pipeline.load(base).unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    p = Pipeline.load(base)
    p.add_lora(tmp_path / "a")
    ups = [layer.lora_up["a"].weight for layer in lora_layers(p.unet).values()]
    assert any(u.abs().sum() > 0 for u in ups)  # B moved away from its zero init


def test_scale_zero_is_bit_identical_and_merge_matches(base, bold, tmp_path):
    plain = _sample(base, tmp_path / "plain")
    zero = _sample(base, tmp_path / "zero", "--lora", f"{bold}:0")
    one = _sample(base, tmp_path / "one", "--lora", f"{bold}:1")
    assert np.array_equal(plain, zero)
    assert not np.array_equal(plain, one)
    assert (
        main(["-q", "merge", "--checkpoint", str(base), "--lora", f"{bold}:1", "--out", str(tmp_path / "m")])
        == 0
    )
    merged = _sample(tmp_path / "m", tmp_path / "merged")
    assert np.abs(merged - one).max() <= 1e-4


def test_two_adapters_mix(base, bold, tmp_path):
    a = _sample(base, tmp_path / "a", "--lora", f"{bold}:0.5", "--lora", f"{bold}:0.5")
    b = _sample(base, tmp_path / "b", "--lora", f"{bold}:1")
    assert np.abs(a - b).max() <= 1e-4  # two halves of one adapter = the whole adapter


def test_resize_extract_and_peft_export(base, bold, tmp_path, capsys):
    assert main(["-q", "resize", "--lora", str(bold), "--rank", "1", "--out", str(tmp_path / "r1")]) == 0
    assert "approximation error" in capsys.readouterr().out
    assert main(["-q", "export-peft", "--lora", str(bold), "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"
    assert (
        main(
            [
                "-q",
                "import-peft",
                "--peft",
                str(tmp_path / "peft"),
                "--checkpoint",
                str(base),
                "--out",
                str(tmp_path / "back"),
            ]
        )
        == 0
    )
    x = _sample(base, tmp_path / "x", "--lora", str(bold))
    y = _sample(base, tmp_path / "y", "--lora", str(tmp_path / "back"))
    assert np.array_equal(x, y)
    # full fine-tune, then extract a rank-2 LoRA of its attention deltas
    assert (
        main(
            [
                "-q",
                "train-lora",
                "--checkpoint",
                str(base),
                "--style",
                "bold",
                "--full",
                "--max-train-steps",
                "3",
                "--out",
                str(tmp_path / "full"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "extract",
                "--checkpoint",
                str(base),
                "--tuned",
                str(tmp_path / "full"),
                "--rank",
                "2",
                "--out",
                str(tmp_path / "ex"),
            ]
        )
        == 0
    )
    assert (tmp_path / "ex" / "adapter.safetensors").is_file()


def _bad(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (bad option values) exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_lora_inputs(base, bold, tmp_path, capsys):
    out = tmp_path / "o"
    t = ["train-lora", "--checkpoint", str(base), "--out", str(out), "--max-train-steps", "2"]
    _bad(capsys, [*t, "--style", "bold", "--rank", "0"], "rank")
    _bad(capsys, [*t, "--style", "bold", "--rank", "999"], "rank")
    _bad(capsys, [*t, "--style", "bold", "--alpha", "0"], "alpha")
    _bad(capsys, [*t, "--style", "bold", "--targets", "nothing_here"], "nothing_here")
    _bad(capsys, [*t, "--style", "gothic"], "gothic")
    (tmp_path / "empty").mkdir()
    _bad(capsys, [*t, "--style", str(tmp_path / "empty")], "empty")
    assert not out.exists()
    s = ["sample", "--checkpoint", str(base), "--out", str(out)]
    _bad(capsys, [*s, "--lora", f"{bold}:abc"], "not a number")
    other = tmp_path / "other"
    train_base("tiny", other, steps=2, progress=False, seed=5)
    _bad(
        capsys,
        ["sample", "--checkpoint", str(other), "--out", str(out), "--lora", str(bold)],
        "different base",
    )
    assert (
        main(
            [
                "-q",
                "sample",
                "--checkpoint",
                str(other),
                "--out",
                str(tmp_path / "forced"),
                "--lora",
                str(bold),
                "--force",
                "--digits",
                "1",
                "--per-digit",
                "1",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    data = (bold / "adapter.safetensors").read_bytes()
    (trunc / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    _bad(capsys, [*s, "--lora", str(trunc)], "adapter.safetensors")
