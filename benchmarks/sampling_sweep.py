"""Quality against cost of sampling: accuracy, classifier-feature FID and wall time for DDIM steps x guidance.

    python benchmarks/sampling_sweep.py --checkpoint pixel-base --per-digit 20 \
        --steps 10,20,50 --guidance 1,2,3 [--bf16]
    python benchmarks/sampling_sweep.py --checkpoint base --per-digit 100 --steps 5,8,10,15,20 \
        --guidance 1.25 --bf16

Prints a Markdown table (one row per setting). Used to pick the pipeline's default steps and guidance.
With `--grid PNG`, also writes a picture with one row per setting: the first two samples of every digit, the
same seeds in every row, so what the FID column measures can be seen.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lora4diffusion.distributed import keep_freed_memory
from lora4diffusion.evaluate import evaluate_samples
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.plots import save_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="pixel-base", help="model directory or shipped name")
    ap.add_argument("--per-digit", type=int, default=20)
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--guidance", default="1,2,3")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default=None, help="PNG: two samples per digit, one row per setting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI does
    pipe = Pipeline.load(args.checkpoint)
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    conditions: list = labels
    if pipe.is_prompt_model:  # as `evaluate`: every training template, cycled per digit
        from lora4diffusion.captions import digit_prompts

        conditions = digit_prompts(labels, None)
    print(
        f"checkpoint {args.checkpoint}, {len(labels)} samples per setting, "
        f"{'bf16' if args.bf16 else 'fp32'}, {args.threads} threads"
    )
    print("\n| DDIM steps | guidance | accuracy | FID (classifier) | floor | mean ink | s / 100 digits |")
    print("|---|---|---|---|---|---|---|")
    shown = [i for i in range(len(labels)) if i % args.per_digit < 2]  # the first two of every digit
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for w in (float(g) for g in args.guidance.split(",")):
            t0 = time.perf_counter()
            images, _ = pipe.generate(conditions, steps=steps, guidance=w, seed=args.seed, bf16=args.bf16)
            dt = time.perf_counter() - t0
            r = evaluate_samples(images, torch.tensor(labels))
            print(
                f"| {steps} | {w:g} | {r['accuracy']:.3f} | {r['fid_classifier']:.2f} | "
                f"{r['reference']['real_vs_real_fid']:.2f} | {r['mean_ink']:.3f} | "
                f"{100 * dt / len(labels):.2f} |"
            )
            rows.append(images[shown])
    if args.grid:
        save_grid(torch.cat(rows), len(shown), Path(args.grid))
        print(f"\nwrote {args.grid}: one row per setting, in the table's order")


if __name__ == "__main__":
    main()
