"""The interface a newcomer touches first: one flag vocabulary with deprecated aliases, --help with
defaults, global options after the command, `list` / `info`, shipped names everywhere with suggestions,
reproducible `sample` outputs (`--from`), one trajectory row per digit, threads, quick mode, extract's report,
and Pipeline.set_lora_weight / remove_lora."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lora4diffusion import catalog, quick
from lora4diffusion.cli import MODEL_COMMANDS, build_parser, main
from lora4diffusion.errors import UserError

# (argv with the old spelling, the new option's dest, the value it must carry, the new spelling)
ALIASES = [
    (["train", "--out", "o", "--steps", "7"], "max_train_steps", 7, "--max-train-steps"),
    (["train-lora", "--style", "bold", "--out", "o", "--steps", "7"], "max_train_steps", 7,
     "--max-train-steps"),
    (["train-lora", "--style", "bold", "--out", "o", "--base", "B"], "checkpoint", "B", "--checkpoint"),
    (["train-lora", "--style", "bold", "--out", "o", "--per-digit", "3"], "examples_per_digit", 3,
     "--examples-per-digit"),
    (["train-vae", "--train-steps", "7"], "max_train_steps", 7, "--max-train-steps"),
    (["extract", "--tuned", "t", "--rank", "1", "--out", "o", "--base", "B"], "checkpoint", "B",
     "--checkpoint"),
    (["demo", "--base", "B"], "checkpoint", "B", "--checkpoint"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny label model (another base than the shipped one)."""
    from lora4diffusion.training.base import train_base

    out = tmp_path_factory.mktemp("tiny") / "run"
    train_base("tiny", out, steps=2, progress=False)
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ----------------------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("argv, dest, value, new", ALIASES, ids=[f"{a[0]}{a[-2]}" for a, *_ in ALIASES])
def test_old_spellings_work_with_a_one_line_note(argv, dest, value, new, capsys):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0] and new in err[0] and argv[-2] in err[0], err
    assert f"lora4diffusion {argv[0]}" in err[0]
    text = _subparsers()[argv[0]].format_help()
    assert argv[-2] not in text.replace(new, "")  # hidden from --help


def test_new_spellings_give_no_note(capsys):
    args = build_parser().parse_args(["train-lora", "--style", "bold", "--out", "o", "--checkpoint", "base",
                                      "--max-train-steps", "3", "--examples-per-digit", "2"])
    assert (args.checkpoint, args.max_train_steps, args.examples_per_digit) == ("base", 3, 2)
    assert capsys.readouterr().err == ""


def test_every_model_command_has_device_and_the_same_bf16_switch():
    subs = _subparsers()
    assert set(MODEL_COMMANDS) <= set(subs)
    for name in MODEL_COMMANDS:
        opts = subs[name]._option_string_actions
        assert {"--device", "--bf16", "--no-bf16"} <= set(opts), name
        assert opts["--device"].choices == ["auto", "cpu", "cuda"], name
        assert isinstance(opts["--bf16"], argparse.BooleanOptionalAction), name
    top = build_parser().parse_args(["list"])
    assert top.device == "auto" and top.bf16 is None  # None: on where the device supports it


