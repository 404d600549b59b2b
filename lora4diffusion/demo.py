"""``lora4diffusion demo``: the whole LoRA story in one offline command, written up as an HTML report.

base model -> a ``bold`` and an ``italic`` LoRA -> the SAME labels and seed sampled with the base, the bold
LoRA at scales 0 / 0.5 / 1, the italic LoRA, a bold + italic mix and the merged bold checkpoint -> every set
scored with the project's classifier -> ``OUT/report.html`` (+ the PNGs it shows) and ``OUT/metrics.json``.
"""

from __future__ import annotations

import csv
import html
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lora4diffusion.errors import UserError
from lora4diffusion.pipeline import DEFAULT_STEPS

log = logging.getLogger("lora4diffusion")

DEFAULT_PER_DIGIT = 8  # 80 samples per set: the default run stays under 10 min on 2 CPU cores
STYLES = ("bold", "italic")
# 0.7 + 0.7 rather than 1 + 1: both adapters adapt the same layers (the LoRA targets) and their weight deltas
# add up, so 1 + 1 pushes the model as far as two full adapters, beyond what either was trained for.
MIX = (0.7, 0.7)
MERGE_TOLERANCE = 1e-4  # merged vs unmerged, fp32, DDIM eta 0: only rounding differs
# What the demo writes inside OUT; --overwrite removes exactly these (plus base/ with --from-scratch).
OWNED = (
    "report.html",
    "metrics.json",
    "images",
    "samples",
    "repro",
    *(f"lora_{s}" for s in STYLES),
    "merged_bold",
)
# key, caption, adapter scales. Every set uses the same labels and seed, so grids compare cell by cell.
SETS = (
    ("base", "base model", {}),
    ("bold_0", "bold LoRA, scale 0", {"bold": 0.0}),
    ("bold_0.5", "bold LoRA, scale 0.5", {"bold": 0.5}),
    ("bold_1", "bold LoRA, scale 1", {"bold": 1.0}),
    ("italic_1", "italic LoRA, scale 1", {"italic": 1.0}),
    ("mix", f"bold {MIX[0]:g} + italic {MIX[1]:g}", {"bold": MIX[0], "italic": MIX[1]}),
)
MERGED = ("merged_bold", "bold merged into the weights")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty folder (without overwrite) or a place we cannot create or write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    try:
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace the demo in it")
    except OSError as e:
        raise UserError(f"--out {out}: cannot read it ({e.strerror or e})") from None
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there ({probe} is not a writable directory)")


def _prepare(out: Path, base, from_scratch: bool, overwrite: bool, steps: int, preset: str):
    """Validate everything, then clear what --overwrite replaces. -> (base_dir, shipped, pipeline or None)."""
    from lora4diffusion.catalog import resolve
    from lora4diffusion.checkpoint import pretrained_dir
    from lora4diffusion.diffusion import DiffusionConfig
    from lora4diffusion.pipeline import Pipeline
    from lora4diffusion.train import PRESET_NAMES

    if from_scratch and base is not None:
        raise UserError("pass either --checkpoint DIR or --from-scratch, not both")
    if preset not in PRESET_NAMES:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESET_NAMES)})")
    _check_out(out, overwrite)
    doomed = [out / n for n in OWNED] + ([out / "base"] if from_scratch else [])
    shipped = base is None and not from_scratch
    base_dir = out / "base" if from_scratch else pretrained_dir() if base is None else resolve(base, "model")
    if shipped and not (base_dir / "config.json").is_file():
        raise UserError(
            "this install has no shipped base model yet: pass --checkpoint DIR (a `lora4diffusion train` run)"
            " or --from-scratch (trains one first, ~15 min)"
        )
    pipe = None
    if not from_scratch:
        if any(base_dir.resolve().is_relative_to(d.resolve()) for d in doomed if d.exists()):
            raise UserError(f"--checkpoint {base_dir} lies inside what --overwrite would delete; move it")
        pipe = Pipeline.load(base_dir)  # a bad base fails here, before anything is written
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
    return base_dir.absolute(), shipped, pipe


