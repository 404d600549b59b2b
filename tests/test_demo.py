"""`lora4diffusion demo`: a self-contained report, honest checks, reproducible commands, bad input refused."""

import hashlib
import json
import shlex
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora4diffusion.cli import main
from lora4diffusion.train import train_base

CHROMIUM = Path("/usr/bin/chromium")
SMALL = ["--lora-steps", "2", "--per-digit", "2", "--steps", "3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "base"
    train_base("tiny", run, steps=8, progress=False)
    return run


@pytest.fixture(scope="module")
def demo(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    # a stale run that train-lora would refuse, and a user file that --overwrite must leave alone
    (out / "lora_bold").mkdir(parents=True)
    (out / "lora_bold" / "train_state.safetensors").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    assert main(["-q", "demo", "--out", str(out), "--checkpoint", str(base), "--overwrite", *SMALL]) == 0
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


def test_report_is_self_contained(demo, capsys):
    parser = _Links()
    parser.feed((demo / "report.html").read_text(encoding="utf-8"))
    assert len(parser.links) >= 15  # grids, real digits, trajectory, loss curves, metrics.json, npz files
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), link  # relative only: works from file://
        assert (demo / link).is_file(), link
    assert (
        "<link" not in (demo / "report.html").read_text()
        and "<script" not in (demo / "report.html").read_text()
    )
    assert (demo / "notes.txt").read_text() == "mine"  # --overwrite removes only what the demo writes


def test_metrics_and_checks(demo):
    m = json.loads((demo / "metrics.json").read_text())
    assert {
        "settings",
        "sets",
        "reference",
        "checks",
        "adapters",
        "base",
        "losses",
        "commands",
        "timings",
    } <= set(m)
    assert set(m["sets"]) == {"base", "bold_0", "bold_0.5", "bold_1", "italic_1", "mix", "merged_bold"}
    for s in m["sets"].values():
        assert {"accuracy", "fid_classifier", "mean_ink", "fid_to"} <= set(s)
        assert set(s["fid_to"]) == {"plain", "bold", "italic"}
    assert m["checks"]["merge_max_abs_diff"] <= 1e-4 and m["checks"]["merge_ok"]
    assert m["checks"]["scale0_equals_base"]
    base, zero = np.load(demo / "samples/base.npz"), np.load(demo / "samples/bold_0.npz")
    assert np.array_equal(base["images"], zero["images"]) and base["images"].shape == (20, 28, 28)
    assert not np.array_equal(base["images"], np.load(demo / "samples/bold_1.npz")["images"])
    for a in m["adapters"].values():
        assert a["steps"] == 2 and 0 < a["share"] < 0.1 and a["file_bytes"] < 0.1 * m["base"]["file_bytes"]
    assert {"base_load", "lora_bold", "lora_italic", "sample_mix", "evaluate", "total"} <= set(m["timings"])
    assert m["losses"]["base"] and m["losses"]["bold"]  # the tiny run's metrics.csv is plotted


def test_commands_reproduce_the_samples(demo, tmp_path):
    cmds = dict(json.loads((demo / "metrics.json").read_text())["commands"])
    for what in ("bold LoRA", "bold LoRA, scale 0.5"):
        argv = shlex.split(cmds[what])
        assert argv[0] == "lora4diffusion"
        assert main(["-q", *argv[1:]]) == 0
    repro = np.load(demo / "repro" / "bold_0.5" / "samples.npz")["images"]
    # same seed, same adapter: equal up to float rounding (measured 6e-8; the demo's model also holds italic)
    np.testing.assert_allclose(repro, np.load(demo / "samples" / "bold_0.5.npz")["images"], rtol=0, atol=1e-5)
    assert any(c.startswith("lora4diffusion merge ") for c in cmds.values())
    assert any(c.startswith("lora4diffusion evaluate --samples ") for c in cmds.values())


def test_report_renders_in_headless_chromium(demo, tmp_path):
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
            (demo / "report.html").absolute().as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert shot.is_file()
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100  # something was drawn


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


def test_no_shipped_base_names_the_way_out(tmp_path, capsys, monkeypatch):
    import lora4diffusion.checkpoint

    monkeypatch.setattr(lora4diffusion.checkpoint, "pretrained_dir", lambda: tmp_path / "none")
    _refused(["--out", str(tmp_path / "o")], capsys, "--checkpoint DIR", "--from-scratch")
    assert not (tmp_path / "o").exists()
