"""What the demo samples: its two styles and their trigger words, the grids (one ``Variant`` each: adapter
weights and the triggers its prompts carry), each grid's prompts and the command line that redoes it.

Nothing here trains or samples; ``run.py`` runs these grids and ``report.py`` shows them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lora4diffusion.captions import caption, check_trigger
from lora4diffusion.errors import UserError

STYLES = ("bold", "italic")
DEFAULT_TRIGGERS = {"bold": "sks", "italic": "ohwx"}  # DreamBooth's and kohya guides' rare identifiers
# Textual inversion on a prompt base: bold as a new token whose one vector starts at the word "bold"'s row
# (Gal et al. 2022: only that vector trains). A pivotal row (train-lora --pivotal) is not in the demo: it is a
# third LoRA training, about half as long again as the whole demo (benchmarks/embeddings.py measures it).
TI_TOKEN, TI_INIT = "<bold-ti>", "bold"
# The prompt template of every prompt set: DreamBooth's "a [V] dog" placement ("a handwritten sks seven"),
# one of the training templates (captions.TEMPLATES["handwritten"]).
TEMPLATE = "a handwritten {w}"
# Label base: 0.7 + 0.7 rather than 1 + 1: both adapters adapt the same layers and no prompt separates them,
# so their deltas add up and 1 + 1 pushes the model as far as two full adapters. On a prompt base each adapter
# was trained to act on its own trigger (and, with --prior, to leave trigger-less prompts alone): 1 + 1, as
# users write <lora:a:1> <lora:b:1>.
LABEL_MIX = (0.7, 0.7)
PROMPT_MIX = (1.0, 1.0)


@dataclass(frozen=True)
class Variant:
    """One grid: adapter weights (style -> weight) and, on a prompt base, whose trigger words the prompt
    carries. Every variant samples the same digits with the same seed, so grids compare cell by cell."""

    key: str
    caption: str
    weights: dict = field(default_factory=dict)
    triggered: tuple = ()
    token: str = ""  # a textual-inversion token the prompt carries (its embedding is loaded)


def label_variants() -> list[Variant]:
    return [
        Variant("base", "base model"),
        Variant("bold_0", "bold LoRA, scale 0", {"bold": 0.0}),
        Variant("bold_0.5", "bold LoRA, scale 0.5", {"bold": 0.5}),
        Variant("bold_1", "bold LoRA, scale 1", {"bold": 1.0}),
        Variant("italic_1", "italic LoRA, scale 1", {"italic": 1.0}),
        Variant("mix", f"bold {LABEL_MIX[0]:g} + italic {LABEL_MIX[1]:g}",
                {"bold": LABEL_MIX[0], "italic": LABEL_MIX[1]}),
        Variant("merged_bold", "bold merged into the weights"),
    ]  # fmt: skip


def prompt_variants(triggers: dict[str, str]) -> list[Variant]:
    b, i = triggers["bold"], triggers["italic"]
    return [
        Variant("base", "base model"),
        Variant("base_trigger", f"base model, prompt with {b} (no adapter)", {}, ("bold",)),
        Variant("bold_0", f"bold LoRA, weight 0, with {b}", {"bold": 0.0}, ("bold",)),
        Variant("bold_0.5", f"bold LoRA, weight 0.5, with {b}", {"bold": 0.5}, ("bold",)),
        Variant("bold_1", f"bold LoRA, weight 1, with {b}", {"bold": 1.0}, ("bold",)),
        Variant("bold_no_trigger", f"bold LoRA, weight 1, WITHOUT {b}", {"bold": 1.0}),
        Variant("italic_1", f"italic LoRA, weight 1, with {i}", {"italic": 1.0}, ("italic",)),
        Variant("both", f"bold {PROMPT_MIX[0]:g} + italic {PROMPT_MIX[1]:g}, with {b} {i}",
                {"bold": PROMPT_MIX[0], "italic": PROMPT_MIX[1]}, ("bold", "italic")),
        Variant("bold_ti", f"bold embedding (textual inversion), with {TI_TOKEN}", token=TI_TOKEN),
        Variant("merged_bold", f"bold merged into the weights, with {b}", {}, ("bold",)),
    ]  # fmt: skip


def prompt_text(digit: int, v: Variant, triggers: dict[str, str], adapters: dict[str, str]) -> str:
    """The prompt of ``v`` for one digit: its <lora:...> tags (``adapters``: style -> what the tag names),
    then the template with the variant's trigger words before the digit ("a handwritten sks seven")."""
    words = " ".join([*(triggers[s] for s in v.triggered), *([v.token] if v.token else [])]) or None
    tags = "".join(f"<lora:{adapters[s]}:{w:g}> " for s, w in v.weights.items())
    return tags + caption(digit, TEMPLATE, words)


