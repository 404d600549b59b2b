"""What a VAE keeps: held-out digits (plain and in each built-in style) encoded and decoded, scored with the
project's classifier (accuracy, FID in classifier features, ink, slant) against the originals."""

from __future__ import annotations

import torch

from lora4diffusion.classifier import load_classifier
from lora4diffusion.data import load_mnist
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import evaluate_samples
from lora4diffusion.latents import reconstruct
from lora4diffusion.models.vae import VAE
from lora4diffusion.styles import STYLES, apply_style, slant


def heldout_digits(
    style: str | None = None, per_digit: int | None = None, digits: list[int] | None = None,
    data: str = "embedded",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_digit`` held-out digits of each of ``digits`` (all if None), in a built-in
    ``style`` (None: plain) -> (uint8 [N, 28, 28], labels int64 [N]), grouped by digit."""
    if style is not None and style not in STYLES:
        raise UserError(f"unknown style {style!r} (choose from {', '.join(STYLES)})")
    held = load_mnist(data).heldout
    picks = [torch.nonzero(held.labels == d).flatten()[:per_digit] for d in (digits or range(10))]
    idx = torch.cat(picks)
    if len(idx) == 0:
        raise UserError(f"no held-out digits in {held.source}")
    images = held.images[idx]
    return (apply_style(images, style) if style else images), held.labels[idx]


def reconstruction_report(
    vae: VAE, data: str = "embedded", per_digit: int | None = None, classifier=None
) -> dict:
    """For plain held-out digits and each built-in style: the classifier's accuracy and FID on originals and
    reconstructions (evaluate.evaluate_samples), their mean ink and slant (styles.slant), and the ratios
    reconstruction / original (benchmarks/RESULTS.md quotes them)."""
    clf = classifier if classifier is not None else load_classifier()
    splits = load_mnist(data)
    report = {}
    for style in (None, *STYLES):
        images, labels = heldout_digits(style, per_digit, data=data)
        originals, recons = images.float() / 255, reconstruct(vae, images)
        o = evaluate_samples(originals, labels, clf, splits)
        r = evaluate_samples(recons, labels, clf, splits)
        so, sr = slant(originals), slant(recons)
        report[style or "plain"] = {
            "n": len(labels),
            "accuracy_originals": o["accuracy"],
            "accuracy_reconstructions": r["accuracy"],
            "fid_originals": o["fid_classifier"],
            "fid_reconstructions": r["fid_classifier"],
            "ink_originals": o["mean_ink"],
            "ink_reconstructions": r["mean_ink"],
            "ink_ratio": r["mean_ink"] / o["mean_ink"],
            "slant_originals": so,
            "slant_reconstructions": sr,
            "slant_ratio": sr / so if abs(so) > 1e-6 else None,
            "l1_error": float((recons - originals).abs().mean()),
        }
    return report


def format_reconstruction_report(report: dict) -> str:
    """``reconstruction_report``'s dict as an aligned table."""
    head = ("style", "n", "acc orig", "acc rec", "ink ratio", "slant orig/rec", "L1")
    lines = ["{:<8} {:>5} {:>9} {:>8} {:>9} {:>15} {:>7}".format(*head)]
    for style, r in report.items():
        acc_o, acc_r = 100 * r["accuracy_originals"], 100 * r["accuracy_reconstructions"]
        lines.append(
            f"{style:<8} {r['n']:>5} {acc_o:>8.1f}% {acc_r:>7.1f}% {r['ink_ratio']:>9.3f}"
            f" {r['slant_originals']:>7.2f}/{r['slant_reconstructions']:<7.2f} {r['l1_error']:>7.4f}"
        )
    return "\n".join(lines)
