"""The command line: a thin layer over the Python API (train.train_base, pipeline.Pipeline, ...).

Every named bad input raises UserError somewhere below; here it becomes one line on stderr and exit status 2,
before anything is written.

Exit statuses: 0 done; 1 training diverged (non-finite loss) or an unexpected error; 2 bad input (nothing
written); 75 interrupted (SIGTERM or Ctrl-C) with a resumable checkpoint written: continue with --resume
(75 is sysexits' EX_TEMPFAIL, "try again later"); 130 / 143 stopped by Ctrl-C / SIGTERM with nothing to
resume (nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from lora4diffusion import __version__
from lora4diffusion.args import (
    add_loras,
    batch_int,
    bounded_int,
    finite_float,
    fraction_float,
    image_size_int,
    learning_rate,
    lora_args,
    nonneg_float,
    out_dir,
    per_digit_int,
    positive_int,
    rank_int,
    seed_int,
    unit_float,
)
from lora4diffusion.errors import UserError

log = logging.getLogger("lora4diffusion")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 75


WORKFLOW = """\
commands in workflow order: train-vae -> train -> sample, evaluate -> train-lora -> merge, extract, resize
  -> export-*/import-* (diffusers, kohya, PEFT) -> list, info -> demo, serve

examples:
  lora4diffusion sample --digits 3,5,7 --lora bold:0.5 --out samples   # the shipped base + a shipped adapter
  lora4diffusion train-lora --style italic --out runs/italic          # ~1 min on 2 CPU cores
  lora4diffusion list                                                 # what is shipped (models, adapters)

-q/--quiet, --threads N and, where a model runs, --device and --bf16/--no-bf16 go before or after the
command. `lora4diffusion COMMAND --help` lists a command's options with their defaults and choices.
"""

# commands that run a model: they take --device and --bf16/--no-bf16 (added in build_parser's last loop)
MODEL_COMMANDS = ("train-vae", "train", "sample", "evaluate", "train-lora", "merge", "extract",
                  "train-classifier", "reconstruct", "serve", "demo")
BF16_HELP = ("bf16 autocast (default: on where the device supports it: CUDA with bf16, CPUs with bf16"
             " kernels; the master weights stay fp32)")
DEVICE_HELP = "auto (the default): CUDA if available, else CPU"


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


class _Renamed(argparse.Action):
    """An old spelling kept for one release: hidden from --help, fills the new option, prints a note."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        kwargs.setdefault("nargs", None)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated and goes in the next release;"
              f" use {self.new}", file=sys.stderr)  # fmt: skip
        setattr(namespace, self.dest, values)


