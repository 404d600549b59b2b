"""`lora4diffusion serve` without a browser: JSON API, prompts, concurrency, the queue, safety, training."""

from __future__ import annotations

import base64
import io
import json
import shlex
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from lora4diffusion.checkpoint import load_tensors, read_metadata, save_tensors
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import shipped_adapters
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.web.prompt import encode_prompt, parse_prompt, prompt_digits
from lora4diffusion.web.server import ServeConfig, create_app

STEPS = 3
CHECKPOINT = "pixel-base"  # the label model (the page for prompt models is tested on a tiny one)
BOLD, ITALIC = "bold-pixel", "italic-pixel"  # its shipped adapters


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapters")
    bold = shipped_adapters()[BOLD] / "adapter.safetensors"
    meta = read_metadata(bold)
    (d / "other").mkdir()  # the same tensors, recorded as trained on another base
    other = {**meta, "base_fingerprint": "f" * 64}
    save_tensors(d / "other" / "adapter.safetensors", load_tensors(bold), other)
    (d / "bad name").mkdir()  # not addressable from the page: never listed
    save_tensors(d / "bad name" / "adapter.safetensors", load_tensors(bold), meta)
    return d


@pytest.fixture(scope="module")
def app(folder):
    return create_app(ServeConfig(checkpoint=CHECKPOINT, adapters=str(folder), max_queue=3))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1:7860", raise_server_exceptions=False) as c:
        yield c


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def images(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.stack([decode(im) for im in resp.json()["images"]])


def as_png_pixels(x: torch.Tensor) -> np.ndarray:  # what the server's PNGs hold: round(255 x)
    return (x.numpy() * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------- prompts
def test_prompt_tags_parse_as_automatic1111():
    p = parse_prompt("3 <lora:bold:0.5> seven <lora:italic> <LORA:bold:0.25>")
    assert p.text == "3 seven"
    assert p.loras == {"italic": 1.0, "bold": 0.25}  # no weight = 1; the last tag of a name wins
    for bad in ("<lora:../x:1> 3", "<lora:/etc/passwd> 3", "<lora:bold:abc> 3", "<lora:bold:9> 3",
                "<lora:bold:1:1> 3", "<lora:bold:nan> 3"):
        with pytest.raises(UserError):
            parse_prompt(bad)


@pytest.mark.parametrize("text, digits", [
    ("7", [7]), ("seven", [7]), ("3 5 7", [3, 5, 7]), ("0-9", list(range(10))), ("37", [3, 7]),
    ("three and 8, 3", [3, 8]), ("", list(range(10))), ("Digit Nine", [9]), ("2-4,8", [2, 3, 4, 8]),
])
def test_prompt_digits(text, digits):
    assert prompt_digits(text) == digits


def test_prompt_refuses_what_the_label_model_cannot_read():
    for bad in ("a cat", "9-2", "the", "\u0663", "\uff17"):  # Arabic-Indic 3, fullwidth 7: ASCII digits only
        with pytest.raises(UserError):
            prompt_digits(bad)
    with pytest.raises(UserError, match="negative"):
        encode_prompt("3", "blurry", 1)
    cond = encode_prompt("3 7", "", 2)
    assert cond.labels == [3, 3, 7, 7] and cond.columns == ["3", "7"]


def test_preview_callback_sees_x0_and_changes_nothing():
    """The sampler hook behind the live preview: x0_hat per step, eq. 15; the images are bit-identical."""
    pipe = Pipeline.load(CHECKPOINT)
    plain, _ = pipe.generate([1, 2, 3], steps=STEPS, seed=5, batch_size=2)
    seen = []
    hooked, _ = pipe.generate([1, 2, 3], steps=STEPS, seed=5, batch_size=2,
                              callback=lambda first, i, n, x0: seen.append((first, i, n, x0.clone())))
    assert torch.equal(plain, hooked)
    assert [(f, i, n) for f, i, n, _ in seen] == [(f, i, 3) for f in (0, 2) for i in (1, 2, 3)]
    # at the last step x_{-1} = x0_hat exactly (abar_prev = 1): the last preview is the image
    last = torch.cat([seen[2][3], seen[5][3]])
    assert torch.allclose(((last[:, 0] + 1) / 2).clamp(0, 1), plain, atol=1e-6)
    assert seen[0][3].abs().max() <= 1  # clipped to the data range, as the sampler clips


# ------------------------------------------------------------------------------------------------- API
def test_adapters_listing_with_metadata(client):
    items = {a["name"]: a for a in client.get("/api/adapters").json()["adapters"]}
    # 'bad name' is not addressable, so not listed
    assert set(items) == {"bold", "italic", BOLD, ITALIC, "other"}
    assert items[BOLD]["source"] == "shipped" and items["other"]["source"] == "folder"
    assert items[BOLD]["rank"] == 4 and items[BOLD]["alpha"] == 4.0 and items[BOLD]["style"] == "bold"
    assert items[BOLD]["targets"] == "all-linear" and items[BOLD]["fits"] is True
    assert items["bold"]["fits"] is False  # the prompt base's adapter does not fit the label model
    assert items["other"]["fits"] is False and "another base" in items["other"]["reason"]


def test_generate_matches_the_pipeline_and_the_printed_command(client, app, tmp_path):
    r = client.post("/api/generate", json={"prompt": f"3 seven <lora:{BOLD}:0.5>", "n": 2, "steps": STEPS,
                                           "seed": 4})
    got = images(r)
    body = r.json()
    assert body["labels"] == [3, 3, 7, 7] and body["columns"] == ["3", "7"]
    s = body["settings"]
    assert (s["digits"], s["n"], s["steps"], s["guidance"], s["seed"], s["loras"]) == \
        ([3, 7], 2, STEPS, 1.25, 4, {BOLD: 0.5})
    grid = decode(body["grid"])
    assert grid.shape == (2 * 28 + 3, 2 * 28 + 3)  # one column per digit, one row per image of it

    pipe = Pipeline.load(CHECKPOINT).to(app.state.serve.pipe.device)  # the server's device, as the CLI's
    pipe.add_lora(BOLD, weight=0.5)
    want, _ = pipe.generate([3, 3, 7, 7], steps=STEPS, guidance=1.25, seed=4)
    assert np.array_equal(got, as_png_pixels(want))

    from lora4diffusion.cli import main

    args = shlex.split(body["command"])
    assert args[:2] == ["lora4diffusion", "sample"]
    args[args.index("--out") + 1] = str(tmp_path / "s")
    assert main(["-q", *args[1:]]) == 0
    npz = np.load(tmp_path / "s" / "samples.npz")
    assert np.array_equal(as_png_pixels(torch.from_numpy(npz["images"])), got)


def test_random_seed_is_reported_and_reproduces(client):
    r = client.post("/api/generate", json={"prompt": "5", "steps": 2, "seed": None})
    seed = r.json()["settings"]["seed"]
    again = client.post("/api/generate", json={"prompt": "5", "steps": 2, "seed": seed})
    assert np.array_equal(images(r), images(again))


def stream(client, body: dict) -> tuple[list[str], list[dict], dict | None]:
    kinds, previews, done = [], [], None
    with client.stream("POST", "/api/generate/stream", json=body) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                kinds.append(kind)
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if kind == "preview":
                    previews.append(data)
                elif kind == "done":
                    done = data
    return kinds, previews, done


def test_stream_sends_previews_then_the_result(client):
    kinds, previews, done = stream(client, {"prompt": "0-9", "steps": 4, "seed": 1})
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert [p["step"] for p in previews] == [1, 2, 3, 4]
    assert decode(previews[0]["grid"]).shape == decode(done["grid"]).shape
    # the predicted x0 sharpens into the result: the last preview is the final x0 (clipped, same pixels)
    assert not np.array_equal(decode(previews[0]["grid"]), decode(done["grid"]))
    assert np.abs(decode(previews[-1]["grid"]).astype(int) - decode(done["grid"])).max() <= 1
    _, previews, _ = stream(client, {"prompt": "1", "steps": 20, "seed": 1})
    assert [p["step"] for p in previews] == [1, *range(2, 21, 2)]  # the first step, then every steps // 10


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "a cat"}, 400, "unknown word"),
    ({"prompt": "3", "negative": "blurry"}, 400, "negative"),
    ({"prompt": "<lora:../../etc:1> 3"}, 400, "bad adapter name"),
    ({"prompt": "3", "loras": {"/abs/path": 1}}, 400, "bad adapter name"),
    ({"prompt": "3", "loras": {"nope": 1}}, 400, "unknown adapter"),
    ({"prompt": "3", "loras": {"other": 1}}, 400, "does not fit"),
    ({"prompt": f"3 <lora:{BOLD}:1>", "loras": {BOLD: 0.5}}, 400, "says"),
    ({"prompt": "3", "steps": 0}, 400, "steps"),
    ({"prompt": "3", "steps": 10_000}, 400, "steps"),
    ({"prompt": "3", "n": 99}, 400, "n must"),
    ({"prompt": "3", "guidance": "x"}, 400, "guidance"),
    ({"prompt": "3", "seed": -5}, 400, "seed"),
    ({"prompt": "3", "colour": "red"}, 400, "unknown field"),
    ({"prompt": 3}, 400, "string"),
    # what arrived is named in JSON's words: the string "1" is not shown as the number 1
    ({"prompt": "3", "n": "1"}, 400, 'n must be an integer in 1..16, got the string "1"'),
    ({"prompt": "3", "n": 2.5}, 400, "got 2.5"),
    ({"prompt": "3", "steps": True}, 400, "steps must be an integer in 1..200, got true"),
    ({"prompt": "3", "seed": True}, 400, "seed must be an integer in 0..2147483647, got true"),
    ({"prompt": "3", "guidance": [1]}, 400, "guidance must be a number in 0..30, got a list"),
    ({"prompt": "3", "negative": 0}, 400, "negative must be a string, got 0"),
    ({"prompt": ["3"]}, 400, "prompt must be a string, got a list"),
    ({"prompt": "3", "loras": []}, 400, 'loras must be an object {"name": weight}, got a list'),
    ({"prompt": "3", "loras": ""}, 400, 'loras must be an object {"name": weight}, got the string ""'),
    ({"prompt": "3", "loras": {BOLD: "1"}}, 400, 'must be a number, got the string "1"'),
    ({"prompts": "3 5"}, 400, "unknown field(s) prompts"),  # never one prompt per character
    ({"prompt": "3", "n": 10**19}, 400, "n must be an integer in 1..16, got 10000000000000000000"),
])
def test_bad_requests_are_one_line_json_4xx(client, body, status, words):
    r = client.post("/api/generate", json=body)
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert words in msg and "\n" not in msg and "Traceback" not in msg


