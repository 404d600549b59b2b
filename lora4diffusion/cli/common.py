"""What the commands share: exit statuses, output folders, the option helpers, signals around training.

Exit statuses: 0 done; 1 training diverged (non-finite loss) or an unexpected error; 2 bad input (nothing
written); 75 interrupted (SIGTERM or Ctrl-C) with a resumable checkpoint written: continue with --resume
(75 is sysexits' EX_TEMPFAIL, "try again later"); 130 / 143 stopped by Ctrl-C / SIGTERM with nothing to
resume (nothing written).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from lora4diffusion import distributed, runlock
from lora4diffusion.cli.args import parse_loras
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import resolve_adapter
from lora4diffusion.precision import ENV as CPU_BF16_ENV
from lora4diffusion.precision import Precision, choose_precision
from lora4diffusion.training.run import STATE_NAME

log = logging.getLogger("lora4diffusion")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 75

BF16_HELP = ("bf16 autocast, the master weights fp32 (default: on where the hardware has native bf16: CUDA"
             " compute capability 8.0+, CPUs with avx512_bf16, amx_bf16 or ARM bf16; fp32 elsewhere, where"
             f" bf16 is slower; {CPU_BF16_ENV}=1|0 sets the CPU default)")
DEVICE_HELP = "auto (the default): CUDA if available, else CPU"
Commands = argparse._SubParsersAction  # what ArgumentParser.add_subparsers returns (add_parser)


# ------------------------------------------------------------------------------------------ output folders


_CLAIMED: list[runlock.RunLock] = []  # the output folders the running command holds (released by main)


def out_dir(path: str | Path, overwrite: bool = False, inputs: tuple[str | Path, ...] = (),
            command: str = "lora4diffusion process") -> Path:
    """An output directory: may not exist yet or be empty; a file there is refused.

    A directory that already holds files is refused unless ``overwrite`` (so a typo never replaces a model,
    an adapter or samples), and so is one that is, or lies inside, one of ``inputs`` (never write over what
    is being read). The command then holds the folder's run lock (runlock.py) until it ends
    (``release_outputs``, called by ``cli.main``): a second command writing there meanwhile is refused with
    one line naming the first, and the emptiness check is made under the lock, so of two commands started
    at once on one new folder exactly one writes it.
    """
    p = Path(path)
    if str(path) == "":
        raise UserError("--out is empty: name a directory")
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} is a file, not a directory")
    resolved = p.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if resolved == s or s in resolved.parents:
            raise UserError(f"--out {p} is the input {src}: write to another directory")
    if p.is_dir():
        runlock.check_free(p)  # a command running there: name it
    lock = claim(p, command)
    try:
        try:
            held = sorted(q.name for q in p.iterdir() if q.name != runlock.LOCK_NAME)
        except OSError as e:
            raise UserError(f"--out {p}: cannot read it ({e.strerror or e})") from None
        if held and not overwrite:
            names = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise UserError(f"--out {p} already holds files ({names}); pass --overwrite or choose another"
                            " --out")
    except BaseException:
        if lock is not None:
            _CLAIMED.remove(lock)
            lock.release()
        raise
    return p


def claim(p: Path, command: str = "lora4diffusion process") -> runlock.RunLock | None:
    """Take output folder ``p``'s run lock for the rest of the command (creating ``p``, after checking it
    can be written); None on torchrun ranks other than 0, which never write (rank 0 holds it for all)."""
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} is a file, not a directory")
    check_writable(p)
    if distributed.env_rank() != 0:
        return None
    lock = runlock.RunLock(p, command=command)  # the refusal of a second writer names it
    try:
        lock.acquire()  # UserError naming the holder while another live process holds it
    except OSError as e:
        raise UserError(f"--out {p}: cannot create it or its lock ({e.strerror or e})") from None
    _CLAIMED.append(lock)
    return lock


def release_outputs() -> None:
    """Release the locks ``out_dir`` took, last first (a folder the lock created and nothing was written
    into goes too: a refused or failed command leaves no empty folder)."""
    while _CLAIMED:
        _CLAIMED.pop().release()


def check_writable(path: Path) -> None:
    """Fail now, not after the work: create and remove a probe file in ``path`` or its nearest parent.

    A real probe, not os.access: it also catches read-only file systems and works for root.
    """
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {path}: cannot write there ({probe} is a file, not a directory)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lora4diffusion-probe-", dir=probe)
    except OSError as e:
        denied = "permission denied, " if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise UserError(f"--out {path}: {denied}cannot write in {probe} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def existing(*paths: str | Path | None) -> tuple[Path, ...]:
    """The arguments that name existing files or folders: inputs --out must not be written over."""
    return tuple(Path(p) for p in paths if p and Path(p).exists())


def lora_inputs(items: list[str]) -> tuple[Path, ...]:
    """The files of the ``--lora`` arguments: inputs --out must not be written over."""
    return tuple(resolve_adapter(path) for path, _ in parse_loras(items))


def train_out(args: argparse.Namespace, inputs: tuple) -> Path:
    """--out of train / train-lora: --resume continues the run there, --overwrite starts over."""
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


# ------------------------------------------------------------------------------------------ option helpers


class Renamed(argparse.Action):
    """An old spelling kept for one release: hidden from --help, fills the new option, prints a note."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        kwargs.setdefault("nargs", None)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated and goes in the next release;"
              f" use {self.new}", file=sys.stderr)  # fmt: skip
        setattr(namespace, self.dest, values)


def renamed(p: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Keep ``old`` as a hidden alias of ``new`` (same dest and type)."""
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=Renamed, new=new, **kwargs)


def overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out (its files may be replaced)"
    )


def run_dir_args(p: argparse.ArgumentParser) -> None:
    """--overwrite and --allow-changes for the training commands (with --resume)."""
    overwrite_arg(p)
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue although settings or data differ from the run's (named in the error)",
    )


def compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")


def device_args(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--device and --bf16/--no-bf16, the same choices and defaults in every command that runs a model."""
    keep = argparse.SUPPRESS  # in a command: a value given before the command name is kept
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto" if top else keep,
                   help=DEVICE_HELP)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None if top else keep,
                   help=BF16_HELP)


def precision(args: argparse.Namespace, device: torch.device) -> Precision:
    """--bf16/--no-bf16, or (neither given) ``device``'s default: precision.py decides, and says why."""
    return choose_precision(device, getattr(args, "bf16", None))


# ------------------------------------------------------------------------------------------ training runs


class StopSignals:
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

    def __enter__(self) -> StopSignals:
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


def train_with_signals(fn: Callable[..., dict], out: Path, *args, **kwargs) -> tuple[dict | None, int]:
    """Run train_base/train_lora with SIGTERM/Ctrl-C wired to its stop request -> (summary, exit status).

    Interrupted with a resumable checkpoint: EXIT_INTERRUPTED (75). Stopped before anything was written:
    128 + the signal number (130 Ctrl-C, 143 SIGTERM), as a shell reports a process killed by it.
    """
    with StopSignals() as stop:
        try:
            summary = run_training(fn, *args, should_stop=stop, **kwargs)
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


def run_training(fn: Callable[..., dict], *args, **kwargs) -> dict | None:
    """Run train_base/train_lora; None on ranks other than 0 (under torchrun rank 0 reports)."""
    try:
        result = fn(*args, **kwargs)
        main = distributed.is_main()
    finally:
        distributed.cleanup()
    return result if main else None
