#!/usr/bin/env bash
# GPU check, one short script (about 3-5 minutes on one GPU):
#   1. the training/LoRA/distributed unit tests, which train on CUDA there (the Python API's device is "auto");
#   2. a CLI smoke run with --device cuda: train tiny, train-lora, sample (+ the same sample on the CPU, to
#      compare), and a 2-process torchrun (nccl) run when 2+ GPUs are visible;
#   3. train images/s and sample seconds per 100 digits for the `base` architecture: fp32, bf16 autocast (the
#      training default) and bf16 + torch.compile, printed as a Markdown table.
#
#   bash benchmarks/gpu_check.sh              # exits 0 with a message when no CUDA GPU is visible
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # the same steps on the CPU, tiny sizes: checks the script
#
# Run from anywhere inside an environment where lora4diffusion is installed (PYTHON=... to pick the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=${GPU_CHECK_DRY:-0}

if [ "$DRY" = 1 ]; then
  DEV=cpu
  echo "gpu_check: dry run on the CPU (tiny sizes, no unit tests, no compile)"
elif ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to PyTorch here ($($PY -c 'import torch; print("torch", torch.__version__)' \
    2>/dev/null || echo 'torch not importable')); nothing to check."
  exit 0
else
  DEV=cuda
fi

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0
fail() { echo "FAILED: $*"; status=1; }
section() { echo; echo "== $*"; }
L4D() { $PY -m lora4diffusion -q "$@"; }

$PY - <<'EOF'
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible; "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

if [ "$DRY" != 1 ]; then
  section "unit tests (training on $DEV)"
  timeout 150 $PY -m pytest -q -rf -p no:cacheprovider tests/test_train.py tests/test_finetune.py \
    tests/test_distributed.py || fail "unit tests (a bit-exact resume test fails if a CUDA op is nondeterministic)"
fi

section "CLI smoke run with --device $DEV"
if L4D train --preset tiny --max-train-steps 20 --out "$OUT/tiny" --device "$DEV" \
  && L4D train-lora --checkpoint "$OUT/tiny" --style bold --max-train-steps 10 --batch-size 32 --out "$OUT/bold" \
    --device "$DEV" \
  && L4D sample --checkpoint "$OUT/tiny" --lora "$OUT/bold" --per-digit 2 --steps 10 --no-bf16 --out "$OUT/s_dev" \
    --device "$DEV" \
  && L4D sample --checkpoint "$OUT/tiny" --lora "$OUT/bold" --per-digit 2 --steps 10 --no-bf16 --out "$OUT/s_cpu" \
    --device cpu
then
  $PY - "$OUT" <<'EOF' || fail "samples"
import sys
import numpy as np
a, b = (np.load(f"{sys.argv[1]}/{d}/samples.npz")["images"] for d in ("s_dev", "s_cpu"))
assert a.shape == (20, 28, 28) and np.isfinite(a).all(), a.shape
# Same CPU-drawn noise on both devices: only arithmetic differs (TF32 convolutions on CUDA by default).
print(f"sample: device vs CPU, same seed: max |diff| {np.abs(a - b).max():.2e}, mean {np.abs(a - b).mean():.2e}")
EOF
else
  fail "CLI smoke run"
fi

NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
if [ "$DEV" = cuda ] && [ "$NGPU" -ge 2 ]; then
  section "torchrun, 2 processes on 2 GPUs (nccl), against 1 GPU"
  timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m lora4diffusion -q train \
    --preset tiny --max-train-steps 20 --no-bf16 --out "$OUT/ddp" --device cuda || fail "torchrun on 2 GPUs"
  L4D train --preset tiny --max-train-steps 20 --no-bf16 --out "$OUT/one" --device cuda || fail "1-GPU reference"
  $PY - "$OUT" <<'EOF' || fail "DDP vs 1 GPU"
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{d}/train_state.safetensors") for d in ("ddp", "one"))
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"DDP (2 GPUs) vs 1 GPU after 20 fp32 steps: max |diff| over the training state {diff:.2e}")
EOF
else
  section "torchrun on GPUs: skipped ($NGPU CUDA device(s); needs 2)"
fi

section "throughput, \`base\` architecture (DDIM 50 steps, guidance 2 for sampling)"
timeout 240 $PY - "$DEV" "$DRY" "$OUT" <<'EOF' || fail "throughput"
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from lora4diffusion.data import load_mnist, to_model_range
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.base import presets
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import TrainConfig
from lora4diffusion.models.unet import UNet

logging.disable(logging.INFO)
dev, dry, out = torch.device(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3])
warm, steps, batch, repeats = (1, 2, 16, 1) if dry else (10, 100, 128, 3)
unet_cfg, base_cfg = presets()["base"]
splits = load_mnist("embedded")
images = to_model_range(splits.train.images, unet_cfg.image_size)
diffusion = DiffusionConfig()


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def train_ips(bf16: bool, compile: bool) -> float:
    """Images/s of the real training loop (Trainer), after `warm` steps (compilation happens there)."""
    torch.manual_seed(0)
    cfg = TrainConfig(steps=warm, batch_size=batch, lr=base_cfg.lr, warmup=base_cfg.warmup, bf16=bf16,
                      ema_decay=base_cfg.ema_decay, log_every=10**9, checkpoint_every=10**9, sample_every=0)
    run = out / f"train_{bf16}_{compile}"
    tr = Trainer(UNet(unet_cfg), NoiseSchedule(diffusion), images, splits.train.labels, cfg, run,
                 lambda m, d: None, device=dev, compile=compile)
    tr.fit(progress=False)
    before = tr.train_seconds
    cfg.steps = warm + steps
    tr.fit(progress=False)
    return steps * batch / (tr.train_seconds - before)


def sample_s(bf16: bool, compile: bool) -> float:
    """Median seconds for 100 digits through Pipeline.generate, after one warm-up (compilation) run."""
    torch.manual_seed(0)
    unet = UNet(unet_cfg).to(dev).eval()
    pipe = Pipeline(torch.compile(unet) if compile else unet, diffusion, {})
    labels = [i % 10 for i in range(100)]

    def run() -> None:
        pipe.generate(labels, steps=5 if dry else 50, guidance=2.0, bf16=bf16)
        sync()

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


variants = [("fp32", False, False), ("bf16 autocast", True, False), ("bf16 + compile", True, True)]
rows = {"train": {}, "sample": {}}
for name, bf16, compile in variants:
    if compile and dry:
        continue
    t0 = time.perf_counter()
    rows["train"][name] = f"{train_ips(bf16, compile):,.0f}"
    rows["sample"][name] = f"{sample_s(bf16, compile):.2f}"
    print(f"  {name}: measured in {time.perf_counter() - t0:.0f} s", flush=True)
peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if dev.type == "cuda" else ""
print(f"\ndevice {dev}, batch {batch}{peak}\n")
print("| measurement | " + " | ".join(n for n, _, _ in variants) + " |")
print("|---" * (len(variants) + 1) + "|")
print(f"| train images/s (batch {batch}) | " + " | ".join(rows["train"].get(n, "-") for n, _, _ in variants) + " |")
print("| sample s / 100 digits | " + " | ".join(rows["sample"].get(n, "-") for n, _, _ in variants) + " |")
EOF

echo
if [ $status = 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: some checks FAILED (see above)"; fi
exit $status