def test_protocol_errors_are_json(client):
    js = {"Content-Type": "application/json"}
    r = client.post("/api/generate", content=b"{not json", headers=js)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/api/generate", content=b"[1]", headers=js)
    assert r.status_code == 400
    r = client.post("/api/generate", content=b"x" * (2**20 + 10), headers=js)
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert client.get("/api/nothing").json() == {"error": "Not Found"}
    assert client.get("/api/generate").status_code == 405
    assert client.get("/api/train/nope").status_code == 404
    assert client.get("/static/../server.py").status_code == 404


DEEP = 100_000


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "3", "steps": 1e400}', "the number 1e400, out of range (numbers must be finite)"),
    (b'{"prompt": "3", "guidance": -1E999}', "the number -1E999, out of range"),
    (b'{"prompt": "3", "steps": ' + b"9" * 5000 + b"}", "an integer of 5000 digits (at most 20)"),
    (b'{"prompt": "3", "seed": -' + b"1" * 21 + b"}", "an integer of 21 digits (at most 20)"),
    (b'{"prompt": "3", "guidance": 0.' + b"1" * 100 + b"}", "a number written with 102 characters"),
    (b'{"prompt": "3", "steps": NaN}', "NaN, which is not a JSON number"),
    (b'{"prompt": "3", "guidance": -Infinity}', "-Infinity, which is not a JSON number"),
    (b"[" * DEEP + b"]" * DEEP, "nests lists or objects too deeply (at most 8)"),
    (b'{"a":' * DEEP + b"1" + b"}" * DEEP, "nests lists or objects too deeply (at most 8)"),
    (b'{"prompt": "3", "loras": [[[[[[[[[1]]]]]]]]]}', "nests lists or objects too deeply (at most 8)"),
    (b'{"prompt": "3", "steps": 2, "steps": 3}', 'the key "steps" twice'),
    (b'{"prompt": "\xff"}', "not UTF-8 (byte 12); JSON is sent as UTF-8"),
    (b"\xff\xfe{\x00}\x00", "not UTF-8 (byte 0)"),  # UTF-16, which Python's json would read
    (b'"3"', "must be a JSON object, got the string"),
    (b"{not json", "not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
])
@pytest.mark.parametrize("path", ["/api/generate", "/api/generate/stream", "/api/train"])
def test_bodies_that_crashed_the_json_parser_are_one_line_400(client, raw, words, path):
    """Overflowing numbers, 5000-digit integers, NaN, nesting 100,000 deep, a key twice, bytes that are not
    UTF-8: the client's errors, each a 400 naming it (they were 500s: OverflowError, ValueError,
    RecursionError), before any field is read."""
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, (raw[:60], r.status_code, r.text[:200])
    msg = r.json()["error"]
    assert words in msg and "\n" not in msg and len(msg) < 300, msg