def test_base_model_flag_is_checkpoint_everywhere():
    for name, sp in _subparsers().items():
        shown = {s for a in sp._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
        assert "--base" not in shown, name


# ----------------------------------------------------------------------------------------------- help
def test_help_lists_commands_in_workflow_order_with_examples():
    text = build_parser().format_help()
    order = ["train-vae", "train ", "sample", "evaluate", "train-lora", "merge", "list", "info", "serve"]
    listed = text[text.index("COMMAND") :]
    positions = [listed.index(f"    {c}") for c in order]
    assert positions == sorted(positions), positions
    assert "examples:" in text and text.count("lora4diffusion sample") >= 1


def test_every_option_states_its_default_and_choices():
    for name, sp in _subparsers().items():
        text = sp.format_help()
        for a in sp._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or a.default == [] or any(
                    a.default is v for v in (None, False, argparse.SUPPRESS)):
                continue
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert "default" in sp._get_formatter()._get_help_string(a), (name, a.option_strings)
        for a in sp._actions:
            if a.choices and a.option_strings and a.help != argparse.SUPPRESS:
                assert "{" + ",".join(a.choices) + "}" in text, (name, a.option_strings)
    assert "(default: fast)" in " ".join(_subparsers()["train"].format_help().split())
    assert "(default: 0.0)" in " ".join(_subparsers()["train-lora"].format_help().split())  # --dropout


def test_global_options_after_the_command():
    args = build_parser().parse_args(["sample", "--out", "o", "-q", "--threads", "1", "--device", "cpu"])
    assert args.quiet and args.threads == 1 and args.device == "cpu"
    args = build_parser().parse_args(["-q", "--device", "cpu", "--threads", "2", "sample", "--out", "o"])
    assert args.quiet and args.threads == 2 and args.device == "cpu"  # before the command: kept
    args = build_parser().parse_args(["sample", "--out", "o"])
    assert not args.quiet and args.threads is None and args.device == "auto"


def test_usage_errors_name_the_command_and_its_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--out", "o", "--bogus"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("lora4diffusion sample: error:") and "lora4diffusion sample --help" in err


# -------------------------------------------------------------------------------- names, list, info
def test_shipped_names_resolve_and_unknown_ones_suggest():
    assert catalog.resolve("base", "model") == catalog.PRETRAINED / "base"
    assert catalog.resolve("bold", "adapter") == catalog.PRETRAINED / "adapters" / "bold"
    with pytest.raises(UserError, match="did you mean italic") as e:
        catalog.resolve("italics", "adapter")
    assert "known: bold, bold-pixel, italic, italic-pixel" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="did you mean base"):
        catalog.resolve("bsae", "model")


