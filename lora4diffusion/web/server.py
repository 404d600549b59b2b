"""``lora4diffusion serve``: a local web page and JSON API to generate digits with LoRA weights, live.

One model is shared by every request; a single worker thread runs the generation jobs one after the other,
and each job sets every loaded adapter's weight to what *its* request asked for before sampling, so two
requests with different weights each get exactly the images they would get alone (tested). Jobs wait in a
bounded queue; past ``max_queue`` waiting jobs the server answers 429. LoRA training runs in a subprocess
(the ``train-lora`` command, one torch thread) so generation keeps working; one training job at a time.

Endpoints (docs/API.md): GET /api/info, GET /api/adapters, POST /api/generate, POST /api/generate/stream
(Server-Sent Events: queued, preview, done | error), POST /api/train, GET /api/train/{id},
DELETE /api/train/{id}. Errors are JSON ``{"error": "one line"}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from lora4diffusion.checkpoint import read_metadata
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import (
    ADAPTER_FILE,
    UNKNOWN,
    base_fingerprint,
    load_adapter,
    shipped_adapters,
)
from lora4diffusion.lora.layers import set_adapter_weight
from lora4diffusion.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, Pipeline
from lora4diffusion.plots import grid_image
from lora4diffusion.web.prompt import Conditioning, check_name, check_weight, encode_prompt, parse_prompt

log = logging.getLogger("lora4diffusion")
STATIC = Path(__file__).parent / "static"
STYLES = ("bold", "thin", "italic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ServeConfig:
    checkpoint: str | None = None  # None: the shipped base
    adapters: str | None = None  # a folder of adapter directories; trained adapters go there too
    device: str = "auto"
    max_queue: int = 8  # waiting generation jobs; the next one gets 429
    max_steps: int = 200
    max_per_digit: int = 16
    max_images: int = 160
    max_upload_bytes: int = 20 * 2**20  # the zip, before base64
    max_upload_images: int = 5000
    max_image_bytes: int = 2 * 2**20  # one image inside the zip, uncompressed
    max_train_steps: int = 2000
    max_rank: int = 64
    sampler_batch: int = 50  # = Pipeline.generate's default, so `lora4diffusion sample` gives the same images


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------------------------- adapters
@dataclass
class AdapterInfo:
    name: str
    path: Path
    source: str  # "shipped" | "folder"
    meta: dict[str, str]
    fits: bool | None  # None: no fingerprint recorded (e.g. imported from PEFT), shapes are checked on load
    reason: str = ""

    def public(self) -> dict:
        m = self.meta
        try:
            targets = json.loads(m.get("targets", "[]"))
        except json.JSONDecodeError:
            targets = []
        return {
            "name": self.name,
            "source": self.source,
            "rank": int(m.get("rank", 0) or 0),
            "alpha": float(m.get("alpha", 0) or 0),
            "targets": m.get("target_spec") or f"{len(targets)} modules",
            "modules": len(targets),
            "style": _style_label(m.get("style", "")),
            "trigger": m.get("trigger", ""),
            "steps": int(m.get("steps", 0) or 0),
            "fits": self.fits,
            "reason": self.reason,
        }


def _style_label(style: str) -> str:
    # A custom style is recorded as the folder it was read from; the page shows the folder's name only.
    return style if style in STYLES or not style else f"images ({Path(style).name})"


class AdapterRegistry:
    """Adapters by name: the shipped examples and the adapter directories in ``folder`` (these win a clash).

    Names come from the browser, so they are only ever dictionary keys here, never joined into a path.
    """

    def __init__(self, folder: Path | None, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self._cache: dict[Path, tuple[int, AdapterInfo]] = {}
        self._lock = threading.Lock()

    def _info(self, name: str, directory: Path, source: str) -> AdapterInfo | None:
        f = directory / ADAPTER_FILE
        try:
            mtime = f.stat().st_mtime_ns
        except OSError:
            return None
        hit = self._cache.get(f)
        if hit and hit[0] == mtime and hit[1].name == name:
            return hit[1]
        try:
            meta = read_metadata(f)
        except UserError as e:
            info = AdapterInfo(name, directory, source, {}, False, str(e).split(": ")[-1])
        else:
            fp = meta.get("base_fingerprint", UNKNOWN)
            fits = None if fp == UNKNOWN else fp == self.fingerprint
            reason = "" if fits is not False else f"trained on another base ({fp[:12]})"
            info = AdapterInfo(name, directory, source, meta, fits, reason)
        self._cache[f] = (mtime, info)
        return info

    def all(self) -> dict[str, AdapterInfo]:
        with self._lock:
            found = {n: self._info(n, p, "shipped") for n, p in shipped_adapters().items()}
            if self.folder is not None and self.folder.is_dir():
                for d in sorted(self.folder.iterdir()):
                    if d.is_dir() and not d.name.startswith(".") and (d / ADAPTER_FILE).is_file():
                        try:
                            check_name(d.name)
                        except UserError:
                            continue  # a folder name the page could not address: not listed
                        found[d.name] = self._info(d.name, d, "folder")
            return {k: v for k, v in found.items() if v is not None}

    def get(self, name: str) -> AdapterInfo:
        check_name(name)
        have = self.all()
        if name not in have:
            raise UserError(f"unknown adapter {name!r} (have {', '.join(sorted(have)) or 'none'})")
        info = have[name]
        if info.fits is False:
            raise UserError(f"adapter {name!r} does not fit the loaded base: {info.reason}")
        return info


# ------------------------------------------------------------------------------------------- generation
@dataclass
class Job:
    cond: Conditioning
    loras: dict[str, float]
    steps: int
    guidance: float
    seed: int
    settings: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    preview_every: int = 0  # 0: no previews
    id: str = field(default_factory=lambda: secrets.token_hex(6))

    def emit(self, kind: str, data: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the request's event loop is gone (client left, server stopping)
            pass


def png_b64(images: torch.Tensor, nrow: int) -> str:
    buf = io.BytesIO()
    grid_image(images, nrow, pad=1 if images.shape[0] > 1 else 0, scale=1).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def grid_b64(images: torch.Tensor, columns: int) -> str:
    """Images in label order (digit by digit, as ``sample`` draws them) -> a grid with one column per digit,
    so each row is a full row of the asked digits (0-9 reads left to right)."""
    per = images.shape[0] // columns
    order = [j * per + k for k in range(per) for j in range(columns)]
    return png_b64(images[order], columns)


class Engine:
    """The shared model and the one worker thread that runs generation jobs in order."""

    def __init__(self, cfg: ServeConfig, pipe: Pipeline, registry: AdapterRegistry):
        self.cfg, self.pipe, self.registry = cfg, pipe, registry
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=cfg.max_queue)
        self.model_lock = threading.Lock()  # held while a job samples; tests hold it to fill the queue
        self.loaded: dict[tuple[Path, int], str] = {}  # (file, mtime) -> adapter name inside the UNet
        self.running: Job | None = None
        self.submitted = self.done_count = 0
        self.stopping = False
        self._thread = threading.Thread(target=self._work, name="lora4diffusion-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # Drain what waits (their clients get an error), stop the running job at its next sampling step,
        # then wake the worker with None.
        self.stopping = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", {"error": "the server is stopping"})
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> int:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            msg = f"busy: {self.cfg.max_queue} jobs are already waiting; try again soon"
            raise HTTPError(429, msg) from None
        self.submitted += 1
        return self.jobs.qsize()

    def _model_name(self, info: AdapterInfo) -> str:
        f = info.path / ADAPTER_FILE
        key = (f, f.stat().st_mtime_ns)
        if key not in self.loaded:
            # A fresh name per file version: a re-trained adapter is loaded anew, the old copy stays at 0.
            name = f"a{len(self.loaded)}"
            load_adapter(self.pipe.unet, info.path, name=name, weight=0.0)
            self.loaded[key] = name
        return self.loaded[key]

    def run(self, job: Job) -> dict:
        """Sample one job on the shared model: every loaded adapter at this request's weight (0 if absent)."""
        wanted = {self._model_name(self.registry.get(n)): w for n, w in job.loras.items()}
        for name in self.loaded.values():
            set_adapter_weight(self.pipe.unet, name, wanted.get(name, 0.0))
        labels, ncol = job.cond.labels, len(job.cond.digits)
        canvas = torch.full((len(labels), self.pipe.image_size, self.pipe.image_size), 0.5)
        t0 = time.perf_counter()

        def preview(start: int, step: int, steps: int, x0: torch.Tensor) -> None:
            if self.stopping:
                raise UserError("the server is stopping")
            if not job.preview_every or (step % job.preview_every and step != steps):
                return
            canvas[start : start + x0.shape[0]] = ((x0[:, 0].float().cpu() + 1) / 2).clamp(0, 1)
            job.emit("preview", {"step": step, "steps": steps, "first": start, "grid": grid_b64(canvas, ncol),
                                 "seconds": round(time.perf_counter() - t0, 3)})

        images, _ = self.pipe.generate(
            labels, steps=job.steps, guidance=job.guidance, seed=job.seed, batch_size=self.cfg.sampler_batch,
            callback=preview,
        )
        return {
            "id": job.id,
            "grid": grid_b64(images, ncol),
            "images": [png_b64(im[None], 1) for im in images],
            "labels": labels,
            "columns": job.cond.columns,
            "settings": job.settings,
            "command": sample_command(job.settings, self.registry, self.cfg.checkpoint),
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                with self.model_lock:
                    self.running = job
                    job.emit("start", {"id": job.id})
                    result = self.run(job)
                job.emit("done", result)
            except UserError as e:
                job.emit("error", {"error": str(e), "status": 400})
            except Exception as e:  # never a traceback to the client; the console keeps it
                log.exception("generation failed")
                job.emit("error", {"error": f"generation failed: {type(e).__name__}: {e}".splitlines()[0],
                                   "status": 500})
            finally:
                self.running = None
                self.done_count += 1


def sample_command(s: dict, registry: AdapterRegistry, checkpoint: str | None) -> str:
    """The ``lora4diffusion sample`` command that draws the same images (same seed, layout and batches)."""
    parts = ["lora4diffusion sample"]
    if checkpoint:
        parts.append(f"--checkpoint {_quote(str(checkpoint))}")
    parts += [f"--digits {','.join(map(str, s['digits']))}", f"--per-digit {s['n']}", f"--steps {s['steps']}",
              f"--guidance {s['guidance']:g}", f"--seed {s['seed']}"]
    have = registry.all()
    for name, w in s["loras"].items():
        info = have.get(name)
        where = name if info is None or info.source == "shipped" else _quote(str(info.path))
        parts.append(f"--lora {where}:{w:g}")
    parts.append("--out samples")
    return " ".join(parts)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# ------------------------------------------------------------------------------------------- training
@dataclass
class TrainJob:
    id: str
    name: str
    style: str  # bold | thin | italic | "upload"
    rank: int
    steps: int
    trigger: str
    work: Path  # staging folder beside the adapters, removed at the end
    proc: subprocess.Popen | None = None
    status: str = "running"  # running | done | failed | cancelled
    error: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    images: int = 0

    def public(self) -> dict:
        curve = []
        metrics = self.work / "run" / "metrics.csv"
        if self.status == "running" and metrics.is_file():
            try:
                for line in metrics.read_text().splitlines()[1:]:
                    step, loss = line.split(",")[:2]
                    curve.append([int(step), float(loss)])
            except (OSError, ValueError):
                pass  # a row being written: the next poll reads it
            self._curve = curve
        curve = getattr(self, "_curve", curve)
        step = curve[-1][0] if curve else 0
        return {"id": self.id, "name": self.name, "style": self.style, "rank": self.rank, "steps": self.steps,
                "status": self.status, "error": self.error,
                "step": step if self.status != "done" else self.steps,
                "progress": 1.0 if self.status == "done" else round(step / self.steps, 4), "loss": curve,
                "images": self.images, "seconds": round((self.finished or time.time()) - self.started, 1)}


class Training:
    """One LoRA training job at a time, in a subprocess running ``train-lora`` with one torch thread."""

    def __init__(self, cfg: ServeConfig, folder: Path, registry: AdapterRegistry):
        self.cfg, self.folder, self.registry = cfg, folder, registry
        self.jobs: dict[str, TrainJob] = {}
        self.lock = threading.Lock()

    def busy(self) -> TrainJob | None:
        return next((j for j in self.jobs.values() if j.status == "running"), None)

    def start(self, body: dict) -> TrainJob:
        name = check_name(str(body.get("name", "")))
        style = str(body.get("style", ""))
        rank = _int(body, "rank", 4, 1, self.cfg.max_rank)
        steps = _int(body, "steps", 200, 1, self.cfg.max_train_steps)
        trigger = str(body.get("trigger", ""))[:64]
        if style not in (*STYLES, "upload"):
            raise UserError(f"style must be one of {', '.join(STYLES)} or 'upload', got {style[:40]!r}")
        with self.lock:
            running = self.busy()
            if running:
                raise HTTPError(409, f"training {running.name!r} is still running (one job at a time)")
            if name in self.registry.all() or (self.folder / name).exists():
                raise UserError(f"an adapter named {name!r} exists already; pick another name")
            self.folder.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".train-", dir=self.folder))
            job = TrainJob(secrets.token_hex(6), name, style, rank, steps, trigger, work)
            try:
                source = style
                if style == "upload":
                    job.images = unpack_zip(body.get("zip_base64"), work / "images", self.cfg)
                    source = str(work / "images")
                cmd = [sys.executable, "-m", "lora4diffusion", "-q", "train-lora", "--style", source,
                       "--rank", str(rank), "--steps", str(steps), "--out", str(work / "run"),
                       "--device", self.cfg.device]
                if self.cfg.checkpoint:
                    cmd += ["--base", str(self.cfg.checkpoint)]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                job.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                            text=True)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            self.jobs[job.id] = job
        threading.Thread(target=self._wait, args=(job,), daemon=True).start()
        return job

    def _wait(self, job: TrainJob) -> None:
        assert job.proc is not None
        _, err = job.proc.communicate()
        job.public()  # keep the last loss curve before the run folder goes
        try:
            if job.status == "cancelled":
                return
            if job.proc.returncode != 0:
                lines = [ln for ln in (err or "").splitlines() if ln.strip()]
                msg = lines[-1] if lines else f"exit status {job.proc.returncode}"
                raise UserError(msg.removeprefix("lora4diffusion: error: "))
            self._install(job)
            job.status = "done"
        except Exception as e:
            job.status, job.error = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
        finally:
            job.finished = time.time()
            shutil.rmtree(job.work, ignore_errors=True)

    def _install(self, job: TrainJob) -> None:
        """Copy the adapter (and its loss curve) into a staged folder, then rename it into place: an adapter
        appears whole or not at all."""
        run, staged = job.work / "run", job.work / job.name
        staged.mkdir()
        for f in (ADAPTER_FILE, "metrics.csv", "loss.png"):
            if (run / f).is_file():
                shutil.copy2(run / f, staged / f)
        if not (staged / ADAPTER_FILE).is_file():
            raise UserError("training wrote no adapter")
        (staged / "README.md").write_text(
            f"# Adapter `{job.name}`\n\nTrained from `lora4diffusion serve`: style {job.style}, "
            f"rank {job.rank}, "
            f"{job.steps} steps{', trigger ' + job.trigger if job.trigger else ''}.\n")
        final = self.folder / job.name
        if final.exists():  # taken since the job started (by hand): keep what is there
            raise UserError(f"{final} appeared while training; the new adapter was not installed")
        os.rename(staged, final)  # same file system: the adapter appears in one step

    def cancel(self, job: TrainJob) -> None:
        if job.status == "running" and job.proc is not None:
            job.status = "cancelled"
            job.proc.terminate()

    def stop(self) -> None:
        for job in list(self.jobs.values()):
            self.cancel(job)
            if job.proc is not None:
                try:
                    job.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
            shutil.rmtree(job.work, ignore_errors=True)


