"""What `sample` used, written where the images go, so that `sample --from FILE` draws the same pixels.

The record is JSON in the PNG's ``lora4diffusion`` text chunk and in ``samples.npz["parameters"]``; the PNG
also carries AUTOMATIC1111's human-readable ``parameters`` chunk ("PNG info": prompt line, then
``Steps: 20, Sampler: DDIM, CFG scale: 1.25, Seed: 0, ...``) for tools that show it.
"""

from __future__ import annotations

import argparse
import json
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lora4diffusion.checkpoint import check_readable, path_kind
from lora4diffusion.data import parse_digits
from lora4diffusion.errors import UserError
from lora4diffusion.limits import lora_weight
from lora4diffusion.prompt_syntax import TagWeight, prompt_loras

KEY = "lora4diffusion"
MAX_RECORD_CHARS = 1 << 20  # a record is a few hundred characters; a 1 MiB one is not ours
# what zipfile / numpy / Pillow raise for a broken file (RuntimeError: an encrypted zip member)
_UNREADABLE = (OSError, ValueError, EOFError, SyntaxError, KeyError, zipfile.BadZipFile, zlib.error,
               NotImplementedError, RuntimeError, Image.DecompressionBombError)


def read_parameters(path: str | Path) -> dict:
    """The sampling record of a samples.png or samples.npz written by `lora4diffusion sample` (the JSON
    object as it is: ``apply_recorded`` checks its values)."""
    p = Path(path)
    if path_kind(p) == "dir":
        p = p / "samples.png"
    if path_kind(p) != "file":
        raise UserError(f"--from {path}: file not found")
    check_readable(p)
    reader = _npz_record if p.suffix.lower() == ".npz" else _png_record
    text = reader(p)
    if text is None:
        raise UserError(f"--from {p}: no lora4diffusion sampling record (written by `lora4diffusion sample`)")
    _check_size(p, len(text))
    try:
        params = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a deeply nested value
        raise UserError(f"--from {p}: the sampling record is not valid JSON") from None
    if not isinstance(params, dict):
        raise UserError(f"--from {p}: the sampling record is not a JSON object")
    return params


def _check_size(p: Path, chars: int) -> None:
    if chars > MAX_RECORD_CHARS:
        raise UserError(f"--from {p}: the sampling record holds {chars} characters (a record written by"
                        f" `sample` holds a few hundred; limit {MAX_RECORD_CHARS})")


def _png_record(p: Path) -> str | None:
    """The record's text chunk, which `sample` writes before the image data: read without decoding pixels."""
    try:
        with Image.open(p) as im:
            text = im.info.get(KEY)
    except UnidentifiedImageError:
        raise UserError(f"--from {p}: not a PNG or .npz written by `lora4diffusion sample`") from None
    except _UNREADABLE as e:
        raise UserError(f"--from {p}: not a readable PNG ({_first_line(e)})") from None
    return text if isinstance(text, str) else None


