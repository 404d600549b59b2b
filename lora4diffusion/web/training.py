"""LoRA training for ``serve``: one job at a time, in a subprocess, installed into the adapters folder whole.

The subprocess runs the ``train-lora`` command (``training.lora.train_lora``) with one torch thread, so the
server's generation keeps working; progress is read from the run's metrics.csv, and with ``validate_every``
(``--validate-every``, built-in styles only) the held-out loss from its validation.csv. Uploaded images are
unpacked without ever using a zip member's name as a path.
"""

from __future__ import annotations

import base64
import io
import os
import re
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

from lora4diffusion.checkpoint import read_metadata
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import ADAPTER_FILE
from lora4diffusion.lora.layers import METHODS
from lora4diffusion.lora.prompt_lora import check_trigger_in
from lora4diffusion.training.validation import VALIDATION_FILE
from lora4diffusion.web.engine import STYLES, AdapterRegistry, ServeConfig
from lora4diffusion.web.prompt import check_name
from lora4diffusion.web.request import HTTPError, describe, int_field, str_field

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Options of train-lora for prompt models, passed on only where its option table has them (see options()).
PROMPT_OPTIONS = {"trigger": "--trigger", "prior": "--prior", "text_encoder": "--text-encoder"}
TRIGGER = re.compile(r"[A-Za-z][A-Za-z0-9]{0,31}")  # one word, never read as an option ("-x")


# train-lora's prompt-model options as this package's CLI defines them (argparse nargs: None one value, 0 a
# switch): what the page assumes when it is created without the CLI's table (ServeConfig.train_lora_options)
DEFAULT_TRAIN_LORA_FLAGS: dict[str, int | str | None] = {"--trigger": None, "--prior": 0, "--text-encoder": 0}


def train_lora_flags() -> dict[str, int | str | None]:
    """The default table of train-lora's options (flag -> nargs) where ServeConfig carries none."""
    return dict(DEFAULT_TRAIN_LORA_FLAGS)


@dataclass
class TrainJob:
    id: str
    name: str
    style: str  # bold | thin | italic | "upload"
    rank: int
    steps: int
    trigger: str
    work: Path
    method: str = "lora"  # staging folder beside the adapters, removed at the end
    extra: list[str] = field(default_factory=list)  # the prompt-model options given to train-lora
    proc: subprocess.Popen | None = None
    status: str = "running"  # running | done | failed | cancelled
    error: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    images: int = 0

    curve: list[list[float]] = field(default_factory=list)  # [step, mean loss] from the run's metrics.csv
    validate_every: int = 0  # train-lora --validate-every (0: off)
    validation: list[list[float]] = field(default_factory=list)  # [step, val_loss] from validation.csv

    def read_curve(self) -> None:
        self.curve = _read_pairs(self.work / "run" / "metrics.csv", self.curve)
        if self.validate_every:
            self.validation = _read_pairs(self.work / "run" / VALIDATION_FILE, self.validation)

    def public(self) -> dict:
        if self.status == "running":
            self.read_curve()
        step = self.steps if self.status == "done" else (int(self.curve[-1][0]) if self.curve else 0)
        return {"id": self.id, "name": self.name, "style": self.style, "method": self.method,
                "rank": self.rank, "steps": self.steps,
                "trigger": self.trigger, "options": self.extra,
                "status": self.status, "error": self.error, "step": step,
                "progress": round(step / self.steps, 4), "loss": self.curve,
                "validate_every": self.validate_every, "validation": self.validation,
                "images": self.images, "seconds": round((self.finished or time.time()) - self.started, 1)}


