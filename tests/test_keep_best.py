"""Training that tells you when to stop: scores every K validations (training/scores.py), the best export
kept in RUN/best/ and early stopping (training/best.py, training/loop.py), the curves in loss.png."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from lora4diffusion.checkpoint import load_tensors, read_metadata, save_tensors
from lora4diffusion.cli import main
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import style_scores
from lora4diffusion.models.unet import UNet
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.best import BEST_DIR, Best, parse_metric
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import STATE_NAME, TrainConfig
from lora4diffusion.training.scores import score_digits
from lora4diffusion.training.validation import VALIDATION_FILE, read_validation, write_validation_row

pytestmark = pytest.mark.usefixtures("one_thread")

# A scripted validation loss per step: best at 4, then 3 validations without improvement (6, 8, 10: 0.31 is
# not below 0.3), so --patience 3 stops at step 10; with a larger patience step 12 improves.
SCRIPT = {2: 0.5, 4: 0.3, 6: 0.4, 8: 0.35, 10: 0.31, 12: 0.2, 14: 0.25, 16: 0.26, 18: 0.27, 20: 0.28}


class Scripted:
    """A validation whose numbers are known in advance (the step's entry of SCRIPT)."""

    columns = ["val_loss"]

    def __init__(self):
        self.trainer = None

    def __call__(self, model, device, bf16):
        return {"val_loss": SCRIPT[self.trainer.step]}


def _export(m, directory):
    save_tensors(directory / "weights.safetensors", {k: v.detach() for k, v in m.state_dict().items()})


def _trainer(run, small_cfg, steps, patience=3, **kw) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=4, warmup=1, log_every=1, checkpoint_every=100,
                      sample_every=0, ema_decay=0.9, bf16=False, validate_every=2, keep_best="val_loss",
                      patience=patience, **kw)
    images, labels = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 10
    val = Scripted()
    tr = Trainer(UNet(small_cfg), NoiseSchedule(DiffusionConfig()), images, labels, cfg, run, _export,
                 device="cpu", validation=val)
    val.trainer = tr
    return tr


def _fit(run, small_cfg, steps, resume=False, **kw) -> dict:
    tr = _trainer(run, small_cfg, steps, **kw)
    if resume:
        tr.resume()
    return tr.fit(progress=False)


def test_keep_best_keeps_the_true_best_and_patience_stops_at_the_right_validation(tmp_path, small_cfg):
    one = tmp_path / "one"
    r = _fit(one, small_cfg, 20)
    assert r["step"] == 10 and not r["interrupted"]  # best at 4; 6, 8, 10 did not improve
    assert r["stopped_early"] == "val_loss did not improve in 3 validations, --patience 3"
    assert r["best"]["step"] == 4 and r["best"]["value"] == 0.3
    assert read_metadata(one / STATE_NAME)["step"] == "10"  # a checkpoint where it stopped: resumable
    assert json.loads((one / BEST_DIR / "best.json").read_text()) == {
        "metric": "val_loss", "direction": "min", "value": 0.3, "step": 4}
    # RUN/best/ holds what the export wrote at step 4 (the EMA's weights): a run that ends at step 4
    four = tmp_path / "four"
    _fit(four, small_cfg, 4)
    best = load_tensors(one / BEST_DIR / "weights.safetensors")
    at4 = load_tensors(four / "weights.safetensors")
    assert all(torch.equal(best[k], at4[k]) for k in at4)
    last = load_tensors(one / "weights.safetensors")
    assert not all(torch.equal(best[k], last[k]) for k in last)  # the last export is step 10's
    assert [s for s, _ in read_validation(one)] == [2, 4, 6, 8, 10]

    # resumed with the same patience: it stays stopped; with a larger one it goes on and finds step 12
    r = _fit(one, small_cfg, 20, resume=True)
    assert r["step"] == 10 and r["stopped_early"] and read_metadata(one / STATE_NAME)["step"] == "10"
    r = _fit(one, small_cfg, 20, resume=True, patience=4)
    assert r["step"] == 20 and r["stopped_early"] is None and r["best"]["step"] == 12
    assert json.loads((one / BEST_DIR / "best.json").read_text())["step"] == 12