def unpack_zip(data: object, dest: Path, cfg: ServeConfig) -> int:
    """A base64 zip of images in folders named 0-9 (at any depth) -> ``dest/D/NNNNNN.ext``; returns the count.

    Member names are never used as paths (only the digit folder and the suffix are read), so a '../' or an
    absolute name cannot write outside ``dest``; sizes are checked before anything is decompressed.
    """
    if not isinstance(data, str) or not data:
        raise UserError("style 'upload' needs zip_base64: a zip of images in folders 0-9")
    if len(data) > cfg.max_upload_bytes * 4 // 3 + 4:
        raise HTTPError(413, f"upload too large (limit {cfg.max_upload_bytes // 2**20} MiB)")
    try:
        raw = base64.b64decode(data, validate=True)
        zf = zipfile.ZipFile(io.BytesIO(raw))
        members = [i for i in zf.infolist() if not i.is_dir()]
    except (ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"upload is not a zip file ({e})") from None
    picked = []
    for info in members:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        suffix = PurePosixPath(parts[-1]).suffix.lower() if parts else ""
        digit = next((p for p in reversed(parts[:-1]) if p in "0123456789" and len(p) == 1), None)
        if digit is None or suffix not in IMAGE_SUFFIXES or parts[-1].startswith("."):
            continue
        if info.file_size > cfg.max_image_bytes:
            raise UserError(f"{info.filename[:80]}: {info.file_size} bytes, over the per-image limit")
        picked.append((info, digit, suffix))
    if not picked:
        raise UserError("the zip holds no images in folders named 0-9 (e.g. 3/a.png)")
    if len(picked) > cfg.max_upload_images:
        raise UserError(f"the zip holds {len(picked)} images; the limit is {cfg.max_upload_images}")
    try:
        for k, (info, digit, suffix) in enumerate(picked):
            with zf.open(info) as src:
                blob = src.read(cfg.max_image_bytes + 1)  # the header's size could lie: read at most this
            if len(blob) > cfg.max_image_bytes:
                raise UserError(f"{info.filename[:80]}: over the per-image limit")
            (dest / digit).mkdir(parents=True, exist_ok=True)
            (dest / digit / f"{k:06d}{suffix}").write_bytes(blob)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
        raise UserError(f"cannot unpack the zip ({e})") from None
    return len(picked)


