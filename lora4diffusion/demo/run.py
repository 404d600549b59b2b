"""The demo's experiment: check the options, prepare the base (the shipped one, ``--checkpoint`` or trained
``--from-scratch``), train the bold and italic adapters (and, on a prompt base, bold as a textual-inversion
embedding), sample every grid of ``variants.py`` with the same seed, merge bold into the weights, score each
set with the project's classifier and write ``metrics.json`` and the report (``report.py``).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lora4diffusion import catalog
from lora4diffusion.catalog import resolve
from lora4diffusion.checkpoint import write_json
from lora4diffusion.classifier import load_classifier
from lora4diffusion.data import load_mnist
from lora4diffusion.demo.report import render_html
from lora4diffusion.demo.variants import (
    LABEL_MIX,
    PROMPT_MIX,
    STYLES,
    TEMPLATE,
    TI_INIT,
    TI_TOKEN,
    PromptOptions,
    label_variants,
    prompt_text,
    prompt_variants,
    repro_commands,
)
from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS, DiffusionConfig
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import evaluate_samples, fid
from lora4diffusion.folders.model import save_model
from lora4diffusion.folders.vae import default_vae_dir, load_vae
from lora4diffusion.lora.layers import unload_lora
from lora4diffusion.lora.prompt_lora import check_trigger_in
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.plots import save_grid, save_trajectory
from lora4diffusion.precision import choose_precision
from lora4diffusion.runlock import LOCK_NAME
from lora4diffusion.styles import slant, style_splits
from lora4diffusion.training.embedding import train_embedding
from lora4diffusion.training.lora import (
    default_lora_config,
    default_lora_train_config,
    default_trigger_train_config,
    train_lora,
)
from lora4diffusion.training.prompt_base import PRESET_NAMES, train_prompt_base
from lora4diffusion.training.run import plot_metrics
from lora4diffusion.training.validation import read_validation

log = logging.getLogger("lora4diffusion")

DEFAULT_PER_DIGIT = 8  # 80 samples per set
# Each adapter is validated 10 times while it trains (the held-out loss: about one training step's forwards
# each), every 2nd time with scores (30 samples with and without the trigger, against the base): on a loaded
# 2-core machine a set of 50 samples cost ~7 steps of a 750-step prompt LoRA, so 11 sets of 30 ~ 6 % of the
# adapters' time, most of the demo's. The report draws the curves: where the scores stop improving.
VALIDATIONS = 10
SCORE_EVERY = 2
SCORE_IMAGES = 30
MERGE_TOLERANCE = 1e-4  # merged vs unmerged, fp32, DDIM eta 0: only rounding differs
# Trigger-specificity targets: a triggered adapter restyles, the same adapter without its trigger leaves the
# base's digits alone (shown beside the measured values; benchmarks/RESULTS.md).
TARGETS = {"with_acc": 0.95, "with_ink": 1.4, "without_acc": 0.98, "without_ink": 0.10}
# What the demo writes inside OUT; --overwrite removes exactly these (plus base/ with --from-scratch).
OWNED = (
    "report.html",
    "metrics.json",
    "images",
    "samples",
    "repro",
    *(f"lora_{s}" for s in STYLES),
    "embedding_bold",
    "merged_bold",
)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty folder (without overwrite) or a place we cannot create or write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    try:  # the lock of the command writing here (cli/common.claim) is not content
        if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace the demo in it")
    except OSError as e:
        raise UserError(f"--out {out}: cannot read it ({e.strerror or e})") from None
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there ({probe} is not a writable directory)")


def _prepare(out: Path, base, from_scratch: bool, overwrite: bool, steps: int, preset: str, vae,
             opts: PromptOptions):  # fmt: skip
    """Validate everything, then clear what --overwrite replaces.
    -> (base_dir, shipped, pipeline or None, vae_dir or None, (triggers, prior, text encoder) or None)."""
    if from_scratch and base is not None:
        raise UserError("pass either --checkpoint DIR or --from-scratch, not both")
    if vae is not None and not from_scratch:
        raise UserError("--vae goes with --from-scratch (a model folder carries its own VAE)")
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESET_NAMES)})")
    _check_out(out, overwrite)
    doomed = [out / n for n in OWNED] + ([out / "base"] if from_scratch else [])
    shipped = base is None and not from_scratch
    shipped_dir = catalog.pretrained_dir  # looked up per call: a redirected shipped base holds
    base_dir = out / "base" if from_scratch else shipped_dir() if base is None else resolve(base, "model")
    if shipped and not (base_dir / "config.json").is_file():
        raise UserError(
            "this install has no shipped base model yet: pass --checkpoint DIR (a `lora4diffusion train` run)"
            " or --from-scratch (trains one first)"
        )
    pipe, vae_dir = None, None
    if from_scratch:  # a prompt base on a VAE: the shipped one unless --vae
        vae_dir = Path(vae).absolute() if vae is not None else default_vae_dir()
        load_vae(vae)  # a missing or bad VAE fails here, before anything is written
        if any(vae_dir.resolve().is_relative_to(d.resolve()) for d in doomed if d.exists()):
            raise UserError(f"--vae {vae_dir} lies inside what --overwrite would delete; move it first")
    else:
        if any(base_dir.resolve().is_relative_to(d.resolve()) for d in doomed if d.exists()):
            raise UserError(f"--checkpoint {base_dir} lies inside what --overwrite would delete; move it"
                            " first")  # fmt: skip
        pipe = Pipeline.load(base_dir)  # a bad base fails here, before anything is written
    prompt = from_scratch or pipe.is_prompt_model
    if not prompt and opts.given():
        raise UserError(f"{', '.join(opts.given())}: {base_dir} is a label model (no text); these options"
                        " are for a prompt base")  # fmt: skip
    resolved = opts.resolved() if prompt else None
    if resolved and pipe is not None:
        for w in resolved[0].values():
            check_trigger_in(w, pipe.tokenizer)
    timesteps = pipe.diffusion.timesteps if pipe else DiffusionConfig().timesteps
    if steps > timesteps:
        raise UserError(f"--steps {steps} exceeds the model's {timesteps} diffusion timesteps")
    for d in doomed:
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)
        else:
            d.unlink(missing_ok=True)  # a file or a link: never follow a link into someone else's folder
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return base_dir.absolute(), shipped, pipe, vae_dir, resolved


def _plot_run(run_dir: Path, png: Path) -> str | None:
    """The run's curves (training loss; validation loss and scores where it validated) as the run folder's
    loss.png draws them (training.run.plot_metrics)."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file() or not list(csv.DictReader(metrics.open())):
        return None
    plot_metrics(metrics, png)
    return f"images/{png.name}"


