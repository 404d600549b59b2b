"""Every shell command in README.md's ```bash blocks runs, verbatim and in order, in one temporary folder.

Work is shrunk through one documented switch, LORA4DIFFUSION_QUICK=1 (lora4diffusion/quick.py: tiny presets,
a few steps and samples), never by editing the commands. Lines that install packages or run the test suite
are skipped (they are this test's own environment). `lora4diffusion` on the command line is this checkout
(a shim on PATH runs `python -m lora4diffusion` with this checkout first on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"^\s*(pip|pip3|uv|conda|apt(-get)?)\s|pytest")


def readme_commands(text: str) -> list[str]:
    """The command lines of every ```bash block: comments removed, backslash continuations joined."""
    commands, block, pending = [], False, ""
    for line in text.splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            block = fence in ("```bash", "```sh", "```shell") if not block else False
            continue
        if not block:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def test_readme_parser_reads_blocks_comments_and_continuations():
    text = "x\n```bash\na --b c   # note\n\n# only a comment\nd \\\n  --e 'f g'\n```\n```python\nno\n```\n"
    assert readme_commands(text) == ["a --b c", "d --e 'f g'"]


def test_every_readme_command_runs(tmp_path):
    commands = [c for c in readme_commands((ROOT / "README.md").read_text()) if not SKIP.search(c)]
    assert len(commands) >= 5, commands  # the README has a tour
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "lora4diffusion").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lora4diffusion "$@"\n')
    (shim / "lora4diffusion").chmod(0o755)
    env = {**os.environ, "LORA4DIFFUSION_QUICK": "1", "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "MPLBACKEND": "Agg"}
    work = tmp_path / "work"
    work.mkdir()
    for i, command in enumerate(commands):
        r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                           timeout=240)
        assert r.returncode == 0, f"README command {i + 1} ({r.returncode}): {command}\n{r.stderr[-2000:]}"


def test_sizes_the_readme_states_match_the_shipped_files():
    """Every README table row naming `pretrained/X` and a size (KiB / MiB) matches X's weights and configs."""
    from lora4diffusion.inventory import stored_size

    lines = (ROOT / "README.md").read_text().splitlines()
    rows = [r for r in lines if r.startswith("|") and "pretrained/" in r]
    checked = 0
    for row in rows:
        path = re.search(r"pretrained/([\w/.-]+)", row)
        size = re.search(r"\|\s*([\d.]+)\s*(KiB|MiB|GiB)\s*\|", row)
        folder = ROOT / "lora4diffusion" / "pretrained" / path.group(1).rstrip("/")
        if size is None or not folder.exists():
            continue
        stated = float(size.group(1)) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[size.group(2)]
        actual = stored_size(folder)
        assert abs(actual - stated) <= 0.01 * stated + 2**10, (row, actual)  # the text rounds
        checked += 1
    assert checked >= 1 or not rows


# ----- the numbers README.md states come from measurement files made by our own commands -----
RESULTS = ROOT / "benchmarks" / "results"  # written by benchmarks/evaluate_shipped.sh and the demo
PRETRAINED = ROOT / "lora4diffusion" / "pretrained"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _pct(x: float, space: str = " ") -> str:
    return f"{100 * x:.1f}{space}%"


def _fid_ratio(r: dict) -> str:
    return f"FID {r['fid_classifier'] / r['reference']['real_vs_real_fid']:.2f}x the real-data floor"


def _measurements() -> dict[str, dict]:
    """Every measurement file in benchmarks/results, by name (base, pixel-base, trigger_bold, demo, ...)."""
    return {p.stem: _json(p) for p in RESULTS.glob("*.json")}


def _seconds(r: dict) -> float:
    """An evaluate file's sampling time, seconds per 100 digits."""
    return r["source"]["sample_seconds_per_100"]


