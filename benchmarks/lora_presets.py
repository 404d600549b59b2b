"""Which LoRA targets teach the frozen base a style best per trainable parameter.

    python benchmarks/lora_presets.py --out /tmp/lora_presets --style bold \
        --specs reference:4,attention:4,all-linear:4,attention+conv:4 [--steps 300] [--per-digit 50]

Each spec is TARGETS:RANK (alpha = rank, so the scale alpha/r is 1). Every adapter is trained with
`train_lora`'s defaults on the base (default: the shipped label model `pixel-base`), then the same labels and
seed are sampled at scale 0 (= the base), 0.5 and 1 (DDIM 20, guidance 1.25, bf16) and scored with the
shipped classifier: accuracy as the asked digit, mean ink (and its ratio to the base's, same seed), and
classifier-feature FID against the style applied to real held-out digits. The `bold` target is accuracy
>= 95 % and ink >= 1.4x the base at scale 1. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lora4diffusion.data import load_mnist
from lora4diffusion.distributed import keep_freed_memory
from lora4diffusion.evaluate import evaluate_samples
from lora4diffusion.lora.layers import set_adapter_weight
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.styles import style_splits
from lora4diffusion.training.lora import LoRAConfig, train_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for one run per spec")
    ap.add_argument("--style", default="bold")
    ap.add_argument("--specs", default="reference:4,attention:4,all-linear:4,attention+conv:4")
    ap.add_argument("--base", default="pixel-base", help="base model directory or shipped name")
    ap.add_argument("--steps", type=int, default=None, help="LoRA steps (default: train_lora's)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: train_lora's)")
    ap.add_argument("--per-digit", type=int, default=50)
    ap.add_argument("--scales", default="0.5,1")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI does
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    label_t, ref = torch.tensor(labels), style_splits(load_mnist("embedded"), args.style)
    gen = {"seed": 0, "bf16": True}

    base_images = Pipeline.load(args.base).generate(labels, **gen)[0]
    base = evaluate_samples(base_images, label_t, reference=ref)
    floor = base["reference"]["real_vs_real_fid"]
    print(f"style {args.style}, {len(labels)} samples per row (DDIM 20, w 1.25, bf16, seed 0), "
          f"{args.threads} threads; base: accuracy {base['accuracy']:.3f}, ink {base['mean_ink']:.4f}, "
          f"FID to {args.style} {base['fid_classifier']:.2f} (floor {floor:.2f})")  # fmt: skip
    print("\n| targets | rank | trainable params | share | steps | train s | s/step | scale | accuracy | "
          "ink | ink / base | FID to style |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.specs.split(","):
        targets, _, rank = spec.rpartition(":")
        rank = int(rank)
        run_dir = Path(args.out) / spec.replace(":", "_r").replace("+", "_")
        lora = LoRAConfig(rank=rank, alpha=float(rank), targets=targets)
        t0 = time.perf_counter()
        run = train_lora(args.style, run_dir, base=args.base, lora=lora, progress=False, steps=args.steps,
                         lr=args.lr)  # fmt: skip
        wall = time.perf_counter() - t0
        pipe = Pipeline.load(args.base)
        name = pipe.add_lora(run_dir, 1.0)
        for scale in (float(s) for s in args.scales.split(",")):
            set_adapter_weight(pipe.unet, name, scale)
            r = evaluate_samples(pipe.generate(labels, **gen)[0], label_t, reference=ref)
            row = [targets, rank, f"{run['trainable_params']:,}", f"{100 * run['share']:.2f}%", run["step"],
                   f"{wall:.0f}", f"{run['train_seconds'] / run['step']:.3f}", f"{scale:g}",
                   f"{r['accuracy']:.3f}", f"{r['mean_ink']:.4f}", f"{r['mean_ink'] / base['mean_ink']:.2f}",
                   f"{r['fid_classifier']:.2f}"]  # fmt: skip
            print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
