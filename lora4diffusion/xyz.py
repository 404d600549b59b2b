"""X/Y/Z grids (AUTOMATIC1111's "X/Y/Z plot" script): one sampling setting per axis, one `sample` per cell,
the cells pasted into one PNG with the values written along its edges.

An axis is ``NAME=V1,V2,...`` (values as CSV: quote one that holds a comma). Names: ``steps``, ``guidance``
(``cfg``), ``seed``, ``eta``, ``sampler``, ``digits``, ``prompt`` (each value replaces the --prompt list),
``prompt_sr`` (A1111's "Prompt S/R": the first value is searched for in every prompt and the negative one,
each value replaces it; the first cell keeps the prompts as given), and per adapter given with ``--lora
PATH``: ``lora:PATH`` (its weight), ``te:PATH`` / ``unet:PATH`` (A1111's text-encoder / UNet weights) and
``lbw:PATH`` (LoRA Block Weight presets or number lists, as ``--lora-blocks``).

Each cell is drawn by the one function that draws a plain `sample` (the CLI passes it in), so a cell's pixels
are those of `sample` with the cell's settings; the PNG's ``lora4diffusion-xyz`` text chunk holds each cell's
sampling record (reproduce.py's) and its box, and ``read_cell`` returns a record for ``sample --from``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from lora4diffusion.checkpoint import check_readable, path_kind
from lora4diffusion.data import parse_digits
from lora4diffusion.errors import UserError
from lora4diffusion.limits import lora_weight
from lora4diffusion.plots import grid_image
from lora4diffusion.prompt_syntax import TagWeight
from lora4diffusion.reproduce import MAX_RECORD_CHARS, SAMPLERS, a1111_parameters

GRID_KEY = "lora4diffusion-xyz"
MAX_AXES = 3  # X, Y, Z, as A1111's script
MAX_CELLS = 64  # each cell is a whole `sample`: 64 of them already take minutes on a CPU
PLAIN = ("steps", "guidance", "seed", "eta", "sampler", "digits", "prompt", "prompt_sr")
PER_ADAPTER = ("lora", "te", "unet", "lbw")
ALIASES = {"cfg": "guidance"}
PAD = 6  # pixels around a label
GAP = 4  # white pixels between cells (and 4 x GAP between the grids of a Z axis)
MAX_LABEL_WIDTH = 240  # pixels: a longer Y or Z label (a prompt) is shortened

# Draws one cell: (settings as `sample`'s parsed arguments) -> (images [N, H, W] in [0, 1], images per row,
# the sampling record `sample` writes).
DrawCell = Callable[[argparse.Namespace], tuple[object, int, dict]]


@dataclass(frozen=True)
class Axis:
    """One ``--xyz``: ``kind`` (steps, lora, ...), the adapter PATH of a per-adapter axis, and its values
    as written (the labels)."""

    text: str
    kind: str
    target: str | None
    values: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}" if self.target is not None else self.kind


def parse_axes(items: list[str], numbers: dict[str, Callable[[str], object]], max_cells: int = MAX_CELLS
               ) -> list[Axis]:
    """Each ``--xyz NAME=V1,V2,...`` -> an Axis, every value checked as its flag checks it (``numbers``:
    `sample`'s table of argparse types); at most MAX_AXES axes and ``max_cells`` cells."""
    if len(items) > MAX_AXES:
        raise UserError(f"--xyz: {len(items)} axes, at most {MAX_AXES} (X, Y, Z)")
    axes = [_parse_axis(text, numbers) for text in items]
    labels = [a.label for a in axes]
    for label in labels:
        if labels.count(label) > 1:
            raise UserError(f"--xyz: axis {label!r} is given twice")
    cells = int(np.prod([len(a.values) for a in axes]))
    if cells > max_cells:
        raise UserError(f"--xyz: {' x '.join(str(len(a.values)) for a in axes)} = {cells} cells, over the"
                        f" limit of {max_cells} (each cell is a whole `sample`)")
    return axes


def _parse_axis(text: str, numbers: dict[str, Callable[[str], object]]) -> Axis:
    name, eq, rest = text.partition("=")
    kind, colon, target = name.strip().partition(":")
    kind = ALIASES.get(kind, kind)
    where = f"--xyz {text[:60]}"
    if not eq:
        raise UserError(f"{where}: write AXIS=V1,V2,... (axes: {', '.join(PLAIN)}, and lora:PATH, te:PATH,"
                        " unet:PATH, lbw:PATH for a --lora PATH)")
    if kind not in PLAIN + PER_ADAPTER or (kind in PER_ADAPTER) != bool(colon and target):
        raise UserError(f"{where}: unknown axis {name!r} (axes: {', '.join(PLAIN)}, and lora:PATH, te:PATH,"
                        " unet:PATH, lbw:PATH for a --lora PATH)")
    values = tuple(v.strip() for v in next(csv.reader([rest], skipinitialspace=True), []))
    if not values or any(not v for v in values):
        raise UserError(f"{where}: an empty value (write {name}=V1,V2,...)")
    if len(set(values)) != len(values):
        raise UserError(f"{where}: a value is given twice")
    if kind == "prompt_sr" and len(values) < 2:
        raise UserError(f"{where}: write prompt_sr=SEARCH,REPLACEMENT,... (the first value is searched for)")
    for v in values:
        try:
            if kind in numbers:
                numbers[kind](v)
            elif kind in ("lora", "te", "unet"):
                lora_weight(float(v), f"{where}: weight {v}")
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UserError(f"{where}: value {v[:40]!r}: {e}") from None
        if kind == "digits":
            try:
                parse_digits(v)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        if kind == "sampler" and v not in SAMPLERS:
            raise UserError(f"{where}: sampler {v!r} is not one of {', '.join(SAMPLERS)}")
    return Axis(text, kind, target if colon else None, values)


def check_axes(axes: list[Axis], args: argparse.Namespace,
               loras: list[tuple[str, float | TagWeight]]) -> None:
    """What an axis needs from the rest of the command line: an adapter axis a --lora of that PATH, a prompt
    axis --prompt (prompt_sr: a prompt holding its search text)."""
    paths = [p for p, _ in loras]
    for a in axes:
        if a.target is not None and a.target not in paths:
            raise UserError(f"--xyz {a.label}: {a.target!r} is not the PATH of a --lora (given:"
                            f" {', '.join(paths) or 'none'})")
        if a.kind in ("prompt", "prompt_sr") and not args.prompt:
            raise UserError(f"--xyz {a.kind}: give --prompt (a prompt model's prompts)")
        if a.kind == "digits" and args.prompt:
            raise UserError("--xyz digits: goes with digits, not --prompt (use a prompt axis)")
        if a.kind == "prompt_sr" and not any(a.values[0] in p for p in args.prompt):
            raise UserError(f"--xyz prompt_sr: {a.values[0]!r} is in no --prompt")


def cell_indices(axes: list[Axis]) -> list[tuple[int, int, int]]:
    """(x, y, z) of every cell, 0-based, z slowest then y then x (A1111's order: rows of X values)."""
    sizes = [len(a.values) for a in axes] + [1] * (MAX_AXES - len(axes))
    return [(x, y, z) for z, y, x in itertools.product(range(sizes[2]), range(sizes[1]), range(sizes[0]))]


def _lora_text(path: str, weight: float | TagWeight) -> str:
    return f"{path}:{weight.te!r}:{weight.unet!r}" if isinstance(weight, TagWeight) else f"{path}:{weight!r}"


def cell_args(args: argparse.Namespace, axes: list[Axis], index: tuple[int, int, int],
              loras: list[tuple[str, float | TagWeight]]) -> argparse.Namespace:
    """`sample`'s arguments for one cell: ``args`` with each axis's value at ``index`` set."""
    cell = copy.deepcopy(args)
    weights = dict(loras)
    blocks = list(getattr(args, "lora_blocks", None) or [])
    for axis, i in zip(axes, index, strict=False):
        v = axis.values[i]
        if axis.kind in ("steps", "guidance", "seed", "eta"):
            setattr(cell, axis.kind, float(v) if axis.kind in ("guidance", "eta") else int(v))
        elif axis.kind in ("sampler", "digits"):
            setattr(cell, axis.kind, v)
        elif axis.kind == "prompt":
            cell.prompt = [v]
        elif axis.kind == "prompt_sr":  # the replacement in every prompt and the negative one, as A1111's
            search = axis.values[0]
            cell.prompt = [p.replace(search, v) for p in cell.prompt]
            if cell.negative is not None:
                cell.negative = cell.negative.replace(search, v)
        elif axis.kind == "lbw":
            blocks = [b for b in blocks if b.rpartition("=")[0] != axis.target] + [f"{axis.target}={v}"]
        else:
            old = weights[axis.target]
            te, unet = (old.te, old.unet) if isinstance(old, TagWeight) else (old, old)
            w = float(v)
            weights[axis.target] = (w if axis.kind == "lora" else TagWeight(w, unet) if axis.kind == "te"
                                    else TagWeight(te, w))
    cell.lora = [_lora_text(p, weights[p]) for p, _ in loras]
    cell.lora_blocks = blocks
    return cell


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def draw_grid(axes: list[Axis], args: argparse.Namespace, loras: list[tuple[str, float | TagWeight]],
              draw_cell: DrawCell) -> tuple[Image.Image, dict]:
    """Every cell drawn by ``draw_cell``, pasted into one labelled image -> (image, record for the PNG)."""
    indices = cell_indices(axes)
    drawn = {}
    for index in indices:
        images, per_row, params = draw_cell(cell_args(args, axes, index, loras))
        drawn[index] = (grid_image(images, per_row), params)
    cw = max(im.width for im, _ in drawn.values())
    ch = max(im.height for im, _ in drawn.values())
    sizes = [len(a.values) for a in axes] + [1] * (MAX_AXES - len(axes))
    font = _font()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))

    def label(n: int, i: int) -> str:  # shortened with "..." to the width of a cell (X) or of a grid
        text = f"{axes[n].label}: {axes[n].values[i]}" if n < len(axes) else ""
        room = cw if n == 0 else MAX_LABEL_WIDTH
        while _text_size(probe, text, font)[0] > room and len(text) > 4:
            text = text[: -4] + "..."
        return text

    x_h = max((_text_size(probe, label(0, i), font)[1] for i in range(sizes[0])), default=0) + 2 * PAD
    y_w = max((_text_size(probe, label(1, i), font)[0] for i in range(sizes[1])), default=0) + 2 * PAD
    z_h = max((_text_size(probe, label(2, i), font)[1] for i in range(sizes[2])), default=0) + 2 * PAD
    y_w = y_w if len(axes) > 1 else 0
    z_h = z_h if len(axes) > 2 else 0
    px, py = cw + GAP, ch + GAP  # the pitch of the cells
    one_w, one_h = y_w + sizes[0] * px - GAP, z_h + x_h + sizes[1] * py - GAP  # one grid (one Z value)
    canvas = Image.new("L", (sizes[2] * one_w + (sizes[2] - 1) * 4 * GAP, one_h), 255)
    pen = ImageDraw.Draw(canvas)
    cells = []
    for z in range(sizes[2]):
        left = z * (one_w + 4 * GAP)
        if z_h:
            pen.text((left + PAD, PAD), label(2, z), fill=0, font=font)
        for x in range(sizes[0]):
            w, _ = _text_size(pen, label(0, x), font)
            pen.text((left + y_w + x * px + (cw - w) // 2, z_h + PAD), label(0, x), fill=0, font=font)
        for y in range(sizes[1] if y_w else 0):
            _, h = _text_size(pen, label(1, y), font)
            pen.text((left + PAD, z_h + x_h + y * py + (ch - h) // 2), label(1, y), fill=0, font=font)
        for y in range(sizes[1]):
            for x in range(sizes[0]):
                im, params = drawn[(x, y, z)]
                box = (left + y_w + x * px, z_h + x_h + y * py)
                canvas.paste(im, box)
                cells.append({"cell": [x + 1, y + 1, z + 1][: max(len(axes), 1)],
                              "box": [*box, im.width, im.height], "record": params})
    record = {"axes": [{"axis": a.label, "values": list(a.values)} for a in axes], "cells": cells}
    return canvas, record


def grid_pnginfo(record: dict, size: int) -> PngInfo:
    """The grid's text chunks: A1111's ``parameters`` (the first cell's, plus a line naming the axes) and
    ours: every cell's record and box."""
    info = PngInfo()
    axes = "; ".join(f"{a['axis']}: {', '.join(a['values'])}" for a in record["axes"])
    first = record["cells"][0]["record"]
    info.add_text("parameters", f"{a1111_parameters(first, size)}\nX/Y/Z plot: {axes}")
    info.add_text(GRID_KEY, json.dumps(record, sort_keys=True))
    return info


def parse_cell(text: str) -> tuple[int, ...]:
    """``--cell X,Y[,Z]``: positive integers, counted from 1 at the top left."""
    try:
        cell = tuple(int(v) for v in text.split(","))
    except ValueError:
        cell = ()
    if not 1 <= len(cell) <= MAX_AXES or min(cell) < 1:
        raise UserError(f"--cell {text[:40]}: write X,Y[,Z], each counted from 1 at the grid's top left")
    return cell


def read_cell(path: str | Path, text: str) -> dict:
    """The sampling record of cell ``text`` (X,Y[,Z]) of a grid written by ``sample --xyz``."""
    cell = parse_cell(text)
    p = Path(path)
    if path_kind(p) != "file":
        raise UserError(f"--from {path}: file not found")
    check_readable(p)
    try:
        with Image.open(p) as im:
            chunk = im.info.get(GRID_KEY)
    except (OSError, ValueError, SyntaxError, zlib.error, Image.DecompressionBombError):
        raise UserError(f"--from {p}: not a readable PNG") from None
    if not isinstance(chunk, str):
        raise UserError(f"--from {p} --cell: no X/Y/Z grid record (written by `sample --xyz`)")
    if len(chunk) > MAX_RECORD_CHARS * MAX_CELLS:
        raise UserError(f"--from {p}: the grid record holds {len(chunk)} characters, over the limit")
    try:
        record = json.loads(chunk)
        cells = {tuple(c["cell"]) + (1,) * (MAX_AXES - len(c["cell"])): c["record"] for c in record["cells"]}
    except (ValueError, RecursionError, KeyError, TypeError):
        raise UserError(f"--from {p}: the grid record is not one written by `sample --xyz`") from None
    key = cell + (1,) * (MAX_AXES - len(cell))
    if key not in cells:
        shape = "x".join(str(len(a.get("values", []))) for a in record.get("axes", []))
        raise UserError(f"--cell {text}: no such cell in this {shape} grid (counted from 1)")
    if not isinstance(cells[key], dict):
        raise UserError(f"--from {p}: cell {text}'s record is not a JSON object")
    return cells[key]


def is_grid(path: str | Path) -> bool:
    """Whether ``path`` is a PNG holding a grid record (for a message: `--from GRID` needs `--cell`)."""
    try:
        with Image.open(path) as im:
            return isinstance(im.info.get(GRID_KEY), str)
    except (OSError, ValueError, SyntaxError, zlib.error, Image.DecompressionBombError):
        return False