def _validation_settings(steps: int) -> dict:
    """``VALIDATIONS`` held-out validations over an adapter's ``steps`` (one at the end when it has fewer
    steps), each ``SCORE_EVERY``-th scored (training/validation.py, training/scores.py)."""
    if steps < VALIDATIONS:  # a toy run (tests, LORA4DIFFUSION_QUICK): one validation, one digit each
        return {"validate_every": steps, "score_every": SCORE_EVERY, "validation_images": 10}
    return {"validate_every": steps // VALIDATIONS, "score_every": SCORE_EVERY,
            "validation_images": SCORE_IMAGES}


def _score(images: dict, labels: list[int], per_digit: int, out: Path, captions: dict) -> tuple[dict, dict]:
    """Accuracy, ink and slant against plain digits (ink and slant also relative to the base's: the same
    seeds), FID against plain / bold / italic held-out digits, as ``evaluate`` computes them. The references'
    features are computed once (``evaluate_samples`` on the first set), not once per set and reference."""
    classifier, plain = load_classifier(), load_mnist("embedded")
    refs = {"plain": plain} | {s: style_splits(plain, s) for s in STYLES}
    label_t = torch.tensor(labels)
    first = next(iter(images.values()))
    reference = {r: evaluate_samples(first, label_t, classifier, ref)["reference"] for r, ref in refs.items()}
    held = {r: classifier.embed(ref.heldout.images.float() / 255)[1] for r, ref in refs.items()}
    sets = {}
    for key, imgs in images.items():
        logits, feats = classifier.embed(imgs)  # batched, gradient-free, eval mode
        fid_to = {r: fid(feats, h) for r, h in held.items()}
        correct = logits.argmax(1) == label_t
        sets[key] = {"caption": captions[key], "accuracy": float(correct.double().mean()),
                     "mean_ink": float(imgs.double().mean()), "slant": slant(imgs),
                     "fid_classifier": fid_to["plain"], "fid_to": fid_to,
                     "image": f"images/{key}.png", "samples": f"samples/{key}.npz"}  # fmt: skip
        save_grid(imgs, per_digit, out / sets[key]["image"])
        np.savez(out / sets[key]["samples"], images=imgs.numpy(), labels=np.array(labels, dtype=np.int64))
    for v in sets.values():  # same seeds as the base: differences are the adapter's (and the prompt's) doing
        v["ink_ratio"] = v["mean_ink"] / sets["base"]["mean_ink"]
        v["slant_diff"] = v["slant"] - sets["base"]["slant"]
    for r, ref in refs.items():  # what each style looks like on real digits (the FID references)
        idx = torch.cat([(ref.heldout.labels == d).nonzero()[:per_digit, 0] for d in range(10)])
        save_grid(ref.heldout.images[idx].float() / 255, per_digit, out / "images" / f"real_{r}.png")
        reference[r]["heldout_slant"] = slant(ref.heldout.images.float() / 255)
    return sets, reference


