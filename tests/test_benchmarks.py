"""The benchmark scripts behind benchmarks/RESULTS.md run (at toy sizes): a figure whose script is broken
cannot be re-measured. Timing is never asserted; each row's numbers must parse and lie in range."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from lora4diffusion.threads import allowed_cores

ROOT = Path(__file__).resolve().parents[1]

# test -> the script runs it checks (script, arguments; "{out}" is that test's own folder). Each run uses one
# thread, so the module starts them all up front, as many at once as this process has cores (two on CI),
# and each test reads its runs' results: the same commands and checks as one at a time, in about half the
# time.
RUNS = {
    "test_fast_curve_runs_on_a_prompt_model": [
        ("fast_curve.py", "--conditioning", "text", "--preset", "tiny", "--every", "15", "--per-digit", "1",
         "--out", "{out}/run")],
    "test_sampling_sweep_runs_on_the_prompt_base": [
        ("sampling_sweep.py", "--checkpoint", "base", "--per-digit", "2", "--steps", "2,3", "--guidance",
         "1.25", "--bf16", "--grid", "{out}/steps.png")],
    "test_trigger_specificity_smoke": [
        ("trigger_specificity.py", "--smoke", "--rows", "unet", "--out", "{out}")],
    "test_trigger_recipes_smoke": [
        ("trigger_recipes.py", "--per-digit", "1", "--out", "{out}/one", "tiny=steps:2,rank:2",
         "plain=steps:2,prior:0,te:0,trigger:"),
        ("trigger_recipes.py", "--per-digit", "1", "--out", "{out}/two", "--sample-steps", "2,3",
         "tiny=steps:2,rank:2")],
    "test_latent_arch_table": [("latent_arch.py", "--rows", "4", "--repeats", "1")],
    "test_latent_vs_pixel_times_both_bases": [
        ("latent_vs_pixel.py", "--per-digit", "1", "--repeats", "2", "--steps", "2")],
    "test_weight_limits_runs_beyond_the_limits": [
        ("weight_limits.py", "--models", "base", "--per-digit", "1", "--weights", "1,3", "--guidance",
         "1.25,50")],
    "test_embeddings_comparison_smoke": [
        ("embeddings.py", "--smoke", "--styles", "bold", "--rows", "ti,pivotal", "--out", "{out}")],
    "test_objectives_smoke": [("objectives.py", "--smoke", "--out", "{out}")],
    "test_methods_comparison_smoke": [
        ("methods.py", "--smoke", "--tasks", "trigger", "--methods", "lora,lokr", "--budgets", "2", "--seeds",
         "0", "--timing", "--timing-steps", "2", "--out", "{out}")],
}  # fmt: skip


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--threads", "1", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def ran(request, tmp_path_factory):
    """ran(test) -> (the stdout of each of its RUNS, its folder). The runs of every selected test of this
    module are started when the first one needs them, in the module's order."""
    selected = [item.name for item in request.session.items if item.module is request.module]
    folders = {name: tmp_path_factory.mktemp(name[len("test_"):][:40]) for name in RUNS if name in selected}
    pool = ThreadPoolExecutor(max_workers=min(2, allowed_cores()))
    jobs = {name: [pool.submit(_run, *(a.format(out=folders[name]) for a in run)) for run in RUNS[name]]
            for name in RUNS if name in folders}  # fmt: skip

    def result(name: str) -> tuple[list[str], Path]:
        outs = []
        for job in jobs[name]:
            r = job.result()
            assert r.returncode == 0, r.stderr[-2000:]
            outs.append(r.stdout)
        return outs, folders[name]

    yield result
    pool.shutdown(wait=True, cancel_futures=True)


