"""The demo's report: ``render_html`` turns the metrics dict that ``run_demo`` returns (what ``metrics.json``
holds) into one self-contained HTML page (relative links to its PNGs, inline CSS, no JS or fonts);
``format_summary`` gives the terminal's short table. Rendering only: nothing here trains, samples or reads a
model.
"""

from __future__ import annotations

import html

from lora4diffusion.demo.variants import STYLES

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1250px;margin:1.5em auto;
  padding:0 1em;color:#222;line-height:1.45}
h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0;max-width:calc(33.3% - .7em)} figure.wide{max-width:100%}
.row4 figure{max-width:calc(25% - .75em)}
figure img{max-width:100%;height:auto;border:1px solid #ccc}
figcaption{font-size:.9em;color:#555;text-align:center}
table{border-collapse:collapse;font-size:.92em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
pre{background:#f5f5f5;padding:.8em;overflow-x:auto;font-size:.82em}
.ok{color:#060} .bad{color:#b00;font-weight:bold} .note{color:#555}
"""


def _fig(src: str, caption: str, wide: bool = False, prompt: str | None = None) -> str:
    e, cls = html.escape, ' class="wide"' if wide else ""
    code = f"<br><code>{e(prompt)}</code>" if prompt else ""
    return (f'<figure{cls}><img src="{e(src)}" alt="{e(caption)}"><figcaption>{e(caption)}{code}</figcaption>'
            "</figure>")  # fmt: skip


def _row(*figs: str) -> str:
    cls = "row row4" if len(figs) == 4 else "row"
    return f'<div class="{cls}">{"".join(figs)}</div>'


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


def _met(ok: bool) -> str:
    return '<span class="ok">met</span>' if ok else '<span class="bad">not met</span>'


def _prompt_sections(m: dict, fig: dict, real: list[str]) -> str:
    """Trigger words, specificity, weights, two triggers in one prompt, merging: the prompt-base story."""
    st, ck, sets = m["settings"], m["checks"], m["sets"]
    b, i = st["triggers"]["bold"], st["triggers"]["italic"]
    parts = (("prior preservation", st["prior"]), ("LoRA on the text encoder too", st["text_encoder_lora"]))
    how = ", ".join(w for w, on in parts if on)
    spec = [[html.escape(r["what"]), f"{r['value']:.3f}", html.escape(r["target"]), _met(r["met"])]
            for r in ck["specificity"]]  # fmt: skip
    return f"""<h2>Base vs triggered LoRA</h2>
<p>The bold adapter was trained on bold digits captioned with the rare word <code>{b}</code> ("a handwritten
{b} seven"), the italic one with <code>{i}</code>{", " + html.escape(how) if how else ""}. Each grid's
prompt for the digit 7 is under it; the LoRA tags name the adapter and its weight, as in AUTOMATIC1111.</p>
{_row(fig["base"], fig["bold_1"], fig["italic_1"])}
<p class="note">The targets: each style applied to real held-out digits.</p>{_row(*real)}
<h2>Trigger specificity</h2>
<p>The same adapter at weight 1, with and without its trigger in the prompt. Without it the model should draw
what the base draws (a LoRA that acts without its trigger is the failure of kohya-ss/sd-scripts #1045;
DreamBooth's prior preservation is the remedy). The second grid is the base given the trigger word without
the adapter: what the rare word alone does.</p>
{_row(fig["base"], fig["base_trigger"], fig["bold_1"], fig["bold_no_trigger"])}
{_table(["measure (same seeds as the base)", "value", "target", ""], spec)}
<h2>Weight sweep</h2>{_row(fig["bold_0"], fig["bold_0.5"], fig["bold_1"])}
<p>Weight 0 reproduces the base on the same prompt bit for bit: {_verdict(ck["scale0_equals_base"])}
(max |difference| {ck["scale0_max_abs_diff"]:.3g}).</p>
<h2>Two triggered adapters in one prompt</h2>{_row(fig["bold_1"], fig["both"], fig["italic_1"])}
<p>Ink {sets["both"]["ink_ratio"]:.2f}x the base's and slant {sets["both"]["slant_diff"]:+.2f} px against
the base (bold alone: {sets["bold_1"]["ink_ratio"]:.2f}x, {sets["bold_1"]["slant_diff"]:+.2f} px; italic
alone: {sets["italic_1"]["ink_ratio"]:.2f}x, {sets["italic_1"]["slant_diff"]:+.2f} px).</p>
{_embedding_section(m, fig)}
<h2>Merging</h2>{_row(fig["bold_1"], fig["merged_bold"])}
<p>W &larr; W + w&middot;B&middot;A in the UNet (and the text encoder), written as a plain checkpoint
(<code>merged_bold/</code>): max |merged &minus; unmerged| = {ck["merge_max_abs_diff"]:.3g} (tolerance
{ck["merge_tolerance"]:g}, fp32, DDIM eta 0): {_verdict(ck["merge_ok"])}.</p>
"""


def _embedding_section(m: dict, fig: dict) -> str:
    """Textual inversion: bold as one new token's vector, the base frozen (Gal et al. 2022)."""
    emb, sets, ck = m.get("embeddings", {}).get("bold"), m["sets"], m["checks"]
    if emb is None or "bold_ti" not in sets:
        return ""
    ti, lo = sets["bold_ti"], sets["bold_1"]
    token, trigger = html.escape(emb["token"]), html.escape(m["settings"]["triggers"]["bold"])
    same = _verdict(ck.get("embedding_base_equal", False))
    return f"""<h2>Textual inversion</h2>{_row(fig["base"], fig["bold_ti"], fig["bold_1"])}
<p>A new token <code>{token}</code> learned bold with the whole model frozen: only its vector trained
({emb["trainable_params"]:,} numbers, {_size(emb["file_bytes"])} on disk, against the LoRA's
{m["adapters"]["bold"]["trainable_params"]:,}). With the token: ink {ti["ink_ratio"]:.2f}x the base's at
{_pct(ti["accuracy"])} accuracy (the bold LoRA with <code>{trigger}</code>:
{lo["ink_ratio"]:.2f}x at {_pct(lo["accuracy"])}). The token can only steer what the frozen model already
draws. Prompts without it are the base's digits bit for bit: {same}.
</p>
"""


def _label_sections(m: dict, fig: dict, real: list[str]) -> str:
    """Base vs LoRA, scale sweep, mixing, merging: the label-base story (today's demo)."""
    st, ck = m["settings"], m["checks"]
    return f"""<h2>Base vs LoRA</h2>{_row(fig["base"], fig["bold_1"], fig["italic_1"])}
<p class="note">The targets: each style applied to real held-out digits.</p>{_row(*real)}
<h2>Scale sweep</h2>{_row(fig["bold_0"], fig["bold_0.5"], fig["bold_1"])}
<p>Scale 0 reproduces the base bit for bit: {_verdict(ck["scale0_equals_base"])}
(max |difference| {ck["scale0_max_abs_diff"]:.3g}).</p>
<h2>Mixing two adapters</h2>{_row(fig["bold_1"], fig["mix"], fig["italic_1"])}
<p class="note">Both adapters change the same layers and a label model has no prompt to tell them apart: their
deltas add up, so each gets {st["mix"][0]:g}: 1 + 1 would push the model as far as two full adapters, beyond
what either was trained for.</p>
<h2>Merging</h2>{_row(fig["bold_1"], fig["merged_bold"])}
<p>W &larr; W + scale&middot;B&middot;A, written as a plain checkpoint (<code>merged_bold/</code>):
max |merged &minus; unmerged| = {ck["merge_max_abs_diff"]:.3g} (tolerance {ck["merge_tolerance"]:g},
fp32, DDIM eta 0): {_verdict(ck["merge_ok"])}.</p>
"""


def _validation_section(m: dict) -> str:
    """The adapters' scored validations as a table: the numbers behind the curves (empty without them)."""
    rows = []
    for style, a in m["adapters"].items():
        for v in a.get("validation", []):
            if v.get("accuracy") is None:
                continue
            leak = ([_pct(v["plain_accuracy"]), f"{v['plain_ink_ratio']:.2f}x"] if "plain_accuracy" in v
                    else ["", ""])  # fmt: skip
            rows.append([html.escape(style), str(v["step"]), f"{v['val_loss']:.4f}", _pct(v["accuracy"]),
                         f"{v['ink_ratio']:.2f}x", f"{v['slant_diff']:+.2f}", *leak])
    if not rows:
        return ""
    st = m["settings"]
    return f"""<p class="note">While each adapter trained, the held-out loss (100 digits of its style at five
fixed timesteps with fixed noise) was measured {st["validations"]} times (once when it trained fewer steps),
and at every {st["score_every"]}nd validation and the last {st["score_images"]} digits were sampled with a
fixed seed and scored (ink and slant against the base, same seeds; "without trigger": the same prompts
without it). The step where the scores stop improving is where training could stop
(<code>train-lora --validate-every N --score-every K --keep-best METRIC --patience P</code>).</p>
{_table(["adapter", "step", "validation loss", "accuracy", "ink / base", "slant - base",
         "without trigger: accuracy", "ink / base"], rows)}"""


def render_html(m: dict) -> str:
    """The report for the dict ``run_demo`` returns: relative links only, no external CSS, JS or fonts."""
    e, st, sets, ref = html.escape, m["settings"], m["sets"], m["reference"]
    prompt = st["conditioning"] == "text"
    fig = {k: _fig(v["image"], v["caption"], prompt=v.get("prompt")) for k, v in sets.items()}
    kinds = ("plain", *STYLES)
    real = [_fig(f"images/real_{r}.png", f"real held-out digits, {r}") for r in kinds]
    scores = [[e(v["caption"]), _pct(v["accuracy"]), *(f"{v['fid_to'][r]:.2f}" for r in kinds),
               f"{v['mean_ink']:.4f}", f"{v['ink_ratio']:.2f}x", f"{v['slant']:+.2f}",
               f'<a href="{e(v["samples"])}">npz</a>'] for v in sets.values()]  # fmt: skip
    for r in kinds:
        floors = [f"{ref[r]['real_vs_real_fid']:.2f} (floor)" if c == r else "" for c in kinds]
        scores.append([f"real held-out digits, {r}", _pct(ref[r]["heldout_accuracy"]), *floors,
                       f"{ref[r]['heldout_mean_ink']:.4f}", "", f"{ref[r]['heldout_slant']:+.2f}",
                       ""])  # fmt: skip
    size = m["base"]["file_bytes"]
    what_base = "base model (UNet + text encoder)" if prompt else "base model"
    cost = [[what_base, f"{m['base']['params']:,}", "100%", _size(size), "", ""]]
    cost += [[f"{s} LoRA" + (f" (trigger {e(a['trigger'])})" if a.get("trigger") else ""),
              f"{a['trainable_params']:,}", f"{100 * a['share']:.2f}%",
              f"{_size(a['file_bytes'])} ({100 * a['file_bytes'] / size:.1f}% of the base weights)",
              str(a["steps"]), f"{a['final_loss']:.4f}"] for s, a in m["adapters"].items()]  # fmt: skip
    cost += [[f"{s} embedding (token {e(a['token'])})", f"{a['trainable_params']:,}",
              f"{100 * a['share']:.4f}%",
              f"{_size(a['file_bytes'])} ({100 * a['file_bytes'] / size:.3f}% of the base weights)",
              str(a["steps"]), f"{a['final_loss']:.4f}"]
             for s, a in m.get("embeddings", {}).items()]  # fmt: skip
    times = [[e(k.replace("_", " ")), f"{v:.1f} s"] for k, v in m["timings"].items()]
    losses = [_fig(p, f"{k}: training loss" + ("" if k == "base" else ", validation loss and scores"))
              for k, p in m["losses"].items() if p]
    no_base_loss = "" if m["losses"]["base"] else '<p class="note">The base directory has no metrics.csv.</p>'
    cmds = "\n".join(f"# {what}\n{cmd}" for what, cmd in m["commands"])
    base_name = "the shipped base model" if st["shipped_base"] else st["base"]
    n = len(st["digits"]) * st["per_digit"]
    kind = ("a prompt-conditioned latent model (text encoder + UNet on VAE latents)" if prompt
            else "a label-conditioned " + ("latent" if st["latent"] else "pixel") + " model")  # fmt: skip
    asked = (f"the same prompts (one row per digit, template <code>{e(st['template'])}</code>)" if prompt
             else "the same labels (one row per digit)")  # fmt: skip
    story = _prompt_sections(m, fig, real) if prompt else _label_sections(m, fig, real)
    traj = "decoded latents, " if st["latent"] else ""
    traj_caption = f"one digit per row, {traj}from noise (left) to the sample (right)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lora4diffusion demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head><body>
<h1>LoRA on a Stable-Diffusion-style UNet, on MNIST</h1>
<p>Base: <code>{e(base_name)}</code>, {kind}. Two LoRA adapters (rank {st["lora_rank"]},
{e(st["lora_targets"])} projections, {st["lora_steps"]} steps each) teach the frozen base a <b>bold</b> and an
<b>italic</b> style.
Every grid is sampled from {asked} and the same seed {st["seed"]} (DDIM, {st["steps"]} steps, eta 0, guidance
{st["guidance"]:g}), so cells compare one to one. Raw numbers: <a href="metrics.json">metrics.json</a>.</p>
{story}
<h2>Denoising trajectory (base model)</h2>
{_row(_fig("images/trajectory.png", traj_caption, True))}
<h2>Training loss, validation and where to stop</h2>{no_base_loss}{_row(*losses)}
{_validation_section(m)}
<h2>Scores</h2>
<p class="note">Accuracy: the project's classifier reads the digit that was asked for. FID: in that
classifier's feature space, against {ref["plain"]["heldout_n"]} held-out digits, plain or restyled (lower is
closer); a style LoRA should move its samples towards its own style. Mean ink: the average pixel value (and
its ratio to the base's, same seeds). Slant: how far right the top half's ink sits of the bottom half's
(px; <code>styles.slant</code>). With {n} samples FID is biased upwards: compare with the floors (real
digits, same n).</p>
{_table(["samples", "accuracy", "FID vs plain", "FID vs bold", "FID vs italic", "mean ink", "ink / base",
         "slant", ""], scores)}
<h2>Cost</h2>
{_table(["model", "trainable parameters", "share of the base", "file", "steps", "final loss"], cost)}
{_table(["part", "wall time"], times)}
<h2>Reproduce each part</h2>
<p class="note">Everything goes into <code>repro/</code> in this folder; each <code>sample</code> command is
headed by its grid's caption. Training and sampling are seeded: on the same machine and torch version the
sample commands give the pixels shown above.</p>
<pre>{e(cmds)}</pre>
</body></html>
"""


def format_summary(m: dict) -> str:
    """The sets as a short text table for the terminal, then the checks."""
    lines = [f"{'samples':<44} {'accuracy':>8} {'FID plain':>9} {'FID bold':>9} {'FID ital.':>9} {'ink':>7}"
             f" {'slant':>6}"]  # fmt: skip
    for v in m["sets"].values():
        fid = v["fid_to"]
        lines.append(f"{v['caption']:<44} {_pct(v['accuracy']):>8} {fid['plain']:>9.2f} {fid['bold']:>9.2f} "
                     f"{fid['italic']:>9.2f} {v['mean_ink']:>7.4f} {v['slant']:>+6.2f}")  # fmt: skip
    ck = m["checks"]
    for r in ck.get("specificity", []):
        met = "met" if r["met"] else "NOT met"
        lines.append(f"{r['what']}: {r['value']:.3f} (target {r['target']}: {met})")
    lines.append(f"weight 0 == base: {ck['scale0_equals_base']}; merged vs unmerged: max diff "
                 f"{ck['merge_max_abs_diff']:.2g} ({'ok' if ck['merge_ok'] else 'FAIL'}); "
                 f"{m['timings']['total']:.0f} s in all")  # fmt: skip
    return "\n".join(lines)