def _plot_csv(metrics_csv: Path, png: Path, title: str) -> str | None:
    from lora4diffusion.plots import plot_loss

    rows = list(csv.DictReader(metrics_csv.open())) if metrics_csv.is_file() else []
    if not rows:
        return None
    plot_loss([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], png, title)
    return f"images/{png.name}"


def _score(images: dict, labels: list[int], per_digit: int, out: Path) -> tuple[dict, dict]:
    """Accuracy and ink against plain digits, FID against plain / bold / italic held-out digits."""
    from lora4diffusion.classifier import load_classifier
    from lora4diffusion.data import load_mnist
    from lora4diffusion.evaluate import evaluate_samples
    from lora4diffusion.plots import save_grid
    from lora4diffusion.styles import style_splits

    classifier, plain = load_classifier(), load_mnist("embedded")
    refs = {"plain": plain} | {s: style_splits(plain, s) for s in STYLES}
    captions = {k: c for k, c, _ in SETS} | dict([MERGED])
    sets, label_t = {}, torch.tensor(labels)
    for key, imgs in images.items():
        scores = {r: evaluate_samples(imgs, label_t, classifier, ref) for r, ref in refs.items()}
        p = scores["plain"]
        sets[key] = {"caption": captions[key], "accuracy": p["accuracy"], "mean_ink": p["mean_ink"],
                     "fid_classifier": p["fid_classifier"],
                     "fid_to": {r: s["fid_classifier"] for r, s in scores.items()},
                     "image": f"images/{key}.png", "samples": f"samples/{key}.npz"}  # fmt: skip
        save_grid(imgs, per_digit, out / sets[key]["image"])
        np.savez(out / sets[key]["samples"], images=imgs.numpy(), labels=np.array(labels, dtype=np.int64))
    for r, ref in refs.items():  # what each style looks like on real digits (the FID references)
        idx = torch.cat([(ref.heldout.labels == d).nonzero()[:per_digit, 0] for d in range(10)])
        save_grid(ref.heldout.images[idx].float() / 255, per_digit, out / "images" / f"real_{r}.png")
    return sets, {r: s["reference"] for r, s in scores.items()}


