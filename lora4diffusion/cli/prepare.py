"""prepare-data: see what a captioned folder trains on (datasets.py does the work)."""

from __future__ import annotations

import argparse
import sys

from lora4diffusion.cli.common import Commands, existing, out_dir, overwrite_arg
from lora4diffusion.datasets import read_captioned, write_prepared
from lora4diffusion.models.tokenizer import Tokenizer


def add_prepare_data(sub: Commands) -> None:
    pd = sub.add_parser(
        "prepare-data",
        help="captioned images (kohya or imagefolder layout) -> MNIST-like digits, a contact sheet",
    )
    pd.add_argument("folder", help="kohya's N_class folders with .txt/.caption captions, or metadata.jsonl")
    pd.add_argument("--out", required=True, help="where the processed images, contact_sheet.png, counts go")
    pd.add_argument("--trigger", help="warn about captions without this word")
    overwrite_arg(pd)
    pd.set_defaults(func=cmd_prepare_data)


def cmd_prepare_data(args: argparse.Namespace) -> int:
    data = read_captioned(args.folder, trigger=args.trigger, tokenizer=Tokenizer.load())
    out = out_dir(args.out, overwrite=args.overwrite, inputs=existing(args.folder), command="prepare-data")
    write_prepared(data, out)
    for note in data.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(data.summary())
    print(f"wrote {out}/images, {out}/metadata.jsonl, {out}/contact_sheet.png, {out}/counts.json")
    return 0
