"""Pictures: sample grids, denoising strips and training curves (Pillow; matplotlib only for the curves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid_image(images: torch.Tensor | np.ndarray, nrow: int, pad: int = 2, scale: int = 2):
    """images [N, H, W] in [0, 1] -> a PIL image with ``nrow`` images per row, white on black like MNIST."""
    arr = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    n, h, w = arr.shape
    rows = -(-n // nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 0.25, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
        ] = arr[i]
    img = Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images: torch.Tensor | np.ndarray, nrow: int, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow).save(path)


def save_trajectory(trajectory: list[torch.Tensor], path: Path, max_rows: int = 10) -> None:
    """One row per sample, one column per saved step (left: noisiest), as the reference's strip."""
    frames = torch.stack([((x[:max_rows, 0] + 1) / 2).clamp(0, 1) for x in trajectory], dim=1)  # [R, S, H, W]
    save_grid(frames.reshape(-1, *frames.shape[2:]), frames.shape[1], path)


def plot_loss(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> None:
    import matplotlib  # heavy (~0.3 s to import) and needed for loss curves only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased (its first values are not pulled
    towards 0), so a curve of flat noise shows its trend."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


# Score columns drawn together (one panel each): the classifier's accuracy, the ink ratios, the slants.
SCORE_PANELS = {"accuracy": ("accuracy", "plain_accuracy"),
                "ink": ("ink", "ink_ratio", "plain_ink_ratio", "recon_ink_ratio"),
                "slant (px)": ("slant_diff", "plain_slant_diff")}


def plot_training(steps: list[int], losses: list[float], path: Path, validation: dict | None = None,
                  best_step: int | None = None, title: str = "training") -> None:
    """The run's curves in one PNG: the training loss (thin) and its smoothed trend, the validation loss
    (``validation``: {"step": [...], "val_loss": [...], score column: [...]}; None where not measured) on the
    same log axis, and each group of scores (``SCORE_PANELS``) in a panel below; a dashed line at the best
    step (``--keep-best``)."""
    import matplotlib  # heavy (~0.3 s to import) and needed for plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validation = validation or {}
    vsteps = validation.get("step", [])
    panels = [(name, [c for c in cols if any(v is not None for v in validation.get(c, []))])
              for name, cols in SCORE_PANELS.items()]
    panels = [(name, cols) for name, cols in panels if cols]
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(6, 3.2 + 1.9 * len(panels)), dpi=100, sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    if losses:
        ax.plot(steps, losses, lw=0.6, alpha=0.35, color="C0")
        ax.plot(steps, smoothed(losses), lw=1.4, color="C0", label="training loss (smoothed)")
    if any(v is not None for v in validation.get("val_loss", [])):
        xs, ys = zip(*[(x, y) for x, y in zip(vsteps, validation["val_loss"], strict=True) if y is not None],
                     strict=True)
        ax.plot(xs, ys, "o-", ms=3, lw=1.2, color="C3", label="validation loss (held out, fixed t and noise)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    for (name, cols), row in zip(panels, axes[1:], strict=True):
        for col in cols:
            pts = [(x, y) for x, y in zip(vsteps, validation[col], strict=True) if y is not None]
            row[0].plot(*zip(*pts, strict=True), "o-", ms=3, lw=1.2, label=col)
        row[0].set_ylabel(name)
        row[0].legend(fontsize=7)
    for row in axes:
        row[0].grid(alpha=0.3)
        if best_step is not None:
            row[0].axvline(best_step, ls="--", lw=1, color="gray")
    axes[-1][0].set_xlabel("step" + ("" if best_step is None else f"   (dashed: best, step {best_step})"))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def save_comparison(originals: torch.Tensor, recons: torch.Tensor, per_row: int, path: Path) -> None:
    """Rows of ``per_row`` originals, each above its row of reconstructions ([N, H, W] in [0, 1])."""
    chunks = []
    for i in range(0, len(originals), per_row):
        o, r = originals[i : i + per_row], recons[i : i + per_row]
        pad = per_row - len(o)
        if pad:
            o, r = (torch.cat([t, torch.zeros(pad, *t.shape[1:])]) for t in (o, r))
        chunks += [o, r]
    save_grid(torch.cat(chunks), per_row, path)