def run_demo(out: str | Path, base: str | Path | None = None, from_scratch: bool = False,
             overwrite: bool = False, lora_steps: int | None = None, per_digit: int = DEFAULT_PER_DIGIT,
             steps: int = DEFAULT_STEPS, scratch_preset: str = "fast", seed: int = 0,
             progress: bool = True, device: str = "auto", bf16: bool | None = None) -> dict:  # fmt: skip
    """Run the demo into folder ``out``; returns what ``metrics.json`` holds plus ``"report"`` (its path).

    ``base``: a model directory (default: the shipped base); ``from_scratch`` trains one (``scratch_preset``)
    into ``out/base`` instead. ``device``: where training and sampling run; ``bf16``: the trainings' autocast
    (None: on where supported); sampling stays fp32 so that the scale-0 and merge checks are exact. Bad
    input raises UserError before anything is written. Ctrl-C during training raises KeyboardInterrupt after
    the training run saved a resumable checkpoint.
    """
    from lora4diffusion.checkpoint import save_model, write_json
    from lora4diffusion.lora.adapters import load_adapter
    from lora4diffusion.lora.finetune import LoRAConfig, default_lora_train_config, train_lora
    from lora4diffusion.lora.layers import lora_summary, set_adapter_weight, unload_lora
    from lora4diffusion.pipeline import DEFAULT_GUIDANCE, Pipeline
    from lora4diffusion.plots import save_trajectory
    from lora4diffusion.train import train_base

    t_start, out = time.perf_counter(), Path(out)
    for name, v in (("--per-digit", per_digit), ("--steps", steps), ("--lora-steps", lora_steps or 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"{name} must be a positive integer, got {v!r}")
    base_dir, shipped, pipe = _prepare(out, base, from_scratch, overwrite, steps, scratch_preset)
    timings: dict[str, float] = {}

    def lap(key: str, t0: float) -> None:
        timings[key] = round(time.perf_counter() - t0, 2)

    def finished(run: dict) -> dict:
        if run["interrupted"]:  # the run saved a resumable checkpoint; a half-trained demo would mislead
            raise KeyboardInterrupt
        return run

    t0 = time.perf_counter()  # 1. the base model
    if from_scratch:
        log.info("demo: training a %s base model into %s", scratch_preset, base_dir)
        finished(train_base(scratch_preset, base_dir, progress=progress, device=device, bf16=bf16))
        pipe = Pipeline.load(base_dir)
    pipe.to(device)
    lap("base_train" if from_scratch else "base_load", t0)

    adapters = {}  # 2. two style adapters on the frozen base
    for style in STYLES:
        t0 = time.perf_counter()
        log.info("demo: training the %s LoRA", style)
        run_dir = out / f"lora_{style}"
        r = finished(train_lora(style, run_dir, base=base_dir, steps=lora_steps, progress=progress,
                                  device=device, bf16=bf16))
        lap(f"lora_{style}", t0)
        adapters[style] = {"trainable_params": r["trainable_params"], "share": r["share"], "steps": r["step"],
                           "final_loss": r["loss"], "train_seconds": round(r["train_seconds"], 2),
                           "file_bytes": (run_dir / "adapter.safetensors").stat().st_size}  # fmt: skip

    # 3. the same labels and seed through every variant; fp32 and eta 0, so the only randomness is x_T
    labels = [d for d in range(10) for _ in range(per_digit)]
    kw = {"steps": steps, "guidance": DEFAULT_GUIDANCE, "seed": seed, "eta": 0.0}
    images: dict[str, torch.Tensor] = {}
    for key, caption, scales in SETS:
        t0 = time.perf_counter()
        log.info("demo: sampling %s", caption)
        if key == "base":  # sampled before any adapter is loaded: the untouched model
            images[key], traj = pipe.generate(
                labels, trajectory_every=max(1, steps // 10), progress=progress, **kw
            )
            save_trajectory([x[::per_digit] for x in traj], out / "images" / "trajectory.png")  # 1 row/digit
            for style in STYLES:
                load_adapter(pipe.unet, out / f"lora_{style}", name=style, weight=0.0)
        else:
            for style in STYLES:
                set_adapter_weight(pipe.unet, style, scales.get(style, 0.0))
            images[key] = pipe.generate(labels, progress=progress, **kw)[0]
        lap(f"sample_{key}", t0)
    counts = lora_summary(pipe.unet, "bold")

    t0 = time.perf_counter()  # merge bold into the weights and write a plain checkpoint, as `merge` does
    log.info("demo: merging the bold LoRA and sampling the merged model")
    merged = Pipeline.load(base_dir)  # merged on the CPU, in fp32: a plain checkpoint
    merged.add_lora(out / "lora_bold", 1.0)
    source = [{"adapter": str(out / "lora_bold"), "scale": 1.0, "name": "lora_bold"}]
    merged_unet = unload_lora(merged.unet)
    save_model(out / MERGED[0], merged_unet, merged.diffusion, {"merged_from": source}, vae=merged.vae)
    merged_pipe = Pipeline.load(out / MERGED[0]).to(device)
    images[MERGED[0]] = merged_pipe.generate(labels, progress=progress, **kw)[0]
    lap("merge_and_sample", t0)
    checks = {"scale0_max_abs_diff": float((images["bold_0"] - images["base"]).abs().max()),
              "scale0_equals_base": bool(torch.equal(images["bold_0"], images["base"])),
              "merge_max_abs_diff": float((images[MERGED[0]] - images["bold_1"]).abs().max()),
              "merge_tolerance": MERGE_TOLERANCE}  # fmt: skip
    checks["merge_ok"] = checks["merge_max_abs_diff"] <= MERGE_TOLERANCE

    t0 = time.perf_counter()  # 4. scores
    sets, reference = _score(images, labels, per_digit, out)
    lap("evaluate", t0)

    t0 = time.perf_counter()  # 5. loss curves, metrics.json, report
    losses = {"base": _plot_csv(base_dir / "metrics.csv", out / "images" / "loss_base.png", "base model")}
    for s in STYLES:
        losses[s] = _plot_csv(
            out / f"lora_{s}" / "metrics.csv", out / "images" / f"loss_{s}.png", f"{s} LoRA"
        )
    lora = LoRAConfig()
    settings = {"base": str(base_dir), "shipped_base": shipped, "from_scratch": from_scratch,
                "scratch_preset": scratch_preset if from_scratch else None, "digits": list(range(10)),
                "per_digit": per_digit, "sampler": "ddim", "mix": list(MIX), **kw,
                "lora_steps": lora_steps or default_lora_train_config().steps, "lora_rank": lora.rank,
                "lora_targets": lora.targets}  # fmt: skip
    base_info = {"path": str(base_dir), "file_bytes": (base_dir / "model.safetensors").stat().st_size,
                 "params": counts["base_params"], "lora_modules": counts["modules"]}  # fmt: skip
    commands = _commands(out, base_dir, shipped, from_scratch, scratch_preset, lora_steps, per_digit, kw)
    result = {"settings": settings, "sets": sets, "reference": reference, "checks": checks,
              "adapters": adapters, "base": base_info, "losses": losses, "commands": commands,
              "timings": timings}  # fmt: skip
    lap("plots", t0)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    write_json(out / "metrics.json", result)
    (out / "report.html").write_text(render_html(result), encoding="utf-8")
    return result | {"report": str(out / "report.html")}


def _commands(out: Path, base_dir: Path, shipped: bool, from_scratch: bool, preset: str,
              lora_steps: int | None, per_digit: int, kw: dict) -> list[list[str]]:  # fmt: skip
    """[what, command] pairs that redo each part into OUT/repro; the sample commands give the same pixels
    up to float rounding (~1e-7: a fresh process may pick other kernel paths for the small LoRA matmuls)."""

    def q(p: Path | str) -> str:
        return shlex.quote(str(p))

    repro = out.absolute() / "repro"
    if from_scratch:
        base_dir = repro / "base"
    base_opt = "" if shipped else f" --checkpoint {q(base_dir)}"
    ckpt_opt = "" if shipped else f" --checkpoint {q(base_dir)}"
    sampling = f"--digits 0-9 --per-digit {per_digit} --steps {kw['steps']} --guidance {kw['guidance']:g}"
    sampling += f" --seed {kw['seed']} --no-bf16"  # the demo samples in fp32 (exact scale-0 / merge checks)
    lora_dir = {s: repro / f"lora_{s}" for s in STYLES}
    n = f" --max-train-steps {lora_steps}" if lora_steps else ""
    cmds = (
        [["base model", f"lora4diffusion train --preset {preset} --out {q(base_dir)}"]]
        if from_scratch
        else []
    )
    cmds += [[f"{s} LoRA", f"lora4diffusion train-lora{base_opt} --style {s}{n} --out {q(lora_dir[s])}"]
             for s in STYLES]  # fmt: skip
    for key, caption, scales in SETS:
        loras = "".join(f" --lora {q(f'{lora_dir[s]}:{w:g}')}" for s, w in scales.items())
        extra = " --trajectory" if key == "base" else ""
        cmds.append(
            [caption, f"lora4diffusion sample{ckpt_opt} {sampling}{loras}{extra} --out {q(repro / key)}"]
        )
    merged = q(repro / MERGED[0])
    cmds.append(["merge bold into the base", f"lora4diffusion merge{ckpt_opt} --lora {q(lora_dir['bold'])} "
                 f"--out {merged}"])  # fmt: skip
    cmds.append(
        [MERGED[1], f"lora4diffusion sample --checkpoint {merged} {sampling} --out {q(repro / 'merged')}"]
    )
    for key in ("base", "bold_0.5"):
        cmds.append([f"score {key}", f"lora4diffusion evaluate --samples {q(repro / key / 'samples.npz')}"])
    return cmds


# ------------------------------------------------------------------------------------------------ report
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1250px;margin:1.5em auto;
  padding:0 1em;color:#222;line-height:1.45}
h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0;max-width:calc(33.3% - .7em)} figure.wide{max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #ccc}
figcaption{font-size:.9em;color:#555;text-align:center}
table{border-collapse:collapse;font-size:.92em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
pre{background:#f5f5f5;padding:.8em;overflow-x:auto;font-size:.82em}
.ok{color:#060} .bad{color:#b00;font-weight:bold} .note{color:#555}
"""


def _fig(src: str, caption: str, wide: bool = False) -> str:
    e, cls = html.escape, ' class="wide"' if wide else ""
    return (
        f'<figure{cls}><img src="{e(src)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
    )


def _row(*figs: str) -> str:
    return f'<div class="row">{"".join(figs)}</div>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escaped by the caller); the header is plain text."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _verdict(ok: bool) -> str:
    return '<span class="ok">pass</span>' if ok else '<span class="bad">FAIL</span>'


def render_html(m: dict) -> str:
    """The report for the dict ``run_demo`` returns: relative links only, no external CSS, JS or fonts."""
    e, st, sets, ref, ck = html.escape, m["settings"], m["sets"], m["reference"], m["checks"]
    fig = {k: _fig(v["image"], v["caption"]) for k, v in sets.items()}
    kinds = ("plain", *STYLES)
    real = [_fig(f"images/real_{r}.png", f"real held-out digits, {r}") for r in kinds]
    scores = [[e(v["caption"]), _pct(v["accuracy"]), *(f"{v['fid_to'][r]:.2f}" for r in kinds),
               f"{v['mean_ink']:.4f}", f'<a href="{e(v["samples"])}">npz</a>']
              for v in sets.values()]  # fmt: skip
    for r in kinds:
        floors = [f"{ref[r]['real_vs_real_fid']:.2f} (floor)" if c == r else "" for c in kinds]
        scores.append([f"real held-out digits, {r}", _pct(ref[r]["heldout_accuracy"]), *floors,
                       f"{ref[r]['heldout_mean_ink']:.4f}", ""])  # fmt: skip
    size = m["base"]["file_bytes"]
    cost = [["base model", f"{m['base']['params']:,}", "100%", _size(size), "", ""]]
    cost += [[f"{s} LoRA", f"{a['trainable_params']:,}", f"{100 * a['share']:.2f}%",
              f"{_size(a['file_bytes'])} ({100 * a['file_bytes'] / size:.1f}% of the base file)",
              str(a["steps"]), f"{a['final_loss']:.4f}"] for s, a in m["adapters"].items()]  # fmt: skip
    times = [[e(k.replace("_", " ")), f"{v:.1f} s"] for k, v in m["timings"].items()]
    losses = [_fig(p, f"{k} training loss") for k, p in m["losses"].items() if p]
    no_base_loss = "" if m["losses"]["base"] else '<p class="note">The base directory has no metrics.csv.</p>'
    cmds = "\n".join(f"# {what}\n{cmd}" for what, cmd in m["commands"])
    base_name = "the shipped base model" if st["shipped_base"] else st["base"]
    n = len(st["digits"]) * st["per_digit"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lora4diffusion demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head><body>
<h1>LoRA on a Stable-Diffusion-style UNet, on MNIST</h1>
<p>Base: <code>{e(base_name)}</code>. Two LoRA adapters (rank {st["lora_rank"]}, {e(st["lora_targets"])}
projections, {st["lora_steps"]} steps each) teach the frozen base a <b>bold</b> and an <b>italic</b> style.
Every grid is sampled from the same labels (one row per digit) and the same seed {st["seed"]} (DDIM,
{st["steps"]} steps, eta 0, guidance {st["guidance"]:g}), so cells compare one to one.
Raw numbers: <a href="metrics.json">metrics.json</a>.</p>
<h2>Base vs LoRA</h2>{_row(fig["base"], fig["bold_1"], fig["italic_1"])}
<p class="note">The targets: each style applied to real held-out digits.</p>{_row(*real)}
<h2>Scale sweep</h2>{_row(fig["bold_0"], fig["bold_0.5"], fig["bold_1"])}
<p>Scale 0 reproduces the base bit for bit: {_verdict(ck["scale0_equals_base"])}
(max |difference| {ck["scale0_max_abs_diff"]:.3g}).</p>
<h2>Mixing two adapters</h2>{_row(fig["bold_1"], fig["mix"], fig["italic_1"])}
<p class="note">Both adapters change the same layers (all-linear) and their deltas add up, so each gets
{st["mix"][0]:g}: 1 + 1 would push the model as far as two full adapters, beyond what either was trained
for.</p>
<h2>Merging</h2>{_row(fig["bold_1"], fig["merged_bold"])}
<p>W &larr; W + scale&middot;B&middot;A, written as a plain checkpoint (<code>merged_bold/</code>):
max |merged &minus; unmerged| = {ck["merge_max_abs_diff"]:.3g} (tolerance {ck["merge_tolerance"]:g},
fp32, DDIM eta 0): {_verdict(ck["merge_ok"])}.</p>
<h2>Denoising trajectory (base model)</h2>
{_row(_fig("images/trajectory.png", "one digit per row, from noise (left) to the sample (right)", True))}
<h2>Training loss</h2>{no_base_loss}{_row(*losses)}
<h2>Scores</h2>
<p class="note">Accuracy: the project's classifier reads the digit that was asked for. FID: in that
classifier's feature space, against {ref["plain"]["heldout_n"]} held-out digits, plain or restyled (lower is
closer); a style LoRA should move its samples towards its own style. Mean ink: the average pixel value.
With {n} samples FID is biased upwards: compare with the floors (real digits, same n).</p>
{_table(["samples", "accuracy", "FID vs plain", "FID vs bold", "FID vs italic", "mean ink", ""], scores)}
<h2>Cost</h2>
{_table(["model", "trainable parameters", "share of the base", "file", "steps", "final loss"], cost)}
{_table(["part", "wall time"], times)}
<h2>Reproduce each part</h2>
<p class="note">Everything goes into <code>repro/</code> in this folder. Training and sampling are seeded:
on the same machine and torch version the sample commands give the pixels shown above.</p>
<pre>{e(cmds)}</pre>
</body></html>
"""


def format_summary(m: dict) -> str:
    """The sets as a short text table for the terminal, then the two checks."""
    lines = [f"{'samples':<30} {'accuracy':>8} {'FID plain':>9} {'FID bold':>9} {'FID ital.':>9} {'ink':>7}"]
    for v in m["sets"].values():
        fid = v["fid_to"]
        lines.append(f"{v['caption']:<30} {_pct(v['accuracy']):>8} {fid['plain']:>9.2f} {fid['bold']:>9.2f} "
                     f"{fid['italic']:>9.2f} {v['mean_ink']:>7.4f}")  # fmt: skip
    ck = m["checks"]
    lines.append(f"scale 0 == base: {ck['scale0_equals_base']}; merged vs unmerged: max diff "
                 f"{ck['merge_max_abs_diff']:.2g} ({'ok' if ck['merge_ok'] else 'FAIL'}); "
                 f"{m['timings']['total']:.0f} s in all")  # fmt: skip
    return "\n".join(lines)
