"""What `sample` used, written where the images go, so that `sample --from FILE` draws the same pixels.

The record is JSON in the PNG's ``lora4diffusion`` text chunk and in ``samples.npz["parameters"]``; the PNG
also carries AUTOMATIC1111's human-readable ``parameters`` chunk ("PNG info": prompt line, then
``Steps: 20, Sampler: DDIM, CFG scale: 1.25, Seed: 0, ...``) for tools that show it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lora4diffusion.checkpoint import path_kind
from lora4diffusion.errors import UserError
from lora4diffusion.prompt_syntax import call_loras

KEY = "lora4diffusion"


def read_parameters(path: str | Path) -> dict:
    """The sampling record of a samples.png or samples.npz written by `lora4diffusion sample`."""
    p = Path(path)
    if path_kind(p) == "dir":
        p = p / "samples.png"
    if path_kind(p) != "file":
        raise UserError(f"--from {path}: file not found")
    text = None
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as data:
                text = str(data["parameters"]) if "parameters" in data.files else None
        except (OSError, ValueError) as e:
            raise UserError(f"--from {p}: not a readable .npz ({e})") from None
    else:
        try:
            with Image.open(p) as im:
                text = getattr(im, "text", {}).get(KEY)
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"--from {p}: not a readable PNG ({e})") from None
    if text is None:
        raise UserError(f"--from {p}: no lora4diffusion sampling record (written by `lora4diffusion sample`)")
    try:
        params = json.loads(text)
    except ValueError:
        raise UserError(f"--from {p}: the sampling record is not valid JSON") from None
    if not isinstance(params, dict):
        raise UserError(f"--from {p}: the sampling record is not a JSON object")
    return params


def apply_recorded(args: argparse.Namespace, params: dict) -> None:
    """Fill every sampling option that this command line left unset from the record (given ones win)."""
    def fill(name: str, value) -> None:
        if getattr(args, name, None) in (None, []) and value is not None:
            setattr(args, name, value)

    fill("checkpoint", params.get("checkpoint"))
    if not args.lora and params.get("loras"):
        args.lora = [f"{p}:{w!r}" for p, w in params["loras"]]
        args.force = args.force or bool(params.get("force"))
    for name in ("sampler", "steps", "guidance", "eta", "seed", "negative", "bf16"):
        fill(name, params.get(name))
    if args.prompt is None and args.digits is None:
        if params.get("prompts"):
            fill("prompt", list(params["prompts"]))
            fill("num", params.get("num"))
        elif params.get("digits") is not None:
            args.digits = ",".join(str(int(d)) for d in params["digits"])
            fill("per_digit", params.get("per_digit"))


def summary_line(params: dict) -> str:
    """One line: everything the run used (what `sample` prints)."""
    loras = ", ".join(f"{p}:{w:g}" for p, w in params["loras"])
    if params.get("prompts"):  # adapters loaded by <lora:...> tags act as much as --lora ones: name them

        tagged = ", ".join(f"{n}:{w:g}" for n, w in call_loras(list(params["prompts"]))[1].items())
        loras = ", ".join(x for x in (loras, tagged and f"{tagged} (prompt tags)") if x)
    loras = loras or "none"
    what = (f"prompts {params['prompts']} x {params['num']}" if params.get("prompts")
            else f"digits {','.join(map(str, params['digits']))} x {params['per_digit']}")
    neg = f", negative {params['negative']!r}" if params.get("negative") is not None else ""
    bf16 = "on" if params["bf16"] else "off"
    return (f"sample: model {params['checkpoint'] or 'the shipped base'}, loras {loras}, sampler "
            f"{params['sampler']}, steps {params['steps'] or 'all'}, guidance {params['guidance']:g}, "
            f"eta {params['eta']:g}, seed {params['seed']}, {what}{neg}, bf16 {bf16} ({params['device']})")


def a1111_parameters(params: dict, size: int) -> str:
    """AUTOMATIC1111's "parameters" text: the prompt (LoRAs as <lora:name:w> tags), then the settings."""
    tags = " ".join(f"<lora:{Path(p).name or p}:{w:g}>" for p, w in params["loras"])
    prompt = (" | ".join(params["prompts"]) if params.get("prompts")
              else "digits " + ",".join(map(str, params["digits"])))
    lines = [f"{prompt} {tags}".strip()]
    if params.get("negative") is not None:
        lines.append(f"Negative prompt: {params['negative']}")
    model = params["checkpoint"] or "base"
    lines.append(f"Steps: {params['steps'] or 'all'}, Sampler: {params['sampler'].upper()}, "
                 f"CFG scale: {params['guidance']:g}, Seed: {params['seed']}, Size: {size}x{size}, "
                 f"Model: {model}, Eta: {params['eta']:g}, bf16: {params['bf16']}, "
                 f"Version: lora4diffusion {params['version']}")
    return "\n".join(lines)