def test_train_requests_name_what_arrived(client, pclient):
    cases = [
        (client, {"name": 5, "style": "bold"}, "name must be a string, got 5"),
        (client, {"name": "x", "style": ["bold"]}, "style must be a string, got a list"),
        (client, {"name": "x", "style": "bold", "steps": "2"}, 'steps must be an integer in 1..2000, got the'
                                                                ' string "2"'),
        (client, {"name": "x", "style": "bold", "rank": True}, "rank must be an integer in 1..64, got true"),
        (client, {"name": "x", "style": "bold", "method": "boft"},
         'method must be one of lora, dora, loha, lokr, oft, got the string "boft"'),
        (client, {"name": "x", "style": "bold", "method": 3}, "method must be a string, got 3"),
        (pclient, {"name": "x", "style": "bold", "prior": 0}, "prior must be true or false (--prior is a"
                                                              " switch), got 0"),
        (pclient, {"name": "x", "style": "bold", "trigger": 7}, "trigger must be one word (letters, digits),"
                                                                " got 7"),
    ]
    for c, body, words in cases:
        r = c.post("/api/train", json=body)
        assert r.status_code == 400 and words in r.json()["error"], (body, r.text)


def test_a_body_that_never_arrives_is_dropped_after_the_stated_timeout(app):
    """Content-Length 1000, 11 bytes sent, then silence: after ServeConfig.body_timeout (30 s by default,
    1 s here) a 408 with a one-line JSON error, and the server closes the connection; it answers others
    meanwhile and after. A real uvicorn server on a socket (the test client cannot send a short body)."""
    import httpx
    import uvicorn

    from lora4diffusion.web.request import BODY_TIMEOUT_S

    cfg = app.state.serve.cfg
    assert cfg.body_timeout == BODY_TIMEOUT_S == 30
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    cfg.body_timeout = 1.0
    try:
        wait_for(lambda: server.started)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
            c.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": ')
            t0 = time.monotonic()
            assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10).status_code == 200  # meanwhile
            data = b""
            while chunk := c.recv(65536):  # until the server closes the connection
                data += chunk
            waited = time.monotonic() - t0
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
        assert 0.5 < waited < 10, waited
        want = "the request body did not arrive within 1 s (11 bytes of the 1000 declared (Content-Length));"
        assert json.loads(body) == {"error": want + " connection closed"}
        assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10).status_code == 200  # and after
    finally:
        cfg.body_timeout = BODY_TIMEOUT_S
        server.should_exit = True
        thread.join(20)