def _merge(base_dir: Path, adapter: Path, out: Path) -> None:
    """Fold the adapter into the weights (UNet and, for a prompt model, text encoder) and write a plain
    checkpoint, exactly as ``lora4diffusion merge`` does."""
    merged = Pipeline.load(base_dir)
    merged.add_lora(adapter, 1.0)
    model = unload_lora(merged.unet, merge=True)
    if merged.is_prompt_model:
        unload_lora(merged.text_encoder, merge=True)
    source = [{"adapter": str(adapter), "scale": 1.0, "name": adapter.name}]
    save_model(out, model, merged.diffusion, {"merged_from": source}, vae=merged.vae, text=merged.text)


def run_demo(out: str | Path, base: str | Path | None = None, from_scratch: bool = False,
             overwrite: bool = False, lora_steps: int | None = None, per_digit: int = DEFAULT_PER_DIGIT,
             steps: int = DEFAULT_STEPS, scratch_preset: str = "fast", seed: int = 0,
             progress: bool = True, vae: str | Path | None = None,
             prompt_options: PromptOptions | None = None, device: str = "auto",
             bf16: bool | None = None) -> dict:  # fmt: skip
    """Run the demo into folder ``out``; returns what ``metrics.json`` holds plus ``"report"`` (its path).

    ``base``: a model directory, prompt or label model (default: the shipped base); ``from_scratch`` trains a
    prompt base (``scratch_preset``, on ``vae``, default the shipped VAE) into ``out/base`` instead.
    ``prompt_options``: triggers, prior preservation, text-encoder LoRA of the prompt-base adapters.
    ``device``: auto | cpu | cuda for training and sampling; ``bf16``: autocast in the trainings (None: the
    device's default, precision.py); sampling stays fp32 so the merge check is exact.
    Bad input raises UserError before anything is written. Ctrl-C during training raises KeyboardInterrupt
    after the training run saved a resumable checkpoint.
    """
    t_start, out = time.perf_counter(), Path(out)
    for name, v in (("--per-digit", per_digit), ("--steps", steps), ("--lora-steps", lora_steps or 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"{name} must be a positive integer, got {v!r}")
    base_dir, shipped, pipe, vae_dir, resolved = _prepare(
        out, base, from_scratch, overwrite, steps, scratch_preset, vae, prompt_options or PromptOptions()
    )
    timings: dict[str, float] = {}
    trained_in = choose_precision(resolve_device(device), bf16)  # what the training loop will choose
    log.info("demo: training in %s; sampling in fp32 (merged vs unmerged compared exactly)", trained_in)

    def lap(key: str, t0: float) -> None:
        timings[key] = round(time.perf_counter() - t0, 2)

    def finished(run: dict) -> dict:
        if run["interrupted"]:  # the run saved a resumable checkpoint; a half-trained demo would mislead
            raise KeyboardInterrupt
        return run

    t0 = time.perf_counter()  # 1. the base model
    if from_scratch:
        log.info("demo: training a %s prompt base model into %s", scratch_preset, base_dir)
        finished(train_prompt_base(scratch_preset, base_dir, vae=vae_dir, progress=progress, device=device,
                                   bf16=bf16))
        pipe = Pipeline.load(base_dir)
    pipe = pipe.to(resolve_device(device))
    lap("base_train" if from_scratch else "base_load", t0)
    prompt = pipe.is_prompt_model
    triggers, prior, text_encoder = resolved if prompt else ({}, False, False)
    parts = [m for m in (pipe.unet, pipe.text_encoder) if m is not None]  # before any adapter is loaded
    base_params = sum(p.numel() for m in parts for p in m.parameters())

    adapters = {}  # 2. two style adapters on the frozen base
    lora_kw = {"trigger": None, "prior": prior, "text_encoder": text_encoder}
    for style in STYLES:
        t0 = time.perf_counter()
        log.info("demo: training the %s LoRA", style)
        run_dir = out / f"lora_{style}"
        kw = lora_kw | {"trigger": triggers.get(style)}
        n = lora_steps or (default_trigger_train_config(kw["trigger"]) if prompt else
                           default_lora_train_config()).steps
        r = finished(train_lora(style, run_dir, base=base_dir, steps=lora_steps, progress=progress,
                                device=device, bf16=bf16, **kw, **_validation_settings(n)))
        lap(f"lora_{style}", t0)
        adapters[style] = {"trainable_params": r["trainable_params"], "share": r["share"], "steps": r["step"],
                           "final_loss": r["loss"], "train_seconds": round(r["train_seconds"], 2),
                           "file_bytes": (run_dir / "adapter.safetensors").stat().st_size,
                           "trigger": triggers.get(style),
                           "validation": [{"step": k, **v} for k, v in read_validation(run_dir)]}  # fmt: skip

    embeddings = {}  # prompt base: bold as a textual-inversion token (one vector trains, the base is frozen)
    if prompt:
        t0 = time.perf_counter()
        log.info("demo: training the bold embedding %s (textual inversion)", TI_TOKEN)
        run_dir = out / "embedding_bold"
        r = finished(train_embedding("bold", run_dir, TI_TOKEN, base=base_dir, init_word=TI_INIT,
                                     steps=lora_steps, progress=progress, device=device, bf16=bf16))
        lap("embedding_bold", t0)
        embeddings["bold"] = {"trainable_params": r["trainable_params"], "share": r["share"],
                              "steps": r["step"], "final_loss": r["loss"],
                              "train_seconds": round(r["train_seconds"], 2), "token": TI_TOKEN,
                              "file_bytes": (run_dir / "embedding.safetensors").stat().st_size}  # fmt: skip

    # 3. the same digits and seed through every variant; fp32 and eta 0, so the only randomness is x_T.
    # Prompt base: one Pipeline, adapters named by <lora:PATH:W> tags in the prompts (loaded once, weights set
    # per call, untagged ones at 0) -- the code path of `sample --prompt`. Label base: Pipeline.add_lora +
    # set_lora_weight, the code path of `sample --lora`.
    variants = prompt_variants(triggers) if prompt else label_variants()
    digits = [d for d in range(10) for _ in range(per_digit)]
    kw = {"steps": steps, "guidance": DEFAULT_GUIDANCE, "seed": seed, "eta": 0.0}
    run_adapters = {s: str((out / f"lora_{s}").absolute()) for s in STYLES}
    prompts: dict[str, list[str]] = {}  # key -> one prompt per digit (what the grid's rows were asked)
    images: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}  # label base: style -> adapter name in the pipeline
    for v in variants:
        if v.key == "merged_bold":
            continue
        t0 = time.perf_counter()
        log.info("demo: sampling %s", v.caption)
        if prompt:
            if v.token and v.token not in pipe.tokenizer.added:  # `sample --embedding`
                pipe.add_embedding(out / "embedding_bold")
            prompts[v.key] = [prompt_text(d, v, triggers, run_adapters) for d in range(10)]
            inputs = [prompts[v.key][d] for d in digits]
        else:
            if v.weights and not names:
                names = {s: pipe.add_lora(run_adapters[s], 0.0) for s in STYLES}
            for s, n in names.items():
                pipe.set_lora_weight(n, v.weights.get(s, 0.0))
            inputs = digits
        every = max(1, steps // 10) if v.key == "base" else 0
        images[v.key], traj = pipe.generate(inputs, trajectory_every=every, progress=progress, **kw)
        if v.key == "base":  # one row per digit; a latent model's trajectory is decoded by the pipeline
            save_trajectory([x[::per_digit] for x in traj], out / "images" / "trajectory.png")
        lap(f"sample_{v.key}", t0)

    t0 = time.perf_counter()  # merge bold into the weights and write a plain checkpoint, as `merge` does
    log.info("demo: merging the bold LoRA and sampling the merged model")
    _merge(base_dir, out / "lora_bold", out / "merged_bold")
    merged_v = variants[-1]
    if prompt:
        prompts[merged_v.key] = [prompt_text(d, merged_v, triggers, run_adapters) for d in range(10)]
    inputs = [prompts[merged_v.key][d] for d in digits] if prompt else digits
    merged = Pipeline.load(out / "merged_bold").to(pipe.device)
    images[merged_v.key] = merged.generate(inputs, progress=progress, **kw)[0]
    lap("merge_and_sample", t0)
    zero_ref = "base_trigger" if prompt else "base"  # weight 0 = the base on the same prompt, bit for bit
    checks = {"scale0_reference": zero_ref,
              "scale0_max_abs_diff": float((images["bold_0"] - images[zero_ref]).abs().max()),
              "scale0_equals_base": bool(torch.equal(images["bold_0"], images[zero_ref])),
              "merge_max_abs_diff": float((images["merged_bold"] - images["bold_1"]).abs().max()),
              "merge_tolerance": MERGE_TOLERANCE}  # fmt: skip
    checks["merge_ok"] = checks["merge_max_abs_diff"] <= MERGE_TOLERANCE
    if prompt:  # textual inversion leaves the base untouched: its prompts draw the base's digits bit for bit
        again = pipe.generate([prompts["base"][d] for d in digits], **kw)[0]
        checks["embedding_base_equal"] = bool(torch.equal(again, images["base"]))

    t0 = time.perf_counter()  # 4. scores
    sets, reference = _score(images, digits, per_digit, out, {v.key: v.caption for v in variants})
    for key in prompts:  # the digit-7 prompt, with short tag names, for the report's captions
        sets[key]["prompt"] = prompt_text(7, next(v for v in variants if v.key == key), triggers,
                                          {s: s for s in STYLES})  # fmt: skip
    if prompt:
        checks["specificity"] = _specificity(sets)
    lap("evaluate", t0)

    t0 = time.perf_counter()  # 5. loss curves, metrics.json, report
    losses = {"base": _plot_run(base_dir, out / "images" / "loss_base.png")}
    for s in STYLES:
        losses[s] = _plot_run(out / f"lora_{s}", out / "images" / f"loss_{s}.png")
    if embeddings:
        losses["bold embedding"] = _plot_run(out / "embedding_bold", out / "images" / "loss_bold_ti.png")
    lora = default_lora_config(base_dir)  # rank 16 on a prompt base, 4 on a label base
    settings = {"base": str(base_dir), "shipped_base": shipped, "from_scratch": from_scratch,
                "conditioning": "text" if prompt else "label", "latent": pipe.vae is not None,
                "scratch_preset": scratch_preset if from_scratch else None,
                "vae": str(vae_dir) if vae_dir else None, "digits": list(range(10)),
                "per_digit": per_digit, "sampler": "ddim",
                "mix": list(PROMPT_MIX if prompt else LABEL_MIX), **kw,
                "template": TEMPLATE if prompt else None,
                "triggers": triggers, "prior": prior, "text_encoder_lora": text_encoder,
                "lora_steps": lora_steps or adapters["bold"]["steps"], "lora_rank": lora.rank,
                "lora_targets": lora.targets, "device": str(pipe.device),
                "validations": VALIDATIONS, "score_every": SCORE_EVERY,
                "score_images": _validation_settings(adapters["bold"]["steps"])["validation_images"],
                "bf16_training": bf16 if bf16 is not None else "auto",
                "training_precision": str(trained_in)}  # fmt: skip
    weights = ["model.safetensors"] + (["text_encoder.safetensors"] if prompt else [])
    base_info = {"path": str(base_dir), "file_bytes": sum((base_dir / w).stat().st_size for w in weights),
                 "params": base_params}  # fmt: skip
    commands = repro_commands(out, base_dir, shipped, variants, prompts, vae_dir,
                               dict(settings, lora_steps=lora_steps), per_digit, kw)  # fmt: skip
    for what, cmd in commands:
        for v in variants:
            if what == v.caption:
                sets[v.key]["command"] = cmd
    result = {"settings": settings, "sets": sets, "reference": reference, "checks": checks,
              "adapters": adapters, "embeddings": embeddings, "base": base_info, "losses": losses,
              "commands": commands, "timings": timings}  # fmt: skip
    lap("plots", t0)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    write_json(out / "metrics.json", result)
    (out / "report.html").write_text(render_html(result), encoding="utf-8")
    return result | {"report": str(out / "report.html")}


def _specificity(sets: dict) -> list[dict]:
    """Trigger specificity, each measure against the base sampled with the same seeds (accuracy, ink ratio,
    slant shift of bold with and without its trigger, italic, both composed): [what, value, target, met]."""
    t, w, wo, both, it = (TARGETS, sets["bold_1"], sets["bold_no_trigger"], sets["both"], sets["italic_1"])
    rows = [
        ("bold WITH its trigger: accuracy", w["accuracy"], f">= {t['with_acc']:.0%}",
         w["accuracy"] >= t["with_acc"]),
        ("bold WITH its trigger: ink / base", w["ink_ratio"], f">= {t['with_ink']:g}x",
         w["ink_ratio"] >= t["with_ink"]),
        ("bold WITHOUT its trigger: accuracy", wo["accuracy"], f">= {t['without_acc']:.0%}",
         wo["accuracy"] >= t["without_acc"]),
        ("bold WITHOUT its trigger: ink / base", wo["ink_ratio"], f"1 +- {t['without_ink']:g}",
         abs(wo["ink_ratio"] - 1) <= t["without_ink"]),
        ("italic WITH its trigger: slant - base (px)", it["slant_diff"], "> 0", it["slant_diff"] > 0),
        ("both composed: ink / base", both["ink_ratio"], "> 1", both["ink_ratio"] > 1),
        ("both composed: slant - base (px)", both["slant_diff"], "> 0", both["slant_diff"] > 0),
    ]  # fmt: skip
    return [{"what": a, "value": float(b), "target": c, "met": bool(d)} for a, b, c, d in rows]
