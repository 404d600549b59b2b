"""`lora4diffusion demo`: on a prompt base (trigger words, specificity, two triggers in one prompt, merge)
and on a label base; a self-contained report, honest checks, commands that reproduce the grids, bad input
refused."""

import hashlib
import html
import json
import shlex
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora4diffusion.cli import main
from lora4diffusion.lora.adapters import read_adapter
from lora4diffusion.lora.prompt_lora import split_adapter, trigger_words
from lora4diffusion.training.base import train_base

CHROMIUM = Path("/usr/bin/chromium")
SMALL = ["--lora-steps", "2", "--per-digit", "2", "--steps", "3"]
PROMPT_SETS = {"base", "base_trigger", "bold_0", "bold_0.5", "bold_1", "bold_no_trigger", "italic_1", "both",
               "bold_ti", "merged_bold"}  # fmt: skip
LABEL_SETS = {"base", "bold_0", "bold_0.5", "bold_1", "italic_1", "mix", "merged_bold"}


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return tiny_vae  # a tiny VAE (conftest's, shared)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny label model (the reference's design)."""
    run = tmp_path_factory.mktemp("demo") / "base"
    train_base("tiny", run, steps=8, progress=False)
    return run


@pytest.fixture(scope="module")
def prompt_demo(vae, tmp_path_factory):
    """The demo on a prompt base: --from-scratch trains a tiny prompt model (train --conditioning text
    --preset tiny) on the tiny VAE into OUT/base, then runs the whole story on it."""
    out = tmp_path_factory.mktemp("demo") / "prompt"
    argv = ["-q", "demo", "--from-scratch", "--scratch-preset", "tiny", "--vae", str(vae), "--out", str(out)]
    assert main([*argv, *SMALL]) == 0
    return out


@pytest.fixture(scope="module")
def demo(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    # a stale run that train-lora would refuse, and a user file that --overwrite must leave alone
    (out / "lora_bold").mkdir(parents=True)
    (out / "lora_bold" / "train_state.safetensors").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    argv = ["demo", "--out", str(out), "--checkpoint", str(base), "--overwrite", "-q", "--device", "cpu",
            "--no-bf16"]  # -q, --device and --bf16 after the command, as for every model command
    assert main([*argv, *SMALL]) == 0
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]


def _snapshot(folder: Path) -> dict:
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _self_contained(folder: Path) -> str:
    text = (folder / "report.html").read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(text)
    assert len(parser.links) >= 15  # grids, real digits, trajectory, loss curves, metrics.json, npz files
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), link  # relative only: works from file://
        assert (folder / link).is_file(), link
    assert "<link" not in text and "<script" not in text
    return text


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------- prompt base

def test_prompt_report_sections_commands_and_checks(prompt_demo):
    text = _self_contained(prompt_demo)
    for heading in ("Base vs triggered LoRA", "Trigger specificity", "Weight sweep",
                    "Two triggered adapters in one prompt", "Textual inversion", "Merging",
                    "Denoising trajectory", "Scores", "Reproduce each part"):  # fmt: skip
        assert f"<h2>{heading}" in text, heading
    m = _metrics(prompt_demo)
    assert set(m["sets"]) == PROMPT_SETS and m["settings"]["conditioning"] == "text"
    assert m["settings"]["triggers"] == {"bold": "sks", "italic": "ohwx"}
    cmds = dict(m["commands"])
    for v in m["sets"].values():
        assert html.escape(v["caption"]) in text and html.escape(v["prompt"]) in text  # grid + its prompt
        assert html.escape(v["command"]) in text and cmds[v["caption"]] == v["command"]  # its command
        assert v["command"].startswith("lora4diffusion sample --checkpoint ") and " --prompt " in v["command"]
        assert {"accuracy", "fid_classifier", "mean_ink", "slant", "ink_ratio", "slant_diff"} <= set(v)
        assert set(v["fid_to"]) == {"plain", "bold", "italic"}
    sets = m["sets"]
    assert sets["both"]["prompt"] == "<lora:bold:1> <lora:italic:1> a handwritten sks ohwx seven"
    assert sets["bold_no_trigger"]["prompt"] == "<lora:bold:1> a handwritten seven"
    assert sets["base_trigger"]["prompt"] == "a handwritten sks seven"
    assert sets["bold_ti"]["prompt"] == "a handwritten <bold-ti> seven"
    assert " --embedding " in sets["bold_ti"]["command"]
    assert "--style bold --token '<bold-ti>' --init-word bold --max-train-steps 2" in cmds["bold embedding"]
    assert m["embeddings"]["bold"]["trainable_params"] == 32 and m["embeddings"]["bold"]["steps"] == 2
    # textual inversion left the base alone: its prompts, sampled again with the token loaded, are equal
    assert m["checks"]["embedding_base_equal"] is True and "embedding_bold" in m["timings"]
    assert cmds["base model"].endswith(" --trajectory --out " + shlex.quote(str(prompt_demo / "repro/base")))
    # the train-lora commands carry the demo's defaults: trigger, prior preservation, text-encoder LoRA
    assert "--style bold --trigger sks --prior --text-encoder --max-train-steps 2" in cmds["bold LoRA"]
    assert "--style italic --trigger ohwx --prior --text-encoder --max-train-steps 2" in cmds["italic LoRA"]
    assert "lora4diffusion train --conditioning text --preset tiny --vae " in cmds["train the base model"]
    ck = m["checks"]
    assert ck["scale0_reference"] == "base_trigger" and ck["scale0_equals_base"]  # same prompt, weight 0
    assert ck["merge_ok"] and ck["merge_max_abs_diff"] <= 1e-4  # UNet + text-encoder LoRA folded in
    assert len(ck["specificity"]) == 7 and all(isinstance(r["met"], bool) for r in ck["specificity"])
    s = {k: np.load(prompt_demo / "samples" / f"{k}.npz")["images"] for k in PROMPT_SETS}
    assert np.array_equal(s["bold_0"], s["base_trigger"]) and s["base"].shape == (20, 28, 28)
    assert not np.array_equal(s["bold_1"], s["base_trigger"])  # the adapter acts
    assert not np.array_equal(s["both"], s["bold_1"]) and not np.array_equal(s["both"], s["italic_1"])
    ink = s["bold_1"].mean() / s["base"].mean()
    assert sets["bold_1"]["ink_ratio"] == pytest.approx(ink, rel=1e-5)  # the reported ratio is the pixels'
    for style, word in (("bold", "sks"), ("italic", "ohwx")):
        a = m["adapters"][style]
        assert a["trigger"] == word and a["steps"] == 2 and 0 < a["share"] < 1  # rank 16 on a tiny base
        adapter = read_adapter(prompt_demo / f"lora_{style}")
        assert trigger_words(adapter) == [word]  # recorded in the adapter's metadata
        assert split_adapter(adapter)[1] is not None  # a text-encoder part: --text-encoder was on
        (v,) = a["validation"]  # 2 steps: one validation, at the end, scored with and without the trigger
        assert v["step"] == 2 and v["val_loss"] > 0 and 0 <= v["plain_accuracy"] <= 1 and v["ink_ratio"] > 0
    assert m["losses"]["base"] and m["losses"]["bold"]
    assert "<h2>Training loss, validation and where to stop" in text and "without trigger: accuracy" in text


