#!/usr/bin/env bash
# Every shipped model and adapter measured in ONE run, back to back, at the defaults (DDIM steps, guidance
# 1.25, seed 0, 1,000 samples = 100 per digit), with `lora4diffusion evaluate --json`; the trigger adapters
# with benchmarks/trigger_specificity.py (with / without the trigger word, same seeds as the base).
# The JSON files it writes into benchmarks/results/ are what README.md's and the model cards' numbers are
# checked against (tests/test_readme.py). Run it on a quiet machine: it also times sampling.
#
#     bash benchmarks/evaluate_shipped.sh [OUT_DIR]        # default benchmarks/results, ~8 min on 2 cores
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
ev() { local name=$1; shift; echo "evaluate $*" >&2; lora4diffusion -q evaluate --json --per-digit 100 "$@" > "$out/$name.json"; }
ev base --checkpoint base                                  # bf16 (the default on this CPU)
ev base_fp32 --checkpoint base --no-bf16
ev base_held_out --checkpoint base --family held_out       # phrasings never used in training
for f in numeral word handwritten digit picture number; do   # the aim: >= 99 % for each template family
    ev "family_$f" --checkpoint base --family "$f"
done
ev pixel-base --checkpoint pixel-base
ev pixel-base_fp32 --checkpoint pixel-base --no-bf16
ev bold-pixel --checkpoint pixel-base --lora bold-pixel
ev bold-pixel_0.5 --checkpoint pixel-base --lora bold-pixel:0.5
ev italic-pixel --checkpoint pixel-base --lora italic-pixel
adapters=lora4diffusion/pretrained/adapters
python benchmarks/trigger_specificity.py --base base --out "$out/trigger_bold" --rows unet+te+prior \
    --adapters "unet+te+prior=$adapters/bold" --second "italic=ohwx:$adapters/italic" > "$out/trigger_bold.md"
python benchmarks/trigger_specificity.py --base base --out "$out/trigger_italic" --style italic --trigger ohwx \
    --rows unet+te+prior --adapters "unet+te+prior=$adapters/italic" > "$out/trigger_italic.md"
for s in bold italic; do mv "$out/trigger_$s/results.json" "$out/trigger_$s.json"; rmdir "$out/trigger_$s"; done
