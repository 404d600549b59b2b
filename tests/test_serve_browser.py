"""`lora4diffusion serve` in a real browser: headless Chromium (Debian's package) driven by Playwright.

Starts the server as the user would (the CLI, a free port), types a prompt, generates, watches the live
preview, moves the bold slider, and checks the new image's pixels changed the way bold should (more ink).
Saves the screenshot the README shows (docs/serve.png). Skips, saying why, only where no Chromium or no
Playwright is installed (.ci/run installs both).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
CHROMIUM = next((p for p in _CANDIDATES if p and os.path.exists(p)), None)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
if CHROMIUM is None:
    pytest.skip("no Chromium binary (apt-get install chromium); the browser test cannot run here",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    adapters = tmp_path_factory.mktemp("adapters")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora4diffusion", "serve", "--checkpoint", "pixel-base", "--port", str(port),
         "--adapters", str(adapters)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    line = proc.stdout.readline()  # the URL, printed before the socket opens
    assert f"http://127.0.0.1:{port}/" in line, line + proc.stderr.read() if proc.poll() is not None else line
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/"
    # Ctrl-C stops it cleanly: exit 0, quickly, no traceback.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err, err


def _pixels(page) -> list[int]:
    return page.evaluate("""() => {
        const img = document.getElementById('output');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data).filter((_, i) => i % 4 === 0);
    }""")


def test_page_generates_previews_and_follows_the_slider(server):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 940})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server)
            page.wait_for_selector('input[data-adapter="bold-pixel"]')  # pixel-base's shipped adapters
            assert page.locator(".adapter.shipped .name", has_text="bold-pixel").count() == 1

            # completion of adapter names inside <lora:
            page.fill("#prompt", "")
            page.type("#prompt", "3 5 7 <lora:italic-p")
            page.wait_for_selector("#complete li[data-name=italic-pixel]")
            page.keyboard.press("Tab")
            assert "<lora:italic-pixel:1>" in page.input_value("#prompt")
            assert page.input_value('input[data-adapter="italic-pixel"]') == "1"  # the tag moved the slider

            page.fill("#prompt", "0-9")
            page.fill("#steps", "4")
            page.fill("#seed", "3")
            page.uncheck("#auto")
            page.click("#generate")
            page.wait_for_selector("#output[data-state=done]", timeout=30_000)
            assert int(page.get_attribute("#output", "data-previews")) >= 1  # the live preview was shown
            first_id = page.get_attribute("#output", "data-result-id")
            before = _pixels(page)

            page.check("#auto")  # from here the slider alone regenerates
            page.locator('input[data-adapter="bold-pixel"]').fill("1")
            assert "<lora:bold-pixel:1>" in page.input_value("#prompt")  # the slider wrote the tag
            page.wait_for_function(
                f"() => {{ const o = document.getElementById('output');"
                f" return o.dataset.state === 'done' && o.dataset.resultId !== '{first_id}'; }}",
                timeout=30_000,
            )
            after = _pixels(page)
            assert len(after) == len(before)
            changed = sum(a != b for a, b in zip(before, after, strict=True)) / len(before)
            assert changed > 0.05, changed
            assert sum(after) > 1.1 * sum(before)  # bold at 1: more ink than the base, same seed
            assert "--lora bold-pixel:1" in page.text_content("#command")
            assert page.locator("#history .card").count() == 2
            assert not errors, errors

            # the picture for the README: a 0-9 row x 3 with bold at 0.6, and a compare of bold's weights
            page.fill("#prompt", "0-9 <lora:bold-pixel:0.6>")
            page.dispatch_event("#prompt", "input")
            page.fill("#n", "3")
            page.fill("#steps", "12")
            page.click("#generate")
            page.wait_for_function("() => document.querySelectorAll('#history .card').length === 3")
            page.fill("#n", "1")
            page.select_option("#compare-mode", "w:bold-pixel")
            page.click("#compare")
            page.wait_for_function("() => document.querySelectorAll('#compare-rows .crow').length === 3")
            labels = page.locator("#compare-rows .crow span").all_text_contents()
            assert labels == ["bold-pixel 0", "bold-pixel 0.5", "bold-pixel 1"]
            page.wait_for_selector("#compare:not([disabled])")
            assert not errors, errors
            shot = ROOT / "docs" / "serve.png"
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
