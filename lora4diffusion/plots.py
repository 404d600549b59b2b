"""Pictures: sample grids, denoising strips and loss curves (Pillow; matplotlib only for loss curves)."""

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
