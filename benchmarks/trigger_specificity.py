"""Trigger specificity of LoRA on a prompt base: does an adapter act WITH its trigger
and stay out of the way WITHOUT it? Prior preservation on/off x UNet-only / UNet + text encoder, at rank 4.

    python benchmarks/trigger_specificity.py --base DIR --out /tmp/trigger_spec --style bold --trigger sks \
        [--steps 500] [--per-digit 100] [--second italic=zwx:ADAPTER_DIR] [--adapters row=DIR,...]

For every row an adapter is trained with `train_lora` (style, trigger, --prior, --text-encoder; rank 4
or --rank, alpha = rank) unless `--adapters` names already trained ones; then the same digits, templates
and seed are sampled (DDIM at the pipeline's default steps, guidance 1.25; same seed = the same initial
noise per sample) by
  - the base, on the plain prompts ("a handwritten seven", ...: the training templates, cycled);
  - the base + adapter at weight 1, on the same prompts WITH the trigger ("a handwritten sks seven") and
    WITHOUT it (the plain prompts),
and scored with the shipped classifier (`evaluate.style_scores`: accuracy as the digit the prompt names)
plus mean ink and slant (`styles.slant`), as ratios / differences to the base's. Targets (bold): with the
trigger accuracy >= 95 % and ink >= 1.4x the base; without it ink within +-10 % of the base and accuracy
>= 98 %. With `--second NAME=TRIGGER:DIR` (e.g. italic=zwx:runs/italic), the two adapters are also composed
in one prompt ("a handwritten sks zwx seven"): ink up AND slant up against the base, same seeds.

Prints Markdown tables and writes OUT/results.json. Check it runs on a tiny model with --smoke.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lora4diffusion.captions import digit_prompts
from lora4diffusion.diffusion import DEFAULT_STEPS
from lora4diffusion.evaluate import style_scores
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.lora import LoRAConfig, train_lora

ROWS = {  # name: (prior, text encoder)
    "unet": (False, False),
    "unet+prior": (True, False),
    "unet+te": (False, True),
    "unet+te+prior": (True, True),
}


def prompts_for(digits: list[int], trigger: str | None) -> list[str]:
    """The training templates cycled per digit (the k-th sample of a digit takes template k mod T)."""
    return digit_prompts(digits, None, trigger)


def score(images: torch.Tensor, labels: torch.Tensor, base: dict | None) -> dict:
    """Accuracy, ink, slant (and ink / slant against ``base``'s): what train-lora --score-every logs."""
    return style_scores(images, labels, base)


def sample(base: str, loras: list[tuple[str, float]], prompts: list[str], gen: dict) -> torch.Tensor:
    pipe = Pipeline.load(base)  # a fresh base per configuration: nothing carries over
    for path, weight in loras:
        pipe.add_lora(path, weight)
    return pipe.to(gen.pop("device", "cpu")).generate(prompts, **gen)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="base", help="prompt base model directory or name")
    ap.add_argument("--out", required=True, help="folder for the trained rows and results.json")
    ap.add_argument("--style", default="bold")
    ap.add_argument("--trigger", default="sks")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {', '.join(ROWS)}")
    ap.add_argument("--adapters", default="", help="ROW=DIR,...: measure these instead of training the rows")
    ap.add_argument("--second", default=None, help="NAME=TRIGGER:DIR: a second triggered adapter to compose")
    ap.add_argument("--steps", type=int, default=None, help="LoRA steps (default: train_lora's)")
    ap.add_argument("--prior-weight", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    ap.add_argument("--targets", default=None, help="LoRA targets (default: train_lora's, all-linear)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: train_lora's)")
    ap.add_argument("--per-digit", type=int, default=100, help="samples per digit (100: 1,000 per row)")
    ap.add_argument("--sample-steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (the pipeline's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: check that the script runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.per_digit, args.sample_steps = args.steps or 4, min(args.per_digit, 2), 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    labels = torch.tensor(digits)
    plain, trig = prompts_for(digits, None), prompts_for(digits, args.trigger)
    gen = {"seed": 0, "steps": args.sample_steps, "device": args.device}

    base = score(sample(args.base, [], plain, dict(gen)), labels, None)
    results = {"base": base, "settings": vars(args), "rows": {}}
    print(f"base ({len(digits)} samples, plain prompts): accuracy {base['accuracy']:.3f},"
          f" ink {base['ink']:.4f}, slant {base['slant']:+.2f}")
    given = dict(item.split("=", 1) for item in args.adapters.split(",") if item)
    print("\n| row | prior | text encoder | LoRA params | train s | trigger | accuracy | ink / base |"
          " slant - base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        prior, te = ROWS[row]
        run_dir = Path(given.get(row, out / row))
        info: dict = {"prior": prior, "text_encoder": te}
        if row not in given:
            t0 = time.perf_counter()
            lora = LoRAConfig(rank=args.rank, alpha=float(args.rank), **({"targets": args.targets}
                                                                         if args.targets else {}))
            run = train_lora(args.style, run_dir, base=args.base, lora=lora, lr=args.lr,
                             trigger=args.trigger, prior=prior, text_encoder=te, progress=False,
                             prior_weight=args.prior_weight if prior else 1.0, steps=args.steps,
                             overwrite=True)
            info.update(params=run["trainable_params"], train_seconds=run["train_seconds"],
                        wall_seconds=time.perf_counter() - t0, steps=run["step"])
        for label, prompts in (("with", trig), ("without", plain)):
            info[label] = score(sample(args.base, [(str(run_dir), 1.0)], prompts, dict(gen)), labels, base)
            r = info[label]
            params = f"{info['params']:,}" if "params" in info else "?"
            cells = [row, "on" if prior else "off", "on" if te else "off", params,
                     f"{info.get('train_seconds', float('nan')):.0f}", label, f"{r['accuracy']:.3f}",
                     f"{r['ink_ratio']:.2f}", f"{r['slant_diff']:+.2f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
        results["rows"][row] = info
    if args.second:
        name, _, rest = args.second.partition("=")
        trigger2, _, second_dir = rest.partition(":")
        first = Path(given.get("unet+te+prior", out / "unet+te+prior"))
        if not first.exists():  # the last measured row
            first = Path(given.get(row, out / row))
        both = prompts_for(digits, f"{args.trigger} {trigger2}")
        r = score(sample(args.base, [(str(first), 1.0), (second_dir, 1.0)], both, dict(gen)), labels, base)
        results["composed"] = {"adapters": [str(first), second_dir], "triggers": [args.trigger, trigger2],
                               **r}
        print(f"\ncomposed ({args.style}:{args.trigger} + {name}:{trigger2}, one prompt): accuracy"
              f" {r['accuracy']:.3f}, ink / base {r['ink_ratio']:.2f}, slant - base {r['slant_diff']:+.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
