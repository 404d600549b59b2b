"""`lora4diffusion serve` in a real browser: headless Chromium (Debian's package) driven by Playwright.

Starts the server as the user would (the CLI, a free port), types a prompt, generates, watches the live
preview, moves the bold slider, and checks the new image's pixels changed the way bold should (more ink).
Takes the screenshot the README shows; it rewrites docs/serve.png only when LORA4DIFFUSION_WRITE_DOCS=1 (a
test run leaves tracked files alone). Skips, saying why, only where no Chromium or no Playwright is installed
(.ci/run installs both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora4diffusion.diffusion import DEFAULT_STEPS

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


@contextlib.contextmanager
def serving(*args: str):
    """`lora4diffusion serve ARGS --port P` as the user starts it; yields the URL; Ctrl-C at the end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora4diffusion", "serve", "--port", str(port), *args],
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving("--checkpoint", "pixel-base", "--adapters", str(tmp_path_factory.mktemp("adapters"))) as url:
        yield url


@contextlib.contextmanager
def open_page(url: str, ready: str):
    """Headless Chromium at ``url`` once the selector ``ready`` is on the page; yields (page, errors): the
    page's uncaught JavaScript errors, which every test asserts empty at its end."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 940})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector(ready)
            yield page, errors
        finally:
            browser.close()


def _pixels(page) -> list[int]:
    return page.evaluate("""() => {
        const img = document.getElementById('output');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data).filter((_, i) => i % 4 === 0);
    }""")


def test_page_generates_previews_and_follows_the_slider(server, tmp_path):
    # the page is ready once pixel-base's shipped adapters are listed
    with open_page(server, 'input[data-adapter="bold-pixel"]') as (page, errors):
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
        # the README's picture is the default base's page: this one until a prompt base ships
        shot = tmp_path / "serve_pixel.png" if shipped_prompt_base() else _docs_shot(tmp_path)
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


# ------------------------------------------------------------------------------------------ prompt models
def shipped_prompt_base() -> bool:
    """Whether the default base (Pipeline.load()) is installed and is a prompt model."""
    from lora4diffusion.errors import UserError
    from lora4diffusion.pipeline import Pipeline

    try:
        return Pipeline.load().is_prompt_model
    except UserError:
        return False


@pytest.fixture(scope="module")
def prompt_server(request, tmp_path_factory, random_prompt_lora):
    """The page on a prompt-conditioned latent model: the shipped base where it is one, else the tiny one of
    conftest.py (its digits are blobs, so only the shipped base's page becomes docs/serve.png).
    An adapter that fits it (small random factors) carries the trigger word "sks"."""
    shipped = shipped_prompt_base()
    base = None if shipped else request.getfixturevalue("tiny_prompt_model")
    adapters = tmp_path_factory.mktemp("prompt_adapters")
    adapter, fingerprint = random_prompt_lora(base, 0.05)  # small: the page's digits stay digits
    extra = {"style": "bold", "trigger_words": '["sks"]'}
    dataclasses.replace(adapter, fingerprint=fingerprint, extra=extra).save(adapters / "pstyle")
    from lora4diffusion.lora.embeddings import Embedding
    from lora4diffusion.pipeline import Pipeline

    width = Pipeline.load(base).text_encoder.cfg.width  # an embedding the page finds as <ink>
    Embedding("<ink>", torch.randn(1, width) * 0.01, fingerprint).save(adapters / "embeddings" / "ink")
    with serving(*(["--checkpoint", str(base)] if base else []), "--adapters", str(adapters)) as url:
        yield url, shipped


def drive_prompt_page(url: str, shot: Path, previews_png: Path | None = None) -> None:
    """Type prompts (completion, a trigger chip, a bad word, a negative prompt), generate with the live
    preview, check what the page shows, screenshot it."""
    with open_page(url, 'input[data-adapter="pstyle"]') as (page, errors):
        assert page.is_enabled("#negative") and page.is_hidden("#digit-picks")
        assert page.text_content("#n-label") == "Images per prompt"
        assert "prompt model" in page.text_content("#model-info")

        # the adapter's trigger word is a chip: a click puts it into the prompt, with the adapter's tag
        page.fill("#prompt", "a handwritten seven")
        page.click('button.trig[data-adapter="pstyle"][data-trigger="sks"]')
        text = page.input_value("#prompt")
        assert "sks" in text.split() and "<lora:pstyle:1>" in text
        assert page.input_value('input[data-adapter="pstyle"]') == "1"

        # completion: the tokenizer's words and the adapters' trigger words
        page.fill("#prompt", "")
        page.type("#prompt", "a handw")
        page.wait_for_selector("#complete li[data-name=handwritten]")
        page.keyboard.press("Tab")
        assert page.input_value("#prompt") == "a handwritten "
        page.type("#prompt", "sk")
        page.wait_for_selector("#complete li[data-name=sks]")
        page.keyboard.press("Tab")
        assert page.input_value("#prompt") == "a handwritten sks "
        # ... and after a '<' the embeddings' tokens (embeddings/ink in the adapters folder), also a chip
        page.type("#prompt", "<")
        page.wait_for_selector('#complete li[data-name="<ink>"]')
        page.keyboard.press("Tab")
        assert page.input_value("#prompt") == "a handwritten sks <ink> "
        assert page.locator('#embeddings button[data-token="<ink>"]').count() == 1

        # a word the text encoder does not know: the tokenizer's one line, next to the prompt box
        page.uncheck("#auto")
        page.fill("#prompt", "a handwriten seven")
        page.click("#generate")
        page.wait_for_selector("#prompt-error:not([hidden])")
        msg = page.text_content("#prompt-error")
        assert "unknown word 'handwriten'" in msg and "nearest: handwritten" in msg

        # two prompts (a column each) and a negative prompt: live preview, then the image and the command
        page.fill("#prompt", "a handwritten seven | the digit 3 <lora:pstyle:0.3>")
        page.fill("#negative", "bold")
        page.fill("#steps", "10")
        page.fill("#seed", "3")
        page.click("#generate")
        page.wait_for_selector("#output[data-state=done]", timeout=30_000)
        assert page.is_hidden("#prompt-error")
        assert int(page.get_attribute("#output", "data-previews")) >= 1
        assert page.evaluate("document.getElementById('output').naturalWidth") == 2 * 28 + 3
        command = page.text_content("#command")
        assert "--prompt 'a handwritten seven' --prompt 'the digit 3' --num 1 --negative bold" in command
        assert "pstyle:0.3" in command
        # the adapter's trigger is not in the prompts: a warning beside the box (the images are drawn)
        assert page.is_visible("#prompt-warning") and "sks" in page.text_content("#prompt-warning")

        # the preview frames the page receives are decoded digits (28 px per image), not 8x8 latents
        frames = page.evaluate("""async () => {
            const r = await fetch('/api/generate/stream', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({prompt: 'the digit 0 | seven | the digit 4', steps: 20, seed: 1})});
            const text = await r.text();
            return text.split('\\n\\n').filter((c) => c.startsWith('event: preview'))
                .map((c) => JSON.parse(c.split('\\ndata: ')[1]).grid);
        }""")
        assert len(frames) == 6  # steps 1, 4, 8, 12, 16, 20
        sizes = page.evaluate("""async (frames) => Promise.all(frames.map((b) => new Promise((ok) => {
            const im = new Image(); im.onload = () => ok([im.naturalWidth, im.naturalHeight]);
            im.src = 'data:image/png;base64,' + b; })))""", frames)
        assert all(s == [3 * 28 + 4, 28 + 2] for s in sizes), sizes  # 1 px padding around each
        if previews_png is not None:  # for a look: the frames one under the other
            _stack_frames(frames, previews_png)

        page.locator('input[data-adapter="pstyle"]').fill("0")  # the slider at 0 removes the tag
        assert page.input_value("#prompt") == "a handwritten seven | the digit 3"

        # the picture: a 0-9 row x 3, one prompt per column
        page.fill("#prompt", " | ".join(f"the digit {d}" for d in range(10)))
        page.fill("#negative", "")
        page.fill("#n", "3")
        page.fill("#steps", str(DEFAULT_STEPS))  # the picture shows the defaults
        page.click("#generate")
        page.wait_for_function("() => document.querySelectorAll('#history .card').length === 2")
        assert page.evaluate("document.getElementById('output').naturalWidth") == 10 * 28 + 11
        assert not errors, errors
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


def _docs_shot(tmp_path: Path) -> Path:
    """Where the README's picture goes: docs/serve.png if asked (LORA4DIFFUSION_WRITE_DOCS=1), else tmp."""
    write_docs = os.environ.get("LORA4DIFFUSION_WRITE_DOCS") == "1"
    return ROOT / "docs" / "serve.png" if write_docs else tmp_path / "serve.png"


def _stack_frames(frames: list[str], path: Path) -> None:
    import base64
    import io

    from PIL import Image

    ims = [Image.open(io.BytesIO(base64.b64decode(b))) for b in frames]
    out = Image.new("L", (ims[0].width, sum(im.height + 2 for im in ims)), 128)
    for k, im in enumerate(ims):
        out.paste(im.convert("L"), (0, k * (im.height + 2)))
    out.resize((out.width * 4, out.height * 4), Image.NEAREST).save(path)


def test_prompt_model_page(prompt_server, tmp_path):
    url, shipped = prompt_server
    # The README's picture is the shipped base's page; a tiny model's page is checked all the same.
    shot = _docs_shot(tmp_path) if shipped else tmp_path / "serve_prompt.png"
    drive_prompt_page(url, shot, tmp_path / "previews.png")
    assert (tmp_path / "previews.png").is_file()