def _renamed(p: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Keep ``old`` as a hidden alias of ``new`` (same dest and type)."""
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_Renamed, new=new, **kwargs)


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
        _device_args(p, top=True)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora4diffusion", description=__doc__.splitlines()[0], epilog=WORKFLOW)
    p.add_argument("--version", action="version", version=f"lora4diffusion {__version__}")
    _global_args(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    from lora4diffusion import evaluate

    # workflow order: the order `lora4diffusion --help` lists them
    _add_train_vae(sub)
    _add_train(sub)
    _add_sample(sub)
    evaluate.add_parser(sub)
    _add_train_lora(sub)
    _add_merge(sub)
    _add_extract(sub)
    _add_resize(sub)
    _add_format_parsers(sub)
    _add_peft(sub)
    evaluate.add_classifier_parser(sub)
    _add_reconstruct(sub)
    _add_list_info(sub)
    _add_demo(sub)
    _add_serve(sub)
    p.commands = dict(sub.choices)
    for name, sp in sub.choices.items():  # the options every command shares
        _global_args(sp, top=False)
        if name in MODEL_COMMANDS:
            _device_args(sp)
    for name in ("merge", "extract"):  # weight arithmetic, not a forward pass: kept exact
        p.commands[name]._option_string_actions["--bf16"].help = (
            "accepted like every model command's; the arithmetic stays fp32 (merge) / fp64 (extract's SVD)"
        )
    p.commands["demo"]._option_string_actions["--bf16"].help = (
        "bf16 autocast for the adapters' (and --from-scratch base's) training, default on where the device"
        " supports it; the demo samples in fp32 so that merged vs unmerged is exact to 1e-5"
    )
    return p


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a base diffusion UNet on MNIST")
    t.add_argument("--preset", choices=["tiny", "fast", "base"], default="fast",
                   help="tiny: seconds, a smoke test | fast: the CPU recipe, ~12 min | base: the shipped one")
    t.add_argument("--out", required=True, help="run directory (checkpoints, logs, pictures)")
    t.add_argument(
        "--data", default="embedded", help="embedded (offline) | download | PATH to IDX files"
    )
    t.add_argument("--max-train-steps", type=positive_int, metavar="N",
                   help="training steps (default: the preset's: tiny 30, fast 1000, base 20000)")
    _renamed(t, "--steps", "--max-train-steps", type=positive_int)
    t.add_argument("--batch-size", type=batch_int, help="global batch (default: the preset's)")
    t.add_argument("--lr", type=learning_rate, help="peak learning rate (default: the preset's)")
    t.add_argument("--image-size", type=image_size_int,
                   help="train at this size (default 28, native; 32, 48 resized)")
    t.add_argument("--seed", type=seed_int, help="training seed (default 0)")
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    t.add_argument("--loss", choices=["mse", "l1"], default="mse", help="l1 is the reference's choice")
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument("--vae", metavar="DIR|NAME",
                   help="latent diffusion: denoise this VAE's latents (train-vae; default: pixels)")
    t.add_argument(
        "--conditioning", choices=["label", "text"], default="label",
        help="label: digit labels | text: prompts, a text encoder trained jointly (SD 1.x; needs"
        " --vae; presets tiny / fast ~10 min / base ~35 min, prompt_model.py)",
    )
    _run_dir_args(t)
    _compile_arg(t)
    t.set_defaults(func=cmd_train)


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="sample digits (or prompts) from a model, with adapters")
    s.add_argument("--checkpoint", metavar="DIR|NAME",
                   help="model or run directory, or a shipped model's name (default: the shipped base;"
                   " `lora4diffusion list`)")
    s.add_argument("--from", dest="from_file", metavar="PNG|NPZ",
                   help="re-run the exact sampling recorded in a samples.png / samples.npz (same pixels);"
                   " options given here override it")
    s.add_argument("--digits", help="e.g. 0-9 or 3,5,7 (default 0-9); prompt models: 'the digit 7', ...")
    s.add_argument("--per-digit", type=per_digit_int, metavar="N", help="samples per digit (default 8)")
    s.add_argument("--prompt", action="append", metavar="TEXT", help="prompt models: a prompt (repeatable)")
    s.add_argument("--num", type=per_digit_int, metavar="N", help="images per --prompt (default 8)")
    s.add_argument("--negative", metavar="TEXT", help="prompt models: replaces the empty prompt in guidance")
    s.add_argument("--sampler", choices=["ddim", "ddpm"], help="sampler (default ddim)")
    s.add_argument("--steps", type=positive_int, metavar="N",
                   help="sampling steps (default: 10 DDIM, 1000 DDPM)")
    s.add_argument("--guidance", type=nonneg_float,
                   help="classifier-free guidance scale w (default 1.25; 1 = none)")
    s.add_argument("--eta", type=unit_float, help="DDIM eta in [0, 1] (default 0: deterministic)")
    s.add_argument("--seed", type=seed_int, help="sampling seed (default 0)")
    s.add_argument("--trajectory", action="store_true",
                   help="also write trajectory.png: the denoising of the first sample of each digit (prompt)")
    s.add_argument("--out", required=True, help="output directory for samples.png and samples.npz")
    _overwrite_arg(s)
    lora_args(s)
    s.set_defaults(func=cmd_sample)


def _add_train_lora(sub) -> None:
    tl = sub.add_parser("train-lora", help="train a LoRA adapter that teaches the frozen base a style")
    tl.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    _renamed(tl, "--base", "--checkpoint")
    tl.add_argument("--style", required=True, help="bold | thin | italic | FOLDER (subfolders 0-9 of images)"
                    " | FILE.csv (rows: label, then 784 pixel values 0-255, as the MNIST CSVs)")
    tl.add_argument("--out", required=True, help="run directory; the adapter is OUT/adapter.safetensors")
    tl.add_argument("--max-train-steps", type=positive_int, metavar="N",
                    help="training steps (default: 500; on a prompt base 750, or 400 without --trigger)")
    _renamed(tl, "--steps", "--max-train-steps", type=positive_int)
    tl.add_argument("--rank", type=rank_int, help="LoRA rank r (default: 4; 16 on a prompt base)")
    tl.add_argument(
        "--alpha",
        type=finite_float(0.0, 1e4, low_open=True),
        help="LoRA alpha (default: = rank, i.e. scale 1)",
    )
    tl.add_argument(
        "--targets",
        help="preset (all-linear, the default | attention | reference | conv, combinable: attention+conv),"
        " module names/suffixes (to_q,to_v) or re:REGEX",
    )
    tl.add_argument("--init", choices=["normal", "kaiming"], default="normal",
                    help="init of A (B starts at 0)")
    tl.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    tl.add_argument("--dropout", type=fraction_float, default=0.0, help="LoRA dropout, in [0, 1)")
    tl.add_argument("--examples-per-digit", type=per_digit_int, metavar="N",
                    help="few-shot: train on N examples per digit (default: every example)")
    _renamed(tl, "--per-digit", "--examples-per-digit", type=per_digit_int)
    tl.add_argument("--data", default="embedded", help="MNIST source for the built-in styles")
    tl.add_argument("--lr", type=learning_rate, help="learning rate (default 2e-3)")
    tl.add_argument("--batch-size", type=batch_int, help="batch (default 64)")
    tl.add_argument("--ema", type=fraction_float,
                    help="EMA decay of the adapter weights (default: off; 0.995 on a prompt base)")
    tl.add_argument("--seed", type=seed_int, help="training seed (default 0)")
    tl.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (for comparison)")
    tl.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    # LoRA on a prompt base (lora/prompt_lora.py): trigger words, prior preservation, text-encoder LoRA
    tl.add_argument("--trigger", metavar="WORD",
                    help="prompt bases: caption the styled digits with this reserved rare word (sks, ohwx,"
                    " ...)")
    tl.add_argument("--prior", action="store_true",
                    help="prompt bases: prior preservation: each step adds as many plain digits with"
                    " trigger-less captions (DreamBooth)")
    tl.add_argument("--prior-weight", type=finite_float(0.0, 1e3), default=1.0, metavar="W",
                    help="loss weight of the prior half of the batch")
    tl.add_argument("--text-encoder", action="store_true",
                    help="prompt bases: LoRA on the text encoder's attention and MLP too (kohya's lora_te)")
    tl.add_argument("--text-encoder-lr", type=learning_rate, metavar="LR",
                    help="learning rate of the text-encoder LoRA (default: --lr)")
    _run_dir_args(tl)
    _compile_arg(tl)
    tl.set_defaults(func=cmd_train_lora)


def _add_merge(sub) -> None:
    m = sub.add_parser("merge", help="merge adapters into the base and write a standalone checkpoint")
    m.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    m.add_argument("--out", required=True, help="folder for the merged model")
    _overwrite_arg(m)
    lora_args(m, required=True)
    m.set_defaults(func=cmd_merge)


def _add_extract(sub) -> None:
    ex = sub.add_parser("extract", help="extract a rank-r LoRA from a fully fine-tuned checkpoint (SVD)")
    ex.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    _renamed(ex, "--base", "--checkpoint")
    ex.add_argument("--tuned", required=True, help="the fine-tuned model directory")
    ex.add_argument("--rank", type=rank_int, required=True, help="rank of the extracted LoRA")
    ex.add_argument("--targets", default="all-linear",
                    help="modules to capture, as train-lora's --targets (the same default)")
    ex.add_argument("--out", required=True, help="folder for adapter.safetensors")
    _overwrite_arg(ex)
    ex.set_defaults(func=cmd_extract)


def _add_resize(sub) -> None:
    rs = sub.add_parser("resize", help="change an adapter's rank by SVD")
    rs.add_argument("--lora", required=True, help="adapter directory or file, or a shipped adapter's name")
    rs.add_argument("--rank", type=rank_int, required=True, help="the new rank")
    rs.add_argument("--out", required=True, help="folder for adapter.safetensors")
    _overwrite_arg(rs)
    rs.set_defaults(func=cmd_resize)


def _add_peft(sub) -> None:
    xp = sub.add_parser("export-peft", help="write an adapter in PEFT's layout")
    xp.add_argument("--lora", required=True, help="adapter directory or file, or a shipped adapter's name")
    xp.add_argument("--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    _overwrite_arg(xp)
    xp.set_defaults(func=cmd_export_peft)

    ip = sub.add_parser("import-peft", help="convert a PEFT LoRA adapter directory into ours")
    ip.add_argument("--peft", required=True, help="directory with adapter_config.json")
    ip.add_argument("--checkpoint", metavar="DIR|NAME",
                    help="base model to fingerprint the adapter against (default: the shipped base)")
    ip.add_argument("--out", required=True, help="folder for adapter.safetensors")
    _overwrite_arg(ip)
    ip.set_defaults(func=cmd_import_peft)


def _add_demo(sub) -> None:
    dm = sub.add_parser("demo", help="base vs triggered LoRA, trigger specificity, weights, two adapters in"
                        " one prompt, merging: an offline HTML report")
    dm.add_argument("--out", default="runs/demo", help="report folder")
    dm.add_argument("--checkpoint", metavar="DIR|NAME",
                    help="base model, prompt or label model (default: the shipped base)")
    _renamed(dm, "--base", "--checkpoint")
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


def _add_train_vae(sub) -> None:
    tv = sub.add_parser("train-vae", help="train the KL autoencoder (VAE) for latent diffusion")
    tv.add_argument("--out", default="runs/vae", help="VAE folder / run directory")
    tv.add_argument("--preset", choices=["tiny", "base"], default="base", help="tiny: a smoke test")
    tv.add_argument("--max-train-steps", type=positive_int, metavar="N",
                    help="training steps (default: the preset's)")
    _renamed(tv, "--train-steps", "--max-train-steps", type=positive_int)
    tv.add_argument("--batch-size", type=batch_int, help="batch (default: the preset's)")
    tv.add_argument("--lr", type=learning_rate, help="learning rate (default: the preset's)")
    tv.add_argument("--kl-weight", type=nonneg_float, help="weight of the KL term (default 1e-6, as LDM)")
    tv.add_argument("--no-augment", action="store_true", help="train on plain digits (no bold/thin/italic)")
    tv.add_argument("--data", default="embedded", help="embedded | download | PATH to IDX files")
    tv.add_argument("--seed", type=seed_int, help="training seed (default 0)")
    tv.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    _run_dir_args(tv)
    _compile_arg(tv)
    tv.set_defaults(func=cmd_train_vae)


def _add_reconstruct(sub) -> None:
    rc = sub.add_parser("reconstruct", help="encode and decode held-out digits with a VAE: what it keeps")
    rc.add_argument("--vae", metavar="DIR|NAME", help="VAE folder (default: the shipped VAE)")
    rc.add_argument("--style", help="restyle the digits first: bold | thin | italic (default: as drawn)")
    rc.add_argument("--digits", default="0-9", help="e.g. 0-9 or 3,5,7")
    rc.add_argument("--per-digit", type=per_digit_int, default=8, metavar="N",
                    help="held-out digits per class")
    rc.add_argument("--data", default="embedded", help="embedded | download | PATH to IDX files")
    rc.add_argument("--report", action="store_true",
                    help="also score every style (accuracy, ink, slant) into OUT/report.json")
    rc.add_argument("--out", required=True, help="directory for originals/reconstructions .npz and .png")
    rc.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    rc.set_defaults(func=cmd_reconstruct)


def _add_list_info(sub) -> None:
    ls = sub.add_parser("list", help="shipped models, VAEs and adapters (and those in given folders)")
    ls.add_argument("folders", nargs="*", metavar="FOLDER", help="also list what these folders hold")
    ls.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ls.set_defaults(func=cmd_list)

    nf = sub.add_parser("info", help="everything a model's, VAE's or adapter's metadata says")
    nf.add_argument("item", metavar="PATH|NAME", help="a folder, an adapter file or a shipped name")
    nf.add_argument("--checkpoint", metavar="DIR|NAME", help="for an adapter: say whether it fits this base")
    nf.add_argument("--json", action="store_true", help="print JSON")
    nf.set_defaults(func=cmd_info)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="a local web page: prompt, slide LoRA weights, watch digits denoise")
    sv.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    sv.add_argument("--adapters", help="folder of adapter directories, listed on the page; trained adapters"
                    " are written there (default: shipped adapters only, trained ones kept for the session)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=7860, help="TCP port")
    sv.add_argument("--queue", type=positive_int, default=8, help="waiting jobs before answering 429")
    sv.set_defaults(func=cmd_serve)


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out (its files may be replaced)"
    )


def _run_dir_args(p: argparse.ArgumentParser) -> None:
    """--overwrite and --allow-changes for the training commands (with --resume)."""
    _overwrite_arg(p)
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue although settings or data differ from the run's (named in the error)",
    )


def _existing(*paths) -> tuple[Path, ...]:
    """The arguments that name existing files or folders: inputs --out must not be written over."""
    return tuple(Path(p) for p in paths if p and Path(p).exists())


def _lora_inputs(items: list[str]) -> tuple[Path, ...]:
    from lora4diffusion.args import parse_loras
    from lora4diffusion.lora.adapters import resolve_adapter

    return tuple(resolve_adapter(path) for path, _ in parse_loras(items))


def _train_out(args: argparse.Namespace, inputs: tuple) -> Path:
    """--out of train / train-lora: --resume continues the run there, --overwrite starts over."""
    from lora4diffusion import runlock
    from lora4diffusion.training.run import STATE_NAME

    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if args.allow_changes and not args.resume:
        raise UserError("--allow-changes only applies with --resume")
    p = Path(args.out)
    if p.is_dir():
        runlock.check_free(p)
        if not args.resume and not args.overwrite and (p / STATE_NAME).is_file():
            raise UserError(
                f"--out {p} already holds a training run; pass --resume to continue it, --overwrite to"
                " start over, or pick another --out"
            )
    if args.resume and not (p / STATE_NAME).is_file():
        raise UserError(f"--resume: no training state at {p / STATE_NAME} (start the run without --resume)")
    return out_dir(p, overwrite=args.overwrite or args.resume, inputs=inputs)


class _StopSignals:
    """The CLI's SIGTERM / Ctrl-C handling for training (library code installs no handlers).

    Once the training loop runs (it polls this object between steps), the first signal asks it to stop at
    the next step boundary with a resumable checkpoint. Before that (loading data, building the model), or
    on a second signal, KeyboardInterrupt is raised at once. Background jobs (`nohup ... &`) ignore SIGINT:
    that is kept.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.polled = False
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if not (self.polled and first):
            raise KeyboardInterrupt

    def __call__(self) -> bool:
        self.polled = True
        return self.signum is not None


def _train_with_signals(fn, out: Path, *args, **kwargs) -> tuple[dict | None, int]:
    """Run train_base/train_lora with SIGTERM/Ctrl-C wired to its stop request -> (summary, exit status).

    Interrupted with a resumable checkpoint: EXIT_INTERRUPTED (75). Stopped before anything was written:
    128 + the signal number (130 Ctrl-C, 143 SIGTERM), as a shell reports a process killed by it.
    """
    from lora4diffusion.training.run import STATE_NAME

    with _StopSignals() as stop:
        try:
            summary = _run_training(fn, *args, should_stop=stop, **kwargs)
        except KeyboardInterrupt:  # raised before the loop polled (or by a second signal)
            summary = {"interrupted": True, "checkpoint": (out / STATE_NAME).is_file(), "early": True}
    if summary is None or not summary["interrupted"]:
        return summary, EXIT_OK
    if not summary["checkpoint"]:
        sig = signal.Signals(stop.signum or signal.SIGINT)
        print(f"lora4diffusion: stopped by {sig.name} before training started; nothing to resume in {out}",
              file=sys.stderr)  # fmt: skip
        return None, 128 + sig
    if summary.get("early"):
        print(f"lora4diffusion: interrupted; continue the run in {out} with --resume", file=sys.stderr)
        return None, EXIT_INTERRUPTED
    return summary, EXIT_INTERRUPTED


def _device_args(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--device and --bf16/--no-bf16, the same choices and defaults in every command that runs a model."""
    keep = argparse.SUPPRESS  # in a command: a value given before the command name is kept
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto" if top else keep,
                   help=DEVICE_HELP)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None if top else keep,
                   help=BF16_HELP)


def _compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")


def _bf16(args: argparse.Namespace, device) -> bool:
    """--bf16/--no-bf16, or (neither given) whether ``device`` has bf16 kernels."""
    from lora4diffusion.distributed import bf16_supported

    return bf16_supported(device) if args.bf16 is None else bool(args.bf16)


def _run_training(fn, *args, **kwargs) -> dict | None:
    """Run train_base/train_lora; None on ranks other than 0 (under torchrun rank 0 reports)."""
    from lora4diffusion import distributed

    try:
        result = fn(*args, **kwargs)
        main = distributed.is_main()
    finally:
        distributed.cleanup()
    return result if main else None


def cmd_train(args: argparse.Namespace) -> int:
    from lora4diffusion.training.base import train_base

    if args.conditioning == "text":  # prompt-conditioned latent base (prompt_model.py)
        from lora4diffusion.training.prompt_base import train_prompt_base as train_base
    out = _train_out(args, inputs=_existing(args.data))
    summary, status = _train_with_signals(
        train_base,
        out,
        args.preset,
        out,
        data=args.data,
        steps=args.max_train_steps,
        resume=args.resume,
        image_size=args.image_size,
        diffusion_overrides={"schedule": args.schedule, "loss": args.loss},
        progress=not args.quiet,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bf16=args.bf16,  # None: the preset's (on), used where the device supports it
        device=args.device,
        compile=args.compile,
        vae=args.vae,
        overwrite=args.overwrite,
        allow_changes=args.allow_changes,
    )
    if summary is None:
        return status
    state = "interrupted (resumable: --resume)" if summary["interrupted"] else "done"
    print(
        f"{state}: step {summary['step']}, loss {summary['loss']:.4f}, "
        f"{summary['train_seconds']:.0f} s of training; run directory {out}"
    )
    return status


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from lora4diffusion.catalog import pretrained_dir
    from lora4diffusion.checkpoint import atomic_write
    from lora4diffusion.data import parse_digits
    from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from lora4diffusion.distributed import resolve_device
    from lora4diffusion.pipeline import Pipeline
    from lora4diffusion.plots import grid_image, save_trajectory
    from lora4diffusion.reproduce import a1111_parameters, apply_recorded, read_parameters, summary_line

    if args.from_file is not None:  # the recorded settings fill every option not given on this command line
        apply_recorded(args, read_parameters(args.from_file))
    if args.prompt and args.digits is not None:
        raise UserError("--prompt and --digits: give one of them")
    if args.num is not None and not args.prompt:
        raise UserError("--num goes with --prompt (with --digits, use --per-digit)")
    sampler = args.sampler or "ddim"
    eta = 0.0 if args.eta is None else args.eta
    seed = 0 if args.seed is None else args.seed
    digits = parse_digits(args.digits or "0-9")
    model_dir = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=_existing(model_dir) + _lora_inputs(args.lora))
    device = resolve_device(args.device)
    bf16 = _bf16(args, device)
    pipe = Pipeline.load(args.checkpoint)
    prompts = None
    if pipe.is_prompt_model:
        from lora4diffusion.captions import digit_of, digit_prompts

        per_row = (args.num or 8) if args.prompt else (args.per_digit or 8)
        if args.prompt:
            prompts = [p for p in args.prompt for _ in range(per_row)]
        else:
            prompts = digit_prompts([d for d in digits for _ in range(per_row)])
        loras = add_loras(pipe, args)
        # <lora:...> tags load their adapters; bad tags, names and prompts (unknown word, too long) fail
        # here, before any sampling or writing
        stripped = pipe.apply_prompt_tags(prompts, force=args.force) if args.prompt else prompts
        pipe.tokenizer.encode(stripped + ([args.negative] if args.negative is not None else []))
        missing = pipe.missing_triggers(stripped)
        if missing:
            name, prompt = missing[0]
            words = ", ".join(pipe.triggers[name])
            log.warning("warning: adapter %r is loaded but its trigger (%s) is absent from prompt %r%s: it"
                        " was trained to act with it", name, words, prompt,
                        f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        labels = [digit_of(p) for p in prompts]
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
        "loras": [[str(p), w] for p, w, _ in loras], "force": bool(args.force),
        "sampler": sampler, "steps": steps, "guidance": guidance, "eta": eta, "seed": seed,
        "digits": None if args.prompt else digits, "per_digit": None if args.prompt else per_row,
        "prompts": list(args.prompt) if args.prompt else None, "num": per_row if args.prompt else None,
        "negative": args.negative, "bf16": bf16, "device": device.type, "version": __version__,
    }
    traj_every = max(1, (steps or pipe.diffusion.timesteps) // 10) if args.trajectory else 0
    images, trajectory = pipe.generate(
        prompts if prompts is not None else labels,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        seed=seed,
        eta=eta,
        trajectory_every=traj_every,
        bf16=bf16,
        progress=not args.quiet,
        negative=args.negative,
    )
    out.mkdir(parents=True, exist_ok=True)
    record = json.dumps(params, sort_keys=True)

    def write_png(tmp: Path) -> None:  # AUTOMATIC1111's "parameters" text chunk, plus ours for --from
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", a1111_parameters(params, pipe.image_size))
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
    print(summary_line(params))  # after the files: a closed stdout (`| head`) loses no work
    print(f"wrote {len(labels)} samples to {out / 'samples.png'} and {out / 'samples.npz'}")
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    from lora4diffusion.training.lora import LoRAConfig, default_lora_config, train_lora

    out = _train_out(args, inputs=_existing(args.checkpoint, args.style, args.data))
    rank = args.rank or default_lora_config(args.checkpoint).rank
    lora = LoRAConfig(
        rank=rank,
        alpha=float(rank) if args.alpha is None else args.alpha,
        targets=args.targets or LoRAConfig.targets,
        init=args.init,
        rslora=args.rslora,
        dropout=args.dropout,
    )
    r, status = _train_with_signals(
        train_lora,
        out,
        args.style,
        out,
        base=args.checkpoint,
        lora=lora,
        data=args.data,
        per_digit=args.examples_per_digit,
        resume=args.resume,
        full=args.full,
        progress=not args.quiet,
        steps=args.max_train_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        ema_decay=args.ema,
        bf16=args.bf16,
        device=args.device,
        compile=args.compile,
        overwrite=args.overwrite,
        allow_changes=args.allow_changes,
        trigger=args.trigger,
        prior=args.prior,
        prior_weight=args.prior_weight,
        text_encoder=args.text_encoder,
        text_encoder_lr=args.text_encoder_lr,
    )
    if r is None:
        return status
    what = "model" if args.full else "adapter"
    print(
        f"{'interrupted (resumable: --resume)' if r['interrupted'] else 'done'}: {what} in {out}, "
        f"step {r['step']}, {r['trainable_params']} trainable parameters ({100 * r['share']:.2f}% of the "
        f"base), {r['train_seconds']:.0f} s of training"
    )
    return status


def cmd_merge(args: argparse.Namespace) -> int:
    from lora4diffusion.catalog import pretrained_dir
    from lora4diffusion.finite import require_finite
    from lora4diffusion.folders.model import save_model
    from lora4diffusion.lora.layers import unload_lora
    from lora4diffusion.pipeline import Pipeline

    base = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=_existing(base) + _lora_inputs(args.lora))
    pipe = Pipeline.load(args.checkpoint).to(args.device)  # the merge is fp32 (exact): --bf16 is unused
    loras = add_loras(pipe, args)
    model = unload_lora(pipe.unet, merge=True)
    if pipe.is_prompt_model:  # text-encoder LoRA (train-lora --text-encoder) is merged into it as well
        unload_lora(pipe.text_encoder, merge=True)
    pipe.to("cpu")
    require_finite(model.state_dict(), "merge")  # an overflowing scale or adapter: no garbage checkpoint
    merged_from = [{"adapter": p, "scale": w, "name": n} for p, w, n in loras]
    extra = {"merged_from": merged_from, "base": pipe.config.get("base_path")}
    save_model(out, model, pipe.diffusion, extra, vae=pipe.vae, text=pipe.text)  # keeps its VAE / text parts
    print(f"merged {len(loras)} adapter(s) into {out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from lora4diffusion.catalog import pretrained_dir
    from lora4diffusion.distributed import resolve_device
    from lora4diffusion.finite import require_finite
    from lora4diffusion.folders.model import load_model
    from lora4diffusion.lora.adapters import base_fingerprint
    from lora4diffusion.lora.extract import extract_lora
    from lora4diffusion.training.lora import load_base

    base_dir = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=_existing(base_dir, args.tuned))
    device = resolve_device(args.device)
    base, _, _, _ = load_base(args.checkpoint)
    tuned, _, _ = load_model(Path(args.tuned))
    adapter, errors = extract_lora(base.to(device), tuned.to(device), args.rank, args.targets)  # SVD in fp64
    adapter.tensors = {k: v.cpu() for k, v in adapter.tensors.items()}
    adapter.fingerprint = base_fingerprint(base)
    require_finite(adapter.tensors, "extract")
    adapter.save(out)
    missed = int(errors.get("uncaptured", 0))
    note = (f"; {missed} changed tensor(s) outside --targets {args.targets} are not captured (counted in the"
            " error)") if missed else ""
    print(
        f"extracted rank-{args.rank} adapter ({len(adapter.modules)} modules) to {out}; "
        f"relative approximation error {errors['overall']:.4g}{note}"
    )
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from lora4diffusion.finite import require_finite
    from lora4diffusion.lora.adapters import resolve_adapter
    from lora4diffusion.lora.extract import resize_adapter

    out = out_dir(args.out, overwrite=args.overwrite, inputs=(resolve_adapter(args.lora),))
    adapter, errors = resize_adapter(args.lora, args.rank)
    require_finite(adapter.tensors, "resize")
    adapter.save(out)
    worst = max((v for k, v in errors.items() if k != "overall"), default=0.0)
    print(
        f"resized to rank {args.rank} in {out}; relative approximation error {errors['overall']:.4g} "
        f"overall, {worst:.4g} worst module"
    )
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    from lora4diffusion.lora.adapters import export_peft, resolve_adapter

    out = out_dir(args.out, overwrite=args.overwrite, inputs=(resolve_adapter(args.lora),))
    export_peft(args.lora, out)
    print(f"wrote PEFT adapter (adapter_config.json, adapter_model.safetensors) to {out}")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    from lora4diffusion.catalog import pretrained_dir
    from lora4diffusion.lora.adapters import import_peft
    from lora4diffusion.training.lora import load_base

    base = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=_existing(args.peft, base))
    base, _, _, _ = load_base(args.checkpoint)
    import_peft(args.peft, base_model=base).save(out)
    print(f"imported PEFT adapter into {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lora4diffusion.demo import PromptOptions, format_summary, run_demo

    sizes = {k: v for k, v in (("per_digit", args.per_digit), ("steps", args.steps)) if v is not None}
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


# ----- file formats (issue 12): diffusers folders, LoRA files in diffusers / kohya / PEFT layouts -----
def _add_format_parsers(sub) -> None:
    xd = sub.add_parser("export-diffusers", help="write a diffusers folder (UNet, scheduler, labels; a prompt"
                        " model: a whole StableDiffusionPipeline)")
    xd.add_argument("--checkpoint", help="model directory (default: the shipped base)")
    xd.add_argument("--out", required=True, help="folder for unet/, scheduler/, label_context.safetensors")
    xd.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    xd.set_defaults(func=cmd_export_diffusers)

    idf = sub.add_parser("import-diffusers", help="convert a diffusers folder to our model")
    idf.add_argument("folder", help="folder with unet/, scheduler/, label_context.safetensors, or a"
                     " StableDiffusionPipeline folder (model_index.json)")
    idf.add_argument("--out", required=True, help="model directory (config.json + model.safetensors)")
    idf.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    idf.set_defaults(func=cmd_import_diffusers)

    xl = sub.add_parser("export-lora", help="write an adapter as a diffusers, kohya or PEFT LoRA file")
    xl.add_argument("--lora", required=True, help="adapter (any layout we read) or a shipped adapter's name")
    xl.add_argument("--format", required=True, choices=["diffusers", "kohya", "peft"])
    xl.add_argument("--out", required=True, help="output folder")
    xl.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    xl.set_defaults(func=cmd_export_lora)


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    from lora4diffusion.catalog import pretrained_dir
    from lora4diffusion.formats.diffusers import export_diffusers
    from lora4diffusion.pipeline import Pipeline

    source = args.checkpoint or str(pretrained_dir())
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(source,))
    pipe = Pipeline.load(args.checkpoint)
    export_diffusers(pipe.unet, pipe.diffusion, out, source=args.checkpoint or "the shipped base",
                     vae=pipe.vae, text=pipe.text)
    parts = "unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json: StableDiffusionPipeline" \
        if pipe.is_prompt_model else "unet/, scheduler/, label_context.safetensors, README.md"
    print(f"wrote a diffusers folder ({parts}) to {out}")
    return 0


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    from lora4diffusion.formats.diffusers import import_diffusers

    out = out_dir(args.out, overwrite=args.overwrite, inputs=(args.folder,))
    import_diffusers(args.folder, out)
    print(f"imported {args.folder} into {out}")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from lora4diffusion.formats import detect, read_any, write_lora

    _, source = detect(args.lora)
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(source,))
    adapter = read_any(args.lora)
    title = source.parent.name if source.name == "adapter.safetensors" else source.stem if source.is_file() \
        else source.name
    written = write_lora(adapter, args.format, out, title=title or "adapter")
    print(f"wrote {args.format} LoRA ({len(adapter.modules)} modules) to {written}")
    return 0

def cmd_train_vae(args: argparse.Namespace) -> int:
    from lora4diffusion.training.vae import DEFAULT_KL_WEIGHT, train_vae

    out = _train_out(args, inputs=_existing(args.data))
    r, status = _train_with_signals(
        train_vae,
        out,
        out,
        preset=args.preset,
        data=args.data,
        resume=args.resume,
        progress=not args.quiet,
        kl_weight=DEFAULT_KL_WEIGHT if args.kl_weight is None else args.kl_weight,
        augment=not args.no_augment,
        device=args.device,
        compile=args.compile,
        steps=args.max_train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bf16=args.bf16,
        overwrite=args.overwrite,
        allow_changes=args.allow_changes,
    )
    if r is None:
        return status
    print(
        f"{'interrupted (resumable: --resume)' if r['interrupted'] else 'done'}: step {r['step']}, "
        f"loss {r['loss']:.4f}, scaling factor {r.get('scaling_factor', float('nan')):.5f}, "
        f"{r['train_seconds']:.0f} s of training; VAE folder {out}"
    )
    return status


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np

    from lora4diffusion.checkpoint import write_json
    from lora4diffusion.data import parse_digits
    from lora4diffusion.distributed import resolve_device
    from lora4diffusion.folders.vae import load_vae
    from lora4diffusion.latents import check_encodable, reconstruct
    from lora4diffusion.plots import save_comparison
    from lora4diffusion.reconstruction import (
        format_reconstruction_report,
        heldout_digits,
        reconstruction_report,
    )

    digits = parse_digits(args.digits)
    inputs = (args.vae,) if args.vae else ()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    device = resolve_device(args.device)
    vae, _ = load_vae(args.vae)
    check_encodable(vae.cfg, 28, 28)  # MNIST's size, before any data is read
    images, labels = heldout_digits(args.style, args.per_digit, digits, data=args.data)
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16(args, device)):
        recons = reconstruct(vae.to(device), images).float()  # raises UserError before anything is written
    report = reconstruction_report(vae, data=args.data) if args.report else None
    originals = images.float() / 255
    out.mkdir(parents=True, exist_ok=True)
    for name, x in (("originals", originals), ("reconstructions", recons)):
        np.savez(out / f"{name}.npz", images=x.numpy().astype(np.float32), labels=labels.numpy())
    save_comparison(originals, recons, args.per_digit, out / "reconstructions.png")
    if report is not None:
        write_json(out / "report.json", report)
        print(format_reconstruction_report(report))
    err = float((recons - originals).abs().mean())
    print(f"reconstructed {len(labels)} digits (mean |error| {err:.4f}); wrote {out / 'reconstructions.png'},"
          f" originals.npz, reconstructions.npz{', report.json' if report else ''}")
    return 0

def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    """torch's CPU allocator raises a plain RuntimeError; CUDA's an OutOfMemoryError."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", ())
    return isinstance(e, MemoryError) or (oom and isinstance(e, oom)) or "can't allocate memory" in str(e)




def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lora4diffusion.web.server import ServeConfig, serve
    except ImportError as e:  # starlette/uvicorn are dependencies; a partial install names what is missing
        raise UserError(f"serve needs starlette and uvicorn ({e}); pip install starlette uvicorn") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    from lora4diffusion.distributed import resolve_device

    cfg = ServeConfig(checkpoint=args.checkpoint, adapters=args.adapters, device=args.device,
                      bf16=_bf16(args, resolve_device(args.device)), max_queue=args.queue)
    from lora4diffusion import quick

    if quick.enabled():  # LORA4DIFFUSION_QUICK (the README test): it starts; no waiting for a browser
        import shutil

        from lora4diffusion.web.server import create_app

        state = create_app(cfg).state.serve  # the model and adapters load; no worker thread was started
        if state.tmp_adapters is not None:
            shutil.rmtree(state.tmp_adapters, ignore_errors=True)
        print(f"{quick.ENV}: serve would listen on http://{args.host}:{args.port}/ (not started)")
        return 0
    serve(cfg, host=args.host, port=args.port)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from lora4diffusion.inventory import format_listing, listing

    rows = listing(args.folders)
    print(json.dumps(rows, indent=2) if args.json else format_listing(rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lora4diffusion.inventory import format_info, info

    data = info(args.item, checkpoint=args.checkpoint)
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from lora4diffusion import quick
    from lora4diffusion.distributed import keep_freed_memory
    from lora4diffusion.threads import configure_threads
    from lora4diffusion.training.run import NonFiniteLoss

    keep_freed_memory()
    configure_threads(args.threads)
    quick.shrink(args)  # LORA4DIFFUSION_QUICK: toy sizes (the README test)
    try:
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
