"""What MKL's reproducibility mode costs: the package sets MKL_CBWR=AUTO (threads.request_reproducible_blas)
so that a product's low bits do not depend on where a buffer lies (weight 0 = the base bit for bit). This
times fp32 GEMMs, fp32 and bf16 sampling on the shipped base, and a fp32 LoRA training step, each in a child
process with the mode on (AUTO) and off (MKL_CBWR set empty), alternating, and prints medians and ratios.

    python benchmarks/reproducible_blas.py [--repeats 5]

Not a test: numbers depend on the machine and on what else runs on it (run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
import lora4diffusion  # sets MKL_CBWR unless the environment has it (empty = off)
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.lora.layers import inject_lora

def timed(fn, warm=1, n=3):
    for _ in range(warm):
        fn()
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2]

out = {}
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
out["gemm 1024 fp32 GFLOP/s"] = 2 * 1024**3 / timed(lambda: a @ b, 3, 10) / 1e9
x, w = torch.randn(250 * 16, 64), torch.randn(192, 64)  # a latent UNet's attention projection at batch 250
out["gemm 4000x64x192 fp32 us"] = 1e6 * timed(lambda: x @ w.T, 3, 20)
pipe = Pipeline.load()
digits = list(range(10)) * 10
out["sample 100 fp32 s"] = timed(lambda: pipe.generate(digits, seed=0))
out["sample 100 bf16 s"] = timed(lambda: pipe.generate(digits, seed=0, bf16=True))
unet = pipe.unet.train()
inject_lora(unet, "all-linear", 16, 16.0)
opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
z, t = torch.randn(64, 4, 8, 8), torch.randint(0, 1000, (64,))
ctx = pipe.text_encoder(pipe.tokenizer.encode(["the digit 7"] * 64))[0].detach()
def step():
    opt.zero_grad()
    unet(z, t, ctx).square().mean().backward()
    opt.step()
out["LoRA step fp32 (64) s"] = timed(step, 2, 5)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="child processes per mode (alternating)")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"AUTO": [], "off": []}
    for _ in range(args.repeats):
        for mode in ("AUTO", "off"):
            env = {**os.environ, "MKL_CBWR": "AUTO" if mode == "AUTO" else ""}
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                                 check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| measure | MKL_CBWR=AUTO | off | AUTO / off |")
    print("| --- | --- | --- | --- |")
    for key in runs["AUTO"][0]:
        on = statistics.median(r[key] for r in runs["AUTO"])
        off = statistics.median(r[key] for r in runs["off"])
        print(f"| {key} | {on:.4g} | {off:.4g} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