def _trigger(ev: dict, style: str) -> dict:
    """The shipped trigger adapter's row (with / without its trigger) in trigger_STYLE.json."""
    return ev[f"trigger_{style}"]["rows"]["unet+te+prior"]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def readme_claims() -> dict[str, list[str]]:
    """README line marker -> strings that line must contain, each formatted from a measurement file."""
    ev = _measurements()
    base, pixel = ev["base"], ev["pixel-base"]
    bold, italic = _trigger(ev, "bold"), _trigger(ev, "italic")
    vae = _json(PRETRAINED / "vae" / "reconstruction_report.json")
    classifier = _json(PRETRAINED / "classifier" / "classifier.json")
    demo = ev["demo"]
    sets, spec = demo["sets"], {s["what"]: s["value"] for s in demo["checks"]["specificity"]}
    drops = [100 * (s["accuracy_originals"] - s["accuracy_reconstructions"]) for s in vae.values()]
    both_ink, both_slant = spec["both composed: ink / base"], spec["both composed: slant - base (px)"]

    def speed(r: dict) -> str:
        return f"{_seconds(r):.2f} s per 100 digits"

    def ink(r: dict, ref: dict) -> str:
        return f"{r['mean_ink'] / ref['mean_ink']:.2f}x"

    return {
        "| prompt base `pretrained/base`": [
            _pct(base["accuracy"]), _fid_ratio(base), speed(base),
            f"{_seconds(pixel) / _seconds(base):.1f}x faster than the pixel base",
        ],
        "| VAE `pretrained/vae`": [
            f"within {max(drops):.1f} points",
            f"ink within {max(100 * abs(s['ink_ratio'] - 1) for s in vae.values()):.1f} %",
            f"slant within {max(100 * abs(s['slant_ratio'] - 1) for s in vae.values()):.1f} %",
        ],
        "| `bold` adapter `pretrained/adapters/bold`": [
            f"{bold['with']['ink_ratio']:.2f}x the base's ink, {_pct(bold['with']['accuracy'])}",
            f"ink {bold['without']['ink_ratio']:.2f}x, {_pct(bold['without']['accuracy'])}",
        ],
        "| `italic` adapter `pretrained/adapters/italic`": [
            f"slant {italic['with']['slant_diff']:+.1f}", f"{_pct(italic['with']['accuracy'])}",
            f"without it: slant {italic['without']['slant_diff']:+.1f}",
        ],
        "| label base `pretrained/pixel-base`": [_pct(pixel["accuracy"]), _fid_ratio(pixel), speed(pixel)],
        "| `bold-pixel` adapter": [
            f"scale 1: {_pct(ev['bold-pixel']['accuracy'])} accuracy, {ink(ev['bold-pixel'], pixel)}",
            f"scale 0.5: {_pct(ev['bold-pixel_0.5']['accuracy'])}, {ink(ev['bold-pixel_0.5'], pixel)}",
        ],
        "| `italic-pixel` adapter": [f"scale 1: {_pct(ev['italic-pixel']['accuracy'])} accuracy"],
        "| MNIST classifier `pretrained/classifier`": [f"{_pct(classifier['heldout_accuracy'])} on the 500"],
        "<!-- demo numbers -->": [
            _minutes(demo["timings"]["total"]),
            f"Bold with `sks`: {_pct(sets['bold_1']['accuracy'])} accuracy",
            f"{spec['bold WITH its trigger: ink / base']:.2f}x the base's ink",
            f"WITHOUT `sks`: {_pct(sets['bold_no_trigger']['accuracy'])}, ink"
            f" {spec['bold WITHOUT its trigger: ink / base']:.2f}x",
            f"italic with `ohwx`: {_pct(sets['italic_1']['accuracy'])}, slant"
            f" {spec['italic WITH its trigger: slant - base (px)']:+.1f}",
            f"ink {both_ink:.1f}x and slant {both_slant:+.1f}",
            f"{_pct(sets['both']['accuracy'])} accuracy",
        ],
        "安装包内附带预训练的基础模型": [_pct(base["accuracy"], space="")],
    }


def test_numbers_the_readme_states_match_the_measurement_files():
    """Each claim's line is found once, and holds every number as the measurement file gives it (rounded as
    the text rounds). Re-measuring (benchmarks/evaluate_shipped.sh, the demo) without updating the text
    fails here, and so does a text edited away from what was measured."""
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    for marker, expected in readme_claims().items():
        if marker.startswith("<!--"):  # a paragraph between <!-- x --> and <!-- /x -->, lines joined
            closing = marker.replace("<!-- ", "<!-- /")
            assert text.count(marker) == 1 and text.count(closing) == 1, marker
            hits = [" ".join(text.split(marker)[1].split(closing)[0].split())]
        else:
            hits = [ln for ln in lines if marker in ln]
        assert len(hits) == 1, (marker, len(hits))
        missing = [e for e in expected if e not in hits[0]]
        assert not missing, f"README line {marker!r} lacks {missing}:\n{hits[0]}"


