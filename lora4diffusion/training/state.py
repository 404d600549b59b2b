"""A run's training state on disk: train_state.safetensors holds the trained parameters, their EMA and
AdamW's moments, with the step, the TrainConfig and the run record as metadata: everything a bit-exact
``--resume`` needs (every step draws from (seed, step), so no RNG state is saved).

    param.NAME              the trained parameter
    ema.NAME                its exponential moving average (when cfg.ema_decay > 0)
    optim.NAME.exp_avg      AdamW's first and second moments and its step count (after the first step)
    optim.NAME.exp_avg_sq
    optim.NAME.step

Reading checks the metadata and the settings against this run, then every tensor's name, shape and dtype
(``expected_state``) before anything is copied into the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.checkpoint import check_against, load_tensors, read_metadata, save_tensors, tensor_header
from lora4diffusion.errors import UserError
from lora4diffusion.schema import float_text, int_text
from lora4diffusion.training.run import RESUME_FIXED, TrainConfig

log = logging.getLogger("lora4diffusion")

# TrainConfig fields that shape the trajectory: resuming with one changed trains a different run.
TRAJECTORY = ("batch_size", "lr", "warmup", "weight_decay", "grad_clip", "ema_decay", "label_dropout", "seed")


def optimizer_params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters in group order (the order ``opt_names`` names them)."""
    return [p for g in opt.param_groups for p in g["params"]]


