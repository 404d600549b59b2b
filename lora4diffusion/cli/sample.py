"""``lora4diffusion sample``: digits or prompts from a model, with adapters, into samples.png (with the
sampling settings recorded for ``--from``) and samples.npz."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL.PngImagePlugin import PngInfo

from lora4diffusion import __version__, xyz
from lora4diffusion.captions import digit_of, digit_prompts
from lora4diffusion.catalog import pretrained_dir
from lora4diffusion.checkpoint import atomic_write
from lora4diffusion.cli.args import (
    MAX_IMAGES,
    add_loras,
    guidance_float,
    lora_args,
    parse_loras,
    per_digit_int,
    positive_int,
    seed_int,
    unit_float,
)
from lora4diffusion.cli.common import (
    Commands,
    existing,
    log,
    lora_inputs,
    out_dir,
    overwrite_arg,
    precision,
)
from lora4diffusion.cli.embedding import embedding_args
from lora4diffusion.data import parse_digits
from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.limits import MAX_GUIDANCE
from lora4diffusion.lora.block_weights import lbw_factors
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.plots import grid_image, save_trajectory
from lora4diffusion.reproduce import (
    SAMPLERS,
    a1111_parameters,
    apply_recorded,
    lora_record,
    read_parameters,
    summary_line,
)

# The numeric sampling options and their types: the flags parse with them, and a sampling record read by
# --from goes through the same ones (reproduce.check_record): a value is checked alike wherever it comes from.
NUMBERS = {
    "per_digit": per_digit_int,
    "num": per_digit_int,
    "steps": positive_int,
    "guidance": guidance_float,  # 0 .. limits.MAX_GUIDANCE (measured)
    "eta": unit_float,
    "seed": seed_int,
}


def add_sample(sub: Commands) -> None:
    s = sub.add_parser("sample", help="sample digits (or prompts) from a model, with adapters")
    s.add_argument("--checkpoint", metavar="DIR|NAME",
                   help="model or run directory, or a shipped model's name (default: the shipped base;"
                   " `lora4diffusion list`)")
    s.add_argument("--from", dest="from_file", metavar="PNG|NPZ",
                   help="re-run the exact sampling recorded in a samples.png / samples.npz (same pixels);"
                   " options given here override it")
    s.add_argument("--digits", help="e.g. 0-9 or 3,5,7 (default 0-9); prompt models: 'the digit 7', ...")
    s.add_argument("--per-digit", type=NUMBERS["per_digit"], metavar="N",
                   help="samples per digit (default 8)")
    s.add_argument("--prompt", action="append", metavar="TEXT", help="prompt models: a prompt (repeatable)")
    s.add_argument("--num", type=NUMBERS["num"], metavar="N", help="images per --prompt (default 8)")
    s.add_argument("--negative", metavar="TEXT", help="prompt models: replaces the empty prompt in guidance")
    s.add_argument("--sampler", choices=SAMPLERS, help="sampler (default ddim)")
    s.add_argument("--steps", type=NUMBERS["steps"], metavar="N",
                   help="sampling steps (default: 10 DDIM, 1000 DDPM)")
    s.add_argument("--guidance", type=NUMBERS["guidance"],
                   help=f"classifier-free guidance scale w, 0-{MAX_GUIDANCE:g} (default 1.25; 1 = none)")
    s.add_argument("--eta", type=NUMBERS["eta"], help="DDIM eta in [0, 1] (default 0: deterministic)")
    s.add_argument("--seed", type=NUMBERS["seed"], help="sampling seed (default 0)")
    s.add_argument("--merged", action="store_true",
                   help="fold the adapters into the weights while sampling (each step costs the base's) and"
                   " restore them exactly afterwards; the digits differ from unmerged ones by rounding"
                   " (docs/RELIABILITY.md), so it is recorded and `--from` redraws the same")
    s.add_argument("--trajectory", action="store_true",
                   help="also write trajectory.png: the denoising of the first sample of each digit (prompt)")
    s.add_argument("--xyz", action="append", default=[], metavar="AXIS=V1,V2,...",
                   help="an X/Y/Z grid (A1111's X/Y/Z plot), up to 3 axes: steps, guidance, seed, eta,"
                   " sampler, digits, prompt, prompt_sr (search,replace1,...), lora:PATH, te:PATH, unet:PATH,"
                   " lbw:PATH (a --lora PATH); writes grid.png, each cell the `sample` of its settings")
    s.add_argument("--cell", metavar="X,Y[,Z]",
                   help="with --from GRID.png: re-draw that cell of a `sample --xyz` grid (counted from 1)")
    s.add_argument("--out", required=True, help="output directory for samples.png and samples.npz")
    overwrite_arg(s)
    lora_args(s, blocks=True)
    embedding_args(s)
    s.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    if args.cell is not None and args.from_file is None:
        raise UserError("--cell goes with --from GRID.png (a grid written by `sample --xyz`)")
    if args.from_file is not None:  # the recorded settings fill every option not given on this command line
        if args.cell is None and xyz.is_grid(args.from_file):
            raise UserError(f"--from {args.from_file} is an X/Y/Z grid: add --cell X,Y[,Z] (counted from 1)")
        record = (xyz.read_cell(args.from_file, args.cell) if args.cell is not None
                  else read_parameters(args.from_file))
        apply_recorded(args, record, f"--from {args.from_file}", NUMBERS)
    if args.prompt and args.digits is not None:
        raise UserError("--prompt and --digits: give one of them")
    if args.num is not None and not args.prompt:
        raise UserError("--num goes with --prompt (with --digits, use --per-digit)")
    per_call = len(args.prompt) * (args.num or 8) if args.prompt else 0
    if per_call > MAX_IMAGES:
        raise UserError(f"{len(args.prompt)} prompts x {args.num or 8} images: over the limit of {MAX_IMAGES}"
                        " images in one `sample` (larger sample sets do not fit in memory)")
    digits = _digits(args)
    axes = []
    if args.xyz:  # every axis checked before anything is read or written
        if args.trajectory:
            raise UserError("--trajectory goes with a plain `sample`, not --xyz")
        per_cell = per_call or 10 * (args.per_digit or 8)
        axes = xyz.parse_axes(args.xyz, NUMBERS, max_cells=min(xyz.MAX_CELLS, MAX_IMAGES // per_cell))
        xyz.check_axes(axes, args, parse_loras(args.lora))
        for spec in (v for a in axes if a.kind == "lbw" for v in a.values):
            lbw_factors(spec)  # a block-weight spec checked before any cell is drawn
    model_dir = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    # held until the command ends: a second `sample --out` there is refused, not merged (cli.common.out_dir)
    inputs = existing(model_dir, *args.embedding) + lora_inputs(args.lora)
    out = out_dir(args.out, overwrite=args.overwrite, inputs=inputs,
                  command="sample")
    return xyz_into(args, axes, out) if axes else sample_into(args, digits, out)


def _digits(args: argparse.Namespace) -> list[int]:
    try:
        return parse_digits("0-9" if args.digits is None else args.digits)
    except UserError as e:
        raise UserError(f"--digits: {e}") from None


class Drawn(NamedTuple):
    """One `sample`'s images and what it writes beside them."""

    images: torch.Tensor  # [N, H, W] in [0, 1]
    trajectory: list
    labels: list[int]
    prompts: list[str] | None
    per_row: int
    params: dict  # the sampling record (reproduce.py)
    why: str | None  # why this precision
    size: int