def test_two_requests_at_once_get_what_they_would_get_alone(client, app):
    """The model is shared, weights are per request: bold at 1 and at 0 submitted together, in both orders."""
    body = {"prompt": "0-9", "steps": STEPS, "seed": 7}
    alone = {w: images(client.post("/api/generate", json={**body, "loras": {BOLD: w}})) for w in (1, 0)}
    pipe = Pipeline.load(CHECKPOINT).to(app.state.serve.pipe.device)
    base, _ = pipe.generate(list(range(10)), steps=STEPS, guidance=1.25, seed=7)
    assert np.array_equal(alone[0], as_png_pixels(base))  # weight 0 is the base exactly
    assert not np.array_equal(alone[1], alone[0])

    engine = app.state.serve.engine
    for order in ((1, 0), (0, 1)):
        got: dict[float, np.ndarray] = {}

        def ask(w, got=got):
            got[w] = images(client.post("/api/generate", json={**body, "loras": {BOLD: w}}))

        with engine.model_lock:  # both wait in the queue, then run back to back on the shared model
            threads = [threading.Thread(target=ask, args=(w,)) for w in order]
            for t in threads:
                t.start()
                time.sleep(0.2)
            wait_for(lambda: engine.jobs.qsize() >= 1)
        for t in threads:
            t.join(60)
        assert np.array_equal(got[1], alone[1]) and np.array_equal(got[0], alone[0])

    # and three at once without any help (at most 3 wait: no 429), weights alternating
    got4: dict[int, np.ndarray] = {}

    def ask4(i):
        got4[i] = images(client.post("/api/generate", json={**body, "loras": {BOLD: i % 2}}))

    threads = [threading.Thread(target=ask4, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert all(np.array_equal(got4[i], alone[i % 2]) for i in range(3))


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_bounded_queue_answers_429(client, app):
    engine = app.state.serve.engine  # max_queue = 3
    codes: list[int] = []
    body = {"prompt": "1", "steps": 1, "seed": 0}

    def ask():
        codes.append(client.post("/api/generate", json=body).status_code)

    threads = []
    with engine.model_lock:
        n0 = engine.submitted
        threads.append(threading.Thread(target=ask))
        threads[0].start()
        # the worker has taken the first job and waits for the model
        wait_for(lambda: engine.submitted == n0 + 1 and engine.jobs.qsize() == 0)
        for _ in range(3):
            threads.append(threading.Thread(target=ask))
            threads[-1].start()
        wait_for(lambda: engine.jobs.qsize() == 3)
        r = client.post("/api/generate", json=body)
        assert r.status_code == 429 and "busy" in r.json()["error"]
        r = client.post("/api/generate/stream", json=body)
        assert r.status_code == 429
    for t in threads:
        t.join(60)
    assert codes == [200] * 4


# -------------------------------------------------------------------------------------------- training
def zip_b64(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return base64.b64encode(buf.getvalue()).decode()


def wait_train(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        job = client.get(f"/api/train/{job_id}").json()
        if job["status"] != "running":
            return job
        assert time.time() < deadline, job
        time.sleep(0.3)


def test_training_from_the_page_adds_an_adapter(client, folder):
    r = client.post("/api/train", json={"name": "tiny_thin", "style": "thin", "rank": 1, "steps": 2,
                                        "method": "dora", "validate_every": 1})  # not LoRA; validated
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "running" and job["steps"] == 2 and job["method"] == "dora"
    busy = client.post("/api/train", json={"name": "another", "style": "bold", "steps": 2})
    assert busy.status_code == 409 and "one job at a time" in busy.json()["error"]
    assert client.post("/api/generate", json={"prompt": "4", "steps": 2}).status_code == 200  # still serving
    job = wait_train(client, job["id"])
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["loss"] and job["loss"][-1][0] == 2
    assert [v[0] for v in job["validation"]] == [1, 2] and all(v[1] > 0 for v in job["validation"])
    assert (folder / "tiny_thin" / "validation.csv").is_file()
    items = {a["name"]: a for a in client.get("/api/adapters").json()["adapters"]}
    assert items["tiny_thin"]["rank"] == 1 and items["tiny_thin"]["fits"] is True
    assert items["tiny_thin"]["method"] == "dora" and items[BOLD]["method"] == "lora"
    assert items["tiny_thin"]["style"] == "thin" and items["tiny_thin"]["source"] == "folder"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left
    r = client.post("/api/generate", json={"prompt": "4 <lora:tiny_thin:1>", "steps": 2})
    assert r.status_code == 200 and str(folder / "tiny_thin") in r.json()["command"]
    again = client.post("/api/train", json={"name": "tiny_thin", "style": "thin", "steps": 2})
    assert again.status_code == 400 and "exists" in again.json()["error"]
    upload = client.post("/api/train", json={"name": "u", "style": "upload", "validate_every": 1})
    assert upload.status_code == 400 and "held-out" in upload.json()["error"]


def test_cancelled_training_leaves_nothing(client, folder):
    before = sorted(p.name for p in folder.iterdir())
    r = client.post("/api/train", json={"name": "long_one", "style": "italic", "steps": 2000})
    assert r.status_code == 202
    job = client.delete(f"/api/train/{r.json()['id']}").json()
    assert job["status"] == "cancelled"
    job = wait_train(client, job["id"])
    assert job["status"] == "cancelled"
    wait_for(lambda: sorted(p.name for p in folder.iterdir()) == before)  # the staging folder goes too


def test_bad_uploads_leave_nothing_behind(client, folder, app):
    before = sorted(p.name for p in folder.iterdir())
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    cases = [
        ({"name": "../evil", "style": "bold"}, 400, "bad adapter name"),
        ({"name": BOLD, "style": "bold"}, 400, "exists"),
        ({"name": "x", "style": "sparkly"}, 400, "style"),
        ({"name": "x", "style": "bold", "rank": 0}, 400, "rank"),
        ({"name": "x", "style": "upload"}, 400, "zip"),
        ({"name": "x", "style": "upload", "zip_base64": "bm90IGEgemlw"}, 400, "not a zip"),
        ({"name": "x", "style": "upload", "zip_base64": zip_b64({"../../evil.png": png.getvalue()})}, 400,
         "no images"),
        ({"name": "x", "style": "upload", "zip_base64": zip_b64({"3/big.png": b"0" * (3 * 2**20)})}, 400,
         "limit"),
    ]
    for body, status, words in cases:
        r = client.post("/api/train", json=body)
        assert r.status_code == status and words in r.json()["error"], (body.get("name"), r.text)
    cfg = app.state.serve.cfg
    old, cfg.max_upload_bytes = cfg.max_upload_bytes, 1024
    try:
        r = client.post("/api/train", json={"name": "x", "style": "upload", "zip_base64": "A" * 4000})
        assert r.status_code == 413
    finally:
        cfg.max_upload_bytes = old
    # a member named 3/../../../x.png lands inside the job's folder (names are never used as paths), and
    # images nobody can read make the training fail: no adapter, no staging folder
    bad = zip_b64({"3/../../../outside.png": b"not an image", "7/a.png": b"neither"})
    r = client.post("/api/train", json={"name": "broken", "style": "upload", "zip_base64": bad, "steps": 2})
    assert r.status_code == 202, r.text
    job = wait_train(client, r.json()["id"])
    assert job["status"] == "failed" and "no readable images" in job["error"]
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (folder.parent / "outside.png").exists()


def test_other_sites_cannot_drive_the_server(client):
    """A cross-site form post (no JSON content type) and a rebinding host name are refused before any work."""
    n = client.app.state.serve.engine.submitted
    r = client.post("/api/generate", content=b'{"prompt": "3"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = client.post("/api/train", content=b'{"name": "x", "style": "bold"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = client.get("/api/adapters", headers={"Host": "evil.example:7860"})
    assert r.status_code == 403 and "refused" in r.json()["error"]
    assert client.get("/api/adapters", headers={"Host": "localhost:7860"}).status_code == 200
    assert client.app.state.serve.engine.submitted == n


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_refuses_bad_ports_and_warns_on_open_hosts(monkeypatch, capsys):
    import uvicorn

    from lora4diffusion.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "/nonexistent/base", "--port", "0"]) == 2
    assert "nonexistent" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
        assert "pick another --port" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: calls.append(self.config))
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--checkpoint", CHECKPOINT, "--host", "0.0.0.0", "--port", str(port)]) == 0
    out = capsys.readouterr()
    assert "warning" in out.err and f"http://0.0.0.0:{port}/" in out.out
    assert calls and calls[0].host == "0.0.0.0" and calls[0].port == port
    assert not calls[0].app.state.serve.cfg.local_only  # any Host header, as asked (and warned)


def test_ctrl_c_ends_running_jobs_and_exits_cleanly(tmp_path):
    """The real command: Ctrl-C during a long job answers it 503 (JSON) and exits 0 at once, no traceback."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora4diffusion", "serve", "--checkpoint", CHECKPOINT,
                             "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert f"http://127.0.0.1:{port}/" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/api/generate"
        wait_for(lambda: _up(f"http://127.0.0.1:{port}/api/info"), timeout=30)
        answer: list = []
        long_job = {"prompt": "0-9", "n": 16, "steps": 200}
        t = threading.Thread(target=lambda: answer.append(httpx.post(url, json=long_job, timeout=60)))
        t.start()
        time.sleep(1.0)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert time.time() - t0 < 5
        t.join(10)
        assert answer[0].status_code == 503 and answer[0].json() == {"error": "the server is stopping"}
        assert "Traceback" not in proc.stderr.read()
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------------------------------ prompt models
# The tiny prompt-conditioned latent model of conftest.py (tiny VAE + tiny UNet and text encoder, built once)
# and an adapter that fits it (random low-rank factors; train-lora is tested on its own).
@pytest.fixture(scope="module")
def prompt_model(tiny_prompt_model) -> Path:
    return tiny_prompt_model


@pytest.fixture(scope="module")
def prompt_adapters(prompt_model, tmp_path_factory, random_prompt_lora) -> Path:
    """Random low-rank factors on the prompt base's UNet, saved four times: pstyle with no base fingerprint
    (as an imported adapter: shapes are checked on load), pfit recording the prompt base's fingerprint (UNet
    + text encoder, as train-lora on a prompt base writes), punet the UNet's alone and pother another base's
    (neither is this prompt base's, for Pipeline.add_lora as for the page). Trigger words in the metadata
    keys an adapter may use."""
    import dataclasses

    from lora4diffusion.lora.adapters import UNKNOWN

    folder = tmp_path_factory.mktemp("prompt_adapters")
    adapter, both = random_prompt_lora(prompt_model, 0.5)  # the adapter records the UNet's fingerprint
    copies = [("pstyle", UNKNOWN, {"trigger": "sks"}), ("pfit", both, {"trigger_words": '["ohwx"]'}),
              ("punet", adapter.fingerprint, {}), ("pother", "e" * 64, {})]
    for name, fp, meta in copies:
        dataclasses.replace(adapter, fingerprint=fp, extra={"style": "bold", **meta}).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def papp(prompt_model, prompt_adapters):
    return create_app(ServeConfig(checkpoint=str(prompt_model), adapters=str(prompt_adapters), max_queue=3))


@pytest.fixture(scope="module")
def pclient(papp):
    with TestClient(papp, base_url="http://127.0.0.1:7860", raise_server_exceptions=False) as c:
        yield c


def prompt_pipe(prompt_model: Path, papp, lora: tuple[Path, float] | None = None) -> Pipeline:
    pipe = Pipeline.load(prompt_model).to(papp.state.serve.pipe.device)
    if lora is not None:
        pipe.add_lora(lora[0], weight=lora[1])
    return pipe


def test_prompt_model_info_and_adapters(pclient, prompt_model):
    info = pclient.get("/api/info").json()
    assert info["model"] == "prompt" and info["latent"] is True and info["negative_prompt"] is True
    assert info["checkpoint"] == str(prompt_model) and info["prompt_separator"] == "|"
    words = set(info["vocabulary"])
    assert {"seven", "handwritten", "sks"} <= words and "<|endoftext|>" not in words
    assert set(info["train"]["options"]) == {"trigger", "prior", "text_encoder"}
    items = {a["name"]: a for a in pclient.get("/api/adapters").json()["adapters"]}
    assert items["pstyle"]["fits"] is None and items["pstyle"]["triggers"] == ["sks"]
    assert items["pfit"]["fits"] is True and items["pfit"]["triggers"] == ["ohwx"]
    assert items["pother"]["fits"] is False and "another base" in items["pother"]["reason"]
    assert items["punet"]["fits"] is False and items["punet"]["triggers"] == []
    assert items["bold-pixel"]["fits"] is False  # the pixel (label) base's


def test_adapter_triggers_are_read_defensively():
    from lora4diffusion.web.engine import adapter_triggers

    assert adapter_triggers({}) == []
    assert adapter_triggers({"trigger": "sks"}) == ["sks"]
    assert adapter_triggers({"trigger": "sks, ohwx"}) == ["sks", "ohwx"]
    assert adapter_triggers({"triggers": '["zwx", "sks"]', "trigger": "sks"}) == ["zwx", "sks"]
    assert adapter_triggers({"trigger_words": '["ohwx", "tok"]'}) == ["ohwx", "tok"]  # train-lora --trigger
    assert adapter_triggers({"triggers": "{not json", "trigger": "<lora:x>"}) == []  # malformed: none


def test_prompt_generate_matches_the_pipeline_and_the_printed_command(pclient, papp, prompt_model,
                                                                       prompt_adapters, tmp_path):
    body = {"prompt": "a handwritten seven | the  digit 3 <lora:pstyle:0.7>", "negative": "thin", "n": 2,
            "steps": STEPS, "seed": 4}
    r = pclient.post("/api/generate", json=body)
    got = images(r)
    out = r.json()
    prompts = ["a handwritten seven"] * 2 + ["the digit 3"] * 2
    assert out["prompts"] == prompts and out["labels"] == [7, 7, 3, 3]
    assert out["columns"] == ["a handwritten seven", "the digit 3"]
    s = out["settings"]
    assert (s["model"], s["prompts"], s["negative"], s["loras"]) == \
        ("prompt", ["a handwritten seven", "the digit 3"], "thin", {"pstyle": 0.7})
    assert got.shape == (4, 28, 28) and decode(out["grid"]).shape == (2 * 28 + 3, 2 * 28 + 3)

    pipe = prompt_pipe(prompt_model, papp, (prompt_adapters / "pstyle", 0.7))
    want, _ = pipe.generate(prompts, steps=STEPS, guidance=1.25, seed=4, negative="thin")
    assert np.array_equal(got, as_png_pixels(want))
    again = {**body, "prompt": body["prompt"].replace("pstyle", "pfit")}  # the same factors, fingerprinted
    assert np.array_equal(images(pclient.post("/api/generate", json=again)), got)
    plain = images(pclient.post("/api/generate", json={**body, "prompt": "a handwritten seven|the digit 3"}))
    neg = images(pclient.post("/api/generate", json={**body, "negative": ""}))
    assert not np.array_equal(plain, got) and not np.array_equal(neg, got)  # the adapter and the negative act

    from lora4diffusion.cli import main

    args = shlex.split(out["command"])
    assert args[:2] == ["lora4diffusion", "sample"] and "--negative" in args and "--digits" not in args
    args[args.index("--out") + 1] = str(tmp_path / "s")
    assert main(["-q", *args[1:]]) == 0
    npz = np.load(tmp_path / "s" / "samples.npz")
    assert np.array_equal(as_png_pixels(torch.from_numpy(npz["images"])), got)
    assert npz["prompts"].tolist() == prompts


def test_prompt_model_concurrent_requests_get_their_own_adapter_weight(pclient, papp, prompt_model):
    body = {"prompt": "seven | the digit 2", "negative": "bold", "steps": STEPS, "seed": 9}
    alone = {w: images(pclient.post("/api/generate", json={**body, "loras": {"pstyle": w}})) for w in (1, 0)}
    base, _ = prompt_pipe(prompt_model, papp).generate(["seven", "the digit 2"], steps=STEPS, seed=9,
                                                       negative="bold")
    assert np.array_equal(alone[0], as_png_pixels(base)) and not np.array_equal(alone[1], alone[0])
    engine = papp.state.serve.engine
    got: dict[float, np.ndarray] = {}

    def ask(w):
        got[w] = images(pclient.post("/api/generate", json={**body, "loras": {"pstyle": w}}))

    with engine.model_lock:  # queued together, run back to back on the shared model
        n0 = engine.submitted
        threads = [threading.Thread(target=ask, args=(w,)) for w in (1, 0)]
        for t in threads:
            t.start()
        # the worker holds one (waiting for the model), the other waits in the queue
        wait_for(lambda: engine.submitted == n0 + 2 and engine.jobs.qsize() == 1)
    for t in threads:
        t.join(60)
    assert np.array_equal(got[1], alone[1]) and np.array_equal(got[0], alone[0])


@pytest.mark.parametrize("body, words", [
    ({"prompt": "a handwriten seven"}, "unknown word 'handwriten'"),
    ({"prompt": "a handwriten seven"}, "nearest: handwritten"),
    ({"prompt": "seven", "negative": "blury"}, "unknown word 'blury'"),
    ({"prompt": "seven " * 20}, "the limit is"),
    ({"prompt": "seven | | two"}, "empty prompt"),
    ({"prompt": "seven <lora:nope:1>"}, "unknown adapter"),
    ({"prompt": "seven <lora:bold-pixel:1>"}, "does not fit"),
    ({"prompt": "seven <lora:pother:1>"}, "does not fit"),
    ({"prompt": "seven <lora:punet:1>"}, "does not fit"),
])
def test_bad_prompts_for_the_prompt_model_are_one_line_400(pclient, body, words):
    r = pclient.post("/api/generate", json=body)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]
    assert words in msg and "\n" not in msg and "Traceback" not in msg
    assert pclient.post("/api/generate/stream", json=body).status_code == 400  # before any stream starts


def test_prompt_model_previews_are_decoded_images(pclient, papp):
    from lora4diffusion.latents import decode_latents
    from lora4diffusion.web.engine import preview_images

    vae = papp.state.serve.pipe.vae
    z = torch.randn(3, vae.cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    x = preview_images(z, vae)
    assert x.shape == (3, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, decode_latents(vae, z))  # the latent decoded as the final image is

    kinds, previews, done = stream(pclient, {"prompt": "the digit 5 | seven", "n": 2, "steps": 10, "seed": 2})
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert [p["step"] for p in previews] == [1, 2, 4, 6, 8, 10]  # the first step, then every steps // 5
    final = decode(done["grid"])
    for p in previews:
        frame = decode(p["grid"])
        assert frame.shape == final.shape == (2 * 28 + 3, 2 * 28 + 3) and frame.dtype == np.uint8
    assert not np.array_equal(decode(previews[0]["grid"]), final)
    # the last step's x0_hat is the final latent (abar_prev = 1), decoded: the result's pixels
    assert np.abs(decode(previews[-1]["grid"]).astype(int) - final).max() <= 1


def test_train_options_for_prompt_models_follow_the_installed_cli(papp, monkeypatch):
    from lora4diffusion.web import training

    t = papp.state.serve.training
    flags = training.train_lora_flags()
    for key, flag in training.PROMPT_OPTIONS.items():
        assert t.options(True)["options"][key] == (flag in flags)
        if flag not in flags:  # asked for but not installed: 400, not a different adapter
            with pytest.raises(UserError, match=f"no {flag}"):
                t.prompt_args({key: "sks" if key == "trigger" else True})
    monkeypatch.setattr(training, "train_lora_flags", lambda: {"--trigger": None, "--prior": 0,
                                                               "--text-encoder": 0})
    assert t.prompt_args({"trigger": "SKS", "prior": True, "text_encoder": True}) == \
        ["--trigger", "sks", "--prior", "--text-encoder"]
    assert t.prompt_args({"trigger": "", "prior": False}) == []
    for bad in ({"trigger": "--out"}, {"trigger": "two words"}, {"trigger": "seven"}, {"trigger": "abc"},
                {"prior": "x"}):  # "seven": an ordinary caption word; "abc": not a reserved trigger
        with pytest.raises(UserError):
            t.prompt_args(bad)


def test_the_cli_hands_serve_train_loras_options(monkeypatch):
    """serve's page learns train-lora's options from the CLI (web code never imports it): its serve command
    fills ServeConfig.train_lora_options from its own parser; the page's default, used without it, agrees."""
    from lora4diffusion.cli import apps, build_parser, main
    from lora4diffusion.web import training

    table = build_parser().parse_args(["serve"]).train_lora_options
    assert table["--max-train-steps"] is None and table["--rslora"] == 0 and "--out" in table
    assert {f: table[f] for f in training.DEFAULT_TRAIN_LORA_FLAGS} == training.DEFAULT_TRAIN_LORA_FLAGS
    seen = {}
    monkeypatch.setattr(apps, "serve", lambda cfg, host, port: seen.update(cfg=cfg))
    monkeypatch.delenv("LORA4DIFFUSION_QUICK", raising=False)
    assert main(["-q", "serve", "--port", "0"]) == 0
    assert seen["cfg"].train_lora_options == table


def test_training_a_triggered_adapter_on_the_prompt_model(pclient, papp, prompt_model, prompt_adapters):
    """Where the installed train-lora has --trigger/--prior/--text-encoder (train_lora_flags), the page's
    options reach it and the adapter it writes is listed with its trigger, fits, and draws as Pipeline does;
    where it has not, asking for them is a 400 and nothing starts."""
    from lora4diffusion.web import training

    flags = training.train_lora_flags()
    body = {"name": "sks_bold", "style": "bold", "rank": 1, "steps": 2, "trigger": "sks", "prior": True,
            "text_encoder": True}
    r = pclient.post("/api/train", json=body)
    if not all(f in flags for f in training.PROMPT_OPTIONS.values()):
        assert r.status_code == 400 and "the installed train-lora has no" in r.json()["error"]
        assert not (prompt_adapters / "sks_bold").exists()
        return
    assert r.status_code == 202, r.text
    assert r.json()["options"] == ["--trigger", "sks", "--prior", "--text-encoder"]
    job = wait_train(pclient, r.json()["id"])
    assert job["status"] == "done", job
    items = {a["name"]: a for a in pclient.get("/api/adapters").json()["adapters"]}
    assert items["sks_bold"]["triggers"] == ["sks"] and items["sks_bold"]["fits"] is True
    gen = {"prompt": "a handwritten sks seven <lora:sks_bold:1>", "steps": STEPS, "seed": 1}
    got = images(pclient.post("/api/generate", json=gen))
    want, _ = prompt_pipe(prompt_model, papp, (prompt_adapters / "sks_bold", 1.0)).generate(
        ["a handwritten sks seven"], steps=STEPS, seed=1)
    assert np.array_equal(got, as_png_pixels(want))  # UNet and text-encoder LoRA, as Pipeline loads them


def test_shipped_prompt_base_is_the_default_and_its_command_omits_checkpoint(prompt_model, tmp_path,
                                                                             monkeypatch):
    """Without --checkpoint the page serves what Pipeline.load() loads; once that is a prompt model (the
    shipped base is switching to one), /api/info says so and the copied command, with no --checkpoint, loads
    the same base and draws the same images."""
    import shutil

    from lora4diffusion import catalog, pipeline
    from lora4diffusion.cli import main

    shipped = tmp_path / "pretrained" / "base"
    shutil.copytree(prompt_model, shipped)
    original = catalog.pretrained_dir

    def pretrained_dir(name: str = catalog.DEFAULT_BASE):
        return shipped if name == catalog.DEFAULT_BASE else original(name)

    for module in (catalog, pipeline):
        monkeypatch.setattr(module, "pretrained_dir", pretrained_dir)
    with TestClient(create_app(ServeConfig()), base_url="http://127.0.0.1:7860") as c:
        info = c.get("/api/info").json()
        assert (info["model"], info["checkpoint"]) == ("prompt", "shipped base (prompt model)")
        body = {"prompt": "the digit 5", "negative": "a", "steps": STEPS, "seed": 2}
        r = c.post("/api/generate", json=body)
        got, command = images(r), r.json()["command"]
    args = shlex.split(command)
    assert "--checkpoint" not in args and args[args.index("--negative") + 1] == "a"
    args[args.index("--out") + 1] = str(tmp_path / "s")
    assert main(["-q", *args[1:]]) == 0
    npz = np.load(tmp_path / "s" / "samples.npz")
    assert np.array_equal(as_png_pixels(torch.from_numpy(npz["images"])), got)


def test_missing_trigger_is_a_warning_beside_the_images(pclient):
    body = {"prompt": "a handwritten seven <lora:pfit:1>", "steps": 1, "seed": 0}
    warnings = pclient.post("/api/generate", json=body).json()["warnings"]
    assert len(warnings) == 1 and "'pfit'" in warnings[0] and "ohwx" in warnings[0]
    body["prompt"] = "a handwritten ohwx seven <lora:pfit:1>"
    assert pclient.post("/api/generate", json=body).json()["warnings"] == []
    assert pclient.post("/api/generate", json={**body, "prompt": "seven"}).json()["warnings"] == []


# -------------------------------------------------------------------- embeddings and pivotal adapters
@pytest.fixture(scope="module")
def token_sources(prompt_model, prompt_adapters, random_prompt_lora) -> dict[str, Path]:
    """In the page's adapters folder: ppiv, a pivotal adapter (the stand-in factors + token <piv>, 2 vectors)
    and embeddings/: ink.safetensors (A1111's layout, its own token <bold-ti>: it goes by <ink>), piv.
    safetensors (other vectors for <piv>), other-base (trained on another base). Random vectors."""
    import dataclasses

    from lora4diffusion.formats.embeddings import write_embedding
    from lora4diffusion.lora.embeddings import Embedding

    adapter, both = random_prompt_lora(prompt_model, 0.5)
    g = torch.Generator().manual_seed(1)
    vec = {k: torch.randn(n, 32, generator=g) for k, n in (("piv", 2), ("ink", 1), ("piv2", 2), ("o", 1))}
    dataclasses.replace(adapter, fingerprint=both, embeddings={"<piv>": vec["piv"]}).save(
        prompt_adapters / "ppiv")
    folder = prompt_adapters / "embeddings"
    ink = write_embedding(Embedding("<bold-ti>", vec["ink"], both), "a1111", folder)
    ink.rename(folder / "ink.safetensors")
    Embedding("<piv>", vec["piv2"], both).save(folder / "piv")  # embeddings/piv/embedding.safetensors
    write_embedding(Embedding("<other-base>", vec["o"], "e" * 64), "a1111", folder)
    return {"ppiv": prompt_adapters / "ppiv", "ink": folder / "ink.safetensors", "piv": folder / "piv"}


def test_info_lists_embeddings_and_pivotal_tokens(pclient, token_sources):
    info = pclient.get("/api/info").json()
    embs = {e["token"]: e for e in info["embeddings"]}
    assert set(embs) == {"<ink>", "<piv>", "<other-base>"} and info["tokens"] == []
    assert (embs["<ink>"]["name"], embs["<ink>"]["vectors"], embs["<ink>"]["source"]) == ("ink", 1, "folder")
    assert embs["<ink>"]["fits"] is True and embs["<other-base>"]["fits"] is False
    adapters = {a["name"]: a for a in pclient.get("/api/adapters").json()["adapters"]}
    assert adapters["ppiv"]["tokens"] == ["<piv>"] and adapters["pfit"]["tokens"] == []


def test_tokens_in_the_prompt_bring_their_embeddings_and_adapters(pclient, papp, prompt_model, token_sources,
                                                                 tmp_path):
    """<ink> brings embeddings/ink.safetensors, <lora:ppiv> its bundled <piv>; without the tag <piv> is
    embeddings/piv's (other vectors): each request draws what the CLI draws with those files alone, whatever
    the requests before it loaded, and the printed command reproduces it."""
    from lora4diffusion.cli import main

    body = {"prompt": "a <ink> seven | the digit <piv> 3", "steps": STEPS, "seed": 4, "n": 1}
    prompts = ["a <ink> seven", "the digit <piv> 3"]
    r = pclient.post("/api/generate", json={**body, "prompt": body["prompt"] + " <lora:ppiv:0.5>"})
    tagged = images(r)
    pipe = prompt_pipe(prompt_model, papp, (token_sources["ppiv"], 0.5))
    pipe.add_embedding(token_sources["ink"])
    assert np.array_equal(tagged, as_png_pixels(pipe.generate(prompts, steps=STEPS, seed=4)[0]))
    untagged = images(pclient.post("/api/generate", json=body))  # <piv>: the embeddings folder's vectors
    pipe = prompt_pipe(prompt_model, papp)
    pipe.add_embedding(token_sources["ink"])
    pipe.add_embedding(token_sources["piv"])
    assert np.array_equal(untagged, as_png_pixels(pipe.generate(prompts, steps=STEPS, seed=4)[0]))
    assert not np.array_equal(tagged[1], untagged[1])
    # again after the other: the tokens' vectors are the request's own
    r = pclient.post("/api/generate", json={**body, "prompt": body["prompt"] + " <lora:ppiv:0.5>"})
    assert np.array_equal(images(r), tagged)
    assert r.json()["settings"]["embeddings"] == {"<ink>": "ink"}
    args = shlex.split(r.json()["command"])
    assert "--embedding" in args and "--lora" in args
    args[args.index("--out") + 1] = str(tmp_path / "s")
    assert main(["-q", *args[1:]]) == 0
    assert np.array_equal(as_png_pixels(torch.from_numpy(np.load(tmp_path / "s" / "samples.npz")["images"])),
                          tagged)


@pytest.mark.parametrize("prompt, words", [
    ("a <inc> seven", ["unknown token '<inc>'", "nearest: <ink>"]),
    ("a <other-base> seven", ["'other-base'", "another base"]),
    ("<lora:pfit:1> <lora:ppiv:1> a <bold-ti> seven", ["unknown token '<bold-ti>'"]),  # it goes by <ink>
])
def test_tokens_without_a_source_are_one_line_400(pclient, token_sources, prompt, words):
    r = pclient.post("/api/generate", json={"prompt": prompt, "steps": 1})
    assert r.status_code == 400 and all(w in r.json()["error"] for w in words), r.text


# ------------------------------------------------------------------------------ fuzzed request bodies
_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-5, 0, 1, 2, 3, 10**9, 2**70]),
    st.sampled_from([float("nan"), float("inf"), -1.0, 0.5, 1e308]),
    st.text(max_size=40), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_KEYS = ["prompt", "negative", "n", "steps", "guidance", "seed", "loras", "style", "rank", "trigger", "prior",
         "text_encoder", "name"]


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=st.one_of(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6), _VALUES,
                      st.binary(max_size=64)),
       path=st.sampled_from(["/api/generate", "/api/train"]))