def test_prompt_command_reproduces_its_grid(prompt_demo):
    cmds = dict(_metrics(prompt_demo)["commands"])
    what = "bold LoRA, weight 0.5, with sks"
    # retrain the base and the adapter into repro/ (seeded), then sample through <lora:...> tags
    for c in ("train the base model", "bold LoRA", what):
        argv = shlex.split(cmds[c])
        assert argv[0] == "lora4diffusion"
        assert main(["-q", *argv[1:]]) == 0
    repro = np.load(prompt_demo / "repro" / "bold_0.5" / "samples.npz")
    shown = np.load(prompt_demo / "samples" / "bold_0.5.npz")
    assert repro["images"].shape == shown["images"].shape
    np.testing.assert_allclose(repro["images"], shown["images"], rtol=0, atol=1e-5)
    assert list(repro["labels"]) == list(shown["labels"])
    assert all("a handwritten sks " in p and "<lora:" in p for p in repro["prompts"])
    ti = "bold embedding (textual inversion), with <bold-ti>"  # train-embedding, then sample --embedding
    for c in ("bold embedding", ti):
        assert main(["-q", *shlex.split(cmds[c])[1:]]) == 0
    np.testing.assert_allclose(np.load(prompt_demo / "repro" / "bold_ti" / "samples.npz")["images"],
                               np.load(prompt_demo / "samples" / "bold_ti.npz")["images"], rtol=0, atol=1e-5)


