"""Training data for LoRA styles: MNIST digits restyled with torch ops, or the user's own digit images.

Built-in styles (uint8 [N, 28, 28] in and out, measured on the embedded train split, 4500 digits):

* ``bold``: grey-scale dilation, one 3x3 max-pool; mean ink x2.00, shipped classifier 96.4 % on held-out.
* ``thin``: grey-scale erosion by a third of a pixel (3x3 min-pool at 3x resolution, antialiased back
  down, each digit's peak brightness restored); mean ink x0.73, 99.2 % accuracy, 12 % of digits gain a
  break (strokes > 127, 8-connected). A full-pixel min-pool leaves 14 % of the ink and blanks 643 digits.
* ``italic``: shear 0.35 to the right, then the digit's bounding box is re-centred; mean ink x1.00
  (every digit keeps >= 99.9 % of its ink: nothing leaves the frame), 98.8 % accuracy.

Custom styles come from image files (anything Pillow reads, any size and colour mode). Each becomes
MNIST-like: grey 'L' (transparent pixels composited onto a background that contrasts with the ink),
INVERTED if the mean of its border pixels is > 127 (MNIST is white on black), padded to a square with
black (keeps the aspect ratio) and resized to 28x28 with antialiasing. Frame digits like MNIST: centred,
about 20/28 of the height.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lora4diffusion.checkpoint import path_kind
from lora4diffusion.data import Digits, MNISTSplits, load_mnist
from lora4diffusion.errors import UserError

log = logging.getLogger("lora4diffusion")

STYLES = ("bold", "thin", "italic")
ITALIC_SHEAR = 0.35  # x shift per pixel going up; 0.3-0.4 reads as italic
THIN_SUPERSAMPLE = 3  # erode by 1/3 px; 2 (1/2 px) gave ink x0.62 but broke 37 % of the digits
_CHUNK = 2048  # thin works at 84x84: chunks bound memory on the 60k-digit MNIST
_DESCRIPTIONS = {
    "bold": "bold: grey-scale dilation (3x3 max-pool once), strokes ~2 px wider, mean ink x2.0",
    "thin": "thin: grey-scale erosion by 1/3 px (3x3 min-pool at 3x resolution), mean ink x0.73",
    "italic": f"italic: shear {ITALIC_SHEAR} to the right (bilinear), digit re-centred in the frame",
}
_DIGIT_NAMES = frozenset("0123456789")
# What a style table holds, as _load_csv reads it (train-lora's --help quotes this, so the two cannot drift)
CSV_FORMAT = ("rows 'path,label': an image file (relative to the table, or absolute) and its digit 0-9;"
              " an optional header row")
_LOAD_ERRORS = (OSError, ValueError, SyntaxError)  # what Pillow raises for files it cannot read as images
MAX_IMAGE_PIXELS = 4096 * 4096  # a digit needs 28x28; this bounds what one file can make us decode (64 MiB)


def _bold(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)  # max_pool pads with -inf: the frame edge adds no ink


def _thin(x: torch.Tensor) -> torch.Tensor:
    size = x.shape[-2:]
    big = F.interpolate(x, scale_factor=THIN_SUPERSAMPLE, mode="bilinear", align_corners=False)
    big = -F.max_pool2d(-big, 3, stride=1, padding=1)  # min-pool
    y = F.interpolate(big, size=size, mode="bilinear", align_corners=False, antialias=True)
    # averaging down dims thin strokes: restore each digit's peak brightness so it stays white on black
    return y * (x.amax((2, 3), keepdim=True) / y.amax((2, 3), keepdim=True).clamp_min(1.0))


def _italic(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    rows = torch.arange(h, dtype=x.dtype).view(h, 1) - (h - 1) / 2
    landing = (torch.arange(w, dtype=x.dtype) - ITALIC_SHEAR * rows).expand(n, h, w)  # sheared columns
    ink = x[:, 0] > 0
    lo = torch.where(ink, landing, torch.inf).amin((1, 2))
    hi = torch.where(ink, landing, -torch.inf).amax((1, 2))
    # centre the sheared digit's bounding box: MNIST's 20 px box grows to <= 27 px, so nothing is cut off
    shift = torch.where(ink.any(2).any(1), (lo + hi) / 2 - (w - 1) / 2, 0.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # x_in = x_out + shear * y + shift in affine_grid's [-1, 1] units: rows above the centre move right
    theta[:, 0, 1], theta[:, 0, 2] = ITALIC_SHEAR * h / w, 2 * shift / w
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


_OPS = {"bold": _bold, "thin": _thin, "italic": _italic}


def apply_style(images_uint8: torch.Tensor, style: str) -> torch.Tensor:
    """uint8 [N, H, W] white-on-black digits -> the same shape and dtype in the built-in ``style``."""
    if style not in _OPS:
        raise UserError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype != torch.uint8:
        raise TypeError(
            f"apply_style expects a uint8 tensor, got {getattr(images_uint8, 'dtype', type(images_uint8))}"
        )
    if images_uint8.dim() != 3:
        raise UserError(f"apply_style expects images [N, H, W], got shape {tuple(images_uint8.shape)}")
    out = torch.empty_like(images_uint8)
    with torch.no_grad():
        for start in range(0, len(out), _CHUNK):
            x = images_uint8[start : start + _CHUNK].float().unsqueeze(1)
            out[start : start + _CHUNK] = _OPS[style](x).squeeze(1).round().clamp(0, 255).to(torch.uint8)
    return out


def slant(images: torch.Tensor) -> float:
    """How far right (px) the top half's ink sits of the bottom half's: the ink-weighted mean column of the
    top half minus the bottom half's, over all of ``images`` [N, H, W] (any scale). Upright digits ~0,
    ``italic`` (shear 0.35) about +4 on MNIST: rows H/2 apart shift by 0.35 H/2."""
    x = torch.as_tensor(images).float()
    cols = torch.arange(x.shape[-1], dtype=torch.float32)
    half = x.shape[-2] // 2
    halves = (x[:, :half], x[:, half:])
    top, bottom = (float((h.sum((0, 1)) * cols).sum() / h.sum().clamp_min(1e-12)) for h in halves)
    return top - bottom


def style_splits(splits: MNISTSplits, style: str) -> MNISTSplits:
    """Both splits of real digits in a built-in ``style``: the reference a style's FID is measured against."""

    def restyle(d: Digits) -> Digits:
        return Digits(apply_style(d.images, style), d.labels, f"{style} {d.source}")

    return MNISTSplits(restyle(splits.train), restyle(splits.heldout), f"{style} {splits.source}")