def sample_into(args: argparse.Namespace, digits: list[int], out: Path) -> int:
    """The sampling and writing of `sample`, its options checked, under --out's lock."""
    images, trajectory, labels, prompts, per_row, params, why, size = draw(args, digits)
    out.mkdir(parents=True, exist_ok=True)
    record = json.dumps(params, sort_keys=True)

    def write_png(tmp: Path) -> None:  # AUTOMATIC1111's "parameters" text chunk, plus ours for --from
        info = PngInfo()
        info.add_text("parameters", a1111_parameters(params, size))
        info.add_text("lora4diffusion", record)
        grid_image(images, per_row).save(tmp, format="PNG", pnginfo=info)

    atomic_write(out / "samples.png", write_png)
    arrays = {"images": images.numpy().astype(np.float32), "labels": np.array(labels, dtype=np.int64),
              "parameters": np.array(record, dtype=np.str_)}  # fixed-width unicode: no pickle on load
    if prompts is not None:
        arrays["prompts"] = np.array(prompts, dtype=np.str_)

    def write_npz(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)

    atomic_write(out / "samples.npz", write_npz)
    if args.trajectory:  # one row per asked digit (prompt): the first sample of each row of the grid
        rows = len(labels) // per_row
        save_trajectory([x[::per_row] for x in trajectory], out / "trajectory.png", max_rows=rows)
    print(summary_line(params, why))  # after the files: a closed stdout (`| head`) loses no work
    print(f"wrote {len(labels)} samples to {out / 'samples.png'} and {out / 'samples.npz'}")
    return 0


