"""The commands around the models: list and info (what is shipped or in a folder), demo (an offline HTML
report) and serve (a local web page)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from lora4diffusion import quick
from lora4diffusion.cli.args import per_digit_int, positive_int
from lora4diffusion.cli.common import Commands, claim, renamed
from lora4diffusion.demo import PromptOptions, format_summary, run_demo
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.inventory import format_info, format_listing, info, listing
from lora4diffusion.web.server import ServeConfig, create_app, serve


def add_list_info(sub: Commands) -> None:
    """list, info."""
    ls = sub.add_parser("list", help="shipped models, VAEs and adapters (and those in given folders)")
    ls.add_argument("folders", nargs="*", metavar="PATH", help="also list these: a model, VAE or adapter"
                    " (folder or file) is listed itself, another folder by what it holds")
    ls.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ls.set_defaults(func=cmd_list)

    nf = sub.add_parser("info", help="everything a model's, VAE's or adapter's metadata says")
    nf.add_argument("item", metavar="PATH|NAME", help="a folder, an adapter file or a shipped name")
    nf.add_argument("--checkpoint", metavar="DIR|NAME", help="for an adapter: say whether it fits this base")
    nf.add_argument("--json", action="store_true", help="print JSON")
    nf.set_defaults(func=cmd_info)


def add_demo(sub: Commands) -> None:
    dm = sub.add_parser("demo", help="base vs triggered LoRA, trigger specificity, weights, two adapters in"
                        " one prompt, merging: an offline HTML report")
    dm.add_argument("--out", default="runs/demo", help="report folder")
    dm.add_argument("--checkpoint", metavar="DIR|NAME",
                    help="base model, prompt or label model (default: the shipped base)")
    renamed(dm, "--base", "--checkpoint")
    dm.add_argument("--from-scratch", action="store_true",
                    help="train a prompt base first (preset fast, shipped VAE or --vae) into OUT/base")
    dm.add_argument("--vae", metavar="DIR", help="with --from-scratch: the VAE (default: the shipped one)")
    dm.add_argument("--bold-trigger", metavar="WORD", help="prompt bases: the bold adapter's trigger (sks)")
    dm.add_argument("--italic-trigger", metavar="WORD",
                    help="prompt bases: the italic adapter's trigger (ohwx)")
    dm.add_argument("--prior", action=argparse.BooleanOptionalAction, default=None,
                    help="prompt bases: train-lora --prior, prior preservation (default on)")
    dm.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=None,
                    help="prompt bases: train-lora --text-encoder, LoRA on the text encoder too (default on)")
    dm.add_argument("--overwrite", action="store_true", help="replace the demo already in --out")
    dm.add_argument("--lora-steps", type=positive_int, metavar="N",
                    help="training steps per LoRA (default: train-lora's: 750 on a prompt base with a"
                    " trigger, 500 on a label base)")
    dm.add_argument("--per-digit", type=per_digit_int, metavar="N", help="samples per digit (default 8)")
    dm.add_argument("--steps", type=positive_int, metavar="N", help="DDIM sampling steps (default 10)")
    dm.add_argument("--scratch-preset", choices=["tiny", "fast"], default="fast", help=argparse.SUPPRESS)
    dm.set_defaults(func=cmd_demo)


def add_serve(sub: Commands) -> None:
    sv = sub.add_parser("serve", help="a local web page: prompt, slide LoRA weights, watch digits denoise")
    sv.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    sv.add_argument("--adapters", help="folder of adapter directories, listed on the page; trained adapters"
                    " are written there (default: shipped adapters only, trained ones kept for the session)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=7860, help="TCP port")
    sv.add_argument("--queue", type=positive_int, default=8, help="waiting jobs before answering 429")
    sv.set_defaults(func=cmd_serve)


def cmd_list(args: argparse.Namespace) -> int:
    """Exit 0 when anything was listed; an item that cannot be read is a row saying why (and counted on
    stderr), so one damaged folder never hides the others. Only unreadable rows: exit 2."""
    rows = listing(args.folders)
    print(json.dumps(rows, indent=2) if args.json else format_listing(rows))
    bad = sum("problem" in r for r in rows)
    if bad:
        print(f"lora4diffusion list: {bad} item(s) could not be read (marked 'problem' / 'not readable')",
              file=sys.stderr)
    return 2 if bad and bad == len(rows) else 0


def cmd_info(args: argparse.Namespace) -> int:
    data = info(args.item, checkpoint=args.checkpoint)
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    sizes = {k: v for k, v in (("per_digit", args.per_digit), ("steps", args.steps)) if v is not None}
    claim(Path(args.out))  # one writer at a time in --out (a second demo there is refused, naming this one)
    try:
        result = run_demo(
            args.out,
            base=args.checkpoint,
            from_scratch=args.from_scratch,
            overwrite=args.overwrite,
            lora_steps=args.lora_steps,
            scratch_preset=args.scratch_preset,
            progress=not args.quiet,
            vae=args.vae,
            prompt_options=PromptOptions(
                args.bold_trigger, args.italic_trigger, args.prior, args.text_encoder
            ),
            device=args.device,
            bf16=args.bf16,
            **sizes,
        )
    except KeyboardInterrupt:  # training runs saved resumable checkpoints; no report was written
        print("lora4diffusion: demo interrupted, no report written", file=sys.stderr)
        return 130
    print(format_summary(result))
    print(f"report: {result['report']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # starlette/uvicorn are dependencies; a partial install names what is missing
        raise UserError(f"serve needs starlette and uvicorn (No module named {missing[0]!r});"
                        " pip install starlette uvicorn")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    resolve_device(args.device)  # --device cuda without CUDA: refused before the model loads
    cfg = ServeConfig(checkpoint=args.checkpoint, adapters=args.adapters, device=args.device,
                      bf16=args.bf16, max_queue=args.queue,  # None: the device's default (precision.py)
                      train_lora_options=args.train_lora_options)
    if quick.enabled():  # LORA4DIFFUSION_QUICK (the README test): it starts; no waiting for a browser
        state = create_app(cfg).state.serve  # the model and adapters load; no worker thread was started
        if state.tmp_adapters is not None:
            shutil.rmtree(state.tmp_adapters, ignore_errors=True)
        print(f"{quick.ENV}: serve would listen on http://{args.host}:{args.port}/, sampling in"
              f" {state.engine.precision} (not started)")
        return 0
    serve(cfg, host=args.host, port=args.port)
    return 0
