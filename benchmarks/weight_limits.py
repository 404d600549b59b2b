"""Where do adapter weights and guidance stop giving digits? The measurement behind MAX_LORA_WEIGHT and
MAX_GUIDANCE (lora4diffusion/limits.py).

    python benchmarks/weight_limits.py                       # shipped base + bold / italic, and pixel-base
    python benchmarks/weight_limits.py --per-digit 2 --models base   # a quick look

For each shipped model (the prompt base with its `bold` / `italic` adapters and their trigger words, the
label `pixel-base` with `bold-pixel` / `italic-pixel`) the same digits and seed are sampled as `sample` does
(DDIM at the default steps, bf16 where the CPU has it):
  - at adapter weights 0, 0.5, 1, 1.5, 2, 2.5, 3, 4, 6, 8 and -0.5 ... -4 (guidance 1.25);
  - at guidance 0, 1, 1.25, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100, 1000, 1e6 (no adapter);
and scored with the shipped classifier (accuracy as the digit asked for) and mean ink (the base's real
digits: about 0.13; an all-white image is 1). Prints Markdown tables, one row per setting.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from lora4diffusion.captions import caption, family_templates
from lora4diffusion.classifier import load_classifier
from lora4diffusion.data import load_mnist
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import evaluate_samples
from lora4diffusion.lora.layers import set_adapter_weight
from lora4diffusion.lora.prompt_lora import set_prompt_adapter_weight
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.precision import default_precision

WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0)
GUIDANCE = (0.0, 1.0, 1.25, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 50.0, 100.0, 1e3, 1e6)
MODELS = {  # model -> {adapter: trigger word (prompt models) or None}
    "base": {"bold": "sks", "italic": "ohwx"},
    "pixel-base": {"bold-pixel": None, "italic-pixel": None},
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def conditions(pipe: Pipeline, digits: list[int], trigger: str | None) -> list:
    """Label models: the digits. Prompt models: the training templates cycled per digit, with the trigger."""
    if not pipe.is_prompt_model:
        return digits
    templates, seen, out = family_templates(None), {}, []
    for d in digits:
        k = seen[d] = seen.get(d, -1) + 1
        out.append(caption(d, templates[k % len(templates)], trigger))
    return out


def set_weight(pipe: Pipeline, name: str, weight: float) -> None:
    """Pipeline.set_lora_weight without its limit check: this script looks beyond the limit."""
    if pipe.is_prompt_model:
        set_prompt_adapter_weight(pipe.unet, pipe.text_encoder, name, weight)
    else:
        set_adapter_weight(pipe.unet, name, weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {', '.join(MODELS)}")
    ap.add_argument("--per-digit", type=int, default=10, help="samples per digit and setting")
    ap.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS))
    ap.add_argument("--guidance", default=",".join(f"{g:g}" for g in GUIDANCE))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chosen = default_precision(torch.device("cpu"))
    bf16 = chosen.bf16
    clf, ref = load_classifier(), load_mnist("embedded")
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    labels = torch.tensor(digits)
    print(f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}, {chosen},"
          f" {len(digits)} samples per row (seed 0)")

    def row(pipe: Pipeline, conds: list, guidance: float) -> str:
        t0 = time.perf_counter()
        try:
            images, _ = pipe.generate(conds, guidance=guidance, seed=0, bf16=bf16)
        except UserError:  # the pipeline refuses non-finite images
            return "non-finite (refused) | - | - |"
        r = evaluate_samples(images, labels, clf, ref)
        white = float((images > 0.5).double().mean())
        return f"{r['accuracy']:.3f} | {r['mean_ink']:.3f} | {white:.3f} | {time.perf_counter() - t0:.1f} s"

    for model in args.models.split(","):
        pipe = Pipeline.load(model)
        print(f"\n### {model}: adapter weight (guidance 1.25)\n")
        print("| adapter | weight | accuracy | mean ink | pixels > 0.5 | time |")
        print("|---|---|---|---|---|---|")
        for adapter, trigger in MODELS[model].items():
            name = pipe.add_lora(adapter, 0.0)
            conds = conditions(pipe, digits, trigger)
            for w in (float(x) for x in args.weights.split(",")):
                set_weight(pipe, name, w)
                print(f"| {adapter} | {w:g} | {row(pipe, conds, 1.25)} |", flush=True)
            pipe.remove_lora(name)
        print(f"\n### {model}: guidance (no adapter)\n")
        print("| guidance | accuracy | mean ink | pixels > 0.5 | time |")
        print("|---|---|---|---|---|")
        conds = conditions(pipe, digits, None)
        for g in (float(x) for x in args.guidance.split(",")):
            print(f"| {g:g} | {row(pipe, conds, g)} |", flush=True)


if __name__ == "__main__":
    main()