def draw(args: argparse.Namespace, digits: list[int]) -> Drawn:
    """The sampling of `sample` (and of each cell of `sample --xyz`): the model and adapters loaded, every
    option checked, the images drawn; nothing written."""
    sampler = args.sampler or "ddim"
    eta = 0.0 if args.eta is None else args.eta
    seed = 0 if args.seed is None else args.seed
    device = resolve_device(args.device)
    chosen = precision(args, device)
    bf16 = chosen.bf16
    pipe = Pipeline.load(args.checkpoint)
    prompts = None
    if pipe.is_prompt_model:
        per_row = (args.num or 8) if args.prompt else (args.per_digit or 8)
        if args.prompt:
            prompts = [p for p in args.prompt for _ in range(per_row)]
        else:
            prompts = digit_prompts([d for d in digits for _ in range(per_row)])
        for emb in args.embedding:  # before the adapters and tags: a tag's bundled token may be the same
            pipe.add_embedding(emb, force=args.force)
        loras = add_loras(pipe, args)
        # <lora:...> tags load their adapters; bad tags, names and prompts (unknown word, too long) fail
        # here, before any sampling or writing
        stripped = pipe.apply_prompt_tags(prompts, force=args.force) if args.prompt else prompts
        # a token in a prompt brings the embedding of that name from ./embeddings (as A1111's folder)
        pipe.load_prompt_embeddings(stripped + ([args.negative] if args.negative is not None else []),
                                    force=args.force)
        pipe.tokenizer.encode(stripped + ([args.negative] if args.negative is not None else []))
        missing = pipe.missing_triggers(stripped)
        if missing:
            name, prompt = missing[0]
            words = ", ".join(pipe.triggers[name])
            log.warning("warning: adapter %r is loaded but its trigger (%s) is absent from prompt %r%s: it"
                        " was trained to act with it", name, words, prompt,
                        f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        labels = [digit_of(p) for p in prompts]
    elif args.embedding:
        raise UserError(f"--embedding: {args.checkpoint or 'the shipped base'} is a label model (no text"
                        " encoder)")
    elif args.prompt or args.negative is not None:
        raise UserError(
            f"{args.checkpoint or 'the shipped base'} is a label model:"
            " it takes --digits, not --prompt/--negative"
        )
    else:
        per_row = args.per_digit or 8
        labels = [d for d in digits for _ in range(per_row)]
        loras = add_loras(pipe, args)
    pipe.to(device)
    steps = args.steps or (DEFAULT_STEPS if sampler == "ddim" else None)  # None: DDPM over every timestep
    if steps is not None and steps > pipe.diffusion.timesteps:
        raise UserError(f"--steps {steps} exceeds the model's {pipe.diffusion.timesteps} diffusion timesteps")
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    params = {
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "loras": [lora_record(p, w) for p, w, _ in loras], "force": bool(args.force),
        "embeddings": list(args.embedding) or None,
        "sampler": sampler, "steps": steps, "guidance": guidance, "eta": eta, "seed": seed,
        "digits": None if args.prompt else digits, "per_digit": None if args.prompt else per_row,
        "prompts": list(args.prompt) if args.prompt else None, "num": per_row if args.prompt else None,
        "negative": args.negative, "bf16": bf16, "merged": bool(args.merged) or None, "device": device.type,
        "version": __version__,
    }
    traj_every = max(1, (steps or pipe.diffusion.timesteps) // 10) if args.trajectory else 0
    images, trajectory = pipe.generate(
        prompts if prompts is not None else labels,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        seed=seed,
        eta=eta,
        merged=bool(args.merged),
        trajectory_every=traj_every,
        bf16=bf16,
        progress=not args.quiet,
        negative=args.negative,
    )
    return Drawn(images, trajectory, labels, prompts, per_row, params, chosen.why, pipe.image_size)


def xyz_into(args: argparse.Namespace, axes: list[xyz.Axis], out: Path) -> int:
    """`sample --xyz`: every cell drawn by ``draw`` (as a plain `sample` with its settings), written as one
    labelled grid.png whose text chunk holds each cell's record (``sample --from grid.png --cell X,Y``)."""
    loras = parse_loras(args.lora)
    sizes = []

    def cell(cell_args: argparse.Namespace) -> tuple[torch.Tensor, int, dict]:
        d = draw(cell_args, _digits(cell_args))
        sizes.append(d.size)
        return d.images, d.per_row, d.params

    once = _Once()  # a warning (an absent trigger word) said once for the grid, not once per cell
    log.addFilter(once)
    try:
        image, record = xyz.draw_grid(axes, args, loras, cell)
    finally:
        log.removeFilter(once)
    out.mkdir(parents=True, exist_ok=True)
    info = xyz.grid_pnginfo(record, sizes[0])
    atomic_write(out / "grid.png", lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    shape = " x ".join(str(len(a.values)) for a in axes)
    print(f"wrote a {shape} grid ({', '.join(a.label for a in axes)}) to {out / 'grid.png'}")
    return 0


class _Once(logging.Filter):
    """Lets each message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True
