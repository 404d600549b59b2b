"""Merged vs unmerged adapters: how far apart the images are, in fp32 and in bf16 (docs/RELIABILITY.md,
"Which promises are bit-exact"). Merging folds m * ΔW into W0, so the product is rounded once instead of
W0 x + m ΔW x being rounded twice: never bit-identical, close in fp32, further apart in bf16 (W0 + m ΔW is
rounded to bf16's 8-bit mantissa before the product).

    python benchmarks/merge_precision.py [--adapter bold] [--weight 1.0] [--n 100]
"""

from __future__ import annotations

import argparse

from lora4diffusion.lora.layers import lora_layers, merge_lora, unmerge_lora
from lora4diffusion.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="bold")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=100, help="digits (0-9 cycled)")
    args = ap.parse_args()
    pipe = Pipeline.load()
    name = pipe.add_lora(args.adapter, weight=args.weight)
    digits = [d % 10 for d in range(args.n)]
    parts = [m for m in (pipe.unet, pipe.text_encoder) if m is not None and lora_layers(m)]
    print("| precision | max abs pixel difference | mean abs | pixels differing by > 1/255 |")
    print("| --- | --- | --- | --- |")
    for bf16 in (False, True):
        unmerged, _ = pipe.generate(digits, seed=0, bf16=bf16)
        for part in parts:
            merge_lora(part, [name])
        merged, _ = pipe.generate(digits, seed=0, bf16=bf16)
        for part in parts:
            unmerge_lora(part)
        diff = (merged - unmerged).abs()
        share = float((diff > 1 / 255).float().mean())
        print(f"| {'bf16' if bf16 else 'fp32'} | {float(diff.max()):.2e} | {float(diff.mean()):.2e} |"
              f" {100 * share:.2f} % |")


if __name__ == "__main__":
    main()