def test_fuzzed_request_bodies_get_a_one_line_4xx_never_a_500(pclient, body, path):
    """Random JSON (wrong types, NaN, 2**70, nested values, unknown keys) or raw bytes: either a valid request
    (200) or a 4xx with a one-line JSON error; never a 500 or a traceback."""
    if isinstance(body, bytes):
        r = pclient.post(path, content=body, headers={"content-type": "application/json"})
    else:
        text = json.dumps(body, allow_nan=True)  # NaN / Infinity as JSON extensions, as a sloppy client sends
        r = pclient.post(path, content=text, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body, r.status_code, r.text[:200])
    if r.status_code >= 400:
        msg = r.json()["error"]
        assert msg and "\n" not in msg and "Traceback" not in msg, (path, body, msg)
    elif path == "/api/train":  # a valid training request started a job: stop it at once
        job = r.json().get("id")
        if job:
            pclient.delete(f"/api/train/{job}")


# Bodies Python's json module alone turns into exceptions: numbers past float's range or of thousands of
# digits, NaN / Infinity, nesting far past the recursion limit, keys given twice; spliced into valid requests.
_HUGE_NUMBERS = st.one_of(
    st.integers(19, 6000).map(lambda n: "9" * n), st.integers(19, 6000).map(lambda n: "-" + "1" * n),
    st.sampled_from(["1e400", "-1e400", "1e309", "1.7976931348623159e308", "1e-400", "123456789e999",
                     "NaN", "Infinity", "-Infinity", "0." + "5" * 80, "2.0", "1e2", "-0"]),
)
_NESTED = st.tuples(st.integers(2, 200_000), st.sampled_from(["[", '{"k":']), st.sampled_from(["1", '"x"',
                                                                                                "[]"]))


