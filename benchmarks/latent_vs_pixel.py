"""Seconds per 100 digits, latent prompt base against pixel label base: medians of alternating runs.

    python benchmarks/latent_vs_pixel.py [--per-digit 100] [--repeats 5] [--steps N] [--fp32]

`evaluate` times one sampling call per model (benchmarks/results/*.json: `sample_seconds_per_100`), so one
ratio from it carries one run's noise. This times `Pipeline.generate` as `evaluate` calls it (1,000 digits,
the shipped bases at their default batch sizes, DDIM at the pipeline's default steps, guidance 1.25, bf16
unless --fp32; VAE decoding included for the latent model), after one warm-up call each, alternating the two
models so that a slow spell of the machine hits both, and prints the medians, every run, and their ratio.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lora4diffusion.captions import digit_prompts
from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS
from lora4diffusion.distributed import keep_freed_memory
from lora4diffusion.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", default="base", help="latent model (directory or shipped name)")
    ap.add_argument("--pixel", default="pixel-base", help="pixel model (directory or shipped name)")
    ap.add_argument("--per-digit", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--fp32", action="store_true", help="sample in fp32 (default: bf16 autocast)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI does
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    models = {"latent": Pipeline.load(args.latent), "pixel": Pipeline.load(args.pixel)}
    conditions = {k: digit_prompts(labels, None) if p.is_prompt_model else labels for k, p in models.items()}
    gen = {"steps": args.steps, "guidance": DEFAULT_GUIDANCE, "seed": 0, "bf16": not args.fp32}
    runs: dict[str, list[float]] = {k: [] for k in models}
    for k, pipe in models.items():  # warm-up: oneDNN builds its kernels for these shapes on the first call
        pipe.generate(conditions[k], **gen)
    for _ in range(args.repeats):
        for k, pipe in models.items():
            t0 = time.perf_counter()
            pipe.generate(conditions[k], **gen)
            runs[k].append(100 * (time.perf_counter() - t0) / len(labels))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"{len(labels)} digits per call, DDIM {args.steps}, guidance {DEFAULT_GUIDANCE:g}, "
          f"{'fp32' if args.fp32 else 'bf16'}, {args.threads} threads, {args.repeats} alternating runs\n")
    print("| model | median s / 100 digits | runs |")
    print("|---|---|---|")
    for k in models:
        print(f"| {k} ({getattr(args, k)}) | {med[k]:.3f} | {', '.join(f'{t:.3f}' for t in runs[k])} |")
    ratio = med["pixel"] / med["latent"]
    print(f"\nlatent is {ratio:.2f}x faster (ratio of medians)")
    print(json.dumps({"median": med, "runs": runs, "ratio": ratio, "settings": vars(args)}))


if __name__ == "__main__":
    main()