def test_cli_suggests_the_nearest_adapter(tmp_path, capsys):
    assert main(["sample", "--lora", "italics", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora4diffusion sample: error:") and "did you mean italic" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_by_name_in_evaluate_and_pipeline(capsys):
    from lora4diffusion.pipeline import Pipeline

    assert Pipeline.load("base").config == Pipeline.load().config
    argv = ["-q", "evaluate", "--checkpoint", "base", "--digits", "1", "--per-digit", "2", "--steps", "2",
            "--json", "--no-bf16"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["source"]["checkpoint"] == "base"


def test_list_shows_shipped_and_given_folders(tiny, tmp_path, capsys):
    from lora4diffusion.lora.adapters import export_peft

    export_peft("bold", tmp_path / "peft_bold")
    assert main(["list", str(tiny.parent), str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "models (--checkpoint)" in text and "adapters (--lora)" in text
    assert "bold" in text and "italic" in text and "style bold" in text and "rank 4" in text
    assert str(tiny) in text and str(tmp_path / "peft_bold") in text
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {(r["kind"], r["name"]) for r in rows}
    assert names >= {("model", "base"), ("adapter", "bold"), ("adapter", "italic")}


def test_info_says_everything_and_whether_an_adapter_fits(tiny, capsys):
    from lora4diffusion.pipeline import Pipeline

    assert main(["info", "bold", "--checkpoint", "base", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "adapter" and data["rank"] == 16 and data["style"] == "bold"
    assert data["fingerprint"] == Pipeline.load().fingerprint  # UNet + text encoder of the prompt base
    assert data["fits"].startswith("yes") and data["train"]["steps"] == 750
    assert main(["info", "bold", "--checkpoint", str(tiny), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"].startswith("no")
    assert main(["info", str(tiny)]) == 0
    text = capsys.readouterr().out
    assert "kind: model" in text and "preset: tiny" in text and "fingerprint: " in text
    assert main(["info", "blod"]) == 2 and "did you mean bold" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ reproducibility
def test_sample_records_its_parameters_and_from_redraws_the_same_pixels(tmp_path, capsys):
    a = tmp_path / "a"
    argv = ["-q", "sample", "--digits", "3,5,7", "--per-digit", "2", "--steps", "3", "--seed", "11",
            "--lora", "bold:0.5", "--guidance", "1.5", "--trajectory", "--out", str(a)]
    assert main(argv) == 0
    line = capsys.readouterr().out.splitlines()[0]
    for part in ("bold:0.5", "sampler ddim", "steps 3", "guidance 1.5", "seed 11", "digits 3,5,7 x 2",
                 "bf16"):
        assert part in line, (part, line)
    png = Image.open(a / "samples.png")
    assert "<lora:bold:0.5>" in png.text["parameters"] and "Steps: 3, Sampler: DDIM" in png.text["parameters"]
    with np.load(a / "samples.npz", allow_pickle=False) as f:
        want = f["images"]
        assert json.loads(str(f["parameters"]))["seed"] == 11
    for source in (a / "samples.png", a / "samples.npz"):
        out = tmp_path / f"from_{source.suffix[1:]}"
        assert main(["-q", "sample", "--from", str(source), "--out", str(out)]) == 0
        with np.load(out / "samples.npz", allow_pickle=False) as f:
            assert np.array_equal(f["images"], want)
    other = ["-q", "sample", "--from", str(a / "samples.png"), "--seed", "12", "--out", str(tmp_path / "c")]
    assert main(other) == 0
    with np.load(tmp_path / "c" / "samples.npz", allow_pickle=False) as f:
        assert f["images"].shape == want.shape and not np.array_equal(f["images"], want)  # given options win
    # one trajectory row per asked digit (3), not the first samples (6 here): grid_image's geometry
    assert Image.open(a / "trajectory.png").height == (3 * (28 + 2) + 2) * 2


def test_from_refuses_a_file_without_a_record(tmp_path, capsys):
    Image.new("L", (4, 4)).save(tmp_path / "plain.png")
    assert main(["sample", "--from", str(tmp_path / "plain.png"), "--out", str(tmp_path / "o")]) == 2
    assert "no lora4diffusion sampling record" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- API
def test_pipeline_set_and_remove_lora_weight():
    from lora4diffusion.lora.layers import lora_layers
    from lora4diffusion.pipeline import Pipeline

    pipe = Pipeline.load()
    keys = set(pipe.unet.state_dict())
    base, _ = pipe.generate([3, 7], steps=3, seed=1)
    name = pipe.add_lora("bold", weight=0.5)
    styled, _ = pipe.generate([3, 7], steps=3, seed=1)
    assert not torch.equal(styled, base) and pipe.loras == {name: 0.5}
    pipe.set_lora_weight(name, 0.0)
    assert torch.equal(pipe.generate([3, 7], steps=3, seed=1)[0], base)
    pipe.set_lora_weight(name, 0.5)
    assert torch.equal(pipe.generate([3, 7], steps=3, seed=1)[0], styled)
    pipe.remove_lora(name)
    assert not lora_layers(pipe.unet) and set(pipe.unet.state_dict()) == keys and pipe.loras == {}
    assert torch.equal(pipe.generate([3, 7], steps=3, seed=1)[0], base)
    with pytest.raises(UserError, match="no adapter named"):
        pipe.remove_lora(name)


# (tokens, features in, features out): the UNet's and text encoder's linear layers at sampling batch sizes
GEMM_SHAPES = [(16, 64, 64), (64, 64, 192), (100, 32, 96), (250, 128, 128), (1000, 64, 64), (7, 48, 80)]


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_matrix_products_do_not_depend_on_buffer_addresses(m, k, n):
    """Weight 0 = the base bit for bit needs products whose low bits do not depend on where the allocator put
    a buffer (an adapter's allocations move the activations): the same input at 64-byte-step offsets."""
    g = torch.Generator().manual_seed(m * k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    reference = torch.nn.functional.linear(x, w, b)
    for offset in range(16, 256, 16):  # floats: 64 bytes apart, every address class mod 1024
        xs = torch.empty(m * k + offset)[offset:].view(m, k)
        ws = torch.empty(n * k + offset)[offset:].view(n, k)
        xs.copy_(x), ws.copy_(w)
        assert torch.equal(torch.nn.functional.linear(xs, ws, b), reference), offset


def _mkl_mode_after_import(env: dict) -> tuple[str | None, int | None]:
    code = ("import ctypes, os, torch, lora4diffusion\n"
            "torch.randn(8, 8) @ torch.randn(8, 8)\n"
            "lib = os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so')\n"
            "try:\n    mode = ctypes.CDLL(lib).mkl_serv_cbwr_get(1)\n"
            "except (OSError, AttributeError):\n    mode = None\n"
            "print(os.environ.get('MKL_CBWR'), mode)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    value, mode = out.stdout.split()
    return value, None if mode == "None" else int(mode)


def test_importing_the_package_asks_mkl_for_reproducible_results():
    """MKL reads its reproducibility mode once, at its first call: importing lora4diffusion (before any
    product) must set it, and a mode the user chose is kept."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    value, mode = _mkl_mode_after_import(env)
    assert value == "AUTO"
    if mode is not None:  # torch built with MKL (x86 wheels): 2 is MKL_CBWR_AUTO, 1 would mean "off"
        assert mode == 2
    value, mode = _mkl_mode_after_import({**env, "MKL_CBWR": "COMPATIBLE"})
    assert value == "COMPATIBLE" and mode in (None, 3)


def test_extract_defaults_to_all_linear_and_counts_what_it_cannot_capture(tiny):
    from lora4diffusion.folders.model import load_model
    from lora4diffusion.lora.extract import extract_lora
    from lora4diffusion.training.lora import LoRAConfig

    assert _subparsers()["extract"].get_default("targets") == LoRAConfig.targets == "all-linear"
    base, _, _ = load_model(tiny)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    linear = next(m for m in tuned.modules() if isinstance(m, torch.nn.Linear))
    conv = next(m for m in tuned.modules() if isinstance(m, torch.nn.Conv2d))
    u = torch.randn(linear.weight.shape[0], 1, generator=g)
    v = torch.randn(1, linear.weight.shape[1], generator=g)
    d_conv = 0.1 * torch.randn(conv.weight.shape, generator=g)
    with torch.no_grad():
        linear.weight += u @ v  # rank 1: captured exactly at rank 1
        conv.weight += d_conv  # not a Linear: outside all-linear, not captured
    adapter, errors = extract_lora(base, tuned, 1, "all-linear")
    assert errors["uncaptured"] == 1
    captured, missed = float((u @ v).double().pow(2).sum()), float(d_conv.double().pow(2).sum())
    # everything the adapter leaves out is the conv delta: overall = ||d_conv|| / ||all deltas||
    assert errors["overall"] == pytest.approx(math.sqrt(missed / (missed + captured)), rel=1e-3)


# --------------------------------------------------------------------------------- threads, signals
def test_threads_follow_the_allowed_cores_and_the_flag(monkeypatch, capsys):
    from lora4diffusion.threads import allowed_cores, configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads() == allowed_cores() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == allowed_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads() == 1
        assert main(["list", "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_library_training_installs_no_signal_handlers(tmp_path):
    from lora4diffusion.training.base import train_base

    seen = []

    def should_stop() -> bool:
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return False

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    train_base("tiny", tmp_path / "run", steps=1, progress=False, should_stop=should_stop)
    assert seen and all(s == before for s in seen)


# ------------------------------------------------------------------------------------------ quick mode
def test_quick_mode_caps_work_only_when_set(monkeypatch, capsys):
    args = argparse.Namespace(max_train_steps=None, steps=50, per_digit=1, preset="base")
    monkeypatch.delenv(quick.ENV, raising=False)
    assert quick.shrink(args) == [] and args.steps == 50
    monkeypatch.setenv(quick.ENV, "1")
    quick.shrink(args)
    assert (args.max_train_steps, args.steps, args.per_digit, args.preset) == (
        quick.CAPS["max_train_steps"], quick.CAPS["steps"], 1, "tiny")
    assert quick.ENV in capsys.readouterr().err
    monkeypatch.setenv(quick.ENV, "0")
    assert not quick.enabled()


def test_quick_serve_starts_and_returns(monkeypatch, capsys):
    monkeypatch.setenv(quick.ENV, "1")
    assert main(["serve", "--port", "0"]) == 0
    assert "not started" in capsys.readouterr().out
