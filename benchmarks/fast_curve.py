"""Accuracy against training time for `--preset fast`, trained from scratch on the embedded digits.

    python benchmarks/fast_curve.py --out /tmp/fast_curve [--every 100] [--per-digit 20]
    python benchmarks/fast_curve.py --conditioning text --vae vae --out /tmp/fast_text --every 500

Trains the preset in chunks of ``--every`` steps through the public API (``train_base`` + ``--resume``,
which continues bit-exactly: the learning rate is constant after warm-up and every step's randomness is
seeded by (seed, step)), and after each chunk samples the EMA weights at the pipeline defaults (bf16) and
scores them with the shipped classifier. Sampling and scoring are not counted as training time. Prints a
Markdown table; the run folder keeps the final `fast` checkpoint. ``--conditioning text`` does the same for
the prompt-conditioned latent model (``train --conditioning text --vae VAE``, `training/prompt_base.py`): its
samples are drawn from the training templates cycled per digit, as `evaluate` does.
"""

from __future__ import annotations

import argparse
import time

import torch

from lora4diffusion.captions import digit_prompts
from lora4diffusion.distributed import keep_freed_memory
from lora4diffusion.evaluate import evaluate_samples
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.base import presets, train_base
from lora4diffusion.training.prompt_base import presets as prompt_presets
from lora4diffusion.training.prompt_base import train_prompt_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run folder (must not hold a run yet)")
    ap.add_argument("--every", type=int, default=100, help="steps between evaluations")
    ap.add_argument("--per-digit", type=int, default=20, help="samples per digit at each evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="fast", help="another preset (tiny: a smoke test of this script)")
    ap.add_argument("--conditioning", choices=["label", "text"], default="label")
    ap.add_argument("--vae", default="vae", help="--conditioning text: the VAE (default: the shipped one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI does
    text = args.conditioning == "text"
    total = (prompt_presets()[args.preset][2] if text else presets()[args.preset][1]).steps
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    conditions = digit_prompts(labels, None) if text else labels
    print(f"--preset {args.preset} ({args.conditioning}), {total} steps, {len(labels)} samples per point"
          " (DDIM at the pipeline default, w 1.25, bf16), "
          f"{args.threads} threads")  # fmt: skip
    print("\n| step | training minutes | accuracy | FID (classifier) | floor | mean ink |")
    print("|---|---|---|---|---|---|")
    wall0 = time.perf_counter()
    for step in range(args.every, total + 1, args.every):
        resume = step > args.every
        if text:
            run = train_prompt_base(args.preset, args.out, steps=step, resume=resume, progress=False,
                                    vae=args.vae)
        else:
            run = train_base(args.preset, args.out, steps=step, resume=resume, progress=False)
        images, _ = Pipeline.load(args.out).generate(conditions, seed=0, bf16=True)
        r = evaluate_samples(images, torch.tensor(labels))
        row = [step, f"{run['train_seconds'] / 60:.1f}", f"{r['accuracy']:.3f}", f"{r['fid_classifier']:.2f}",
               f"{r['reference']['real_vs_real_fid']:.2f}", f"{r['mean_ink']:.3f}"]  # fmt: skip
        print("| " + " | ".join(map(str, row)) + " |", flush=True)
    print(f"\nwall time including evaluation: {(time.perf_counter() - wall0) / 60:.1f} min")


if __name__ == "__main__":
    main()