def _nest(depth: int, opener: str, leaf: str) -> str:
    closer = "]" if opener == "[" else "}"
    return opener * depth + leaf + closer * depth


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(["n", "steps", "guidance", "seed", "loras", "prompt", "rank", "name"]),
       value=st.one_of(_HUGE_NUMBERS, _NESTED.map(lambda t: _nest(*t))),
       where=st.sampled_from(["field", "lora weight", "top", "twice"]),
       path=st.sampled_from(["/api/generate", "/api/train"]))
def test_fuzzed_overflowing_numbers_and_deep_nesting_get_a_4xx_never_a_500(pclient, key, value, where, path):
    """A huge or non-finite number, or lists/objects nested up to 200,000 deep, put into a field, a LoRA
    weight, the whole body, or a key given twice: a 4xx with a one-line JSON error, never a 500."""
    text = {"field": f'{{"prompt": "seven", "steps": 1, "{key}": {value}}}',
            "lora weight": f'{{"prompt": "seven", "steps": 1, "loras": {{"pfit": {value}}}}}',
            "top": value,
            "twice": f'{{"prompt": "seven", "steps": 1, "{key}": 1, "{key}": {value}}}'}[where]
    r = pclient.post(path, content=text.encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, text[:80], r.status_code, r.text[:200])
    if r.status_code >= 400:
        msg = r.json()["error"]
        assert msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 600, (path, text[:80], msg)
    elif path == "/api/train":
        job = r.json().get("id")
        if job:
            pclient.delete(f"/api/train/{job}")