def _resolve(style: str) -> tuple[str, Path | None]:
    """-> ("bold" | "thin" | "italic", None), ("folder", path) or ("csv", path)."""
    if style in STYLES:
        return style, None
    path = Path(style).expanduser()
    kind = path_kind(path)  # a UserError where a parent folder may not be entered (permission denied)
    if kind == "dir":
        return "folder", path
    if kind == "file" and path.suffix.lower() == ".csv":
        return "csv", path
    what = "is neither a folder nor a .csv file" if kind != "missing" else "is no such folder or .csv file"
    raise UserError(f"unknown style {style!r}: not one of {', '.join(STYLES)} and {what}")


def style_description(style: str) -> str:
    """One line for logs and metadata."""
    kind, path = _resolve(style)
    if kind == "folder":
        return f"custom style: images in subfolders 0-9 of {path}"
    if kind == "csv":
        return f"custom style: images listed (path,label) in {path}"
    return _DESCRIPTIONS[kind]


def _to_grey(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I") or im.mode == "F":  # 16-bit grey: convert("L") would clip it, not scale
        g = np.asarray(im, dtype=np.float64)
        return g / 257 if g.max() > 255 else g
    if "A" not in im.getbands() and "transparency" not in im.info:
        return np.asarray(im.convert("L"), dtype=np.float64)
    rgba = im.convert("RGBA")
    g = np.asarray(rgba.convert("L"), dtype=np.float64)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255
    ink = g[alpha > 0.5]
    paper = 255.0 if ink.size and ink.mean() < 128 else 0.0  # dark ink on transparent -> white paper
    return g * alpha + paper * (1 - alpha)


def _read_image(path: Path) -> torch.Tensor | None:
    """An image file -> uint8 [28, 28] white on black; None if Pillow cannot read it as an image."""
    bomb = f"the limit is {MAX_IMAGE_PIXELS} pixels: refused as a possible decompression bomb"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data", bomb warnings: the checks here decide
            with Image.open(path) as im:
                w, h = im.size  # from the header: nothing is decoded yet
                if w * h <= MAX_IMAGE_PIXELS:
                    g = _to_grey(im)
    except Image.DecompressionBombError:  # Pillow's own check, from 2 x 89 M pixels
        raise UserError(f"{path}: image too large ({bomb})") from None
    except PermissionError:
        raise UserError(f"{path}: cannot read (permission denied)") from None
    except _LOAD_ERRORS:
        return None
    if w * h > MAX_IMAGE_PIXELS:
        raise UserError(f"{path}: image too large ({w}x{h}; {bomb})")
    if not np.isfinite(g).all():  # float (mode F) TIFFs can hold NaN/inf, which no uint8 digit has
        raise UserError(f"{path}: image holds NaN or infinite pixel values")
    border = np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]])
    if border.mean() > 127:  # light background: black-on-white scan or drawing
        g = 255 - g
    h, w = g.shape
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    x = torch.from_numpy(np.pad(g, ((top, s - h - top), (left, s - w - left)))).float()[None, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8)


