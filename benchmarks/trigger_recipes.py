"""Search for a trigger-LoRA recipe: train `bold` adapters on a prompt base with the given settings and score
each WITH and WITHOUT its trigger (quick: 300 samples, fp32, the pipeline's default sampler, seed 0).

    python benchmarks/trigger_recipes.py --base base --out /tmp/recipes \
        r4=rank:4 r16=rank:16 ema=rank:16,ema:0.99 conv=rank:8,targets:all-linear+conv \
        te5=lr:1e-3,te_lr:5e-3 short=steps:250 plain=prior:0,te:0,trigger:

Each NAME=KEY:VALUE,... overrides the shipped recipe (`train-lora --trigger sks --prior --text-encoder` at
its prompt-base defaults: all-linear, rank 16, 750 steps, EMA 0.995, lr 2e-3): keys rank (alpha = rank),
targets, steps, lr, te_lr, prior (0/1), te (0/1), prior_weight, ema, trigger (empty: no trigger, scored on
the plain prompts only). Prints one JSON line per recipe: trainable parameters, training seconds, and
(accuracy, ink / base, slant - base) with and without the trigger; with `--sample-steps 5,10` at each DDIM
step count (keys "with@5", "without@5", ...; the base is scored at each too).
benchmarks/trigger_specificity.py measures a chosen recipe on 1,000 samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from trigger_specificity import prompts_for, sample, score  # this folder's script

from lora4diffusion.diffusion import DEFAULT_STEPS
from lora4diffusion.training.lora import (
    PROMPT_LORA_EMA,
    PROMPT_LORA_RANK,
    PROMPT_LORA_STEPS,
    LoRAConfig,
    default_lora_train_config,
    train_lora,
)

# train-lora's own defaults on a prompt base (training/lora.py), so a recipe names only what it changes
SHIPPED = {"rank": PROMPT_LORA_RANK, "targets": LoRAConfig().targets, "steps": PROMPT_LORA_STEPS,
           "lr": default_lora_train_config().lr, "te_lr": None, "prior": 1, "te": 1, "prior_weight": 1.0,
           "ema": PROMPT_LORA_EMA, "trigger": "sks"}  # fmt: skip


def recipe(spec: str) -> dict:
    r = dict(SHIPPED)
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        if key not in r:
            raise SystemExit(f"unknown key {key!r} in {spec!r} (keys: {', '.join(r)})")
        r[key] = value if key in ("targets", "trigger") else float(value) if value else None
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+", metavar="NAME=KEY:VALUE,...")
    ap.add_argument("--base", default="base")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-digit", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample-steps", default=str(DEFAULT_STEPS), help="DDIM steps, or a list: 5,10")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    labels = torch.tensor(digits)
    step_counts = [int(n) for n in args.sample_steps.split(",")]
    at = {n: f"@{n}" if len(step_counts) > 1 else "" for n in step_counts}  # key suffix
    gens = {n: {"seed": 0, "steps": n} for n in step_counts}
    base = {n: score(sample(args.base, [], prompts_for(digits, None), dict(gens[n])), labels, None)
            for n in step_counts}
    print(json.dumps({f"base{at[n]}": base[n] for n in step_counts}), flush=True)
    for item in args.recipes:
        name, _, spec = item.partition("=")
        r, out = recipe(spec), Path(args.out) / name
        trigger = r["trigger"] or None
        run = train_lora("bold", out, base=args.base, progress=False, overwrite=True,
                         lora=LoRAConfig(rank=int(r["rank"]), alpha=float(r["rank"]), targets=r["targets"]),
                         trigger=trigger, prior=bool(r["prior"]), text_encoder=bool(r["te"]),
                         text_encoder_lr=r["te_lr"], prior_weight=r["prior_weight"], steps=int(r["steps"]),
                         lr=r["lr"], ema_decay=r["ema"])  # fmt: skip
        res = {"recipe": name, **r, "params": run["trainable_params"],
               "train_s": round(run["train_seconds"], 1)}
        for n in step_counts:
            for label, t in (("with", trigger), ("without", None)) if trigger else (("plain", None),):
                prompts = prompts_for(digits, t)
                s = score(sample(args.base, [(str(out), 1.0)], prompts, dict(gens[n])), labels, base[n])
                res[label + at[n]] = [round(s["accuracy"], 3), round(s["ink_ratio"], 2),
                                      round(s["slant_diff"], 2)]
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
