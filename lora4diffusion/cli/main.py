"""The command line's parser and entry point: global options, dispatch to a command, errors -> exit status.

Every named bad input raises UserError somewhere below; here it becomes one line on stderr and exit status 2,
before anything is written. The exit statuses are listed in ``cli/common.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch

from lora4diffusion import __version__, quick
from lora4diffusion.cli.apps import add_demo, add_list_info, add_serve
from lora4diffusion.cli.args import bounded_int
from lora4diffusion.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, device_args, release_outputs
from lora4diffusion.cli.convert import (
    add_extract,
    add_format_parsers,
    add_merge,
    add_merge_lora,
    add_peft,
    add_resize,
)
from lora4diffusion.cli.embedding import add_embedding_formats, add_train_embedding
from lora4diffusion.cli.evaluate import add_evaluate, add_train_classifier
from lora4diffusion.cli.prepare import add_prepare_data
from lora4diffusion.cli.sample import add_sample
from lora4diffusion.cli.train import add_reconstruct, add_train, add_train_lora, add_train_vae
from lora4diffusion.distributed import keep_freed_memory, resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.threads import configure_threads
from lora4diffusion.training.run import NonFiniteLoss

DESCRIPTION = (
    "The command line: a thin layer over the Python API (training.base.train_base, pipeline.Pipeline, ...)."
)
WORKFLOW = """\
commands in workflow order: train-vae -> train -> sample, evaluate -> train-lora -> merge, merge-lora,
  extract, resize -> export-*/import-* (diffusers, kohya, PEFT) -> list, info -> demo, serve

examples:
  lora4diffusion sample --digits 3,5,7 --lora bold:0.5 --out samples   # the shipped base + a shipped adapter
  lora4diffusion train-lora --style italic --out runs/italic          # ~1 min on 2 CPU cores
  lora4diffusion list                                                 # what is shipped (models, adapters)

-q/--quiet, --threads N and, where a model runs, --device and --bf16/--no-bf16 go before or after the
command. `lora4diffusion COMMAND --help` lists a command's options with their defaults and choices.
"""

# commands that run a model: they take --device and --bf16/--no-bf16 (added in build_parser's last loop)
MODEL_COMMANDS = ("train-vae", "train", "sample", "evaluate", "train-lora", "merge", "extract",
                  "train-classifier", "reconstruct", "serve", "demo", "train-embedding")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, plus every option's default where its help does not already state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))  # 0 and 0.0 are shown
            or action.default == []
            or text == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    commands: dict | None = None  # the top-level parser's subcommand parsers (set in build_parser)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is reported by the command it was given to."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = (self.commands or {}).get(getattr(ns, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message: str):  # one line, exit 2 (argparse's own convention, minus the usage block)
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _global_args(p: argparse.ArgumentParser, top: bool) -> None:
    """-q, --threads (every command) and --device, --bf16 (top level; model commands add theirs): a value
    given after the command wins, one given before it is kept (the subcommand's defaults are SUPPRESS)."""
    keep = argparse.SUPPRESS
    p.add_argument("-q", "--quiet", action="store_true", default=False if top else keep,
                   help="no progress bars or info logs")
    p.add_argument("--threads", type=bounded_int(1, 4096, "threads"), metavar="N",
                   default=None if top else keep,
                   help="CPU threads for torch (default: the cores this process may use; docs/THREADS.md)")
    if top:
        device_args(p, top=True)


def option_table(p: argparse.ArgumentParser) -> dict[str, int | str | None]:
    """A command's option strings and how many values each takes (argparse's nargs; 0: a switch)."""
    return {flag: action.nargs for flag, action in p._option_string_actions.items()}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora4diffusion", description=DESCRIPTION, epilog=WORKFLOW)
    p.add_argument("--version", action="version", version=f"lora4diffusion {__version__}")
    _global_args(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    # workflow order: the order `lora4diffusion --help` lists them
    add_train_vae(sub)
    add_train(sub)
    add_sample(sub)
    add_evaluate(sub)
    add_prepare_data(sub)
    add_train_lora(sub)
    add_train_embedding(sub)
    add_merge(sub)
    add_merge_lora(sub)
    add_extract(sub)
    add_resize(sub)
    add_format_parsers(sub)
    add_embedding_formats(sub)
    add_peft(sub)
    add_train_classifier(sub)
    add_reconstruct(sub)
    add_list_info(sub)
    add_demo(sub)
    add_serve(sub)
    p.commands = dict(sub.choices)
    for name, sp in sub.choices.items():  # the options every command shares
        _global_args(sp, top=False)
        if name in MODEL_COMMANDS:
            device_args(sp)
    for name in ("merge", "extract"):  # weight arithmetic, not a forward pass: kept exact
        p.commands[name]._option_string_actions["--bf16"].help = (
            "accepted like every model command's; the arithmetic stays fp32 (merge) / fp64 (extract's SVD)"
        )
    p.commands["demo"]._option_string_actions["--bf16"].help = (
        "bf16 autocast for the adapters' (and --from-scratch base's) training, default on where the hardware"
        " has native bf16 (as every command: see train --help); the demo samples in fp32 so that merged vs"
        " unmerged is exact to 1e-5"
    )
    # serve's page starts train-lora runs: it offers the options this train-lora takes (web.training)
    p.commands["serve"].set_defaults(train_lora_options=option_table(p.commands["train-lora"]))
    return p


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    """torch's CPU allocator raises a plain RuntimeError; CUDA's an OutOfMemoryError."""
    oom = getattr(torch, "OutOfMemoryError", ())
    return isinstance(e, MemoryError) or (oom and isinstance(e, oom)) or "can't allocate memory" in str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    keep_freed_memory()
    configure_threads(args.threads)
    quick.shrink(args)  # LORA4DIFFUSION_QUICK: toy sizes (the README test)
    try:
        if args.command in MODEL_COMMANDS:  # --device cuda without CUDA: refused by every command, up front
            resolve_device(getattr(args, "device", "auto"))
        return args.func(args)
    except UserError as e:  # names the command: "lora4diffusion sample: error: ..."
        print(f"lora4diffusion {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:  # not a bad input: exit 1; the message says whether a checkpoint is kept
        print(f"lora4diffusion: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (sample, evaluate, ...): nothing was written
        print(f"lora4diffusion: {args.command} interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (MemoryError, RuntimeError) as e:  # within the flags' limits a small machine can still run out
        if not _out_of_memory(e):
            raise
        print(f"lora4diffusion: error: {args.command}: out of memory ({_first_line(e)[:120]}); lower"
              " --batch-size, --per-digit or --image-size", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    except BrokenPipeError:  # the reader went away (`evaluate ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit flush raises again
        return 1
    finally:
        release_outputs()  # the output folders' locks (cli/common.out_dir)