class Training:
    """One LoRA training job at a time, in a subprocess running ``train-lora`` with one torch thread."""

    def __init__(self, cfg: ServeConfig, folder: Path, registry: AdapterRegistry, tokenizer=None):
        self.cfg, self.folder, self.registry = cfg, folder, registry
        self.tokenizer = tokenizer  # a prompt model's (None: a label model)
        self.prompt_model = tokenizer is not None
        self.jobs: dict[str, TrainJob] = {}
        self.lock = threading.Lock()

    def flags(self) -> dict[str, int | str | None]:
        """train-lora's option table: the one the CLI handed in (ServeConfig), else train_lora_flags()."""
        table = self.cfg.train_lora_options
        return train_lora_flags() if table is None else table

    def options(self, prompt_model: bool) -> dict:
        """What /api/info tells the page: which prompt-model options this install's train-lora takes."""
        flags = self.flags()
        have = {key: flag in flags for key, flag in PROMPT_OPTIONS.items()}
        note = ""
        if prompt_model and not all(have.values()):
            missing = ", ".join(f for k, f in PROMPT_OPTIONS.items() if not have[k])
            note = f"this install's train-lora has no {missing}"
        return {"options": have, "note": note}

    def prompt_args(self, body: dict) -> list[str]:
        """train-lora arguments for the prompt-model fields of a request; each only where train-lora has
        the flag (asking for a missing one is a 400, not a silently different adapter)."""
        flags, args = self.flags(), []
        for key, flag in PROMPT_OPTIONS.items():
            value = body.get(key)
            if value is None or value is False or value == "":  # not asked for (0 is not false: see below)
                continue
            if flag not in flags:
                raise UserError(f"{key}: the installed train-lora has no {flag} option")
            if not self.prompt_model:
                raise UserError(f"{key} is for prompt models; the loaded base is a label model")
            if key == "trigger":
                if not isinstance(value, str) or not TRIGGER.fullmatch(value.strip()):
                    raise UserError(f"trigger must be one word (letters, digits), got {describe(value)}")

                # a reserved rare word of this base's vocabulary: a 400 now, not a failed job later
                args += [flag, check_trigger_in(value.strip(), self.tokenizer)]
            elif value is True and flags[flag] in (0, "?"):
                args.append(flag)  # a switch
            elif value is not True and flags[flag] not in (0,) and isinstance(value, int | float | str):
                text = str(value).strip()
                if not text or text.startswith("-") and not _number(text):
                    raise UserError(f"{key}: bad value {text[:40]!r}")
                args += [flag, text]
            elif flags[flag] == 0:
                raise UserError(f"{key} must be true or false ({flag} is a switch), got {describe(value)}")
            else:
                raise UserError(f"{key}: {flag} takes a value, got {describe(value)}")
        return args

    def busy(self) -> TrainJob | None:
        return next((j for j in self.jobs.values() if j.status == "running"), None)

    def start(self, body: dict) -> TrainJob:
        name = check_name(str_field(body, "name", max_chars=64))
        style = str_field(body, "style", max_chars=64)
        rank = int_field(body, "rank", 4, 1, self.cfg.max_rank)
        steps = int_field(body, "steps", 200, 1, self.cfg.max_train_steps)
        method = str_field(body, "method", "lora", max_chars=16)
        if method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got {describe(method)}")
        validate_every = int_field(body, "validate_every", 0, 0, self.cfg.max_train_steps)
        extra = self.prompt_args(body)
        raw = body.get("trigger")  # checked by prompt_args where it is used; shown in the job as given
        trigger = raw.strip().lower()[:32] if isinstance(raw, str) else ""
        if style not in (*STYLES, "upload"):
            raise UserError(f"style must be one of {', '.join(STYLES)} or 'upload', got {describe(style)}")
        if validate_every and style == "upload":
            raise UserError("validate_every needs held-out digits: a built-in style (an upload has none)")
        with self.lock:
            running = self.busy()
            if running:
                raise HTTPError(409, f"training {running.name!r} is still running (one job at a time)")
            if name in self.registry.all() or (self.folder / name).exists():
                raise UserError(f"an adapter named {name!r} exists already; pick another name")
            self.folder.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".train-", dir=self.folder))
            job = TrainJob(secrets.token_hex(6), name, style, rank, steps, trigger, work, method, extra,
                           validate_every=validate_every)
            try:
                source = style
                if style == "upload":
                    job.images = unpack_zip(body.get("zip_base64"), work / "images", self.cfg)
                    source = str(work / "images")
                cmd = [sys.executable, "-m", "lora4diffusion", "-q", "train-lora", "--style", source,
                       "--rank", str(rank), "--max-train-steps", str(steps), "--out", str(work / "run"),
                       "--device", self.cfg.device, "--method", method]
                if self.cfg.checkpoint:
                    cmd += ["--checkpoint", str(self.cfg.checkpoint)]
                cmd += extra
                if validate_every:
                    cmd += ["--validate-every", str(validate_every)]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                # Its own session: a Ctrl-C in the server's terminal reaches the server, which stops the job.
                job.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                            text=True, start_new_session=True)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            self.jobs[job.id] = job
        threading.Thread(target=self._wait, args=(job,), daemon=True).start()
        return job

    def _wait(self, job: TrainJob) -> None:
        assert job.proc is not None
        _, err = job.proc.communicate()
        job.read_curve()  # keep the last loss curve before the run folder goes
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
        for f in (ADAPTER_FILE, "metrics.csv", "loss.png", VALIDATION_FILE):
            if (run / f).is_file():
                shutil.copy2(run / f, staged / f)
        if not (staged / ADAPTER_FILE).is_file():
            raise UserError("training wrote no adapter")
        done = read_metadata(staged / ADAPTER_FILE).get("steps")
        if done != str(job.steps):  # e.g. stopped by a signal: train-lora then exits 0 with a partial adapter
            raise UserError(f"training stopped at step {done} of {job.steps}; no adapter installed")
        (staged / "README.md").write_text(
            f"# Adapter `{job.name}`\n\nTrained from `lora4diffusion serve`: style {job.style}, "
            f"{job.method}, rank {job.rank}, "
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


def _read_pairs(path: Path, before: list[list[float]]) -> list[list[float]]:
    """[step, first value] of each row of a run's CSV (metrics.csv: the loss; validation.csv: val_loss), or
    ``before`` while the file is missing or shorter (a row being written: the next poll reads it)."""
    if not path.is_file():
        return before
    pairs = []
    try:
        for line in path.read_text().splitlines()[1:]:
            step, value = line.split(",")[:2]
            pairs.append([int(step), float(value)])
    except (OSError, ValueError):
        pass
    return pairs if len(pairs) >= len(before) else before


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