def test_report_renders_in_headless_chromium(prompt_demo, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1300,2000",
            f"--screenshot={shot}",
            (prompt_demo / "report.html").absolute().as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert shot.is_file()
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100  # something was drawn


# -------------------------------------------------------------------------------------------- label base
def test_label_demo_takes_device_and_bf16(demo):
    """--device reaches the sampling pipeline, --no-bf16 the adapters' training config."""
    settings = _metrics(demo)["settings"]
    assert settings["device"] == "cpu" and settings["bf16_training"] is False
    assert settings["training_precision"] == "fp32 (asked for)"
    for style in ("bold", "italic"):
        train = json.loads(read_adapter(demo / f"lora_{style}").extra["train"])
        assert train["bf16"] is False


def test_label_report_and_checks(demo):
    text = _self_contained(demo)
    assert (demo / "notes.txt").read_text() == "mine"  # --overwrite removes only what the demo writes
    for heading in ("Base vs LoRA", "Scale sweep", "Mixing two adapters", "Merging", "Reproduce each part"):
        assert f"<h2>{heading}" in text, heading
    assert "Trigger specificity" not in text
    m = _metrics(demo)
    assert {"settings", "sets", "reference", "checks", "adapters", "base", "losses", "commands",
            "timings"} <= set(m)  # fmt: skip
    assert set(m["sets"]) == LABEL_SETS and m["settings"]["conditioning"] == "label"
    for s in m["sets"].values():
        assert {"accuracy", "fid_classifier", "mean_ink", "fid_to", "slant"} <= set(s)
        assert set(s["fid_to"]) == {"plain", "bold", "italic"}
        assert html.escape(s["command"]) in text and "--digits 0-9" in s["command"]
    assert m["checks"]["merge_max_abs_diff"] <= 1e-4 and m["checks"]["merge_ok"]
    assert m["checks"]["scale0_equals_base"] and "specificity" not in m["checks"]
    base, zero = np.load(demo / "samples/base.npz"), np.load(demo / "samples/bold_0.npz")
    assert np.array_equal(base["images"], zero["images"]) and base["images"].shape == (20, 28, 28)
    assert not np.array_equal(base["images"], np.load(demo / "samples/bold_1.npz")["images"])
    for a in m["adapters"].values():
        assert a["steps"] == 2 and 0 < a["share"] < 0.1 and a["file_bytes"] < 0.1 * m["base"]["file_bytes"]
        assert a["trigger"] is None
        assert [v["step"] for v in a["validation"]] == [2] and "plain_accuracy" not in a["validation"][0]
    assert "--trigger" not in dict(m["commands"])["bold LoRA"]
    assert {"base_load", "lora_bold", "lora_italic", "sample_mix", "evaluate", "total"} <= set(m["timings"])
    assert m["losses"]["base"] and m["losses"]["bold"]  # the tiny run's metrics.csv is plotted


def test_label_commands_reproduce_the_samples(demo):
    cmds = dict(_metrics(demo)["commands"])
    for what in ("bold LoRA", "bold LoRA, scale 0.5"):
        argv = shlex.split(cmds[what])
        assert argv[0] == "lora4diffusion"
        assert main(["-q", *argv[1:]]) == 0
    repro = np.load(demo / "repro" / "bold_0.5" / "samples.npz")["images"]
    # same seed, same adapter: equal up to float rounding (measured 6e-8; the demo's model also holds italic)
    np.testing.assert_allclose(repro, np.load(demo / "samples" / "bold_0.5.npz")["images"], rtol=0, atol=1e-5)
    assert any(c.startswith("lora4diffusion merge ") for c in cmds.values())
    assert any(c.startswith("lora4diffusion evaluate --samples ") for c in cmds.values())


# ------------------------------------------------------------------------------------------------ bad input
def _refused(argv, capsys, *words):
    assert main(["-q", "demo", *argv, *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_bad_out_is_refused_and_nothing_written(base, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    _refused(["--out", str(f), "--checkpoint", str(base)], capsys, "is a file")
    _refused(["--out", str(f / "sub"), "--checkpoint", str(base)], capsys, "cannot write")
    assert f.read_text() == "keep"
    full = tmp_path / "full"
    (full / "lora_bold").mkdir(parents=True)
    (full / "lora_bold" / "x").write_text("x")
    before = _snapshot(full)
    _refused(["--out", str(full), "--checkpoint", str(base)], capsys, "not empty", "--overwrite")
    assert _snapshot(full) == before
    fresh = tmp_path / "fresh"
    _refused(["--out", str(fresh), "--checkpoint", str(base), "--from-scratch"], capsys, "not both")
    _refused(["--out", str(fresh), "--checkpoint", str(tmp_path / "nope")], capsys, "does not exist")
    assert not fresh.exists()


def test_bad_prompt_options_are_refused_and_nothing_written(base, prompt_demo, vae, tmp_path, capsys):
    fresh, prompt_base = tmp_path / "fresh", prompt_demo / "base"
    # on a label base the trigger options have no meaning: said, not ignored
    _refused(["--out", str(fresh), "--checkpoint", str(base), "--bold-trigger", "zwx"], capsys, "label model",
             "--bold-trigger")  # fmt: skip
    _refused(["--out", str(fresh), "--checkpoint", str(base), "--no-prior"], capsys, "label model")
    _refused(["--out", str(fresh), "--checkpoint", str(prompt_base), "--bold-trigger", "seven"], capsys,
             "ordinary caption word")  # fmt: skip
    _refused(["--out", str(fresh), "--checkpoint", str(prompt_base), "--italic-trigger", "sks"], capsys,
             "two different trigger words")  # fmt: skip
    _refused(["--out", str(fresh), "--checkpoint", str(prompt_base), "--vae", str(vae)], capsys,
             "--from-scratch")  # fmt: skip
    _refused(["--out", str(fresh), "--from-scratch", "--vae", str(tmp_path / "novae")], capsys,
             "does not exist")  # fmt: skip
    assert not fresh.exists()


def test_no_shipped_base_names_the_way_out(tmp_path, capsys, monkeypatch):
    import lora4diffusion.catalog

    monkeypatch.setattr(lora4diffusion.catalog, "pretrained_dir", lambda name="base": tmp_path / "none")
    _refused(["--out", str(tmp_path / "o")], capsys, "--checkpoint DIR", "--from-scratch")
    assert not (tmp_path / "o").exists()