def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or not lo <= v <= hi:
        raise UserError(f"{key} must be an integer in {lo}..{hi}, got {str(v)[:40]}")
    return int(v)


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise UserError(f"{key} must be a number in {lo:g}..{hi:g}, got {str(v)[:40]}")
    return float(v)


# ------------------------------------------------------------------------------------------------- app
class State:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.pipe = Pipeline.load(cfg.checkpoint).to(cfg.device)
        self.pipe.unet.eval()
        self.fingerprint = base_fingerprint(self.pipe.unet)
        self.tmp_adapters: Path | None = None
        if cfg.adapters:
            folder = Path(cfg.adapters).expanduser()
            if folder.exists() and not folder.is_dir():
                raise UserError(f"--adapters {folder} is a file, not a folder")
        else:  # trained adapters live for this session only
            folder = self.tmp_adapters = Path(tempfile.mkdtemp(prefix="lora4diffusion-serve-"))
        self.adapters_folder = folder
        self.registry = AdapterRegistry(folder, self.fingerprint)
        self.engine = Engine(cfg, self.pipe, self.registry)
        self.training = Training(cfg, folder, self.registry)

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
        prompt, negative = body.get("prompt", ""), body.get("negative", "") or ""
        if not isinstance(prompt, str) or not isinstance(negative, str) or len(prompt) > 2000:
            raise UserError("prompt and negative must be strings (prompt at most 2000 characters)")
        n = _int(body, "n", 1, 1, cfg.max_per_digit)
        steps = _int(body, "steps", DEFAULT_STEPS, 1, min(cfg.max_steps, self.pipe.diffusion.timesteps))
        guidance = _float(body, "guidance", DEFAULT_GUIDANCE, 0.0, 20.0)
        seed = body.get("seed")
        seed = secrets.randbelow(2**31) if seed is None or seed == -1 else _int(body, "seed", 0, 0, 2**31 - 1)
        loras = body.get("loras") or {}
        if not isinstance(loras, dict):
            raise UserError('loras must be an object {"name": weight}')
        parsed = parse_prompt(prompt)
        merged: dict[str, float] = {}
        for name, w in loras.items():
            check_name(name)
            if isinstance(w, bool) or not isinstance(w, int | float):
                raise UserError(f"weight of adapter {name!r} must be a number")
            merged[name] = check_weight(name, w)
        for name, w in parsed.loras.items():
            if name in merged and merged[name] != w:
                raise UserError(f"adapter {name!r}: the prompt's tag says {w:g}, loras says {merged[name]:g}")
            merged[name] = w
        for name in merged:
            self.registry.get(name)  # unknown names and adapters of another base: 400 now, not in the worker
        merged = {k: v for k, v in merged.items() if v != 0}  # weight 0 is the base exactly (skipped branch)
        cond = encode_prompt(parsed.text, negative, n)
        if len(cond.labels) > cfg.max_images:
            raise UserError(f"{len(cond.labels)} images asked; the limit is {cfg.max_images}")
        settings = {"prompt": parsed.text, "negative": negative, "digits": cond.digits, "n": n,
                    "steps": steps,
                    "guidance": guidance, "seed": seed, "loras": merged, "sampler": "ddim",
                    "checkpoint": cfg.checkpoint or "shipped base"}
        every = max(1, steps // 10) if preview else 0
        return Job(cond, merged, steps, guidance, seed, settings, loop, asyncio.Queue(), every)


def create_app(cfg: ServeConfig | None = None):
    """The Starlette application (the model loads here; the worker starts with the app's lifespan)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

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
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise HTTPError(413, f"request body too large (limit {limit // 2**20} MiB)")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPError(413, f"request body too large (limit {limit // 2**20} MiB)")
        try:
            obj = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"the request body is not JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(obj, dict):
            raise UserError("the request body must be a JSON object")
        return obj

    async def index(request: Request):
        return FileResponse(STATIC / "index.html")

    async def info(request: Request):
        return JSONResponse({
            "model": "label", "conditioning": "digit label 0-9 (the prompt names digits)",
            "checkpoint": cfg.checkpoint or "shipped base", "device": str(state.pipe.device),
            "defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "n": 1},
            "limits": {"steps": cfg.max_steps, "n": cfg.max_per_digit, "images": cfg.max_images,
                       "queue": cfg.max_queue, "upload_mib": cfg.max_upload_bytes // 2**20,
                       "upload_images": cfg.max_upload_images, "train_steps": cfg.max_train_steps,
                       "rank": cfg.max_rank},
            "adapters_folder": None if state.tmp_adapters else str(state.adapters_folder),
            "negative_prompt": False, "styles": list(STYLES),
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
        return error(exc.status, exc.message)

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
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        UserError: user_error, HTTPError: http_error, HTTPException: starlette_error, Exception: server_error,
    })
    app.state.serve = state
    return app


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the server until Ctrl-C (uvicorn handles SIGINT/SIGTERM and runs the app's shutdown)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {host} makes the page (and training on this machine) reachable from the "
              "network, without authentication", file=sys.stderr)
    app = create_app(cfg)
    shown = f"[{host}]" if ":" in host else host
    print(f"lora4diffusion serve: http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
