"""``lora4diffusion evaluate`` (score samples, or a model's samples, with the MNIST classifier: accuracy,
FID in its feature space, ink) and ``train-classifier``. The metrics themselves are in ``evaluate.py``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lora4diffusion.captions import digit_prompts
from lora4diffusion.classifier import load_classifier, train_classifier
from lora4diffusion.cli.args import (
    add_loras,
    bounded_int,
    guidance_float,
    lora_args,
    per_digit_int,
    positive_int,
    seed_int,
)
from lora4diffusion.cli.common import Commands, out_dir, precision
from lora4diffusion.data import parse_digits
from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import evaluate_samples, format_report, load_samples, percent
from lora4diffusion.pipeline import Pipeline


def add_evaluate(subparsers: Commands) -> None:
    """Add ``evaluate`` to an argparse subparsers object; the parsed args carry ``func=run``."""
    p = subparsers.add_parser("evaluate", help="score samples with the MNIST classifier (accuracy, FID)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", metavar="PATH.npz", help="samples.npz written by `lora4diffusion sample`")
    src.add_argument("--checkpoint", metavar="DIR", help="model or run directory: sample first, then score")
    p.add_argument("--digits", help="digits to sample with --checkpoint (default 0-9)")
    p.add_argument("--per-digit", type=per_digit_int, help="samples per digit (default 100)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps with --checkpoint (default 10)")
    p.add_argument("--guidance", type=guidance_float, help="guidance with --checkpoint (default 1.25)")
    p.add_argument("--seed", type=seed_int, help="sampling seed with --checkpoint (default 0)")
    p.add_argument("--family", help="prompt models: prompts from one caption family (numeral, word,"
                   " handwritten, digit, picture, number, held_out; default: every training template)")
    lora_args(p)
    p.add_argument("--classifier", metavar="PATH", help="classifier directory (default: the shipped one)")
    p.add_argument("--data", default="embedded", help="real digits: embedded | download | IDX folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)


def _generate(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict]:
    try:
        digits = parse_digits("0-9" if args.digits is None else args.digits)  # '' is refused, not 0-9
    except UserError as e:
        raise UserError(f"--digits: {e}") from None
    per_digit = args.per_digit or 100
    device = resolve_device(getattr(args, "device", "auto"))
    chosen = precision(args, device)
    bf16 = chosen.bf16
    pipe = Pipeline.load(args.checkpoint)
    loras = add_loras(pipe, args)
    pipe.to(device)
    steps = args.steps or DEFAULT_STEPS
    if steps > pipe.diffusion.timesteps:
        raise UserError(f"--steps {steps} exceeds the model's {pipe.diffusion.timesteps} diffusion timesteps")
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    seed = args.seed or 0
    labels = [d for d in digits for _ in range(per_digit)]
    t0 = time.perf_counter()
    family = getattr(args, "family", None)
    conditions: list = labels
    if pipe.is_prompt_model:  # the digits become prompts: a family's templates cycled per digit
        conditions = digit_prompts(labels, family)
    elif family is not None:
        raise UserError("--family applies to prompt models; this is a label model")
    images, _ = pipe.generate(conditions, steps=steps, guidance=guidance, seed=seed, bf16=bf16,
                              progress=not getattr(args, "quiet", False))
    settings = {"checkpoint": str(args.checkpoint), "sampler": "ddim", "steps": steps, "guidance": guidance,
                "seed": seed, "per_digit": per_digit, "digits": digits, "bf16": bf16,
                "precision": str(chosen), "loras": [f"{p}:{w:g}" for p, w, _ in loras],
                "sample_seconds_per_100": round(100 * (time.perf_counter() - t0) / len(labels), 2)}
    if pipe.is_prompt_model:
        settings["family"] = family or "all training templates"
    return images, torch.tensor(labels, dtype=torch.int64), settings


def run(args: argparse.Namespace) -> int:
    """``lora4diffusion evaluate``: print the report (table or JSON); bad input raises UserError."""
    if args.samples is not None:
        sampling = ("digits", "per_digit", "steps", "guidance", "seed", "bf16", "lora", "family")
        given = [o for o in sampling if getattr(args, o, None) not in (None, False, [])]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} only applies with --checkpoint, not --samples")
        images, labels = load_samples(args.samples)
        origin = {"samples": str(args.samples)}
    else:
        images, labels, origin = _generate(args)
    classifier = load_classifier(args.classifier)
    result = {"source": origin, **evaluate_samples(images, labels, classifier, args.data)}
    print(format_report(result, as_json=args.json))
    return 0


def add_train_classifier(subparsers: Commands) -> None:
    """Add ``train-classifier`` to an argparse subparsers object; the parsed args carry ``func``."""
    p = subparsers.add_parser("train-classifier", help="train the MNIST classifier used by evaluate")
    p.add_argument("--out", required=True, help="directory for classifier.safetensors and classifier.json")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--data", default="embedded", help="embedded (default) | download | IDX folder")
    p.add_argument("--epochs", type=bounded_int(1, 1000, "the most epochs"), default=12)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=run_train_classifier)


def run_train_classifier(args: argparse.Namespace) -> int:
    data = (Path(args.data),) if Path(args.data).exists() else ()
    out_dir(args.out, overwrite=args.overwrite, inputs=data)  # refused now, not after the training
    device = resolve_device(getattr(args, "device", "auto"))
    chosen = precision(args, device)
    bf16 = chosen.bf16
    command = (f"lora4diffusion train-classifier --out {args.out} --data {args.data} --epochs {args.epochs}"
               f" --seed {args.seed} --device {device.type} --{'' if bf16 else 'no-'}bf16")
    info = train_classifier(args.out, data=args.data, epochs=args.epochs, seed=args.seed, command=command,
                            device=device, bf16=bf16)
    print(f"held-out accuracy {percent(info['heldout_accuracy'])} on {info['heldout_digits']} digits after "
          f"{info['train_seconds']:.0f} s in {chosen}; wrote {Path(args.out)}")
    return 0
