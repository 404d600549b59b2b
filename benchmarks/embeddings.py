"""Textual inversion vs a trigger-word LoRA vs pivotal tuning, on a prompt base: does a learned token carry
the style, and what does it cost?

    python benchmarks/embeddings.py --out /tmp/embeddings [--base base] [--styles bold,italic]
        [--rows ti,ti-sks,lora,pivotal] [--per-digit 100] [--ti-steps N] [--lora-steps N] [--smoke]

For each style (bold with the trigger sks, italic with ohwx, as the demo) every row is trained, then the same
digits, training templates and seed are sampled by the base (plain prompts) and by the row WITH its token or
trigger ("a handwritten <bold-ti> seven") and WITHOUT it (the plain prompts), and scored as
benchmarks/trigger_specificity.py scores (accuracy as the digit the prompt names, ink and slant against the
base's):
  - ti       textual inversion (train-embedding): a fresh token <STYLE-ti>, only its vector trains; without
             the token the images must equal the base's bit for bit (checked: `identical_without`);
  - ti-sks   the same, its vector started at the trigger word's row ("re-using sks": fresh vs re-used);
  - lora     train-lora's prompt recipe with the trigger word, --prior and --text-encoder (the demo's);
  - pivotal  the same LoRA with a fresh token <STYLE-pt> trained with it (train-lora --pivotal).
Also: trainable parameters, file size, training seconds. Prints a Markdown table, writes OUT/results.json.
Timings are only meaningful on a quiet machine. `--smoke`: tiny settings, checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from trigger_specificity import prompts_for, score

from lora4diffusion.diffusion import DEFAULT_STEPS
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.embedding import train_embedding
from lora4diffusion.training.lora import train_lora

TRIGGERS = {"bold": "sks", "italic": "ohwx", "thin": "zwx"}
ROWS = ("ti", "ti-sks", "lora", "pivotal")


def with_token(digits: list[int], token: str) -> list[str]:
    """prompts_for's templates with ``token`` where the trigger goes (caption() places any modifier)."""
    plain = prompts_for(digits, "sks")  # the same templates and placements, then the word swapped
    return [p.replace("sks", token) for p in plain]


def generate(base: str, prompts: list[str], gen: dict, lora: str | None = None,
             embedding: str | None = None) -> torch.Tensor:
    pipe = Pipeline.load(base)  # a fresh base per configuration: nothing carries over
    if embedding:
        pipe.add_embedding(embedding)
    if lora:
        pipe.add_lora(lora)
    return pipe.to(gen.get("device", "cpu")).generate(prompts, seed=gen["seed"], steps=gen["steps"])[0]


def train_row(row: str, style: str, base: str, out: Path, args) -> tuple[dict, str | None, str | None, str]:
    """Train one row -> (facts, lora path, embedding path, the word or token its prompts carry)."""
    trigger = TRIGGERS[style]
    t0 = time.perf_counter()
    common = {"base": base, "progress": False, "overwrite": True}
    if row.startswith("ti"):
        token = f"<{style}-ti>"
        init = trigger if row == "ti-sks" else args.init_word
        run = train_embedding(style, out, token, init_word=init, steps=args.ti_steps, **common)
        file, lora, emb = out / "embedding.safetensors", None, str(out)
    else:
        token = trigger if row == "lora" else f"<{style}-pt>"
        extra = {"trigger": trigger} if row == "lora" else {"pivotal": {"token": token}}
        run = train_lora(style, out, prior=True, text_encoder=True, steps=args.lora_steps, **extra, **common)
        file, lora, emb = out / "adapter.safetensors", str(out), None
    facts = {"params": run["trainable_params"], "train_seconds": run["train_seconds"],
             "wall_seconds": time.perf_counter() - t0, "steps": run["step"],
             "file_bytes": file.stat().st_size}
    return facts, lora, emb, token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="base", help="prompt base model directory or name")
    ap.add_argument("--out", required=True, help="folder for the trained rows and results.json")
    ap.add_argument("--styles", default="bold,italic")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {', '.join(ROWS)}")
    ap.add_argument("--init-word", default=None, help="the ti row's init word (default: the mean word)")
    ap.add_argument("--ti-steps", type=int, default=None, help="textual-inversion steps (default: its own)")
    ap.add_argument("--lora-steps", type=int, default=None, help="LoRA steps (default: train-lora's)")
    ap.add_argument("--per-digit", type=int, default=100, help="samples per digit (100: 1,000 per row)")
    ap.add_argument("--sample-steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (the pipeline's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: check that the script runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.ti_steps, args.lora_steps = args.ti_steps or 3, args.lora_steps or 3
        args.per_digit, args.sample_steps = min(args.per_digit, 1), 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    labels = torch.tensor(digits)
    plain = prompts_for(digits, None)
    gen = {"seed": 0, "steps": args.sample_steps, "device": args.device}
    base_images = generate(args.base, plain, gen)
    base = score(base_images, labels, None)
    results = {"base": base, "settings": vars(args), "rows": {}}
    print(f"base ({len(digits)} samples, plain prompts): accuracy {base['accuracy']:.3f},"
          f" ink {base['ink']:.4f}, slant {base['slant']:+.2f}")
    print("\n| style | row | token | params | file | train s | prompt | accuracy | ink / base |"
          " slant - base |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for style in [s.strip() for s in args.styles.split(",") if s.strip()]:
        for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
            facts, lora, emb, token = train_row(row, style, args.base, out / f"{style}-{row}", args)
            for label, prompts in (("with", with_token(digits, token)), ("without", plain)):
                images = generate(args.base, prompts, gen, lora, emb)
                facts[label] = score(images, labels, base)
                if label == "without":
                    facts["identical_without"] = bool(torch.equal(images, base_images))
                r = facts[label]
                cells = [style, row, token, f"{facts['params']:,}", f"{facts['file_bytes'] / 1024:.1f} KiB",
                         f"{facts['train_seconds']:.0f}", label, f"{r['accuracy']:.3f}",
                         f"{r['ink_ratio']:.2f}", f"{r['slant_diff']:+.2f}"]
                print("| " + " | ".join(cells) + " |", flush=True)
            results["rows"][f"{style}-{row}"] = {"token": token, **facts}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