def _rows(out: str) -> list[list[str]]:
    """The Markdown table rows after the header's separator line."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if not ln.startswith("|---")][1:]


def test_fast_curve_runs_on_a_prompt_model(ran):
    (out,), folder = ran("test_fast_curve_runs_on_a_prompt_model")
    rows = _rows(out)
    assert [r[0] for r in rows] == ["15", "30"]  # tiny: 30 steps, a point every 15
    for r in rows:
        assert 0.0 <= float(r[2]) <= 1.0 and float(r[1]) >= 0.0
    assert (folder / "run" / "text_encoder.safetensors").is_file()  # a prompt model was trained


def test_sampling_sweep_runs_on_the_prompt_base(ran):
    from PIL import Image

    (out,), folder = ran("test_sampling_sweep_runs_on_the_prompt_base")
    rows = _rows(out)
    assert [(r[0], r[1]) for r in rows] == [("2", "1.25"), ("3", "1.25")]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)
    # one row per setting, two samples per digit: 2 x 20 cells of 28 px + 2 px padding, scaled 2x
    assert Image.open(folder / "steps.png").size == (2 * (20 * 30 + 2), 2 * (2 * 30 + 2))


def test_trigger_specificity_smoke(ran):
    (out,), folder = ran("test_trigger_specificity_smoke")
    results = json.loads((folder / "results.json").read_text())
    row = results["rows"]["unet"]
    assert row["steps"] == 4 and row["params"] > 0
    for label in ("with", "without"):
        assert 0.0 <= row[label]["accuracy"] <= 1.0 and row[label]["ink_ratio"] > 0
    assert "| unet | off | off |" in out


def test_embeddings_comparison_smoke(ran):
    (out,), folder = ran("test_embeddings_comparison_smoke")
    rows = json.loads((folder / "results.json").read_text())["rows"]
    ti, pivotal = rows["bold-ti"], rows["bold-pivotal"]
    assert ti["identical_without"] is True  # textual inversion alone, without its token: the base bit for bit
    assert ti["params"] == 64 and ti["file_bytes"] < 4096  # one vector of the base's width 64
    assert pivotal["params"] > ti["params"] and pivotal["token"] == "<bold-pt>"
    for row in (ti, pivotal):
        for label in ("with", "without"):
            assert 0.0 <= row[label]["accuracy"] <= 1.0 and row[label]["ink_ratio"] > 0
    assert "| bold | ti | <bold-ti> | 64 |" in out


def test_trigger_recipes_smoke(ran):
    (one, two), folder = ran("test_trigger_recipes_smoke")
    lines = [json.loads(ln) for ln in one.splitlines() if ln.startswith("{")]
    assert "base" in lines[0]
    tiny, plain = lines[1], lines[2]
    assert tiny["recipe"] == "tiny" and tiny["rank"] == 2 and tiny["steps"] == 2 and tiny["params"] > 0
    assert set(tiny) >= {"with", "without"} and "plain" in plain and "with" not in plain
    assert (folder / "one" / "tiny" / "adapter.safetensors").is_file()
    lines = [json.loads(ln) for ln in two.splitlines() if ln.startswith("{")]  # --sample-steps 2,3
    assert set(lines[0]) == {"base@2", "base@3"}
    assert {"with@2", "without@2", "with@3", "without@3"} <= set(lines[1])


def test_latent_arch_table(ran):
    (out,), _ = ran("test_latent_arch_table")
    rows = _rows(out)
    assert len(rows) == 8 and rows[0][0].startswith("pixel base")
    gflops = {r[0]: float(r[2]) for r in rows}
    assert 0.3 < gflops[rows[0][0]] < 0.5  # the pixel base's 0.406
    assert all(0 < g < gflops[rows[0][0]] for name, g in gflops.items() if name.startswith("latent"))
    assert all(r[3] == "4" and float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    assert "VAE decode of 4 latents" in out


def test_latent_vs_pixel_times_both_bases(ran):
    (out,), _ = ran("test_latent_vs_pixel_times_both_bases")
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["runs"]) == {"latent", "pixel"} and all(len(v) == 2 for v in result["runs"].values())
    assert all(t > 0 for v in result["runs"].values() for t in v)
    assert abs(result["ratio"] - result["median"]["pixel"] / result["median"]["latent"]) < 1e-9


def test_weight_limits_runs_beyond_the_limits(ran):
    """benchmarks/weight_limits.py (the measurement behind limits.py) samples past both limits."""
    (out,), _ = ran("test_weight_limits_runs_beyond_the_limits")
    rows = [r for r in _rows(out) if r[0] != "guidance"]  # the second table's header
    assert [(r[0], r[1]) for r in rows if len(r) == 6] == [("bold", "1"), ("bold", "3"), ("italic", "1"),
                                                            ("italic", "3")]  # fmt: skip
    assert [r[0] for r in rows if len(r) == 5] == ["1.25", "50"]
    assert all(0.0 <= float(r[-4]) <= 1.0 and 0.0 <= float(r[-3]) <= 1.0 for r in rows)


def test_methods_comparison_smoke(ran):
    """benchmarks/methods.py: every method matched to the budget, trained, scored and tabled; a second call
    measures step times first (--timing); a second call resumes from runs.jsonl (nothing retrained) and tables
    the first call's step times."""
    _, folder = ran("test_methods_comparison_smoke")
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in runs] == ["lora", "lokr"]
    budget = runs[0]["params"]
    for r in runs:
        assert abs(r["params"] - budget) <= 0.1 * budget  # matched to the LoRA's parameter count
        assert 0.0 <= r["with"]["accuracy"] <= 1.0 and r["without"]["ink_ratio"] > 0
        assert r["merge_error"] < 1e-3 and r["steps"] == 2
    assert runs[1]["options"]["factor"] != 1
    # again, without --timing: nothing retrained or re-timed, the table takes the first call's step times
    again = _run(*(a.format(out=folder) for a in RUNS["test_methods_comparison_smoke"][0] if a != "--timing"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert len((folder / "runs.jsonl").read_text().splitlines()) == 2  # nothing retrained
    timed = [json.loads(line) for line in (folder / "timing.jsonl").read_text().splitlines()]
    assert [(t["method"], t["recipe"]) for t in timed] == [("lora", "plain"), ("lora", "trigger"),
                                                           ("lokr", "plain"), ("lokr", "trigger")]
    assert all(t["step_seconds"] > 0 and t["train_seconds"] == t["step_seconds"] * t["default_steps"]
               for t in timed)
    row = next(r for r in _rows(again.stdout) if r[:3] == ["trigger", "lokr", "2"])
    step = next(t["step_seconds"] for t in timed if t["method"] == "lokr" and t["recipe"] == "trigger")
    assert row[5] == f"{step:.3f}"  # s/step from the timing run, not the comparison's own
    assert (folder / "methods.png").stat().st_size > 0
    w, h = Image.open(folder / "grid-trigger.png").size
    assert 0.25 < h / w < 0.35  # three rows of ten digits: the base, lora, lokr


def test_objectives_smoke(ran):
    (out,), folder = ran("test_objectives_smoke")
    rows = _rows(out)
    assert [(r[0], r[1]) for r in rows] == [("default", "0"), ("v", "0")]
    for r in rows:
        assert 0.0 <= float(r[3]) <= 1.0 and float(r[5]) > 0 and 0.0 <= float(r[7]) <= 1.0
    results = json.loads((folder / "results.json").read_text())
    assert [p["step"] for p in results["v"]["0"]["points"]] == [15, 30]
    assert [v["step"] for v in results["v"]["0"]["validation"]] == [15, 30]
    assert Image.open(folder / "curves.png").size[0] > 0
    config = json.loads((folder / "v-seed0" / "config.json").read_text())
    assert config["diffusion"]["prediction_type"] == "v_prediction"
