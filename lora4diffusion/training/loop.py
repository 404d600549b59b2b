"""The one training loop, for every model: base UNets, prompt bases, the VAE and LoRA adapters.

It trains whatever parameters of ``model`` have requires_grad=True on the diffusion loss (DDPM Algorithm 1,
with label dropout for classifier-free guidance), with AdamW, linear LR warm-up, gradient clipping and an EMA
of the trained parameters. What gets exported (a full model, or only an adapter) is the caller's ``export``.

Reproducibility and resume: every step draws its batch, timesteps and noise from a generator seeded with
(seed, step), and the data order from (seed, epoch). So nothing but the weights, the EMA, the optimizer state
and the step needs saving, and a resumed run continues bit-for-bit like an uninterrupted one. A task (the
loss: ``DiffusionTask`` here, the prompt, VAE and trigger tasks in their modules) is the only part that
differs between models; the run folder's settings and files are training/run.py's. ``validation`` (the
held-out loss every ``validate_every`` steps, training/validation.py) and ``scores`` (samples scored every
``score_every``-th validation, training/scores.py) draw nothing from the training generators and change no
state. With ``keep_best`` the export of the best validation so far goes to RUN/best/ as well (with
best.json); with ``patience`` the run stops, resumable, after that many validations without improvement
(training/best.py: both are rebuilt from validation.csv on resume).

Several processes (torchrun, see distributed.py): the model is wrapped in DistributedDataParallel; each rank
takes a contiguous slice of the very batch one process would use, with the t/noise/dropout draws one process
makes for those rows, so K ranks match one process up to float rounding. Only rank 0 writes files.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lora4diffusion import distributed
from lora4diffusion.diffusion import NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.precision import choose_precision
from lora4diffusion.runlock import RunLock
from lora4diffusion.training.best import BEST_DIR, Best, restore_best, write_best
from lora4diffusion.training.run import (
    STATE_NAME,
    NonFiniteLoss,
    TrainConfig,
    plot_metrics,
    remove_stale_temps,
    seed_value,
    tensorboard_writer,
    trim_metrics,
)
from lora4diffusion.training.state import (
    expected_state,
    read_state,
    restore_state,
    state_tensors,
    write_state,
)
from lora4diffusion.training.validation import VALIDATION_FILE, trim_validation, write_validation_row

log = logging.getLogger("lora4diffusion")


class EMA:
    """Exponential moving average of the trained parameters, with the usual warm-up of the decay."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def swap(self, params: dict[str, nn.Parameter]) -> None:
        """Exchange live and EMA values in place (call twice to undo)."""
        for k, p in params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)


class DiffusionTask:
    """The diffusion loss (DDPM Algorithm 1 with label dropout): what base and LoRA training minimise.

    A *task* is what the one training loop needs to know about a model: ``loss(trainer, step)``, this rank's
    mean loss on step ``step``'s batch (``trainer.batch_indices(step)``), drawing every random number from
    a generator seeded with (seed, step) so that resume is bit-exact. The VAE's task is in training/vae.py.
    """

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def loss(self, trainer: Trainer, step: int) -> torch.Tensor:
        cfg, schedule = trainer.cfg, self.schedule
        g = torch.Generator().manual_seed(seed_value(cfg.seed * 1_000_003 + step))
        idx = trainer.batch_indices(step)
        n = idx.shape[0]
        # Draw for the whole global batch on every rank (one process: exactly training_loss's draws), keep
        # this rank's rows: it sees the t, noise and label dropout one process has for them.
        shape = (n, *trainer.images.shape[1:])
        t, noise, drop = schedule.draw_training_inputs(shape, g, cfg.label_dropout)
        rows = slice(trainer.rank * n // trainer.world, (trainer.rank + 1) * n // trainer.world)
        dev = trainer.device
        idx, t, noise = idx[rows].to(dev), t[rows].to(dev), noise[rows].to(dev)
        drop = drop[rows].to(dev) if drop is not None else None
        x0 = trainer.images[idx]
        if cfg.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.use_bf16):
            return schedule.loss(trainer.net(), x0, trainer.labels[idx], t, noise, drop)