def card_claims() -> dict[Path, list[str]]:
    """Model card -> strings it must contain (whitespace-normalised), each formatted from a measurement."""
    from lora4diffusion.diffusion import DEFAULT_STEPS

    ev = _measurements()
    base, pixel = ev["base"], ev["pixel-base"]

    def row(r: dict) -> str:  # accuracy | ink / base | slant - base, as the adapter cards' tables
        return f"| {_pct(r['accuracy'])} | {r['ink_ratio']:.2f} | {r['slant_diff']:+.2f} |"

    def ev_row(r: dict, bold_time: bool = False) -> str:  # accuracy | FID (x floor) | s per 100: base card
        ratio = r["fid_classifier"] / r["reference"]["real_vs_real_fid"]
        t = f"**{_seconds(r):.2f}**" if bold_time else f"{_seconds(r):.2f}"
        return f"| {_pct(r['accuracy'])} | {r['fid_classifier']:.3f} ({ratio:.2f}x) | {t} |"

    def ink(r: dict) -> str:
        return f"ink {r['mean_ink'] / pixel['mean_ink']:.2f}x"

    b, i, c = _trigger(ev, "bold"), _trigger(ev, "italic"), ev["trigger_bold"]["composed"]
    adapters = PRETRAINED / "adapters"
    return {
        adapters / "bold" / "README.md": [
            f'("a handwritten sks seven") {row(b["with"])}', f'("a handwritten seven") {row(b["without"])}',
            f"{_pct(c['accuracy'])} accuracy, {c['ink_ratio']:.2f}x the ink, slant {c['slant_diff']:+.2f} px",
            f"DDIM {DEFAULT_STEPS} (the default)",
        ],
        adapters / "italic" / "README.md": [
            f'("a handwritten ohwx seven") {row(i["with"])}', f'("a handwritten seven") {row(i["without"])}',
            f"DDIM {DEFAULT_STEPS} (the default)",
        ],
        ROOT / "docs" / "base_model.md": [
            f"| bf16, DDIM {DEFAULT_STEPS}, w 1.25 (the defaults) {ev_row(base, bold_time=True)}",
            f"bf16, DDIM {DEFAULT_STEPS}, same run {ev_row(pixel)}",
        ],
        adapters / "bold-pixel" / "README.md": [
            f"scale 1: {_pct(ev['bold-pixel']['accuracy'])}, {ink(ev['bold-pixel'])}",
            f"scale 0.5: {_pct(ev['bold-pixel_0.5']['accuracy'])}, {ink(ev['bold-pixel_0.5'])}",
        ],
        adapters / "italic-pixel" / "README.md": [
            f"scale 1: {_pct(ev['italic-pixel']['accuracy'])}, {ink(ev['italic-pixel'])}"
        ],
    }


def test_model_cards_state_the_measured_numbers():
    """The base and adapter cards' measured figures match the files benchmarks/evaluate_shipped.sh wrote, at
    the current defaults (benchmarks/RESULTS.md says the cards are checked: this is the check)."""
    for card, expected in card_claims().items():
        text = " ".join(card.read_text().split())
        missing = [e for e in expected if e not in text]
        assert not missing, f"{card.relative_to(ROOT)} lacks {missing}"


def test_results_at_a_glance_matches_the_measurement_files():
    """benchmarks/RESULTS.md's headline table states the current measurement files' numbers."""
    ev = _measurements()
    base, pixel = ev["base"], ev["pixel-base"]
    bold, italic = _trigger(ev, "bold"), _trigger(ev, "italic")
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    glance = text.split("## At a glance", 1)[1].split("\n## ", 1)[0]
    speed = _seconds(base), _seconds(pixel)
    families = {round(ev[k]["accuracy"], 3) for k in ev if k.startswith("family_") or k == "base_held_out"}
    expected = [
        f"{_pct(base['accuracy'])} of 1,000 prompts", f"FID {base['fid_classifier']:.3f}",
        f"{speed[0]:.2f} s per 100 digits bf16",
        f"{_pct(pixel['accuracy'])}, FID {pixel['fid_classifier']:.3f}, {speed[1]:.2f} s per 100",
        f"{speed[1] / speed[0]:.1f}x (one cold call each)",
        f"with the trigger {_pct(bold['with']['accuracy'])}, {bold['with']['ink_ratio']:.2f}x ink",
        f"without {_pct(bold['without']['accuracy'])}, {bold['without']['ink_ratio']:.2f}x",
        f"slant {italic['with']['slant_diff']:+.2f} px",
    ]
    assert len(families) == 1, f"the table gives one figure for every family; they now differ: {families}"
    expected.append(f"{_pct(families.pop())} for each of the six template families")
    missing = [e for e in expected if e not in glance]
    assert not missing, f"RESULTS.md's at-a-glance table lacks {missing}"


def test_measurement_files_were_made_at_the_defaults():
    """The README's figures are the defaults' figures: the settings recorded in every evaluate file."""
    from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS

    for path in RESULTS.glob("*.json"):
        r = _json(path)
        settings = r.get("source") or r.get("settings")
        steps = settings["sample_steps"] if "sample_steps" in settings else settings["steps"]  # trigger files
        assert steps == DEFAULT_STEPS and settings.get("guidance", DEFAULT_GUIDANCE) == DEFAULT_GUIDANCE, path
        if "source" in r:
            assert r["source"]["per_digit"] == 100 and r["source"]["seed"] == 0, path