def test_resume_rebuilds_the_best_and_the_patience_count_bit_for_bit(tmp_path, small_cfg):
    """Runs stopped at step 6 (best at 4, one validation waited) and at step 2 with a RUN/best/ from step 4
    (a kill after the export, before the next checkpoint) resume to the uninterrupted run's stop, rows, best
    export and weights."""
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    _fit(one, small_cfg, 20)
    _fit(two, small_cfg, 6)
    assert json.loads((two / BEST_DIR / "best.json").read_text())["step"] == 4
    r = _fit(two, small_cfg, 20, resume=True)
    assert r["step"] == 10 and r["best"]["step"] == 4  # waited 1 before, 2 more: the same stop
    _fit(three, small_cfg, 20)
    _fit(tmp_path / "at2", small_cfg, 2)
    (three / STATE_NAME).write_bytes((tmp_path / "at2" / STATE_NAME).read_bytes())  # back to step 2
    r = _fit(three, small_cfg, 20, resume=True)  # best/ (step 4) is past step 2: dropped, then written again
    assert r["step"] == 10 and r["best"]["step"] == 4
    for run in (two, three):
        assert (run / VALIDATION_FILE).read_text() == (one / VALIDATION_FILE).read_text()
        assert (run / BEST_DIR / "best.json").read_text() == (one / BEST_DIR / "best.json").read_text()
        for f in (BEST_DIR + "/weights.safetensors", "weights.safetensors", STATE_NAME):
            a, b = load_tensors(one / f), load_tensors(run / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (run, f)


def test_directions_of_the_metrics():
    assert parse_metric("val_loss") == ("val_loss", "min") and parse_metric("accuracy") == ("accuracy", "max")
    assert parse_metric("ink_ratio:min") == ("ink_ratio", "min") and parse_metric("val_loss_t300")[1] == "min"
    for bad in ("bogus", "accuracy:up", "ink", "val_loss_tx"):
        with pytest.raises(UserError):
            parse_metric(bad)

    def pick(spec, values):
        best = Best.parse(spec)
        for step, v in enumerate(values, start=1):
            best.update(step, {best.metric: v})
        return best.step, best.waited

    assert pick("ink_ratio", [1.4, 0.5, 1.9]) == (2, 1)  # farthest from 1 either way, on log: 0.5x beats 1.9x
    assert pick("ink_ratio", [1.4, 0.5, 2.1]) == (3, 0)
    assert pick("plain_ink_ratio", [1.2, 0.95, 1.04, 0.96]) == (3, 1)  # nearest 1
    assert pick("plain_slant_diff", [0.5, -0.2, 0.3]) == (2, 1)
    assert pick("val_loss", [0.5, 0.5, None, 0.4]) == (4, 0)  # a tie is no improvement; None is not measured
    assert pick("accuracy", [0.9, 0.95, 0.95]) == (2, 1)


def test_validation_rows_with_and_without_scores(tmp_path):
    write_validation_row(tmp_path, 2, {"val_loss": 0.5})
    write_validation_row(tmp_path, 4, {"val_loss": 0.4, "accuracy": 0.9})  # scores appear: header grows
    write_validation_row(tmp_path, 6, {"val_loss": 0.3, "accuracy": None})  # not scored: an empty cell
    write_validation_row(tmp_path, 8, {"val_loss": 0.2})  # scores gone (resumed without): kept as empty
    want = "step,val_loss,accuracy\n2,0.5,\n4,0.4,0.9\n6,0.3,\n8,0.2,\n"
    assert (tmp_path / VALIDATION_FILE).read_text() == want
    assert read_validation(tmp_path, 6) == [(2, {"val_loss": 0.5, "accuracy": None}),
                                            (4, {"val_loss": 0.4, "accuracy": 0.9}),
                                            (6, {"val_loss": 0.3, "accuracy": None})]


def test_scores_are_what_sample_and_evaluate_give_and_best_is_loadable(tiny_label_run, tmp_path):
    """A label LoRA scored at its last step: the accuracy and the ink / slant against the base are those of
    `sample --seed 0` of the export (Pipeline.generate) scored by evaluate.style_scores; RUN/best/ loads as
    an adapter (`sample --lora RUN/best`); loss.png has the loss panel and the accuracy, ink and slant
    panels."""
    out = tmp_path / "lora"
    argv = ["-q", "train-lora", "--checkpoint", str(tiny_label_run), "--style", "bold", "--batch-size", "4",
            "--rank", "2", "--max-train-steps", "2", "--validate-every", "1", "--score-every", "2",
            "--num-validation-images", "10", "--keep-best", "ink_ratio", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rows = read_validation(out)
    scored = [s for s, row in rows if row["accuracy"] is not None]
    assert [s for s, _ in rows] == [1, 2] and scored == [2]  # every 2nd validation (and the last)
    got = rows[1][1]
    digits = score_digits(10)
    base = style_scores(Pipeline.load(tiny_label_run).generate(digits, seed=0)[0], torch.tensor(digits))
    pipe = Pipeline.load(tiny_label_run)
    pipe.add_lora(out, 1.0)
    want = style_scores(pipe.generate(digits, seed=0)[0], torch.tensor(digits), base)
    for k in ("accuracy", "ink_ratio", "slant_diff"):
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-5), (k, got[k], want[k])
    best = json.loads((out / BEST_DIR / "best.json").read_text())
    assert best["step"] in scored and best["value"] == max(
        (rows[s - 1][1]["ink_ratio"] for s in scored), key=lambda v: abs(math.log(v)))
    assert Pipeline.load(tiny_label_run).add_lora(out / BEST_DIR)  # what `sample --lora RUN/best` loads
    assert Image.open(out / "loss.png").size == (600, 890)  # 3.2 + 3 x 1.9 inches at 100 dpi: 3 score panels


def test_a_trigger_lora_scores_its_leak(tiny_prompt_model, tmp_path):
    """At a learning rate too small to move the adapter, the trigger LoRA is the base: its images with and
    without the trigger have the base's ink and slant (the base's images are drawn on the trigger-less
    prompts, with the same seed), so every ratio is 1 and every difference 0."""
    out = tmp_path / "lora"
    argv = ["-q", "train-lora", "--checkpoint", str(tiny_prompt_model), "--style", "bold", "--trigger", "sks",
            "--batch-size", "4", "--max-train-steps", "1", "--lr", "1e-9", "--validate-every", "1",
            "--score-every", "1", "--num-validation-images", "10", "--keep-best", "plain_ink_ratio",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    (_, row), = read_validation(out)
    assert set(row) >= {"accuracy", "ink_ratio", "slant_diff", "plain_accuracy", "plain_ink_ratio",
                        "plain_slant_diff"}
    assert row["plain_ink_ratio"] == pytest.approx(1, abs=1e-4) and row["plain_slant_diff"] == pytest.approx(
        0, abs=1e-3)
    assert row["ink_ratio"] != row["plain_ink_ratio"]  # the trigger word is read: other images


@pytest.mark.parametrize("extra, message", [
    (["--keep-best", "bogus"], "unknown metric"),
    (["--keep-best", "ink"], "ink:min or ink:max"),
    (["--keep-best", "val_loss:up"], "min or max"),
    (["--patience", "-1"], "--patience"),
    (["--validate-every", "0", "--patience", "2", "--keep-best", "val_loss"], "need(s) --validate-every"),
    (["--patience", "2"], "--patience needs --keep-best"),
    (["--keep-best", "accuracy"], "--score-every"),
    (["--score-every", "1", "--keep-best", "ink_ratio"], "no such column"),  # a base has no style
    (["--num-validation-images", "0"], "--num-validation-images"),
])  # fmt: skip
def test_bad_values_are_refused_in_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = ["-q", "train", "--preset", "tiny", "--batch-size", "8", "--max-train-steps", "2", "--device",
            "cpu", "--validate-every", "2", *extra, "--out", str(out)]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_vae_scores_every_second_validation(tmp_path):
    """train-vae: the classifier's accuracy on the reconstructions and their ink over the originals', at
    every 2nd validation and the last; the best recon_ink_ratio is the one nearest 1."""
    out = tmp_path / "vae"
    assert main(["-q", "train-vae", "--preset", "tiny", "--max-train-steps", "3", "--validate-every", "1",
                 "--score-every", "2", "--keep-best", "recon_ink_ratio", "--device", "cpu", "--out",
                 str(out)]) == 0
    rows = read_validation(out)
    assert [s for s, row in rows if row["accuracy"] is not None] == [2, 3]
    ratios = {s: row["recon_ink_ratio"] for s, row in rows if row["accuracy"] is not None}
    assert all(0 <= row["accuracy"] <= 1 for s, row in rows if s in ratios)
    best = json.loads((out / BEST_DIR / "best.json").read_text())
    assert best["step"] == min(ratios, key=lambda s: abs(math.log(ratios[s])))
    assert (out / BEST_DIR / "config.json").is_file()  # a VAE folder: --vae RUN/best
