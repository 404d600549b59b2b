"""Generation for ``serve``: the adapter registry, the job queue and the one worker on the shared model.

One model is shared by every request; a single worker thread runs the generation jobs one after the other,
and each job sets every loaded adapter's weight to what *its* request asked for before sampling, so two
requests with different weights each get exactly the images they would get alone (tested). Jobs wait in a
bounded queue; past ``max_queue`` waiting jobs the server answers 429.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import queue
import re
import secrets
import shlex
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lora4diffusion.captions import digit_of
from lora4diffusion.checkpoint import read_metadata, tensor_header
from lora4diffusion.errors import UserError
from lora4diffusion.latents import decode_latents
from lora4diffusion.lora.adapters import (
    ADAPTER_FILE,
    UNKNOWN,
    base_fingerprint,
    bundled_tokens,
    load_adapter,
    read_adapter,
    shipped_adapters,
)
from lora4diffusion.lora.prompt_lora import load_prompt_adapter, prompt_fingerprint
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.plots import grid_image
from lora4diffusion.precision import choose_precision
from lora4diffusion.web.embeddings import EmbeddingRegistry, place_token
from lora4diffusion.web.prompt import Conditioning, check_name
from lora4diffusion.web.request import BODY_TIMEOUT_S, HTTPError

log = logging.getLogger("lora4diffusion")
STYLES = ("bold", "thin", "italic")
_WORD = re.compile(r"[^\s<>:|,]{1,64}")  # a trigger the prompt box can carry (not a tag, not a separator)


@dataclass
class ServeConfig:
    checkpoint: str | None = None  # None: the shipped base
    adapters: str | None = None  # a folder of adapter directories; trained adapters go there too
    device: str = "auto"
    bf16: bool | None = False  # bf16 autocast for sampling; None: the device's default (the CLI's serve)
    max_queue: int = 8  # waiting generation jobs; the next one gets 429
    max_steps: int = 200
    max_per_digit: int = 16
    max_images: int = 160
    max_upload_bytes: int = 20 * 2**20  # the zip, before base64
    max_upload_images: int = 5000
    max_image_bytes: int = 2 * 2**20  # one image inside the zip, uncompressed
    max_train_steps: int = 2000
    max_rank: int = 64
    body_timeout: float = BODY_TIMEOUT_S  # seconds for a request's whole body to arrive (then 408, closed)
    local_only: bool = True  # answer only to Host 127.0.0.1/localhost (serve sets False for other binds)
    sampler_batch: int | None = None  # None: Pipeline.generate's default, so `sample` gives the same images
    # train-lora's option strings -> how many values each takes (argparse nargs, 0: a switch), handed in by
    # the CLI's serve from its own parser; None: training.DEFAULT_TRAIN_LORA_FLAGS
    train_lora_options: dict[str, int | str | None] | None = None


# --------------------------------------------------------------------------------------------- adapters
@dataclass
class AdapterInfo:
    name: str
    path: Path
    source: str  # "shipped" | "folder"
    meta: dict[str, str]
    fits: bool | None  # None: no fingerprint recorded (e.g. imported from PEFT), shapes are checked on load
    reason: str = ""
    tokens: dict[str, int] = field(default_factory=dict)  # bundled tokens (pivotal tuning) -> vectors

    def public(self) -> dict:
        m = self.meta
        try:
            targets = json.loads(m.get("targets", "[]"))
        except json.JSONDecodeError:
            targets = []
        triggers = adapter_triggers(m)
        return {
            "name": self.name,
            "source": self.source,
            "method": m.get("method") or "lora",  # our files name methods other than LoRA
            "rank": int(m.get("rank", 0) or 0),
            "alpha": float(m.get("alpha", 0) or 0),
            "targets": m.get("target_spec") or f"{len(targets)} modules",
            "modules": len(targets),
            "style": _style_label(m.get("style", "")),
            "triggers": triggers,
            "trigger": ", ".join(triggers),
            "steps": int(m.get("steps", 0) or 0),
            "tokens": list(self.tokens),  # a tag of the adapter brings them into prompts
            "fits": self.fits,
            "reason": self.reason,
        }


def adapter_triggers(meta: dict[str, str]) -> list[str]:
    """The trigger word(s) an adapter was trained with, from its metadata: ``trigger_words`` (a JSON list, as
    train-lora --trigger writes it) or ``triggers`` (the same), or ``trigger`` (one word, or several separated
    by commas or spaces). Read defensively: absent or malformed is none (adapters trained before triggers
    existed, or imported from elsewhere)."""
    found: list[str] = []
    for key in ("trigger_words", "triggers"):
        raw = meta.get(key)
        if raw:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = None  # malformed: ignored
            found += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    found += [meta.get("trigger") or ""]
    words = [w for item in found if isinstance(item, str) for w in item.replace(",", " ").split()]
    words = [w for w in words if _WORD.fullmatch(w)]
    return [w for i, w in enumerate(words) if w not in words[:i]][:8]


def _style_label(style: str) -> str:
    # A custom style is recorded as the folder it was read from; the page shows the folder's name only.
    return style if style in STYLES or not style else f"images ({Path(style).name})"


class AdapterRegistry:
    """Adapters by name: the shipped examples and the adapter directories in ``folder`` (these win a clash).

    Names come from the browser, so they are only ever dictionary keys here, never joined into a path.
    """

    def __init__(self, folder: Path | None, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint  # the loaded base's (pipe_fingerprint)
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
            meta, tokens = read_metadata(f), bundled_tokens(tensor_header(f))
        except UserError as e:
            info = AdapterInfo(name, directory, source, {}, False, str(e).split(": ")[-1])
        else:
            fp = meta.get("base_fingerprint", UNKNOWN)
            fits = None if fp == UNKNOWN else fp == self.fingerprint
            reason = "" if fits is not False else f"trained on another base ({fp[:12]})"
            info = AdapterInfo(name, directory, source, meta, fits, reason, tokens)
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
    warnings: list[str] = field(default_factory=list)  # shown beside the prompt; the images are unaffected
    # the prompts' added tokens -> where their vectors come from: ("adapter", name) | ("embedding", name)
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(6))

    def emit(self, kind: str, data: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the request's event loop is gone (client left, server stopping)
            pass


DECODED_SIZE = 28  # what latents.decode_latents crops a decoded latent to (MNIST's size)


def preview_images(x0: torch.Tensor, vae) -> torch.Tensor:
    """The sampler's predicted clean sample x0_hat [b, C, h, w] -> images [b, H, W] in [0, 1].

    Pixel model: x0_hat is an image in [-1, 1]. Latent model: x0_hat is a (scaled) latent, which means
    nothing to look at until the VAE decodes it, as the final latents are (LDM, Rombach et al. 2022, sec. 3).
    """
    if vae is None:
        return ((x0[:, 0].float().cpu() + 1) / 2).clamp(0, 1)

    return decode_latents(vae, x0, DECODED_SIZE, DECODED_SIZE)


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

    def __init__(self, cfg: ServeConfig, pipe: Pipeline, registry: AdapterRegistry,
                 embeddings: EmbeddingRegistry | None = None):
        self.cfg, self.pipe, self.registry, self.embeddings = cfg, pipe, registry, embeddings
        self.bundled: dict[str, dict] = {}  # adapter name inside the model -> its bundled tokens' vectors
        self.precision = choose_precision(pipe.device, cfg.bf16)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=cfg.max_queue)
        self.model_lock = threading.Lock()  # held while a job samples; tests hold it to fill the queue
        self.loaded: dict[tuple[Path, int], str] = {}  # (file, mtime) -> adapter name inside the UNet
        self.running: Job | None = None
        self.submitted = self.done_count = 0
        self.stopping = False
        self._thread = threading.Thread(target=self._work, name="lora4diffusion-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop_soon(self) -> None:
        """Ctrl-C: the running job ends at its next sampling step and waiting ones at once, each answered
        503, so open requests finish before the server closes their connections."""
        self.stopping = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", {"error": "the server is stopping", "status": 503})

    def stop(self) -> None:
        self.stop_soon()
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
            # The registry has checked the adapter fits this base (pipe_fingerprint); the loaders then check
            # every module's shape.
            adapter = replace(read_adapter(info.path), fingerprint=UNKNOWN)
            # its bundled tokens are put in place per job (place_token), not once for good
            load_into(self.pipe, replace(adapter, embeddings={}), name)
            self.bundled[name] = adapter.embeddings
            self.loaded[key] = name
        return self.loaded[key]

    def _place_tokens(self, job: Job) -> None:
        """Every added token of the job's prompts stands for its own source's vectors (an adapter's bundled
        ones, or an embedding's), whatever an earlier job put there."""
        for token, (kind, name) in job.tokens.items():
            if kind == "adapter":
                vectors = self.bundled[self._model_name(self.registry.get(name))][token]
            else:
                info = self.embeddings.all().get(token) if self.embeddings is not None else None
                if info is None or info.embedding is None:
                    raise UserError(f"embedding {name!r} ({token}) is gone from its folder")
                vectors = info.embedding.vectors
            place_token(self.pipe.text_encoder, self.pipe.tokenizer, token, vectors)

    def run(self, job: Job) -> dict:
        """Sample one job on the shared model: every loaded adapter at this request's weight (0 if absent)."""
        wanted = {self._model_name(self.registry.get(n)): w for n, w in job.loras.items()}
        for name in self.loaded.values():
            self.pipe.set_lora_weight(name, wanted.get(name, 0.0))  # UNet and text encoder
        self._place_tokens(job)
        labels, ncol, vae = job.cond.labels, len(job.cond.columns), self.pipe.vae
        size = DECODED_SIZE if vae is not None else self.pipe.image_size
        canvas = torch.full((len(labels), size, size), 0.5)
        t0 = time.perf_counter()

        def preview(start: int, step: int, steps: int, x0: torch.Tensor) -> None:
            if self.stopping:
                raise HTTPError(503, "the server is stopping")
            if not job.preview_every or (step % job.preview_every and step not in (1, steps)):
                return  # the first step too: something to look at as early as possible
            canvas[start : start + x0.shape[0]] = preview_images(x0, vae)
            job.emit("preview", {"step": step, "steps": steps, "first": start, "grid": grid_b64(canvas, ncol),
                                 "seconds": round(time.perf_counter() - t0, 3)})

        images, _ = self.pipe.generate(
            labels, steps=job.steps, guidance=job.guidance, seed=job.seed, batch_size=self.cfg.sampler_batch,
            callback=preview, negative=job.cond.negative, bf16=self.precision.bf16,
        )
        prompts = job.cond.prompts is not None
        return {
            "id": job.id,
            "grid": grid_b64(images, ncol),
            "images": [png_b64(im[None], 1) for im in images],
            # as `sample`'s samples.npz: the digit each image's prompt names (-1: none), and the prompts
            "labels": [digit_of(p) for p in labels] if prompts else labels,
            "prompts": labels if prompts else None,
            "columns": job.cond.columns,
            "warnings": job.warnings,
            "settings": job.settings,
            "command": sample_command(job.settings, self.registry, self.cfg.checkpoint, self.precision.bf16,
                                      self.embeddings),
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
            except HTTPError as e:
                job.emit("error", {"error": e.message, "status": e.status})
            except Exception as e:  # never a traceback to the client; the console keeps it
                log.exception("generation failed")
                job.emit("error", {"error": f"generation failed: {type(e).__name__}: {e}".splitlines()[0],
                                   "status": 500})
            finally:
                self.running = None
                self.done_count += 1


def pipe_fingerprint(pipe: Pipeline) -> str:
    """The base fingerprint an adapter of this base records, as Pipeline.add_lora checks it: the UNet's for a
    label model, the one over UNet and text encoder for a prompt model (lora.prompt_lora.prompt_fingerprint,
    what train-lora on a prompt base writes)."""
    if pipe.is_prompt_model:
        return prompt_fingerprint(pipe.unet, pipe.text_encoder)

    return base_fingerprint(pipe.unet)


def load_into(pipe: Pipeline, adapter, name: str) -> None:
    """Load an adapter at weight 0 under ``name``: into the UNet, and for a prompt model into the text encoder
    too where it has text-encoder modules (train-lora --text-encoder)."""
    if pipe.is_prompt_model:
        load_prompt_adapter(pipe.unet, pipe.text_encoder, adapter, 0.0, name=name)
    else:
        load_adapter(pipe.unet, adapter, name=name, weight=0.0)


def sample_command(s: dict, registry: AdapterRegistry, checkpoint: str | None, bf16: bool = False,
                   embeddings: EmbeddingRegistry | None = None) -> str:
    """The ``lora4diffusion sample`` command that draws the same images (same seed, layout and batches)."""
    parts = ["lora4diffusion sample"]
    if checkpoint:  # absent: `sample` loads the shipped base, as the server did
        where = Path(checkpoint).expanduser()
        parts.append(f"--checkpoint {_quote(str(where.resolve() if where.exists() else checkpoint))}")
    if s.get("prompts") is not None:  # a prompt model: the same prompts, N images each, in the same order
        parts += [f"--prompt {_quote(p)}" for p in s["prompts"]] + [f"--num {s['n']}"]
        if s.get("negative"):
            parts.append(f"--negative {_quote(s['negative'])}")
    else:
        parts += [f"--digits {','.join(map(str, s['digits']))}", f"--per-digit {s['n']}"]
    parts += [f"--steps {s['steps']}", f"--guidance {s['guidance']:g}", f"--seed {s['seed']}"]
    have = registry.all()
    # an adapter whose tag is at weight 0 still brings its tokens: --lora NAME:0
    for name, w in {**{a: 0.0 for a in s.get("token_adapters", [])}, **s["loras"]}.items():
        info = have.get(name)
        where = name if info is None or info.source == "shipped" else _quote(str(info.path))
        parts.append(f"--lora {where}:{w:g}")
    found = embeddings.all() if embeddings is not None and s.get("embeddings") else {}
    for token, name in (s.get("embeddings") or {}).items():  # in an embeddings/ folder: it goes by <name>
        info = found.get(token)
        where = name if info is None or info.source == "shipped" else _quote(str(info.path.absolute()))
        parts.append(f"--embedding {where}")
    parts.append("--bf16" if bf16 else "--no-bf16")  # the CLI's default depends on the device: say it
    parts.append("--out samples")
    return " ".join(parts)


def _quote(text: str) -> str:
    return shlex.quote(text)
