"""What does a batch whose prompts carry different adapters cost? (Per-row adapters: lora/layers.py
``row_multipliers_while``; the target is at most 1.3x a plain batch.)

    python benchmarks/mixed_batch.py                 # the shipped base with bold / italic, 100 digits
    python benchmarks/mixed_batch.py --repeats 1     # a quick look

Times ``Pipeline.generate`` on the same 100 prompts (DDIM at 5 steps, the default precision, one batch) as:
the base (no tags); every prompt tagged ``bold`` (one adapter on the whole batch); every prompt tagged
``bold`` and ``italic``; and the mixed batch (a third ``bold``, a third ``italic``, a third untagged).
Prints seconds per 100 digits (the best of ``--repeats``, after one warm-up call each) and the ratios to the
base and to the one-adapter batch. Run it on a quiet machine: the figures are per-core wall time.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lora4diffusion.pipeline import Pipeline
from lora4diffusion.precision import default_precision

TEXTS = ["a handwritten sks seven", "a handwritten ohwx three", "a handwritten four"]


def batches(n: int) -> dict[str, list[str]]:
    plain = [TEXTS[i % 3] for i in range(n)]
    tags = ["<lora:bold>", "<lora:italic>", ""]
    return {
        "base": plain,
        "bold on every row": [f"<lora:bold> {p}" for p in plain],
        "bold + italic on every row": [f"<lora:bold> <lora:italic> {p}" for p in plain],
        "mixed: bold / italic / none": [f"{tags[i % 3]} {p}" for i, p in enumerate(plain)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="digits per call (one batch)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bf16 = default_precision(torch.device("cpu")).bf16
    pipe = Pipeline.load("base")
    seconds = {}
    for name, prompts in batches(args.n).items():
        kw = dict(steps=args.steps, seed=0, batch_size=args.n, bf16=bf16)
        pipe.generate(prompts, **kw)  # warm-up: loads the tags' adapters
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe.generate(prompts, **kw)
            best = min(best, time.perf_counter() - t0)
        seconds[name] = best * 100 / args.n
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 {bf16},"
          f" DDIM {args.steps}, {args.n} digits per batch\n")
    print("| batch | s per 100 digits | x base | x one adapter |\n| --- | --- | --- | --- |")
    for name, s in seconds.items():
        print(f"| {name} | {s:.3f} | {s / seconds['base']:.2f} | {s / seconds['bold on every row']:.2f} |")


if __name__ == "__main__":
    main()