def state_tensors(params: dict[str, nn.Parameter], ema, opt: torch.optim.Optimizer,
                  opt_names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of the state file (module docstring); ``ema``: an object with ``shadow``, or None."""
    out = {f"param.{k}": p.detach() for k, p in params.items()}  # save_tensors moves to the CPU
    if ema:
        out.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    for name, p in zip(opt_names, optimizer_params(opt), strict=True):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                t = st[key].detach()
                out[f"optim.{name}.{key}"] = t.reshape(-1) if key == "step" else t
    return out


def expected_state(params: dict[str, nn.Parameter], ema, opt: torch.optim.Optimizer, opt_names: list[str],
                   optimizer: bool = True) -> dict[str, torch.Tensor]:
    """What ``state_tensors`` writes after at least one step (names, shapes, dtypes): the schema a
    train_state file is checked against before resuming. A step-0 checkpoint has no optimizer state."""
    out = {f"param.{k}": p for k, p in params.items()}
    if ema:
        out.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    for name, p in zip(opt_names, optimizer_params(opt), strict=True) if optimizer else ():
        out[f"optim.{name}.exp_avg"] = out[f"optim.{name}.exp_avg_sq"] = p
        out[f"optim.{name}.step"] = torch.zeros(1)
    return out


def write_state(path: Path, tensors: dict[str, torch.Tensor], step: int, seconds: float, cfg: TrainConfig,
                run_info: dict) -> None:
    meta = {
        "step": str(step),
        "train_seconds": f"{seconds:.3f}",
        "config": json.dumps(asdict(cfg)),
        "run": json.dumps(run_info, default=str),
    }
    save_tensors(path, tensors, metadata=meta)


def check_resume(path: Path, meta: dict[str, str], saved_run: dict, run_info: dict, cfg: TrainConfig,
                 allow_changes: bool) -> None:
    """A different base (the fingerprint) is always refused; other settings (``TRAJECTORY``) or data and
    run entries (``run_info`` outside RESUME_FIXED) are refused, naming them, unless ``allow_changes``.
    ``steps`` may grow, and logging, checkpoint and preview intervals may change."""
    now = json.loads(json.dumps(run_info, default=str))
    if "base_fingerprint" in saved_run and saved_run["base_fingerprint"] != now.get("base_fingerprint"):
        raise UserError(
            f"--resume: {path} was trained on base {saved_run.get('base')!r}"
            f" (fingerprint {str(saved_run['base_fingerprint'])[:12]}), not on {now.get('base')!r}"
            f" (fingerprint {str(now.get('base_fingerprint'))[:12]})"
        )
    try:
        saved_cfg = json.loads(meta.get("config", "{}"))
    except (json.JSONDecodeError, RecursionError):
        raise UserError(f"--resume: {path}: malformed metadata (config is not JSON)") from None
    if not isinstance(saved_cfg, dict):
        raise UserError(f"--resume: {path}: malformed metadata (config must be a JSON object)")
    now_cfg = asdict(cfg)
    changed = [f"{k} {saved_cfg[k]!r} -> {now_cfg[k]!r}" for k in TRAJECTORY
               if k in saved_cfg and saved_cfg[k] != now_cfg[k]]
    changed += [
        f"{k} {saved_run[k]!r} -> {now.get(k)!r}"
        for k in sorted(saved_run)
        if k not in RESUME_FIXED and k != "base" and k in now and saved_run[k] != now[k]
    ]
    if changed and not allow_changes:
        raise UserError(
            f"--resume: {path} used other data or settings ({'; '.join(changed)[:300]});"
            " pass --allow-changes to continue with the new ones"
        )
    if changed:
        log.warning("resuming with changes: %s", "; ".join(changed))


def read_state(
    path: Path, run_info: dict, cfg: TrainConfig, allow_changes: bool,
    expected: Callable[[bool], dict[str, torch.Tensor]],
) -> tuple[int, float, dict[str, torch.Tensor]]:
    """(step, train seconds, tensors) of a state file, after every check; ``expected(optimizer)``: the
    tensors this run needs (``expected_state``)."""
    if not path.is_file():
        raise UserError(f"--resume: no training state at {path}")
    meta = read_metadata(path)
    try:  # metadata is text from a file: check it before anything is copied into the model
        step = int_text(meta.get("step"), "step", 0, 2**62)
        seconds = float_text(meta.get("train_seconds", "0"), "train_seconds", 0.0, 1e12)
        saved_run = json.loads(meta.get("run", "{}"))
        if not isinstance(saved_run, dict):
            raise UserError("run must be a JSON object")
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"--resume: {path}: malformed metadata (run is not JSON: {e})") from None
    except UserError as e:
        raise UserError(f"--resume: {path}: malformed metadata ({e})") from None
    for key in ("unet", "diffusion", "lora", "vae", "text_encoder"):
        now = json.loads(json.dumps(run_info[key], default=str)) if key in run_info else None
        if key in run_info and saved_run.get(key) != now:
            raise UserError(f"--resume: {path} was trained with a different {key} config"
                            f"{_differences(saved_run.get(key), now)}")
    check_resume(path, meta, saved_run, run_info, cfg, allow_changes)
    # every tensor named, shaped and typed as this run needs (a missing optimizer entry included)
    check_against(expected(step > 0), tensor_header(path), path, "this run")
    return step, seconds, load_tensors(path)


def _differences(saved: object, now: object) -> str:
    """' (name saved -> now, ...)' for two config dicts (a key one lacks: its default), or ''."""
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return ""
    keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]

    def value(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(default)"

    shown = ", ".join(f"{k} {value(saved, k)} -> {value(now, k)}" for k in keys)
    return f" ({shown[:300]})" if shown else ""


def restore_state(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter], ema,
                  opt: torch.optim.Optimizer, opt_names: list[str], path: Path) -> None:
    """Copy a checked state into the parameters, the EMA and AdamW's moments."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
            if ema:
                ema.shadow[k].copy_(tensors[f"ema.{k}"])
    for name, p in zip(opt_names, optimizer_params(opt), strict=True):
        if f"optim.{name}.exp_avg" in tensors:
            adam_step = tensors[f"optim.{name}.step"].reshape(())
            if not 0 <= float(adam_step) <= 2**62:
                raise UserError(f"--resume: {path}: optim.{name}.step is {float(adam_step):g}")
            opt.state[p] = {
                "step": adam_step.float(),  # AdamW keeps it on the CPU
                "exp_avg": tensors[f"optim.{name}.exp_avg"].to(p.device, copy=True),
                "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].to(p.device, copy=True),
            }
