"""Every shell command in README.md's ```bash blocks runs, verbatim and in order, in one temporary folder.

Work is shrunk through one documented switch, LORA4DIFFUSION_QUICK=1 (lora4diffusion/quick.py: tiny presets,
a few steps and samples), never by editing the commands. Lines that install packages or run the test suite
are skipped (they are this test's own environment). `lora4diffusion` on the command line is this checkout
(a shim on PATH runs `python -m lora4diffusion` with this checkout first on PYTHONPATH).
"""

from __future__ import annotations

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
    from lora4diffusion.catalog import _size

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
        actual = _size(folder)
        assert abs(actual - stated) <= 0.01 * stated + 2**10, (row, actual)  # the text rounds
        checked += 1
    assert checked >= 1 or not rows
