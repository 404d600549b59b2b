"""Captioned image folders (kohya's and Hugging Face's layouts) -> MNIST-like digits with their captions.

Two layouts people already have for SD LoRA training:

* kohya-ss/sd-scripts' DreamBooth layout: ``DIR/N_class words/`` folders, ``N`` the repeats (how many
  times each image is seen per epoch) and the rest the class words, which are the caption of an image
  that has no caption file; a caption beside each image as ``name.txt`` or ``name.caption``.
* Hugging Face ``datasets``' ``imagefolder``: ``DIR/metadata.jsonl``, one JSON object a line with
  ``file_name`` (relative to DIR) and ``text`` (the caption).

Each image becomes a digit the way MNIST's were made (LeCun et al., "The MNIST database"): the ink's
bounding box is scaled to fit a 20x20 box keeping its aspect ratio (anti-aliased, so grey levels appear),
then placed in a 28x28 field so that its centre of mass (intensity-weighted) is at the field's centre.
Dark ink on light paper is detected by the border's mean (> 127: inverted), as MNIST is white on black.

A digit's label comes from its caption (captions.digit_of) or, in kohya's layout, its class words; -1 if
neither names one digit (fine for a prompt base, refused by a label base).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from lora4diffusion.captions import digit_of
from lora4diffusion.data import Digits
from lora4diffusion.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CAPTION_SUFFIXES = (".txt", ".caption")  # kohya reads one (--caption_extension); we take the first found
METADATA = "metadata.jsonl"
METADATA_CSV = "metadata.csv"  # imagefolder reads either: columns file_name and text
KOHYA_FOLDER = re.compile(r"^([0-9]+)_(.+)$")
FIELD, BOX = 28, 20  # MNIST: a 20x20 box centred by mass in a 28x28 field
MAX_REPEATS = 1000
TINY_SET = 10  # fewer images than this: warned (kohya guides start at 10-20 images)
MAX_IMAGE_PIXELS = 4096 * 4096  # as styles.py: what one file may make us decode
INK_FLOOR = 0.1  # ink below this share of the brightest pixel is paper noise (JPEG ringing, scanner grain)
_LOAD_ERRORS = (OSError, ValueError, SyntaxError)  # what Pillow raises for a file it cannot read


@dataclass
class CaptionedImages:
    """A captioned folder read and preprocessed: one row per image (repeats are not expanded)."""

    images: torch.Tensor  # uint8 [N, 28, 28], white digit on black as in MNIST
    captions: list[str]
    labels: torch.Tensor  # int64 [N]: the digit, -1 where neither caption nor class names one
    repeats: torch.Tensor  # int64 [N]: kohya's N of the folder, 1 in imagefolder
    files: list[str]  # relative to the folder, for messages and the contact sheet
    layout: str  # "kohya" | "imagefolder"
    source: str
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def expanded(self) -> torch.Tensor:
        """Row indices with each image repeated ``repeats`` times: what one epoch sees (kohya)."""
        return torch.repeat_interleave(torch.arange(len(self)), self.repeats)

    def summary(self) -> str:
        """One line: counts, repeats, labelled share (what prepare-data and train-lora print)."""
        n, seen = len(self), int(self.repeats.sum())
        labelled = int((self.labels >= 0).sum())
        per = ", ".join(f"{d}:{int((self.labels == d).sum())}" for d in range(10)
                        if (self.labels == d).any())
        return (f"{self.source}: {n} images ({self.layout}), {seen} per epoch with repeats, {labelled} name a"
                f" digit{f' ({per})' if per else ''}, {len(self.warnings)} warnings")


def as_digits(data: CaptionedImages, need_labels: bool) -> Digits:
    """The training rows, each image repeated as its folder says; ``need_labels`` (a label base) refuses
    an image whose caption and class name no digit."""
    if need_labels and (data.labels < 0).any():
        i = int((data.labels < 0).nonzero()[0])
        n = int((data.labels < 0).sum())
        raise UserError(f"{data.files[i]}: caption {data.captions[i]!r} names no digit, and a label base"
                        f" needs one (in the caption or the kohya folder's class words); {n} such image(s)")
    rows = data.expanded()
    return Digits(data.images[rows].contiguous(), data.labels[rows],
                  f"{data.layout} {data.source} ({len(data)} images, {len(rows)} with repeats)")


def to_grey(im: Image.Image) -> np.ndarray:
    """float64 [H, W] in 0..255; transparent pixels become paper of the contrasting shade."""
    if im.mode.startswith("I") or im.mode == "F":  # 16-bit grey: convert("L") would clip, not scale
        g = np.asarray(im, dtype=np.float64)
        return g / 257 if g.max() > 255 else g
    if "A" not in im.getbands() and "transparency" not in im.info:
        return np.asarray(im.convert("L"), dtype=np.float64)
    rgba = im.convert("RGBA")
    g = np.asarray(rgba.convert("L"), dtype=np.float64)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255
    ink = g[alpha > 0.5]
    paper = 255.0 if ink.size and ink.mean() < 128 else 0.0
    return g * alpha + paper * (1 - alpha)


def mnist_like(grey: np.ndarray) -> torch.Tensor | None:
    """A grey picture of one digit (any size, either polarity) -> uint8 [28, 28] as MNIST was made; None if
    it holds no ink. The ink's bounding box is fit in 20x20 keeping the aspect ratio, then translated (by
    whole pixels, as MNIST) so that its centre of mass lies within half a pixel of pixel (14, 14)."""
    g = np.asarray(grey, dtype=np.float64)
    if g.ndim != 2 or not np.isfinite(g).all():
        return None
    border = np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]]) if min(g.shape) > 1 else g.ravel()
    if border.mean() > 127:  # dark ink on light paper
        g, border = 255 - g, 255 - border
    ink = np.clip(g - np.median(border), 0, None)
    if ink.max() <= 0:
        return None
    ink[ink < INK_FLOOR * ink.max()] = 0
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(crop).float()[None, None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0, 0]
    x = (x.clamp(min=0) * (255 / max(float(x.max()), 1e-6))).round().clamp(0, 255)
    total = float(x.sum())
    if total <= 0:
        return None
    ys, xs = torch.arange(size[0], dtype=torch.float64), torch.arange(size[1], dtype=torch.float64)
    cy, cx = float((x.double().sum(1) * ys).sum()) / total, float((x.double().sum(0) * xs).sum()) / total
    centre = FIELD / 2  # pixel (14, 14), as MNIST: the embedded digits' mean centre of mass is (13.99, 14.00)
    top = min(max(round(centre - cy), 0), FIELD - size[0])  # the whole box stays in the field
    left = min(max(round(centre - cx), 0), FIELD - size[1])
    out = torch.zeros(FIELD, FIELD)
    out[top : top + size[0], left : left + size[1]] = x
    return out.to(torch.uint8)


def read_digit(path: Path) -> torch.Tensor | None:
    """An image file -> MNIST-like uint8 [28, 28]; None if Pillow cannot read it or it holds no ink."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data", bomb warnings: the size check decides
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                    raise UserError(f"{path}: image too large ({im.size[0]}x{im.size[1]}; the limit is"
                                    f" {MAX_IMAGE_PIXELS} pixels)")
                g = to_grey(ImageOps.exif_transpose(im))  # a phone's photo: upright as its EXIF says
    except UserError:  # a ValueError too: not one of Pillow's
        raise
    except (Image.DecompressionBombError, PermissionError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except _LOAD_ERRORS:
        return None
    return mnist_like(g)


def layout_of(folder: Path) -> str | None:
    """"imagefolder" (a metadata.jsonl), "kohya" (N_class subfolders) or None."""
    try:
        if (folder / METADATA).is_file() or (folder / METADATA_CSV).is_file():
            return "imagefolder"
        if folder.is_dir() and any(p.is_dir() and KOHYA_FOLDER.match(p.name) for p in folder.iterdir()):
            return "kohya"
    except OSError:  # a folder we may not list: not a dataset we can read (the caller's reader says why)
        return None
    return None


def _kohya_items(folder: Path) -> list[tuple[Path, str | None, int, str]]:
    """(image, caption or None, repeats, class words) for each image of each N_class subfolder."""
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = KOHYA_FOLDER.match(sub.name)
        if m is None:
            continue
        repeats, words = int(m.group(1)), m.group(2).replace("_", " ").strip()
        if not 1 <= repeats <= MAX_REPEATS:
            raise UserError(f"{sub}: repeats {repeats} must be in 1..{MAX_REPEATS} (kohya's N_class folder)")
        for f in sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            found = [f.with_suffix(s) for s in CAPTION_SUFFIXES if f.with_suffix(s).is_file()]
            text = _read_text(found[0]) if found else None
            items.append((f, text, repeats, words))
    return items


def _read_text(path: Path) -> str:
    try:
        return " ".join(path.read_text(encoding="utf-8-sig").split())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the caption ({e})") from None


def _metadata_rows(folder: Path) -> tuple[Path, list[tuple[int, object]]]:
    """(the table, [(line number, row)]) of metadata.jsonl, else metadata.csv (a header row first)."""
    table = folder / METADATA
    if table.is_file():
        rows = []
        for n, line in enumerate(_read_text_lines(table), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{table}, line {n}: not JSON ({e.msg})") from None
        return table, rows
    table = folder / METADATA_CSV
    try:
        reader = csv.DictReader(_read_text_lines(table))
        return table, [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise UserError(f"{table}: not a CSV table ({e})") from None


def _imagefolder_items(folder: Path) -> list[tuple[Path, str | None, int, str]]:
    items = []
    table, rows = _metadata_rows(folder)
    for n, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f"{table}, line {n}: wants an object with \"file_name\" and \"text\"")
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            raise UserError(f"{table}, line {n}: \"text\" must be a string")
        path = (folder / row["file_name"]).resolve()
        if folder.resolve() not in path.parents:
            raise UserError(f"{table}, line {n}: file_name {row['file_name']!r} leaves the folder")
        items.append((path, None if text is None else " ".join(text.split()), 1, ""))
    return items


def _read_text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None


def read_captioned(folder: str | Path, trigger: str | None = None, tokenizer=None) -> CaptionedImages:
    """Read a kohya or imagefolder dataset. Unreadable images, duplicates (same bytes), captions without
    ``trigger`` and a tiny set are warnings (one line each); a caption the ``tokenizer`` cannot encode, an
    empty set or an unknown layout is a UserError naming the file."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset {root}: no such folder")
    layout = layout_of(root)
    if layout is None:
        raise UserError(f"dataset {root}: neither kohya's layout (subfolders like '10_sks digit/' holding"
                        f" images and .txt captions) nor imagefolder's ({METADATA} or {METADATA_CSV} with"
                        " file_name and text)")
    try:
        items = (_kohya_items if layout == "kohya" else _imagefolder_items)(root)
    except OSError as e:
        raise UserError(f"dataset {root}: cannot read it ({e.strerror or e})") from None
    images, captions, labels, repeats, files, notes, seen = [], [], [], [], [], [], {}
    for path, text, n, words in items:
        name = str(path.relative_to(root.resolve() if layout == "imagefolder" else root))
        if not path.is_file():
            notes.append(f"{name}: no such image (skipped)")
            continue
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            notes.append(f"{name}: unreadable ({e.strerror or e}; skipped)")
            continue
        if digest in seen:
            notes.append(f"{name}: duplicate of {seen[digest]}")
        seen.setdefault(digest, name)
        img = read_digit(path)
        if img is None:
            notes.append(f"{name}: not a readable image with ink (skipped)")
            continue
        caption = text if text is not None else words
        if tokenizer is not None:
            try:
                tokenizer.tokenize(caption)
            except UserError as e:
                raise UserError(f"{name}: caption {caption!r}: {e}") from None
        if trigger is not None and not re.search(rf"\b{re.escape(trigger)}\b", caption.lower()):
            notes.append(f"{name}: caption {caption!r} has no trigger {trigger!r}")
        label = digit_of(caption)
        images.append(img)
        captions.append(caption)
        labels.append(label if label >= 0 else digit_of(words))
        repeats.append(n)
        files.append(name)
    if not images:
        raise UserError(f"dataset {root}: no readable images ({layout} layout)")
    if len(images) < TINY_SET:
        notes.append(f"only {len(images)} images: a LoRA usually wants {TINY_SET} or more")
    return CaptionedImages(torch.stack(images), captions, torch.tensor(labels, dtype=torch.int64),
                           torch.tensor(repeats, dtype=torch.int64), files, layout, str(root), notes)


def contact_sheet(data: CaptionedImages, columns: int = 8, zoom: int = 3) -> Image.Image:
    """Every digit at ``zoom``x with its caption (and label) underneath."""
    cell, text_h = FIELD * zoom, 24
    width = max(cell, 150)
    rows = (len(data) + columns - 1) // columns
    sheet = Image.new("L", (columns * width, rows * (cell + text_h)), 255)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, (img, cap) in enumerate(zip(data.images, data.captions, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (cell + text_h)
        tile = Image.fromarray(img.numpy()).resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, (x + (width - cell) // 2, y))
        label = int(data.labels[i])
        text = cap if len(cap) <= 24 else cap[:21] + "..."
        text = text.encode("latin-1", "replace").decode("latin-1")  # Pillow's built-in bitmap font
        draw.text((x + 2, y + cell + 1), text, fill=0, font=font)
        draw.text((x + 2, y + cell + 12), f"digit {label if label >= 0 else '-'} x{int(data.repeats[i])}",
                  fill=96, font=font)
    return sheet


def write_prepared(data: CaptionedImages, out: Path) -> dict:
    """The processed set as an imagefolder (``images/NNNN.png`` + metadata.jsonl), a contact sheet and
    counts.json; returns the counts."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / METADATA, "w", encoding="utf-8") as f:
        for i, img in enumerate(data.images):
            name = f"images/{i:04d}.png"
            Image.fromarray(img.numpy()).save(out / name)
            f.write(json.dumps({"file_name": name, "text": data.captions[i], "source": data.files[i],
                                "repeats": int(data.repeats[i])}) + "\n")
    contact_sheet(data).save(out / "contact_sheet.png")
    counts = {"images": len(data), "per_epoch": int(data.repeats.sum()), "layout": data.layout,
              "source": data.source, "digits": {str(d): int((data.labels == d).sum()) for d in range(10)},
              "no_digit": int((data.labels < 0).sum()), "warnings": data.warnings}
    (out / "counts.json").write_text(json.dumps(counts, indent=1) + "\n", encoding="utf-8")
    return counts