def _load_folder(folder: Path) -> tuple[list[torch.Tensor], list[int], int]:
    try:
        entries = sorted(folder.iterdir())
        subdirs = [p for p in entries if p.name in _DIGIT_NAMES and p.is_dir()]
        if not entries:
            raise UserError(f"style folder {folder} is empty (want subfolders 0-9 holding digit images)")
        if not subdirs:
            raise UserError(f"style folder {folder} has no digit subfolders 0-9 (e.g. {folder / '3'}/a.png)")
        images, labels, skipped = [], [], 0
        for sub in subdirs:
            for f in sorted(p for p in sub.iterdir() if p.is_file()):
                img = _read_image(f)
                skipped += img is None
                if img is not None:
                    images.append(img)
                    labels.append(int(sub.name))
    except OSError as e:
        raise UserError(f"style folder {folder}: cannot read it ({e.strerror or e})") from None
    return images, labels, skipped


def _load_csv(table: Path) -> tuple[list[torch.Tensor], list[int], int]:
    """Rows ``path,label``; an optional header; rows numbered from 1 as in a spreadsheet."""
    images, labels, skipped, first = [], [], 0, True
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                n = reader.line_num
                if not any(c.strip() for c in row):
                    continue
                if len(row) != 2:
                    raise UserError(f"{table}, row {n}: expected 'path,label', got {len(row)} fields (a style"
                                    f" table holds {CSV_FORMAT})")
                name, label = row[0].strip(), row[1].strip()
                if first and not label.lstrip("+-").isdigit():  # a header: "path,label" or similar
                    first = False
                    continue
                first = False
                if label not in _DIGIT_NAMES:
                    raise UserError(f"{table}, row {n}: label {label!r} is not a digit 0-9")
                if "\0" in name:
                    raise UserError(f"{table}, row {n}: the path holds a NUL character")
                path = Path(name).expanduser()
                path = path if path.is_absolute() else table.parent / path
                if not path.is_file():
                    raise UserError(f"{table}, row {n}: image {path} does not exist or is not a file")
                img = _read_image(path)
                skipped += img is None
                if img is not None:
                    images.append(img)
                    labels.append(int(label))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read style table {table} ({e})") from None
    return images, labels, skipped


def _few_shot(labels: torch.Tensor, per_digit: int, seed: int) -> torch.Tensor:
    """Indices of the first ``per_digit`` digits of each class after a seeded shuffle, in source order."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    keep = torch.cat([perm[labels[perm] == d][:per_digit] for d in range(10)])
    short = [f"{d} ({int((labels == d).sum())})" for d in range(10) if 0 < (labels == d).sum() < per_digit]
    if short:
        log.info(
            "per_digit %d: fewer available for digit(s) %s, using all of them", per_digit, ", ".join(short)
        )
    return keep.sort().values


def load_style_data(
    style: str, data: str = "embedded", per_digit: int | None = None, seed: int = 0
) -> Digits:
    """Training digits for a LoRA style: a built-in style applied to the TRAIN split of ``load_mnist(data)``
    (never the held-out digits), or the images of a custom style folder / CSV (``data`` is then unused).

    ``per_digit`` keeps the first N of each digit after a shuffle seeded by ``seed`` (few-shot styles).
    """
    if per_digit is not None and (
        isinstance(per_digit, bool) or not isinstance(per_digit, int) or per_digit <= 0
    ):
        raise UserError(f"per_digit must be a positive integer, got {per_digit!r}")
    kind, path = _resolve(style)
    if path is None:
        splits = load_mnist(data)
        images, labels = apply_style(splits.train.images, kind), splits.train.labels
        origin = f"style {kind} on {'embedded MNIST' if data == 'embedded' else splits.source}"
    else:
        imgs, labs, skipped = (_load_folder if kind == "folder" else _load_csv)(path)
        if skipped:
            log.warning("skipped %d non-image files in %s", skipped, path)
        if not imgs:
            raise UserError(f"style {kind} {path}: no readable images")
        images, labels = torch.stack(imgs), torch.tensor(labs, dtype=torch.int64)
        origin = f"style {kind} {path}"
    if per_digit is not None:
        keep = _few_shot(labels, per_digit, seed)
        images, labels, origin = images[keep], labels[keep], f"{origin}, {per_digit} per digit"
    missing = [str(d) for d in range(10) if not (labels == d).any()]
    if missing:
        log.warning("style data has no examples of digit(s) %s", ", ".join(missing))
    return Digits(images.contiguous(), labels, f"{origin} ({len(labels)} digits)")
