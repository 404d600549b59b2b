"""The training commands: train-vae, train (a base UNet), train-lora (an adapter), and reconstruct (a VAE's
encode-decode of held-out digits, what train-vae's model keeps)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from lora4diffusion.checkpoint import write_json
from lora4diffusion.cli.args import (
    MAX_COUNT,
    batch_int,
    bounded_int,
    finite_float,
    fraction_float,
    image_size_int,
    learning_rate,
    nonneg_float,
    per_digit_int,
    positive_int,
    rank_int,
    seed_int,
)
from lora4diffusion.cli.common import (
    Commands,
    compile_arg,
    existing,
    out_dir,
    precision,
    renamed,
    run_dir_args,
    train_out,
    train_with_signals,
)
from lora4diffusion.data import parse_digits
from lora4diffusion.datasets import layout_of
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.folders.vae import load_vae
from lora4diffusion.latents import check_encodable, reconstruct
from lora4diffusion.lora.layers import METHODS
from lora4diffusion.objectives import HUBER_SCHEDULES, LOSSES, PREDICTION_TYPES
from lora4diffusion.plots import save_comparison
from lora4diffusion.reconstruction import format_reconstruction_report, heldout_digits, reconstruction_report
from lora4diffusion.styles import CSV_FORMAT
from lora4diffusion.training.base import train_base
from lora4diffusion.training.best import parse_metric
from lora4diffusion.training.lora import LoRAConfig, default_lora_config, train_lora
from lora4diffusion.training.prompt_base import train_prompt_base
from lora4diffusion.training.run import MAX_VALIDATION_IMAGES
from lora4diffusion.training.vae import DEFAULT_KL_WEIGHT, train_vae


def add_train_vae(sub: Commands) -> None:
    tv = sub.add_parser("train-vae", help="train the KL autoencoder (VAE) for latent diffusion")
    tv.add_argument("--out", default="runs/vae", help="VAE folder / run directory")
    tv.add_argument("--preset", choices=["tiny", "base"], default="base", help="tiny: a smoke test")
    tv.add_argument("--max-train-steps", type=positive_int, metavar="N",
                    help="training steps (default: the preset's)")
    renamed(tv, "--train-steps", "--max-train-steps", type=positive_int)
    tv.add_argument("--batch-size", type=batch_int, help="batch (default: the preset's)")
    tv.add_argument("--lr", type=learning_rate, help="learning rate (default: the preset's)")
    tv.add_argument("--kl-weight", type=nonneg_float, help="weight of the KL term (default 1e-6, as LDM)")
    tv.add_argument("--no-augment", action="store_true", help="train on plain digits (no bold/thin/italic)")
    tv.add_argument("--data", default="embedded", help="embedded | download | PATH to IDX files")
    tv.add_argument("--seed", type=seed_int, help="training seed (default 0)")
    tv.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    validate_arg(tv)
    run_dir_args(tv)
    compile_arg(tv)
    tv.set_defaults(func=cmd_train_vae)


def add_train(sub: Commands) -> None:
    t = sub.add_parser("train", help="train a base diffusion UNet on MNIST")
    t.add_argument("--preset", choices=["tiny", "fast", "base"], default="fast",
                   help="tiny: seconds, a smoke test | fast: the CPU recipe, ~12 min | base: the shipped one")
    t.add_argument("--out", required=True, help="run directory (checkpoints, logs, pictures)")
    t.add_argument(
        "--data", default="embedded", help="embedded (offline) | download | PATH to IDX files"
    )
    t.add_argument("--max-train-steps", type=positive_int, metavar="N",
                   help="training steps (default: the preset's: tiny 30, fast 1000, base 20000)")
    renamed(t, "--steps", "--max-train-steps", type=positive_int)
    t.add_argument("--batch-size", type=batch_int, help="global batch (default: the preset's)")
    t.add_argument("--lr", type=learning_rate, help="peak learning rate (default: the preset's)")
    t.add_argument("--image-size", type=image_size_int,
                   help="train at this size (default 28, native; 32, 48 resized)")
    t.add_argument("--seed", type=seed_int, help="training seed (default 0)")
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    objective_args(t, lora=False)
    validate_arg(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument("--vae", metavar="DIR|NAME",
                   help="latent diffusion: denoise this VAE's latents (train-vae; default: pixels)")
    t.add_argument(
        "--conditioning", choices=["label", "text"], default="label",
        help="label: digit labels | text: prompts, a text encoder trained jointly (SD 1.x; needs"
        " --vae; presets tiny / fast ~10 min / base ~35 min, training/prompt_base.py)",
    )
    run_dir_args(t)
    compile_arg(t)
    t.set_defaults(func=cmd_train)


def add_train_lora(sub: Commands) -> None:
    tl = sub.add_parser("train-lora", help="train a LoRA adapter that teaches the frozen base a style")
    tl.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    renamed(tl, "--base", "--checkpoint")
    tl.add_argument("--style", help="bold | thin | italic | FOLDER (subfolders 0-9 of images)"
                    f" | FILE.csv ({CSV_FORMAT}); with a captioned --data folder, a name (default: the"
                    " folder's)")
    tl.add_argument("--out", required=True, help="run directory; the adapter is OUT/adapter.safetensors")
    tl.add_argument("--max-train-steps", type=positive_int, metavar="N",
                    help="training steps (default: 500; on a prompt base 750, or 400 without --trigger)")
    renamed(tl, "--steps", "--max-train-steps", type=positive_int)
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
    tl.add_argument("--method", choices=list(METHODS), default="lora",
                    help="adapter method: lora (Hu et al.), dora (LoRA plus a trained magnitude, Liu et"
                    " al.), loha (Hadamard product of two low-rank products), lokr (Kronecker product),"
                    " oft (W0 turned by a block-diagonal orthogonal matrix; --rank is its block size);"
                    " default lora")
    tl.add_argument("--factor", type=int, metavar="F",
                    help="lokr: split each size into two factors, the smaller at most F (default -1: nearest"
                    " the square root)")
    tl.add_argument("--loraplus-lr-ratio", type=finite_float(0.0, 1e3, low_open=True), metavar="R",
                    help="LoRA+ (Hayou et al. 2024): train the B factor of each A/B pair at R x the learning"
                    " rate (the paper suggests 16; default 1: off)")
    tl.add_argument("--init", choices=["normal", "kaiming"], default="normal",
                    help="init of the factors (ΔW starts at 0): normal = the seed's (LyCORIS's for"
                    " loha/lokr), kaiming = PEFT's")
    tl.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    tl.add_argument("--dropout", type=fraction_float, default=0.0, help="LoRA dropout, in [0, 1)")
    tl.add_argument("--examples-per-digit", type=per_digit_int, metavar="N",
                    help="few-shot: train on N examples per digit (default: every example)")
    renamed(tl, "--per-digit", "--examples-per-digit", type=per_digit_int)
    tl.add_argument("--data", default="embedded",
                    help="MNIST source for the built-in styles (embedded | download | PATH to IDX files), or"
                    " a captioned image folder: kohya's N_class folders with .txt/.caption captions, or"
                    " metadata.jsonl (file_name, text); see prepare-data")
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
    tl.add_argument("--pivotal", action="store_true",
                    help="prompt bases: pivotal tuning: a new --token takes the trigger's place and its"
                    " vectors train with the LoRA; the adapter file carries them (A1111's bundled"
                    " embeddings)")
    tl.add_argument("--token", metavar="<NAME>",
                    help="with --pivotal: the new placeholder token, e.g. \"<bold-ti>\"")
    tl.add_argument("--init-word", metavar="WORD",
                    help="with --pivotal: the word the token's vectors start from (default: the mean of the"
                    " words)")
    tl.add_argument("--num-vectors", type=bounded_int(1, 14, "a prompt holds 14 tokens"), metavar="N",
                    help="with --pivotal: vectors of the token (default 1)")
    objective_args(tl, lora=True)
    validate_arg(tl)
    tl.add_argument("--embedding-lr", type=learning_rate, metavar="LR",
                    help="with --pivotal: learning rate of the token's vectors (default: --text-encoder-lr"
                    " with --text-encoder, else --lr)")
    run_dir_args(tl)
    compile_arg(tl)
    tl.set_defaults(func=cmd_train_lora)


def objective_args(p: argparse.ArgumentParser, lora: bool) -> None:
    """The training-objective options (lora4diffusion/objectives.py), recorded in the model's DiffusionConfig
    (an adapter's in its metadata). ``lora``: an option left out is the base's."""
    default = {"prediction": "the base's, which an adapter keeps", "loss": "the base's", "off": "the base's",
               "dropout": "0"} if lora else {"prediction": "epsilon", "loss": "mse", "off": "off",
                                             "dropout": "0.1"}
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="what the UNet predicts: epsilon (DDPM) or v_prediction (Salimans & Ho 2022, SD 2.x);"
                   f" sampling, guidance and export-diffusers follow it (default {default['prediction']})")
    p.add_argument("--loss", choices=LOSSES, default=None if lora else "mse",
                   help="loss on the prediction: mse, l1 (the reference's), huber or smooth_l1 (kohya's"
                   f" pseudo-Huber, see --huber-c) (default {default['loss']})")
    p.add_argument("--huber-c", type=finite_float(0.0, 1e3, low_open=True), metavar="C",
                   help=f"huber / smooth_l1: the threshold c (default {DiffusionConfig.huber_c:g}, kohya's)")
    p.add_argument("--huber-schedule", choices=HUBER_SCHEDULES,
                   help="huber / smooth_l1: c over the timesteps (default snr, kohya's)")
    p.add_argument("--min-snr-gamma", type=finite_float(0.0, 1e6), metavar="G",
                   help="min-SNR-gamma loss weighting (Hang et al. 2023 use 5); 0 = off"
                   f" (default {default['off']})")
    p.add_argument("--noise-offset", type=finite_float(0.0, 1.0), metavar="S",
                   help="offset noise: eps + S * N(0, 1) per image and channel (kohya / diffusers; 0.05-0.1"
                   f" is usual); 0 = off (default {default['off']})")
    p.add_argument("--caption-dropout-rate", type=finite_float(0.0, 1.0), metavar="P",
                   help="prompt models: the share of captions replaced by the empty prompt, guidance's"
                   f" unconditional branch (kohya's caption_dropout_rate; default {default['dropout']})")


def validate_arg(p: argparse.ArgumentParser) -> None:
    """--validate-every and what acts at validations: scores, keeping the best, stopping early."""
    p.add_argument("--validate-every", type=bounded_int(0, MAX_COUNT), metavar="N",
                   help="every N steps (and at the end), the loss on 100 held-out digits at fixed timesteps"
                   " with fixed noise, into OUT/validation.csv and TensorBoard (training/validation.py;"
                   " default 0: off)")
    p.add_argument("--score-every", type=bounded_int(0, MAX_COUNT), metavar="K",
                   help="every K-th validation (and the last) also samples --num-validation-images digits"
                   " with a fixed seed and scores them: accuracy, ink / slant against the base, a trigger's"
                   " leak (training/scores.py; default 0: off)")
    p.add_argument("--num-validation-images", type=bounded_int(1, MAX_VALIDATION_IMAGES), metavar="N",
                   help="images per scoring (default 50: 5 per digit)")
    p.add_argument("--keep-best", type=metric_arg, metavar="METRIC[:min|max]",
                   help="also keep the export of the best validation so far in OUT/best/ (with best.json):"
                   " val_loss, accuracy, ink_ratio, plain_ink_ratio, ... (training/best.py)")
    p.add_argument("--patience", type=bounded_int(0, MAX_COUNT), metavar="P",
                   help="with --keep-best: stop (resumable) after P validations without improvement"
                   " (default 0: never)")


def metric_arg(text: str) -> str:
    """argparse type of --keep-best: a known metric, with min or max if it has no direction of its own."""
    try:
        parse_metric(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--keep-best {text!r}: ")) from None
    return text.strip()


def validation_overrides(args: argparse.Namespace) -> dict:
    """The validation options given on the command line, as TrainConfig fields (None: the run's own)."""
    return {"validate_every": args.validate_every, "score_every": args.score_every,
            "validation_images": args.num_validation_images, "keep_best": args.keep_best,
            "patience": args.patience}


def _state(summary: dict) -> str:
    """How a run ended, for the summary line."""
    if summary["interrupted"]:
        return "interrupted (resumable: --resume)"
    if summary.get("stopped_early"):
        return f"stopped early ({summary['stopped_early']}; --resume with a larger --patience goes on)"
    return "done"


def _best(summary: dict) -> str:
    best = summary.get("best")
    if not best or best.get("step") is None:
        return ""
    return f"; best {best['metric']} {best['value']:.6g} at step {best['step']} in {best['dir']}"


def objective_overrides(args: argparse.Namespace) -> dict:
    """The objective options given on the command line, as DiffusionConfig fields (left out: not given)."""
    given = {"prediction_type": args.prediction_type, "loss": args.loss, "huber_c": args.huber_c,
             "huber_schedule": args.huber_schedule, "min_snr_gamma": args.min_snr_gamma,
             "noise_offset": args.noise_offset}
    huber = [flag for flag, key in (("--huber-c", "huber_c"), ("--huber-schedule", "huber_schedule"))
             if given[key] is not None]
    if huber and args.loss not in ("huber", "smooth_l1"):
        raise UserError(f"{' and '.join(huber)} go with --loss huber or --loss smooth_l1"
                        f" (got {'--loss ' + args.loss if args.loss else 'no --loss'})")
    return {k: v for k, v in given.items() if v is not None}


def add_reconstruct(sub: Commands) -> None:
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


def _loss(summary: dict) -> str:
    """The summary's last loss; none when no step ran (``--resume`` of a run at its target, or a stop at
    once)."""
    loss = summary["loss"]
    return f"loss {loss:.4f}" if math.isfinite(loss) else "no step trained"


def cmd_train_vae(args: argparse.Namespace) -> int:
    out = train_out(args, inputs=existing(args.data))
    r, status = train_with_signals(
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
        **validation_overrides(args),
    )
    if r is None:
        return status
    print(
        f"{_state(r)}: step {r['step']}, "
        f"{_loss(r)}, scaling factor {r.get('scaling_factor', float('nan')):.5f}, "
        f"{r['train_seconds']:.0f} s of training; VAE folder {out}{_best(r)}"
    )
    return status


def cmd_train(args: argparse.Namespace) -> int:
    # label: the pixel or latent base (training/base.py) | text: the prompt-conditioned latent base
    # (training/prompt_base.py)
    train = train_prompt_base if args.conditioning == "text" else train_base
    objective = objective_overrides(args)
    if args.caption_dropout_rate is not None and args.conditioning != "text":
        raise UserError("--caption-dropout-rate goes with --conditioning text (a label model has no captions;"
                        " its labels are dropped at the fixed 10 %)")
    out = train_out(args, inputs=existing(args.data))
    summary, status = train_with_signals(
        train,
        out,
        args.preset,
        out,
        data=args.data,
        steps=args.max_train_steps,
        resume=args.resume,
        image_size=args.image_size,
        diffusion_overrides={"schedule": args.schedule, **objective},
        progress=not args.quiet,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bf16=args.bf16,  # None: the device's default (precision.py)
        label_dropout=args.caption_dropout_rate,  # None: the preset's (10 % of captions become "")
        **validation_overrides(args),
        device=args.device,
        compile=args.compile,
        vae=args.vae,
        overwrite=args.overwrite,
        allow_changes=args.allow_changes,
    )
    if summary is None:
        return status
    print(
        f"{_state(summary)}: step {summary['step']}, {_loss(summary)}, "
        f"{summary['train_seconds']:.0f} s of training; run directory {out}{_best(summary)}"
    )
    return status


def cmd_train_lora(args: argparse.Namespace) -> int:
    if args.style is None:
        if layout_of(Path(args.data).expanduser()) is None:
            raise UserError("--style is required unless --data names a captioned image folder")
        args.style = Path(args.data).resolve().name
    if args.factor is not None and args.method != "lokr":
        raise UserError(f"--factor goes with --method lokr (got --method {args.method})")
    if args.full and (args.method != "lora" or args.loraplus_lr_ratio is not None):
        raise UserError("--full trains every weight: --method and --loraplus-lr-ratio go with an adapter")
    pivotal_flags = [f for f, v in (("--token", args.token), ("--init-word", args.init_word),
                                    ("--num-vectors", args.num_vectors),
                                    ("--embedding-lr", args.embedding_lr)) if v is not None]
    if args.pivotal and args.token is None:
        raise UserError("--pivotal needs --token <name> (the new placeholder token)")
    if pivotal_flags and not args.pivotal:
        raise UserError(f"{', '.join(pivotal_flags)} go with --pivotal")
    pivotal = {"token": args.token, "num_vectors": args.num_vectors or 1, "init_word": args.init_word,
               "lr": args.embedding_lr} if args.pivotal else None
    rank = args.rank or default_lora_config(args.checkpoint).rank
    lora = LoRAConfig(
        rank=rank,
        alpha=float(rank) if args.alpha is None else args.alpha,
        targets=args.targets or LoRAConfig.targets,
        init=args.init,
        rslora=args.rslora,
        dropout=args.dropout,
        method=args.method,
        options={} if args.factor is None else {"factor": args.factor},
        loraplus_lr_ratio=1.0 if args.loraplus_lr_ratio is None else args.loraplus_lr_ratio,
    )
    lora.check()  # before anything is written
    objective = objective_overrides(args)
    out = train_out(args, inputs=existing(args.checkpoint, args.style, args.data))
    r, status = train_with_signals(
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
        **({"pivotal": pivotal} if pivotal else {}),
        objective=objective,
        caption_dropout=args.caption_dropout_rate,
        **validation_overrides(args),
    )
    if r is None:
        return status
    what = "model" if args.full else "adapter"
    print(
        f"{_state(r)}: {what} in {out}, "
        f"step {r['step']}, {r['trainable_params']} trainable parameters ({100 * r['share']:.2f}% of the "
        f"base), {r['train_seconds']:.0f} s of training{_best(r)}"
    )
    return status


def cmd_reconstruct(args: argparse.Namespace) -> int:
    digits = parse_digits(args.digits)
    inputs = (args.vae,) if args.vae else ()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    device = resolve_device(args.device)
    vae, _ = load_vae(args.vae)
    check_encodable(vae.cfg, 28, 28)  # MNIST's size, before any data is read
    images, labels = heldout_digits(args.style, args.per_digit, digits, data=args.data)
    chosen = precision(args, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=chosen.bf16):
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
    report_file = ", report.json" if report else ""
    print(f"reconstructed {len(labels)} digits in {chosen} (mean |error| {err:.4f}); wrote"
          f" {out / 'reconstructions.png'}, originals.npz, reconstructions.npz{report_file}")
    return 0
