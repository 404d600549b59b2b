"""``lora4diffusion demo``: the whole LoRA story in one offline command, written up as an HTML report.

Prompt base (the shipped default): base -> a ``bold`` LoRA with trigger ``sks`` and an
``italic`` one with trigger ``ohwx`` (DreamBooth-LoRA: ``train-lora --trigger --prior --text-encoder``) -> the
SAME prompts and seed sampled with the base, with bold at weights 0 / 0.5 / 1, with bold WITHOUT its trigger
(trigger specificity: it should look like the base), with italic, with both triggered adapters composed in one
prompt, and with the merged bold model. Every sampling call goes through ``Pipeline`` with AUTOMATIC1111's
``<lora:PATH:W>`` tags in the prompts, exactly as ``lora4diffusion sample --prompt`` does.

Label base (``--checkpoint`` of a label model, the reference's design): bold / italic LoRAs, the same labels
and seed through the base, bold at scales 0 / 0.5 / 1, italic, a 0.7 + 0.7 mix and the merged bold model.

Every set is scored with the project's classifier (accuracy, FID, ink, slant) -> ``OUT/report.html`` (+ the
PNGs it shows) and ``OUT/metrics.json``, with the commands that reproduce each grid.

``variants.py``: the grids, their prompts and repro commands; ``run.py``: the experiment (``run_demo``);
``report.py``: the HTML report and the terminal summary.
"""

from lora4diffusion.demo.report import format_summary, render_html
from lora4diffusion.demo.run import DEFAULT_PER_DIGIT, run_demo
from lora4diffusion.demo.variants import (
    DEFAULT_TRIGGERS,
    STYLES,
    TEMPLATE,
    PromptOptions,
    Variant,
    label_variants,
    prompt_text,
    prompt_variants,
)

__all__ = [
    "DEFAULT_PER_DIGIT",
    "DEFAULT_TRIGGERS",
    "STYLES",
    "TEMPLATE",
    "PromptOptions",
    "Variant",
    "format_summary",
    "label_variants",
    "prompt_text",
    "prompt_variants",
    "render_html",
    "run_demo",
]