def _npz_record(p: Path) -> str | None:
    """``parameters`` of a samples.npz: its .npy header is checked (a text scalar of bounded size) before
    numpy reads it, so a header declaring a huge shape allocates nothing; no pickle."""
    try:
        with zipfile.ZipFile(p) as zf:
            if "parameters.npy" not in zf.namelist():
                return None
            with zf.open("parameters.npy") as fp:
                version = np.lib.format.read_magic(fp)
                if version not in ((1, 0), (2, 0)):
                    raise UserError(f"--from {p}: parameters: unsupported .npy format version {version}")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(fp)
                if shape != () or dtype.kind != "U":
                    raise UserError(f"--from {p}: parameters is not the text of a sampling record (shape"
                                    f" {str(shape)[:40]}, dtype {str(dtype)[:20]})")
                _check_size(p, dtype.itemsize // 4)  # before numpy allocates it
            with zf.open("parameters.npy") as fp:
                return str(np.lib.format.read_array(fp, allow_pickle=False))
    except UserError:
        raise
    except _UNREADABLE as e:
        raise UserError(f"--from {p}: not a readable .npz ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


# The fields `sample` records (cli/sample.py writes them); "device" and "version" only describe the run.
FIELDS = ("checkpoint", "loras", "embeddings", "force", "sampler", "steps", "guidance", "eta", "seed",
          "digits", "per_digit", "prompts", "num", "negative", "bf16", "merged", "device", "version")
SAMPLERS = ("ddim", "ddpm")


def _shown(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's int-to-text limit
        return "a number too long to show"
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(params: dict, where: str, numbers: dict[str, Callable[[str], object]]) -> dict:
    """The record's values, each through the check its flag gets; -> the same fields, checked.

    ``numbers``: field -> the argparse type of its flag (cli/sample.py's table: ``steps`` -> ``--steps``'s
    ``positive_int``, ...), applied to the number as the flag applies it to its text; its ``allowed`` names
    the range in the message. Digits go through ``--digits``'s parser and adapter weights through the one
    weight limit (limits.py). Anything else -- a wrong type, NaN, out of range, an unknown field -- is a
    UserError: "``where``: field 'steps' must be ..., got ...".
    """
    out: dict = {}
    for name, value in params.items():
        if name not in FIELDS:
            raise UserError(f"{where}: unknown field {_shown(name)} (a sampling record holds"
                            f" {', '.join(FIELDS)})")
        if value is None:
            continue  # not set: the default, as an option not given
        bad = f"{where}: field {name!r} must be"
        if name in numbers:
            check = numbers[name]
            number = not isinstance(value, bool) and isinstance(value, int | float)
            try:
                out[name] = check(repr(value)) if number else None
            except (argparse.ArgumentTypeError, ValueError):
                out[name] = None
            if out[name] is None:
                raise UserError(f"{bad} {getattr(check, 'allowed', 'a number')}, got {_shown(value)}")
        elif name in ("force", "bf16", "merged"):
            if not isinstance(value, bool):
                raise UserError(f"{bad} true or false, got {_shown(value)}")
            out[name] = value
        elif name == "sampler":
            if value not in SAMPLERS:
                raise UserError(f"{bad} one of {', '.join(SAMPLERS)}, got {_shown(value)}")
            out[name] = value
        elif name in ("checkpoint", "negative", "device", "version"):
            path = name == "checkpoint"
            if not isinstance(value, str) or (path and (not value.strip() or "\0" in value)):
                raise UserError(f"{bad} {'a model folder or name' if path else 'text'}, got {_shown(value)}")
            out[name] = value
        elif name == "digits":
            if not isinstance(value, list) or not all(type(d) is int for d in value):
                raise UserError(f"{bad} a list of digits 0-9, got {_shown(value)}")
            try:
                out[name] = parse_digits(",".join(map(str, value)))
            except UserError as e:
                raise UserError(f"{where}: field 'digits': {e}") from None
        elif name == "embeddings":
            if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() and "\0" not in x
                                                      for x in value):
                raise UserError(f"{bad} a list of embedding files or names, got {_shown(value)}")
            out[name] = list(value)
        elif name == "prompts":
            if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
                raise UserError(f"{bad} a non-empty list of prompts (text), got {_shown(value)}")
            out[name] = list(value)
        elif name == "loras":
            if not isinstance(value, list):
                raise UserError(f"{bad} a list of [adapter, weight] pairs, got {_shown(value)}")
            out[name] = [_recorded_lora(item, f"{where}: field 'loras'") for item in value]
    if out.get("prompts") is not None and out.get("digits") is not None:
        raise UserError(f"{where}: the record holds both 'prompts' and 'digits' (a record of `sample` holds"
                        " one of them)")
    return out


def lora_record(path: object, weight: float | TagWeight) -> list:
    """One --lora as the record holds it: [adapter, weight], or [adapter, TE weight, UNet weight] (A1111's
    two), or [adapter, TE, UNet, block weights] (``--lora-blocks``: a preset name or numbers)."""
    if not isinstance(weight, TagWeight):
        return [str(path), weight]
    return [str(path), weight.te, weight.unet, *([weight.lbw] if weight.lbw else [])]


def _recorded_lora(item: object, where: str) -> tuple[str, float | TagWeight]:
    ok = (isinstance(item, list) and 2 <= len(item) <= 4 and isinstance(item[0], str) and item[0].strip()
          and "\0" not in item[0])
    if not ok or (len(item) == 4 and not (isinstance(item[3], str) and item[3].strip())):
        raise UserError(f"{where} must hold [adapter, weight] or [adapter, TE weight, UNet weight[, block"
                        f" weights]] items, got {_shown(item)}")
    weights = [lora_weight(w, f"{where}, adapter {_shown(item[0])}") for w in item[1:3]]
    if len(item) == 2:
        return item[0], weights[0]
    return item[0], TagWeight(weights[0], weights[1], item[3] if len(item) == 4 else None)


def _weight_text(weight: float | TagWeight) -> str:
    return f"{weight:g}" if isinstance(weight, int | float) else str(weight)


def _lora_items(params: dict) -> list[tuple[str, str]]:
    """(adapter, weight as a tag writes it) of each recorded --lora (record lists or checked tuples)."""
    out = []
    for item in params["loras"]:
        path, *ws = item
        weight = ws[0] if len(ws) == 1 else ws[0] if isinstance(ws[0], TagWeight) else TagWeight(
            ws[0], ws[1], ws[2] if len(ws) == 3 else None)
        out.append((str(path), _weight_text(weight)))
    return out


def apply_recorded(args: argparse.Namespace, params: dict, where: str,
                   numbers: dict[str, Callable[[str], object]]) -> None:
    """Fill every sampling option that this command line left unset from the record (given ones win); every
    recorded value is checked first (``check_record``), as its flag would be."""
    params = check_record(params, where, numbers)

    def fill(name: str, value) -> None:
        if getattr(args, name, None) in (None, []) and value is not None:
            setattr(args, name, value)

    fill("checkpoint", params.get("checkpoint"))
    fill("embedding", params.get("embeddings"))
    if not args.lora and params.get("loras"):
        args.lora = [f"{p}:{w.te!r}:{w.unet!r}" if isinstance(w, TagWeight) else f"{p}:{w!r}"
                     for p, w in params["loras"]]
        args.lora_blocks = [f"{p}={w.lbw}" for p, w in params["loras"] if isinstance(w, TagWeight) and w.lbw]
        args.force = args.force or bool(params.get("force"))
    for name in ("sampler", "steps", "guidance", "eta", "seed", "negative", "bf16"):
        fill(name, params.get(name))
    args.merged = bool(getattr(args, "merged", False) or params.get("merged"))
    if args.prompt is None and args.digits is None:
        if params.get("prompts"):
            fill("prompt", params["prompts"])
            fill("num", params.get("num"))
        elif params.get("digits") is not None:
            args.digits = ",".join(map(str, params["digits"]))
            fill("per_digit", params.get("per_digit"))


def summary_line(params: dict, why: str | None = None) -> str:
    """One line: everything the run used (what `sample` prints); ``why``: the reason for its precision."""
    items = _lora_items(params)
    loras = ", ".join(f"{p}:{w}" for p, w in items)
    if params.get("prompts"):  # adapters loaded by <lora:...> tags act as much as --lora ones: name them
        given = set(items)  # a tag repeating a --lora is that adapter
        rows = prompt_loras(list(params["prompts"]))[1]  # rows may carry different tags: each named once
        named = dict.fromkeys((n, _weight_text(w)) for row in rows for n, w in row.items())
        tagged = ", ".join(f"{n}:{w}" for n, w in named if (n, w) not in given)
        loras = ", ".join(x for x in (loras, tagged and f"{tagged} (prompt tags)") if x)
    loras = loras or "none"
    what = (f"prompts {params['prompts']} x {params['num']}" if params.get("prompts")
            else f"digits {','.join(map(str, params['digits']))} x {params['per_digit']}")
    neg = f", negative {params['negative']!r}" if params.get("negative") is not None else ""
    precision = ("bf16" if params["bf16"] else "fp32") + (f" ({why})" if why else "") + (
        ", adapters merged" if params.get("merged") else "")
    return (f"sample: model {params['checkpoint'] or 'the shipped base'}, loras {loras}, sampler "
            f"{params['sampler']}, steps {params['steps'] or 'all'}, guidance {params['guidance']:g}, "
            f"eta {params['eta']:g}, seed {params['seed']}, {what}{neg}, {precision} on {params['device']}")


def a1111_parameters(params: dict, size: int) -> str:
    """AUTOMATIC1111's "parameters" text: the prompt (LoRAs as <lora:name:w> tags), then the settings."""
    tags = " ".join(f"<lora:{Path(p).name or p}:{w}>" for p, w in _lora_items(params))
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