class Trainer:
    """Trains ``model`` (the plain module: export, EMA and preview see it unwrapped) on ``device``.

    ``task``: a NoiseSchedule (the diffusion loss, ``DiffusionTask``) or any object with
    ``loss(trainer, step)`` (the VAE's reconstruction + KL loss).

    ``device`` None keeps the model where it is; under torchrun (WORLD_SIZE > 1) the process group is joined
    here and the forward pass goes through DistributedDataParallel. ``compile`` runs it through torch.compile.
    ``should_stop``: polled between steps; True ends the run with a resumable checkpoint (the CLI wires
    SIGTERM and Ctrl-C to it; library code installs no signal handlers). A KeyboardInterrupt does the same.
    """

    def __init__(
        self,
        model: nn.Module,
        task: NoiseSchedule | DiffusionTask,
        images: torch.Tensor,
        labels: torch.Tensor,
        cfg: TrainConfig,
        run_dir: Path,
        export: Callable[[nn.Module, Path], None],
        preview: Callable[[nn.Module, Path], None] | None = None,
        run_info: dict | None = None,
        device: str | torch.device | None = None,
        compile: bool = False,
        should_stop: Callable[[], bool] | None = None,
        lr_scale: Callable[[str], float] | None = None,
        validation: Callable[[nn.Module, torch.device, bool], dict[str, float]] | None = None,
        scores: Callable[[nn.Module, torch.device, bool], dict[str, float]] | None = None,
    ):
        cfg.validate()
        self.device = (
            distributed.resolve_device(device) if device is not None else next(model.parameters()).device
        )
        distributed.init(self.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if cfg.batch_size % self.world:
            raise UserError(
                f"batch size {cfg.batch_size} is not divisible by the {self.world} processes"
                " (each takes an equal slice of the global batch)"
            )
        self.model, self.cfg = model.to(self.device), cfg
        self.task = DiffusionTask(task) if isinstance(task, NoiseSchedule) else task
        # The data set is small (MNIST: <= 60k x 28x28 fp32, 188 MB): it lives on the device once, instead of
        # a host-to-device copy of every batch.
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.run_dir = Path(run_dir)
        self.export, self.preview = export, preview
        self.validation = validation  # every cfg.validate_every steps (training/validation.py)
        self.scores = scores if cfg.score_every else None  # every cfg.score_every-th validation (scores.py)
        if cfg.score_every and scores is None:
            raise UserError("--score-every: this kind of run has no scores")
        self.best = Best.parse(cfg.keep_best) if cfg.keep_best else None
        self._check_metric()
        self.stopped_early: str | None = None  # why the run stopped before cfg.steps (patience), if it did
        self.run_info = run_info or {}
        self.compile = compile
        self.should_stop = should_stop or (lambda: False)
        self._saved_step: int | None = None  # step of the last checkpoint on disk (None: none yet)
        self._net: nn.Module | None = None  # what the forward pass runs through (DDP / compiled); see fit()
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise UserError("nothing to train: no parameter has requires_grad=True")
        self.precision = choose_precision(self.device, cfg.bf16)  # None: the device's default
        self.use_bf16 = self.precision.bf16
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        # Decay only matrices/kernels, as is usual for AdamW; norms, biases and embeddings are not decayed.
        # ``lr_scale(name)``: a parameter's learning rate as a multiple of cfg.lr (e.g. a text encoder's own
        # rate in LoRA training); without it, the two groups below are all there is.
        scales = sorted({lr_scale(k) for k in self.params}) if lr_scale is not None else [None]
        groups, self.opt_names = [], []
        for scale in scales:
            mine = {k: p for k, p in self.params.items() if scale is None or lr_scale(k) == scale}
            for decayed in (True, False):
                names = [k for k, p in mine.items() if (p.dim() >= 2) == decayed]
                wd = cfg.weight_decay if decayed else 0.0
                group = {"params": [mine[k] for k in names], "weight_decay": wd}
                if scale is not None:
                    group["lr_scale"] = scale
                groups.append(group)
                self.opt_names += names
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.train_seconds = 0.0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    # ----- data order and learning rate: pure functions of (seed, step) -----
    def batch_indices(self, step: int) -> torch.Tensor:
        n, b = self.images.shape[0], self.cfg.batch_size
        per_epoch = max(1, n // b)
        epoch, pos = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(seed_value(self.cfg.seed * 7919 + epoch))
            self._perm_epoch, self._perm = epoch, torch.randperm(n, generator=g)
        if n < b:  # few-shot data sets: sample with replacement
            g = torch.Generator().manual_seed(seed_value(self.cfg.seed * 7919 + step))
            return torch.randint(0, n, (b,), generator=g)
        return self._perm[pos * b : (pos + 1) * b]

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup))

    # ----- checkpoints (the file format: training/state.py) -----
    def save_checkpoint(self) -> None:
        """Write the training state and the export (rank 0 only: every rank holds the same weights)."""
        if not distributed.is_main():
            return
        tensors = state_tensors(self.params, self.ema, self.opt, self.opt_names)
        path = self.run_dir / STATE_NAME
        write_state(path, tensors, self.step, self.train_seconds, self.cfg, self.run_info)
        self._export_ema()
        self._saved_step = self.step

    def _export_ema(self, directory: Path | None = None) -> None:
        """The export of the EMA's weights (the live ones without an EMA) into ``directory`` (the run's)."""
        if self.ema:
            self.ema.swap(self.params)
        try:
            self.export(self.model, directory or self.run_dir)
        finally:
            if self.ema:
                self.ema.swap(self.params)

    def resume(self, allow_changes: bool = False) -> None:
        """Continue from the run folder's train state (checked: metadata, settings, tensor names/shapes)."""
        path = self.run_dir / STATE_NAME
        self.step, self.train_seconds, tensors = read_state(
            path, self.run_info, self.cfg, allow_changes,
            lambda optimizer: expected_state(self.params, self.ema, self.opt, self.opt_names, optimizer),
        )
        restore_state(tensors, self.params, self.ema, self.opt, self.opt_names, path)
        log.info("resumed from %s at step %d", path, self.step)

    # ----- the loop -----
    def net(self) -> nn.Module:
        """The module the training forward runs through: ``model``, DDP-wrapped and/or compiled."""
        if self._net is None:
            net = self.model
            if self.world > 1:  # built after resume(): DDP's initial broadcast then agrees with every rank
                ids = [self.device.index] if self.device.type == "cuda" else None
                net = DistributedDataParallel(net, device_ids=ids)
            if self.compile:
                net = torch.compile(net)
            self._net = net
        return self._net

    def _loss(self, step: int) -> torch.Tensor:
        """This rank's loss for ``step`` (the task's); DDP's gradient averaging makes it the global mean."""
        # Dropout (UNet or LoRA) draws from the global RNG: seed it per step too, inside fork_rng so the
        # caller's RNG is left alone, else a resumed run draws other masks than an uninterrupted one.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed_value(self.cfg.seed * 1_000_003 + step + 1))
            return self.task.loss(self, step)

    def _stop_requested(self) -> bool:
        """``should_stop()`` on any rank (one all-reduce under torchrun, so every rank stops at one step)."""
        stop = bool(self.should_stop())
        if self.world > 1:
            stop = bool(distributed.mean(torch.tensor(float(stop), device=self.device)) > 0)
        return stop

    def fit(self, progress: bool = True) -> dict:
        """Train until cfg.steps; returns a summary. A stop request (``should_stop``) or Ctrl-C saves a
        resumable checkpoint and returns with ``interrupted`` True; a stop requested before the first step
        writes nothing (``checkpoint`` False when no resumable state exists).

        Only rank 0 writes (metrics, tensorboard, checkpoints, samples, progress bar); the other ranks wait at
        a barrier after each checkpoint, so when fit returns the run directory is complete for every rank.
        While it runs, rank 0 holds the run directory's lock (runlock.py): a second training there is refused.
        """
        if self.step > 0 and self._saved_step is None:  # resumed: its checkpoint is on disk
            self._saved_step = self.step
        if self._stop_requested():  # stopped while loading: leave the folder as it was
            return self._summary(float("nan"), interrupted=True)
        if self.step >= self.cfg.steps:  # resumed at its target (prepare_run refuses past it): nothing to do
            return self._summary(float("nan"), interrupted=False)
        lock = RunLock(self.run_dir)
        if distributed.is_main():
            lock.acquire()  # creates the folder
        try:
            return self._fit(progress)
        finally:
            lock.release()

    def _fit(self, progress: bool) -> dict:
        cfg, main = self.cfg, distributed.is_main()
        metrics_path = self.run_dir / "metrics.csv"
        mf, writer, tb = None, None, None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.run_dir)
            new_file = not metrics_path.exists() or self.step == 0
            if not new_file:  # a killed run may have logged past its last checkpoint, or half a line
                trim_metrics(metrics_path, self.step)
            if self.step > 0:
                trim_validation(self.run_dir, self.step)
            else:  # a run started over (--overwrite): not the old run's rows
                (self.run_dir / VALIDATION_FILE).unlink(missing_ok=True)
            self.best = restore_best(self.run_dir, self.cfg.keep_best, self.step)
            mf = metrics_path.open("w" if new_file else "a", newline="")
            writer = csv.writer(mf)
            if new_file:
                writer.writerow(["step", "loss", "lr", "grad_norm", "images_per_s", "train_seconds"])
            tb = tensorboard_writer(self.run_dir)
            log.info(
                "training on %s in %s: global batch %d = %d process(es) x %d, lr %.3g (warm-up %d),"
                " step %d->%d",
                self.device,
                self.precision,
                cfg.batch_size,
                self.world,
                cfg.batch_size // self.world,
                cfg.lr,
                cfg.warmup,
                self.step,
                cfg.steps,
            )
        if self._agree(self._patience_spent()):  # resumed after an early stop, with the same --patience
            self.stopped_early = self._early_reason()
            if main:
                log.warning("stopped early at step %d: %s; nothing trained (a larger --patience, or 0,"
                            " goes on)", self.step, self.stopped_early)
            if mf:
                mf.close()
            if tb:
                tb.close()
            return self._summary(float("nan"), interrupted=False)
        self.net().train()
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (progress and main), desc="train", unit="step"
        )
        interrupted, last_loss, window = False, float("nan"), []
        try:
            while self.step < cfg.steps:
                if self._stop_requested():  # SIGTERM / Ctrl-C via the CLI: between two steps, like Ctrl-C
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                for group in self.opt.param_groups:
                    group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
                loss = self._loss(self.step)
                # The global batch's loss: the logged value, and one verdict on non-finite for every rank.
                global_loss = distributed.mean(loss.detach())
                if not torch.isfinite(global_loss):
                    raise NonFiniteLoss(self._non_finite_message(global_loss.item()))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()  # under DDP, also averages the gradients over the ranks
                grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
                self.opt.step()
                if self.ema:
                    self.ema.update(self.params, self.step)
                self.step += 1
                last_loss = global_loss.item()  # also waits for the device, so dt is the real step time
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                window.append(last_loss)
                bar.update(1)
                if writer and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    mean_loss = sum(window) / len(window)
                    window.clear()
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{cfg.batch_size / dt:.0f}")
                    writer.writerow(
                        [
                            self.step,
                            f"{mean_loss:.6f}",
                            f"{self.lr_at(self.step - 1):.3g}",
                            f"{float(grad_norm):.4f}",
                            f"{cfg.batch_size / dt:.1f}",
                            f"{self.train_seconds:.2f}",
                        ]
                    )
                    mf.flush()
                    if tb:
                        tb.add_scalar("loss", mean_loss, self.step)
                early = False
                if self._validation_due():
                    if main:
                        self._validate(tb)
                    early = self._agree(self._patience_spent()) and self.step < cfg.steps
                if early or self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    if main:
                        self.save_checkpoint()
                        plot_metrics(metrics_path, self.run_dir / "loss.png")
                    distributed.barrier()
                if early:  # a clean stop at a checkpoint: --resume with a larger --patience goes on
                    self.stopped_early = self._early_reason()
                    if main:
                        log.warning("stopped early at step %d: %s (%s); checkpoint saved", self.step,
                                    self.stopped_early, self.best.describe())
                    break
                if (
                    main
                    and self.preview
                    and cfg.sample_every
                    and (self.step % cfg.sample_every == 0 or self.step == cfg.steps)
                ):
                    self._preview()
            distributed.barrier()  # the last preview is written too when fit returns on any rank
        except KeyboardInterrupt:
            # No barrier here: under torchrun the other ranks are being interrupted too (or are gone).
            interrupted = True
            self.save_checkpoint()
            if main:
                log.warning("interrupted at step %d: checkpoint saved, continue with --resume", self.step)
        finally:
            bar.close()
            if mf:
                mf.close()
            if tb:
                tb.close()
        return self._summary(last_loss, interrupted)

    def _summary(self, loss: float, interrupted: bool) -> dict:
        return {
            "step": self.step,
            "loss": loss,
            "train_seconds": self.train_seconds,
            "interrupted": interrupted,
            "checkpoint": self._saved_step is not None,  # a resumable state exists in run_dir
            "stopped_early": self.stopped_early,
            "best": None if self.best is None else {**self.best.record(),
                                                     "dir": str(self.run_dir / BEST_DIR)},
        }

    def _non_finite_message(self, value: float) -> str:
        where = f"non-finite loss ({value}) at step {self.step}; stopped"
        if self._saved_step is None:
            return (
                f"{where} before the first checkpoint (step {self.cfg.checkpoint_every}), so there is nothing"
                " to resume; try a lower --lr"
            )
        return (
            f"{where}; the last good checkpoint (step {self._saved_step}) in {self.run_dir} is kept"
            " (try a lower --lr)"
        )

    def _validation_due(self) -> bool:
        every = self.cfg.validate_every
        return bool(self.validation and every and (self.step % every == 0 or self.step == self.cfg.steps))

    def _score_due(self) -> bool:
        every = self.cfg.validate_every * self.cfg.score_every
        return bool(self.scores and (self.step % every == 0 or self.step == self.cfg.steps))

    def _validate(self, tb) -> None:
        """The held-out loss (and, when due, the scores) of the weights that get exported (the EMA's, if any)
        into validation.csv and TensorBoard; a new best is exported to RUN/best/. Eval mode, no gradients, no
        draws from the training generators: the training trajectory is not touched."""
        if self.ema:
            self.ema.swap(self.params)
        self.model.eval()
        try:
            values: dict[str, float | None] = dict(self.validation(self.model, self.device, self.use_bf16))
            if self.scores is not None:
                due = self._score_due()
                got = self.scores(self.model, self.device, self.use_bf16) if due else {}
                values.update({k: got.get(k) for k in self.scores.columns})
        finally:
            self.model.train()
            if self.ema:
                self.ema.swap(self.params)
        write_validation_row(self.run_dir, self.step, values)
        if tb:
            for key, value in values.items():
                if value is not None:
                    name = key.replace("val_", "val/", 1) if key.startswith("val_") else f"score/{key}"
                    tb.add_scalar(name, value, self.step)
        if self.best is not None and self.best.update(self.step, values):
            self._export_best()

    # ----- the best so far and early stopping (training/best.py) -----
    def _check_metric(self) -> None:
        """--keep-best names a column this run writes (checked before anything is written)."""
        columns = getattr(self.validation, "columns", None)
        if self.best is None or columns is None:
            return
        columns = [*columns, *(getattr(self.scores, "columns", []) if self.scores else [])]
        if self.best.metric not in columns:
            raise UserError(f"--keep-best {self.best.metric}: this run's validation.csv has no such column"
                            f" (it has {', '.join(columns)})")

    def _export_best(self) -> None:
        """The export, as at a checkpoint (the EMA's weights), into RUN/best/ (training/best.py)."""
        write_best(self.run_dir, self._export_ema, self.best)
        log.info("step %d: %s; exported to %s", self.step, self.best.describe(), self.run_dir / BEST_DIR)

    def _patience_spent(self) -> bool:
        p = self.cfg.patience
        return bool(self.best is not None and p and self.best.waited >= p)

    def _early_reason(self) -> str:
        b, p = self.best, self.cfg.patience
        return f"{b.metric} did not improve in {b.waited} validations, --patience {p}"

    def _agree(self, flag: bool) -> bool:
        """Rank 0's verdict (it validates) for every rank: one all-reduce under torchrun."""
        if self.world > 1:
            flag = bool(distributed.mean(torch.tensor(float(flag and distributed.is_main()),
                                                      device=self.device)) > 0)
        return flag

    def _preview(self) -> None:
        if self.ema:
            self.ema.swap(self.params)
        self.model.eval()
        try:
            self.preview(self.model, self.run_dir / "samples" / f"step_{self.step:07d}.png")
        finally:
            self.model.train()
            if self.ema:
                self.ema.swap(self.params)


