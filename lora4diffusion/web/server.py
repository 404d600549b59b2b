"""``lora4diffusion serve``: a local web page and JSON API to generate digits with LoRA weights, live.

The base is ``--checkpoint`` or whatever ``Pipeline.load()`` loads (the shipped base): a prompt model (text
prompts through its text encoder, a negative prompt, VAE-decoded previews) or a label model (digits).

Starlette + uvicorn around ``engine.Engine`` (generation: a queue and one worker on the shared model) and
``training.Training`` (one LoRA training subprocess at a time). Endpoints (docs/API.md): GET /api/info,
GET /api/adapters, POST /api/generate, POST /api/generate/stream (Server-Sent Events: queued, start, preview,
done | error), POST /api/train, GET /api/train/{id}, DELETE /api/train/{id}. Errors are JSON
``{"error": "one line"}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import shutil
import socket
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lora4diffusion.captions import TRIGGER_WORDS
from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS
from lora4diffusion.errors import UserError
from lora4diffusion.limits import MAX_GUIDANCE
from lora4diffusion.lora.prompt_lora import missing_triggers
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.web.embeddings import EmbeddingRegistry, bundled_vectors, request_tokens
from lora4diffusion.web.engine import STYLES, AdapterRegistry, Engine, Job, ServeConfig, pipe_fingerprint
from lora4diffusion.web.prompt import check_name, check_weight, encode_prompt, parse_prompt
from lora4diffusion.web.request import (
    HTTPError,
    describe,
    float_field,
    int_field,
    object_field,
    parse_body,
    read_body,
    str_field,
)
from lora4diffusion.web.training import Training, TrainJob

__all__ = ["ServeConfig", "create_app", "serve"]
log = logging.getLogger("lora4diffusion")
STATIC = Path(__file__).parent / "static"


class State:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.pipe = Pipeline.load(cfg.checkpoint).to(cfg.device)
        self.pipe.unet.eval()
        self.fingerprint = pipe_fingerprint(self.pipe)
        self.kind = "prompt" if self.pipe.is_prompt_model else "label"
        # What Pipeline.load(None) loaded is the shipped base, whichever kind it is at the moment.
        self.checkpoint_name = cfg.checkpoint or f"shipped base ({self.kind} model)"
        self.tmp_adapters: Path | None = None
        if cfg.adapters:
            folder = Path(cfg.adapters).expanduser()
            if folder.exists() and not folder.is_dir():
                raise UserError(f"--adapters {folder} is a file, not a folder")
        else:  # trained adapters live for this session only
            folder = self.tmp_adapters = Path(tempfile.mkdtemp(prefix="lora4diffusion-serve-"))
        self.adapters_folder = folder
        self.registry = AdapterRegistry(folder, self.fingerprint)
        self.embeddings = base_tokenizer = None
        if self.pipe.is_prompt_model:  # textual inversion: folder/embeddings, ./embeddings, the shipped ones
            self.embeddings = EmbeddingRegistry(folder, self.fingerprint, self.pipe.text_encoder.cfg.width)
            base_tokenizer = copy.deepcopy(self.pipe.tokenizer)  # requests are read against the base's tokens
        self.base_tokenizer = base_tokenizer
        self.engine = Engine(cfg, self.pipe, self.registry, self.embeddings)
        self.training = Training(cfg, folder, self.registry, self.pipe.tokenizer)

    def close(self) -> None:
        self.engine.stop()
        self.training.stop()
        if self.tmp_adapters is not None:
            shutil.rmtree(self.tmp_adapters, ignore_errors=True)

    def request(self, body: dict, loop: asyncio.AbstractEventLoop, preview: bool) -> Job:
        """Validate a generate request (every error is a UserError/HTTPError, before anything is queued)."""
        cfg = self.cfg
        if not isinstance(body, dict):
            raise UserError("the request body must be a JSON object")
        unknown = set(body) - {"prompt", "negative", "n", "steps", "guidance", "seed", "loras"}
        if unknown:
            raise UserError(f"unknown field(s) {', '.join(sorted(unknown))}")
        prompt, negative = str_field(body, "prompt"), str_field(body, "negative")
        n = int_field(body, "n", 1, 1, cfg.max_per_digit)
        steps = int_field(body, "steps", DEFAULT_STEPS, 1, min(cfg.max_steps, self.pipe.diffusion.timesteps))
        guidance = float_field(body, "guidance", DEFAULT_GUIDANCE, 0.0, MAX_GUIDANCE)
        seed = body.get("seed")
        if seed is None or (seed == -1 and not isinstance(seed, bool)):  # -1 or null: draw one
            seed = secrets.randbelow(2**31)
        seed = int_field({"seed": seed}, "seed", 0, 0, 2**31 - 1)
        loras = object_field(body, "loras", '{"name": weight}')
        parsed = parse_prompt(prompt)
        merged: dict[str, float] = {}
        for name, w in loras.items():
            check_name(name)
            if isinstance(w, bool) or not isinstance(w, int | float):
                raise UserError(f"weight of adapter {name!r} must be a number, got {describe(w)}")
            merged[name] = check_weight(name, w)
        for name, w in parsed.loras.items():
            if name in merged and merged[name] != w:
                raise UserError(f"adapter {name!r}: the prompt's tag says {w:g}, loras says {merged[name]:g}")
            merged[name] = w
        infos = {name: self.registry.get(name) for name in merged}  # unknown names, other bases: 400 now
        merged = {k: v for k, v in merged.items() if v != 0}  # weight 0 is the base exactly (skipped branch)
        tokenizer, tokens = None, {}  # None: a label model
        if self.pipe.is_prompt_model:  # <name> brings its embedding, a pivotal adapter's tag its tokens
            bundled = bundled_vectors({name: info.tokens for name, info in infos.items()})
            tokenizer, found = request_tokens([parsed.text, negative], self.base_tokenizer, bundled,
                                              self.embeddings.all())
            tokens = {t: ("adapter", bundled[t][0]) if t in bundled else ("embedding", found[t])
                      for t in tokenizer.added if t not in self.base_tokenizer.added}
        cond = encode_prompt(parsed.text, negative, n, tokenizer)
        if len(cond.labels) > cfg.max_images:
            raise UserError(f"{len(cond.labels)} images asked; the limit is {cfg.max_images}")
        settings = {"model": self.kind, "prompt": parsed.text, "negative": cond.negative or "",
                    "digits": cond.digits, "prompts": cond.prompts, "n": n, "steps": steps,
                    "guidance": guidance, "seed": seed, "loras": merged, "sampler": "ddim",
                    "checkpoint": self.checkpoint_name,
                    "embeddings": {t: name for t, (kind, name) in tokens.items() if kind == "embedding"},
                    "token_adapters": sorted({name for kind, name in tokens.values() if kind == "adapter"}
                                             - set(merged))}
        # A latent model's preview costs a VAE decode per frame: every few steps (fewer frames than pixels).
        every = max(1, steps // (5 if self.pipe.vae is not None else 10)) if preview else 0
        job = Job(cond, merged, steps, guidance, seed, settings, loop, asyncio.Queue(), every, tokens=tokens)
        job.warnings = self.missing_triggers(merged, cond.prompts or [])
        return job

    def missing_triggers(self, loras: dict[str, float], prompts: list[str]) -> list[str]:
        """One line per adapter in use whose trigger words a prompt lacks (as `sample` warns): trained with
        its trigger, it acts weakly without it, or with prior preservation hardly at all."""
        have = self.registry.all()
        triggers = {name: have[name].public()["triggers"] for name in loras if name in have}
        return [f"adapter {name!r} was trained with its trigger ({', '.join(triggers[name])}), which prompt "
                f"{prompt!r} lacks" for name, prompt in missing_triggers(triggers, prompts)]


def create_app(cfg: ServeConfig | None = None):
    """The Starlette application (the model loads here; the worker starts with the app's lifespan)."""
    cfg = cfg or ServeConfig()
    state = State(cfg)

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            state.close()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())[:500]}, status_code=status)

    async def read_json(request: Request, limit: int = 2**20) -> dict:
        """The body as a JSON object, read and parsed with limits (web/request.py: size, time, depth,
        numbers); every way it falls short is a 4xx naming it."""
        return parse_body(await read_body(request, limit, cfg.body_timeout))

    async def index(request: Request):
        return FileResponse(STATIC / "index.html")

    async def info(request: Request):
        pipe, prompt_model = state.pipe, state.pipe.is_prompt_model
        return JSONResponse({
            "model": state.kind,
            "conditioning": "text prompt (a text encoder reads it; '|' separates prompts, one column each)"
            if prompt_model else "digit label 0-9 (the prompt names digits)",
            "latent": pipe.vae is not None,
            "checkpoint": state.checkpoint_name, "device": str(pipe.device),
            "defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "n": 1,
                         "prompt": "a handwritten seven" if prompt_model else "3 5 7"},
            "vocabulary": list(pipe.tokenizer.words) if prompt_model else [],
            # textual inversion: the base's own tokens, and the embeddings whose <name> a prompt may write
            "tokens": list(state.base_tokenizer.added) if prompt_model else [],
            "embeddings": [e.public(e.token in pipe.tokenizer.added) for e in state.embeddings.all().values()]
            if prompt_model else [],
            "prompt_separator": "|" if prompt_model else None,
            "trigger_words": list(TRIGGER_WORDS) if prompt_model else [],
            "train": state.training.options(prompt_model),
            "limits": {"steps": cfg.max_steps, "n": cfg.max_per_digit, "images": cfg.max_images,
                       "queue": cfg.max_queue, "upload_mib": cfg.max_upload_bytes // 2**20,
                       "upload_images": cfg.max_upload_images, "train_steps": cfg.max_train_steps,
                       "rank": cfg.max_rank},
            "adapters_folder": None if state.tmp_adapters else str(state.adapters_folder),
            "negative_prompt": prompt_model, "styles": list(STYLES),
            "queue": {"waiting": state.engine.jobs.qsize(), "running": state.engine.running is not None},
        })

    async def adapters(request: Request):
        items = [a.public() for a in state.registry.all().values()]
        folder = None if state.tmp_adapters else str(state.adapters_folder)
        return JSONResponse({"adapters": items, "folder": folder})

    async def generate(request: Request):
        job = state.request(await read_json(request), asyncio.get_running_loop(), preview=False)
        state.engine.submit(job)
        while True:
            kind, data = await job.events.get()
            if kind == "done":
                return JSONResponse(data)
            if kind == "error":
                return error(data.get("status", 400), data["error"])

    async def generate_stream(request: Request):
        job = state.request(await read_json(request), asyncio.get_running_loop(), preview=True)
        waiting = state.engine.submit(job)

        async def events():
            yield _sse("queued", {"id": job.id, "waiting": waiting})
            while True:
                kind, data = await job.events.get()
                yield _sse(kind, data)
                if kind in ("done", "error"):
                    return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def train(request: Request):
        body = await read_json(request, limit=cfg.max_upload_bytes * 4 // 3 + 2**16)
        job = await asyncio.to_thread(state.training.start, body)
        return JSONResponse(job.public(), status_code=202)

    def train_job(request: Request) -> TrainJob:
        job = state.training.jobs.get(request.path_params["id"])
        if job is None:
            raise HTTPError(404, "no such training job")
        return job

    async def train_status(request: Request):
        return JSONResponse(train_job(request).public())

    async def train_cancel(request: Request):
        job = train_job(request)
        state.training.cancel(job)
        return JSONResponse(job.public())

    async def user_error(request: Request, exc: UserError):
        return error(400, str(exc))

    async def http_error(request: Request, exc: HTTPError):
        response = error(exc.status, exc.message)
        if exc.close:  # the client may still be sending: end the connection (uvicorn closes it after this)
            response.headers["connection"] = "close"
        return response

    async def starlette_error(request: Request, exc: HTTPException):
        return error(exc.status_code, exc.detail or "error")

    async def server_error(request: Request, exc: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error(500, f"internal error ({type(exc).__name__})")

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/adapters", adapters),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/generate/stream", generate_stream, methods=["POST"]),
        Route("/api/train", train, methods=["POST"]),
        Route("/api/train/{id}", train_status, methods=["GET"]),
        Route("/api/train/{id}", train_cancel, methods=["DELETE"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    guard = [Middleware(Guard, local_only=cfg.local_only)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=guard, exception_handlers={
        UserError: user_error, HTTPError: http_error, HTTPException: starlette_error, Exception: server_error,
    })
    app.state.serve = state
    return app


LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
JSON_TYPE = "application/json"


class Guard:
    """ASGI middleware against other web sites driving this server through the user's browser.

    A POST must carry ``Content-Type: application/json``: a cross-site page can only send that after a CORS
    preflight, which this server never answers, so a form or a no-cors ``fetch`` elsewhere cannot start a job.
    Bound to this machine, the Host header must name it too (DNS rebinding: a site whose name resolves to
    127.0.0.1 would otherwise read the answers).
    """

    def __init__(self, app, local_only: bool):
        self.app, self.local_only = app, local_only

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
            refusal = None
            if self.local_only and name.lower() not in LOCAL_NAMES:
                refusal = (403, f"host {name[:60]!r} refused: this server answers to localhost only")
            elif scope["method"] == "POST" and not headers.get("content-type", "").startswith(JSON_TYPE):
                refusal = (415, "POST bodies must be JSON, sent with Content-Type: application/json")
            if refusal:
                await JSONResponse({"error": refusal[1]}, status_code=refusal[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the server until Ctrl-C (uvicorn handles SIGINT/SIGTERM and runs the app's shutdown)."""
    import uvicorn

    local = host in ("127.0.0.1", "localhost", "::1")
    if not local:
        print(f"warning: --host {host} makes the page (and training on this machine) reachable from the "
              "network, without authentication", file=sys.stderr)
    cfg.local_only = local
    _check_port(host, port)  # before loading anything: a taken port is a one-line error, not uvicorn's log
    app = create_app(cfg)
    shown = f"[{host}]" if ":" in host else host
    engine = app.state.serve.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # Ctrl-C / SIGTERM: end the jobs first (see stop_soon)
            engine.stop_soon()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    print(f"lora4diffusion serve: http://{shown}:{port}/, sampling in {engine.precision}  (Ctrl-C to stop)",
          flush=True)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    print("lora4diffusion serve: stopped", flush=True)


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"--host {host}: cannot resolve it ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            msg = f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port"
            raise UserError(msg) from None
