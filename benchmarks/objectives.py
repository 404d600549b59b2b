"""Training objectives side by side: each option against the default, same preset, data and seeds.

    python benchmarks/objectives.py --out /tmp/objectives                       # the `fast` pixel base
    python benchmarks/objectives.py --conditioning text --vae vae --every 500 --out /tmp/objectives_text
    python benchmarks/objectives.py --smoke --out /tmp/objectives_smoke         # seconds: tiny, two variants

For every variant and seed, trains the preset in chunks of ``--every`` steps through the public API
(``train_base`` / ``train_prompt_base`` + ``--resume``, bit-exact), with ``validate_every`` = ``--every`` (the
held-out loss at fixed timesteps, training/validation.py), and after each chunk samples the EMA weights at the
pipeline defaults (bf16) and scores them with the shipped classifier; the final model is also scored at every
``--sample-steps`` (does v-prediction change the sampling-steps curve?). Prints a Markdown table, writes
``results.json`` and ``curves.png`` (accuracy against training minutes, and the held-out eps-MSE, the one
yardstick every objective shares, against steps) into ``--out``. Time it on a quiet machine only.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lora4diffusion.captions import digit_prompts
from lora4diffusion.distributed import keep_freed_memory
from lora4diffusion.evaluate import evaluate_samples
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.base import presets, train_base
from lora4diffusion.training.prompt_base import presets as prompt_presets
from lora4diffusion.training.prompt_base import train_prompt_base
from lora4diffusion.training.validation import VALIDATION_FILE

# name -> DiffusionConfig options (train's --prediction-type, --min-snr-gamma, --noise-offset, --loss ...)
VARIANTS = {
    "default": {},
    "min-snr-5": {"min_snr_gamma": 5.0},
    "v": {"prediction_type": "v_prediction"},
    "v+min-snr-5": {"prediction_type": "v_prediction", "min_snr_gamma": 5.0},
    "offset-0.05": {"noise_offset": 0.05},
    "huber": {"loss": "huber"},
}


def train_variant(args: argparse.Namespace, name: str, seed: int, total: int, labels: list[int]) -> dict:
    out = Path(args.out) / f"{name}-seed{seed}"
    conditions = digit_prompts(labels, None) if args.conditioning == "text" else labels
    points = []
    for step in range(args.every, total + 1, args.every):
        common = dict(steps=step, resume=step > args.every, overwrite=step == args.every, progress=False,
                      seed=seed, diffusion_overrides=VARIANTS[name], validate_every=args.every)
        if args.conditioning == "text":
            run = train_prompt_base(args.preset, out, vae=args.vae, **common)
        else:
            run = train_base(args.preset, out, **common)
        images, _ = Pipeline.load(out).generate(conditions, seed=0, bf16=True)
        r = evaluate_samples(images, torch.tensor(labels))
        points.append({"step": step, "minutes": run["train_seconds"] / 60, "accuracy": r["accuracy"],
                       "fid": r["fid_classifier"]})
    with (out / VALIDATION_FILE).open() as f:
        validation = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    by_steps = {}
    for steps in args.sample_steps:
        images, _ = Pipeline.load(out).generate(conditions, seed=0, bf16=True, steps=steps)
        by_steps[steps] = evaluate_samples(images, torch.tensor(labels))["accuracy"]
    return {"points": points, "validation": validation, "accuracy_by_sample_steps": by_steps}


def plot(results: dict, path: Path) -> None:
    fig, (acc, val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, seeds in results.items():
        for i, r in enumerate(seeds.values()):
            style = dict(label=name if i == 0 else None, color=f"C{list(results).index(name)}", alpha=0.8)
            acc.plot([p["minutes"] for p in r["points"]], [p["accuracy"] for p in r["points"]], "o-", **style)
            val.plot([v["step"] for v in r["validation"]], [v["val_eps_mse"] for v in r["validation"]], "-",
                     **style)
    acc.set(xlabel="training minutes", ylabel="classifier accuracy", title="accuracy (EMA, DDIM defaults)")
    val.set(xlabel="step", ylabel="held-out eps MSE", yscale="log", title="validation (fixed t, fixed noise)")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the runs, results.json and curves.png")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--conditioning", choices=["label", "text"], default="label")
    ap.add_argument("--vae", default="vae", help="--conditioning text: the VAE (default: the shipped one)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (repeat to see the noise)")
    ap.add_argument("--every", type=int, default=100, help="steps between evaluations and validations")
    ap.add_argument("--per-digit", type=int, default=20, help="samples per digit at each evaluation")
    ap.add_argument("--sample-steps", default="3,5,10", help="DDIM steps the final models are scored at")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny preset, default and v, 2 samples per digit")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.variants, args.every = "tiny", "default,v", 15
        args.per_digit, args.sample_steps = 1, "2"
    args.sample_steps = [int(s) for s in args.sample_steps.split(",")]
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    text = args.conditioning == "text"
    total = (prompt_presets()[args.preset][2] if text else presets()[args.preset][1]).steps
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    names, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}")
    print(f"--preset {args.preset} ({args.conditioning}), {total} steps, seeds {seeds}, {len(labels)} samples"
          f" per point, {args.threads} threads")
    wall0 = time.perf_counter()
    results: dict = {}
    for name in names:
        results[name] = {str(seed): train_variant(args, name, seed, total, labels) for seed in seeds}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out) / "curves.png")
    head = " | ".join(f"acc@{s} steps" for s in args.sample_steps)
    print(f"\n| variant | seed | training minutes | accuracy | FID | val eps-MSE | val loss | {head} |")
    print("|---" * (7 + len(args.sample_steps)) + "|")
    for name, by_seed in results.items():
        for seed, r in by_seed.items():
            last, val = r["points"][-1], r["validation"][-1]
            cells = [name, seed, f"{last['minutes']:.1f}", f"{last['accuracy']:.3f}", f"{last['fid']:.2f}",
                     f"{val['val_eps_mse']:.4f}", f"{val['val_loss']:.4f}",
                     *(f"{r['accuracy_by_sample_steps'][s]:.3f}" for s in args.sample_steps)]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nwall time including evaluation: {(time.perf_counter() - wall0) / 60:.1f} min;"
          f" curves in {Path(args.out) / 'curves.png'}")


if __name__ == "__main__":
    main()
