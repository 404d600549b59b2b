"""The benchmark scripts behind benchmarks/RESULTS.md run (at toy sizes): a figure whose script is broken
cannot be re-measured. Timing is never asserted; each row's numbers must parse and lie in range."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--threads", "1", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _rows(out: str) -> list[list[str]]:
    """The Markdown table rows after the header's separator line."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if not ln.startswith("|---")][1:]


def test_fast_curve_runs_on_a_prompt_model(tmp_path):
    out = _run("fast_curve.py", "--conditioning", "text", "--preset", "tiny", "--every", "15",
               "--per-digit", "1", "--out", str(tmp_path / "run"))  # fmt: skip
    rows = _rows(out)
    assert [r[0] for r in rows] == ["15", "30"]  # tiny: 30 steps, a point every 15
    for r in rows:
        assert 0.0 <= float(r[2]) <= 1.0 and float(r[1]) >= 0.0
    assert (tmp_path / "run" / "text_encoder.safetensors").is_file()  # a prompt model was trained


def test_sampling_sweep_runs_on_the_prompt_base(tmp_path):
    from PIL import Image

    grid = tmp_path / "steps.png"
    rows = _rows(_run("sampling_sweep.py", "--checkpoint", "base", "--per-digit", "2", "--steps", "2,3",
                      "--guidance", "1.25", "--bf16", "--grid", str(grid)))  # fmt: skip
    assert [(r[0], r[1]) for r in rows] == [("2", "1.25"), ("3", "1.25")]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)
    # one row per setting, two samples per digit: 2 x 20 cells of 28 px + 2 px padding, scaled 2x
    assert Image.open(grid).size == (2 * (20 * 30 + 2), 2 * (2 * 30 + 2))


def test_trigger_specificity_smoke(tmp_path):
    out = _run("trigger_specificity.py", "--smoke", "--rows", "unet", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    row = results["rows"]["unet"]
    assert row["steps"] == 4 and row["params"] > 0
    for label in ("with", "without"):
        assert 0.0 <= row[label]["accuracy"] <= 1.0 and row[label]["ink_ratio"] > 0
    assert "| unet | off | off |" in out


def test_trigger_recipes_smoke(tmp_path):
    out = _run("trigger_recipes.py", "--per-digit", "1", "--out", str(tmp_path),
               "tiny=steps:2,rank:2", "plain=steps:2,prior:0,te:0,trigger:")  # fmt: skip
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert "base" in lines[0]
    tiny, plain = lines[1], lines[2]
    assert tiny["recipe"] == "tiny" and tiny["rank"] == 2 and tiny["steps"] == 2 and tiny["params"] > 0
    assert set(tiny) >= {"with", "without"} and "plain" in plain and "with" not in plain
    assert (tmp_path / "tiny" / "adapter.safetensors").is_file()
    out = _run("trigger_recipes.py", "--per-digit", "1", "--out", str(tmp_path), "--sample-steps", "2,3",
               "tiny=steps:2,rank:2")  # fmt: skip
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert set(lines[0]) == {"base@2", "base@3"}
    assert {"with@2", "without@2", "with@3", "without@3"} <= set(lines[1])


def test_latent_arch_table():
    out = _run("latent_arch.py", "--rows", "4", "--repeats", "1")
    rows = _rows(out)
    assert len(rows) == 8 and rows[0][0].startswith("pixel base")
    gflops = {r[0]: float(r[2]) for r in rows}
    assert 0.3 < gflops[rows[0][0]] < 0.5  # the pixel base's 0.406
    assert all(0 < g < gflops[rows[0][0]] for name, g in gflops.items() if name.startswith("latent"))
    assert all(r[3] == "4" and float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    assert "VAE decode of 4 latents" in out


def test_latent_vs_pixel_times_both_bases():
    out = _run("latent_vs_pixel.py", "--per-digit", "1", "--repeats", "2", "--steps", "2")
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["runs"]) == {"latent", "pixel"} and all(len(v) == 2 for v in result["runs"].values())
    assert all(t > 0 for v in result["runs"].values() for t in v)
    assert abs(result["ratio"] - result["median"]["pixel"] / result["median"]["latent"]) < 1e-9


def test_weight_limits_runs_beyond_the_limits():
    """benchmarks/weight_limits.py (the measurement behind limits.py) samples past both limits."""
    out = _run("weight_limits.py", "--models", "base", "--per-digit", "1", "--weights", "1,3",
               "--guidance", "1.25,50")  # fmt: skip
    rows = [r for r in _rows(out) if r[0] != "guidance"]  # the second table's header
    assert [(r[0], r[1]) for r in rows if len(r) == 6] == [("bold", "1"), ("bold", "3"), ("italic", "1"),
                                                            ("italic", "3")]  # fmt: skip
    assert [r[0] for r in rows if len(r) == 5] == ["1.25", "50"]
    assert all(0.0 <= float(r[-4]) <= 1.0 and 0.0 <= float(r[-3]) <= 1.0 for r in rows)


def test_methods_comparison_smoke(tmp_path):
    """benchmarks/methods.py: every method matched to the budget, trained, scored and tabled; a second call
    resumes from runs.jsonl (nothing retrained)."""
    argv = ("methods.py", "--smoke", "--tasks", "trigger", "--methods", "lora,lokr", "--budgets", "2",
            "--seeds", "0", "--threads", "1", "--out", str(tmp_path))
    _run(*argv)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in runs] == ["lora", "lokr"]
    budget = runs[0]["params"]
    for r in runs:
        assert abs(r["params"] - budget) <= 0.1 * budget  # matched to the LoRA's parameter count
        assert 0.0 <= r["with"]["accuracy"] <= 1.0 and r["without"]["ink_ratio"] > 0
        assert r["merge_error"] < 1e-3 and r["steps"] == 2
    assert runs[1]["options"]["factor"] != 1
    out = _run(*argv)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2 and "| trigger | lokr | 2 |" in out
    assert (tmp_path / "methods.png").stat().st_size > 0
    w, h = Image.open(tmp_path / "grid-trigger.png").size
    assert 0.25 < h / w < 0.35  # three rows of ten digits: the base, lora, lokr