@dataclass
class PromptOptions:
    """How the prompt-base adapters are trained (train-lora's flags); None = the default."""

    bold_trigger: str | None = None
    italic_trigger: str | None = None
    prior: bool | None = None
    text_encoder: bool | None = None

    def given(self) -> list[str]:
        flags = {"--bold-trigger": self.bold_trigger, "--italic-trigger": self.italic_trigger,
                 "--prior/--no-prior": self.prior, "--text-encoder/--no-text-encoder": self.text_encoder}
        return [f for f, v in flags.items() if v is not None]  # fmt: skip

    def resolved(self) -> tuple[dict[str, str], bool, bool]:
        """(style -> trigger, prior, text encoder), checked: reserved rare words, two different ones."""
        given = {"bold": self.bold_trigger, "italic": self.italic_trigger}
        triggers = {}
        for style, word in given.items():  # an empty word is refused as train-lora refuses it, not defaulted
            try:
                triggers[style] = check_trigger(DEFAULT_TRIGGERS[style] if word is None else word)
            except UserError as e:
                raise UserError(f"--{style}-trigger: {e}") from None
        if triggers["bold"] == triggers["italic"]:
            raise UserError(f"--bold-trigger and --italic-trigger are both {triggers['bold']!r}: composing"
                            " the two adapters needs two different trigger words")  # fmt: skip
        return triggers, self.prior is not False, self.text_encoder is not False


def repro_commands(out: Path, base_dir: Path, shipped: bool, variants: list[Variant], prompts: dict,
              vae_dir: Path | None, st: dict, per_digit: int, kw: dict) -> list[list[str]]:  # fmt: skip
    """[what, command] pairs that redo each part into OUT/repro; a sample command's ``what`` is its grid's
    caption. They give the same pixels up to float rounding (~1e-7: a fresh process may pick other kernel
    paths for the small LoRA matmuls)."""

    def q(p: Path | str) -> str:
        return shlex.quote(str(p))

    repro = out.absolute() / "repro"
    if st["from_scratch"]:
        base_dir = repro / "base"
    base_opt = "" if shipped else f" --checkpoint {q(base_dir)}"
    ckpt_opt = "" if shipped else f" --checkpoint {q(base_dir)}"
    gen = f"--steps {kw['steps']} --guidance {kw['guidance']:g} --seed {kw['seed']} --no-bf16"  # demo: fp32
    lora_dir = {s: repro / f"lora_{s}" for s in STYLES}
    ti_dir = repro / "embedding_bold"
    n = f" --max-train-steps {st['lora_steps']}" if st["lora_steps"] else ""
    if st["bf16_training"] in (True, False):  # the trainings' precision, when the demo was told one
        n += " --bf16" if st["bf16_training"] else " --no-bf16"
    if not st["device"].startswith("cpu"):
        n += f" --device {st['device'].split(':')[0]}"
    prompt = st["conditioning"] == "text"
    cmds = []
    if st["from_scratch"]:
        train = f"lora4diffusion train --conditioning text --preset {st['scratch_preset']}"
        cmds.append(["train the base model", f"{train} --vae {q(vae_dir)} --out {q(base_dir)}"])
    for s in STYLES:
        extra = ""
        if prompt:
            extra = f" --trigger {st['triggers'][s]}" + " --prior" * st["prior"]
            extra += " --text-encoder" * st["text_encoder_lora"]
        cmds.append([f"{s} LoRA", f"lora4diffusion train-lora{base_opt} --style {s}{extra}{n}"
                     f" --out {q(lora_dir[s])}"])  # fmt: skip
    if any(v.token for v in variants):
        cmds.append(["bold embedding", f"lora4diffusion train-embedding{base_opt} --style bold --token"
                     f" {q(TI_TOKEN)} --init-word {TI_INIT}{n} --out {q(ti_dir)}"])  # fmt: skip
    merged = repro / "merged_bold"
    for v in variants:
        if v.key == "merged_bold":
            cmds.append(["merge bold into the base", f"lora4diffusion merge{ckpt_opt} --lora"
                         f" {q(lora_dir['bold'])} --out {q(merged)}"])  # fmt: skip
        where = f" --checkpoint {q(merged)}" if v.key == "merged_bold" else ckpt_opt
        extra = " --trajectory" if v.key == "base" else ""
        extra += f" --embedding {q(ti_dir)}" if v.token else ""
        if prompt:
            paths = {s: str(lora_dir[s]) for s in STYLES}
            tagged = [prompt_text(d, v, st["triggers"], paths) for d in range(10)]
            what = " ".join(f"--prompt {q(p)}" for p in tagged) + f" --num {per_digit}"
        else:
            loras = "".join(f" --lora {q(f'{lora_dir[s]}:{w:g}')}" for s, w in v.weights.items())
            what = f"--digits 0-9 --per-digit {per_digit}{loras}"
        cmds.append([v.caption, f"lora4diffusion sample{where} {what} {gen}{extra} --out {q(repro / v.key)}"])
    for key in ("base", "bold_0.5"):
        cmds.append([f"score {key}", f"lora4diffusion evaluate --samples {q(repro / key / 'samples.npz')}"])
    return cmds
