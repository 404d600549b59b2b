"""The command line: a thin layer over the Python API (train.train_base, pipeline.Pipeline, ...).

Every named bad input raises UserError somewhere below; here it becomes one line on stderr and exit status 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lora4diffusion import __version__
from lora4diffusion.args import add_loras, lora_args, nonneg_float, out_dir, positive_int
from lora4diffusion.errors import UserError

log = logging.getLogger("lora4diffusion")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention, minus the usage block)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora4diffusion", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"lora4diffusion {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a base diffusion UNet on MNIST")
    t.add_argument("--preset", default="fast", help="tiny (seconds, smoke test) | fast (CPU recipe) | base")
    t.add_argument("--out", required=True, help="run directory (checkpoints, logs, pictures)")
    t.add_argument(
        "--data", default="embedded", help="embedded (default, offline) | download | PATH to IDX files"
    )
    t.add_argument("--steps", type=positive_int, help="override the preset's number of steps")
    t.add_argument("--batch-size", type=positive_int)
    t.add_argument("--lr", type=float)
    t.add_argument("--image-size", type=int, help="train at this size (28 native; 32, 48 resized)")
    t.add_argument("--seed", type=int)
    t.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is the default)")
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    t.add_argument("--loss", choices=["mse", "l1"], default="mse", help="l1 is the reference's choice")
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    _device_args(t, train=True)

    s = sub.add_parser("sample", help="sample digits from a model")
    s.add_argument("--checkpoint", help="model or run directory (default: the shipped base model)")
    s.add_argument("--digits", default="0-9", help="e.g. 0-9 or 3,5,7")
    s.add_argument("--per-digit", type=positive_int, default=8)
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--steps", type=positive_int, help="sampling steps (default: 20 DDIM, 1000 DDPM)")
    s.add_argument("--guidance", type=nonneg_float, help="classifier-free guidance scale w (1 = none)")
    s.add_argument("--eta", type=nonneg_float, default=0.0, help="DDIM eta (0 = deterministic)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (faster on CPUs with bf16, not bit-exact)"
    )
    s.add_argument("--trajectory", action="store_true", help="also write the denoising strip trajectory.png")
    s.add_argument("--out", required=True, help="output directory for samples.png and samples.npz")
    lora_args(s)
    _device_args(s)

    tl = sub.add_parser("train-lora", help="train a LoRA adapter that teaches the frozen base a style")
    tl.add_argument("--base", help="base model directory (default: the shipped base)")
    tl.add_argument("--style", required=True, help="bold | thin | italic | FOLDER (0-9) | FILE.csv")
    tl.add_argument("--out", required=True, help="run directory; the adapter is OUT/adapter.safetensors")
    tl.add_argument("--steps", type=positive_int)
    tl.add_argument("--rank", type=int, default=4)
    tl.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank, i.e. scale 1)")
    tl.add_argument(
        "--targets",
        help="preset (all-linear, the default | attention | reference | conv, combinable: attention+conv),"
        " module names/suffixes (to_q,to_v) or re:REGEX",
    )
    tl.add_argument("--init", choices=["normal", "kaiming"], default="normal")
    tl.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    tl.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    tl.add_argument("--per-digit", type=positive_int, help="few-shot: N examples per digit")
    tl.add_argument("--data", default="embedded", help="MNIST source for the built-in styles")
    tl.add_argument("--lr", type=float)
    tl.add_argument("--batch-size", type=positive_int)
    tl.add_argument("--ema", type=float, help="EMA decay of the adapter weights (default: off)")
    tl.add_argument("--seed", type=int)
    tl.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (for comparison)")
    tl.add_argument("--resume", action="store_true")
    _device_args(tl, train=True)
    tl.set_defaults(func=cmd_train_lora)

    m = sub.add_parser("merge", help="merge adapters into the base and write a standalone checkpoint")
    m.add_argument("--checkpoint", help="base model directory (default: the shipped base)")
    m.add_argument("--out", required=True)
    lora_args(m, required=True)
    m.set_defaults(func=cmd_merge)

    ex = sub.add_parser("extract", help="extract a rank-r LoRA from a fully fine-tuned checkpoint (SVD)")
    ex.add_argument("--base", help="base model directory (default: the shipped base)")
    ex.add_argument("--tuned", required=True, help="the fine-tuned model directory")
    ex.add_argument("--rank", type=positive_int, required=True)
    ex.add_argument("--targets", default="attention")
    ex.add_argument("--out", required=True)
    ex.set_defaults(func=cmd_extract)

    rs = sub.add_parser("resize", help="change an adapter's rank by SVD")
    rs.add_argument("--lora", required=True, help="adapter directory or file, or a shipped adapter's name")
    rs.add_argument("--rank", type=positive_int, required=True)
    rs.add_argument("--out", required=True)
    rs.set_defaults(func=cmd_resize)

    xp = sub.add_parser("export-peft", help="write an adapter in PEFT's layout")
    xp.add_argument("--lora", required=True, help="adapter directory or file, or a shipped adapter's name")
    xp.add_argument("--out", required=True)
    xp.set_defaults(func=cmd_export_peft)

    ip = sub.add_parser("import-peft", help="convert a PEFT LoRA adapter directory into ours")
    ip.add_argument("--peft", required=True, help="directory with adapter_config.json")
    ip.add_argument("--checkpoint", help="base model to fingerprint the adapter against (default: shipped)")
    ip.add_argument("--out", required=True)
    ip.set_defaults(func=cmd_import_peft)

    dm = sub.add_parser("demo", help="base vs LoRA, scale sweep, mixing, merging: an offline HTML report")
    dm.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    dm.add_argument("--base", help="base model directory (default: the shipped base)")
    dm.add_argument("--from-scratch", action="store_true", help="train a fast base first, into OUT/base")
    dm.add_argument("--overwrite", action="store_true", help="replace the demo already in --out")
    dm.add_argument("--lora-steps", type=positive_int, help="LoRA steps (default 500)")
    dm.add_argument("--per-digit", type=positive_int, help="samples per digit (default 8)")
    dm.add_argument("--steps", type=positive_int, help="DDIM sampling steps (default 20)")
    dm.add_argument("--scratch-preset", choices=["tiny", "fast"], default="fast", help=argparse.SUPPRESS)
    dm.set_defaults(func=cmd_demo)

    from lora4diffusion import evaluate

    evaluate.add_parser(sub)
    evaluate.add_classifier_parser(sub)
    t.set_defaults(func=cmd_train)
    s.set_defaults(func=cmd_sample)

    sv = sub.add_parser("serve", help="a local web page: prompt, slide LoRA weights, watch digits denoise")
    sv.add_argument("--checkpoint", help="base model directory (default: the shipped base)")
    sv.add_argument("--adapters", help="folder of adapter directories, listed on the page; trained adapters"
                    " are written there (default: shipped adapters only, trained ones kept for the session)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--queue", type=positive_int, default=8, help="waiting jobs before answering 429")
    _device_args(sv)
    sv.set_defaults(func=cmd_serve)
    return p


def _device_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto (default): CUDA if available, else CPU",
    )
    if train:
        p.add_argument("--compile", action="store_true", help="torch.compile the model for training")


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
    from lora4diffusion.train import train_base

    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    summary = _run_training(
        train_base,
        args.preset,
        out,
        data=args.data,
        steps=args.steps,
        resume=args.resume,
        image_size=args.image_size,
        diffusion_overrides={"schedule": args.schedule, "loss": args.loss},
        progress=not args.quiet,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bf16=False if args.no_bf16 else None,
        device=args.device,
        compile=args.compile,
    )
    if summary is None:
        return 0
    state = "interrupted" if summary["interrupted"] else "done"
    print(
        f"{state}: step {summary['step']}, loss {summary['loss']:.4f}, "
        f"{summary['train_seconds']:.0f} s of training; run directory {out}"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from lora4diffusion.data import parse_digits
    from lora4diffusion.distributed import resolve_device
    from lora4diffusion.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, Pipeline
    from lora4diffusion.plots import save_grid, save_trajectory

    digits = parse_digits(args.digits)
    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    device = resolve_device(args.device)
    pipe = Pipeline.load(args.checkpoint)
    add_loras(pipe, args)
    pipe.to(device)
    steps = args.steps or (DEFAULT_STEPS if args.sampler == "ddim" else None)
    if steps is not None and steps > pipe.diffusion.timesteps:
        raise UserError(f"--steps {steps} exceeds the model's {pipe.diffusion.timesteps} diffusion timesteps")
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    labels = [d for d in digits for _ in range(args.per_digit)]
    traj_every = max(1, (steps or pipe.diffusion.timesteps) // 10) if args.trajectory else 0
    images, trajectory = pipe.generate(
        labels,
        sampler=args.sampler,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        eta=args.eta,
        trajectory_every=traj_every,
        bf16=args.bf16,
        progress=not args.quiet,
    )
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, args.per_digit, out / "samples.png")
    np.savez(
        out / "samples.npz", images=images.numpy().astype(np.float32), labels=np.array(labels, dtype=np.int64)
    )
    if args.trajectory:
        save_trajectory(trajectory, out / "trajectory.png")
    print(f"wrote {len(labels)} samples to {out / 'samples.png'} and {out / 'samples.npz'}")
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    from lora4diffusion.lora.finetune import LoRAConfig, train_lora

    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    lora = LoRAConfig(
        rank=args.rank,
        alpha=float(args.rank) if args.alpha is None else args.alpha,
        targets=args.targets or LoRAConfig.targets,
        init=args.init,
        rslora=args.rslora,
        dropout=args.dropout,
    )
    r = _run_training(
        train_lora,
        args.style,
        out,
        base=args.base,
        lora=lora,
        data=args.data,
        per_digit=args.per_digit,
        resume=args.resume,
        full=args.full,
        progress=not args.quiet,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        ema_decay=args.ema,
        device=args.device,
        compile=args.compile,
    )
    if r is None:
        return 0
    what = "model" if args.full else "adapter"
    print(
        f"{'interrupted' if r['interrupted'] else 'done'}: {what} in {out}, step {r['step']}, "
        f"{r['trainable_params']} trainable parameters ({100 * r['share']:.2f}% of the base), "
        f"{r['train_seconds']:.0f} s of training"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lora4diffusion.checkpoint import save_model
    from lora4diffusion.lora.layers import unload_lora
    from lora4diffusion.pipeline import Pipeline

    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    pipe = Pipeline.load(args.checkpoint)
    loras = add_loras(pipe, args)
    model = unload_lora(pipe.unet, merge=True)
    merged_from = [{"adapter": p, "scale": w, "name": n} for p, w, n in loras]
    save_model(out, model, pipe.diffusion, {"merged_from": merged_from, "base": pipe.config.get("base_path")})
    print(f"merged {len(loras)} adapter(s) into {out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from lora4diffusion.checkpoint import load_model
    from lora4diffusion.lora.adapters import base_fingerprint, extract_lora
    from lora4diffusion.lora.finetune import load_base

    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    base, _, _, _ = load_base(args.base)
    tuned, _, _ = load_model(Path(args.tuned))
    adapter, errors = extract_lora(base, tuned, args.rank, args.targets)
    adapter.fingerprint = base_fingerprint(base)
    adapter.save(out)
    print(
        f"extracted rank-{args.rank} adapter ({len(adapter.modules)} modules) to {out}; "
        f"relative approximation error {errors['overall']:.4g}"
    )
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from lora4diffusion.lora.adapters import resize_adapter

    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    adapter, errors = resize_adapter(args.lora, args.rank)
    adapter.save(out)
    worst = max((v for k, v in errors.items() if k != "overall"), default=0.0)
    print(
        f"resized to rank {args.rank} in {out}; relative approximation error {errors['overall']:.4g} "
        f"overall, {worst:.4g} worst module"
    )
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    from lora4diffusion.lora.adapters import export_peft

    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    export_peft(args.lora, out)
    print(f"wrote PEFT adapter (adapter_config.json, adapter_model.safetensors) to {out}")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    from lora4diffusion.lora.adapters import import_peft
    from lora4diffusion.lora.finetune import load_base

    out = out_dir(args.out, overwrite=True)  # TODO(#14): --overwrite
    base, _, _, _ = load_base(args.checkpoint)
    import_peft(args.peft, base_model=base).save(out)
    print(f"imported PEFT adapter into {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lora4diffusion.demo import format_summary, run_demo

    sizes = {k: v for k, v in (("per_digit", args.per_digit), ("steps", args.steps)) if v is not None}
    try:
        result = run_demo(
            args.out,
            base=args.base,
            from_scratch=args.from_scratch,
            overwrite=args.overwrite,
            lora_steps=args.lora_steps,
            scratch_preset=args.scratch_preset,
            progress=not args.quiet,
            **sizes,
        )
    except KeyboardInterrupt:  # training runs saved resumable checkpoints; no report was written
        print("lora4diffusion: demo interrupted, no report written", file=sys.stderr)
        return 130
    print(format_summary(result))
    print(f"report: {result['report']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lora4diffusion.web.server import ServeConfig, serve
    except ImportError as e:  # starlette/uvicorn are dependencies; a partial install names what is missing
        raise UserError(f"serve needs starlette and uvicorn ({e}); pip install starlette uvicorn") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    serve(ServeConfig(checkpoint=args.checkpoint, adapters=args.adapters, device=args.device,
                      max_queue=args.queue), host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from lora4diffusion.distributed import keep_freed_memory
    from lora4diffusion.train import NonFiniteLoss

    keep_freed_memory()
    try:
        return args.func(args)
    except UserError as e:
        print(f"lora4diffusion: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:  # not a bad input: exit 1, the last good checkpoint is kept
        print(f"lora4diffusion: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`evaluate ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit flush raises again
        return 1
