"""Captioned image folders (datasets.py): kohya's and imagefolder's layouts, MNIST's preprocessing, the
prepare-data command and train-lora --data on a tiny prompt base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from lora4diffusion.checkpoint import read_metadata
from lora4diffusion.cli import main
from lora4diffusion.data import load_mnist
from lora4diffusion.datasets import BOX, FIELD, as_digits, mnist_like, read_captioned, read_digit
from lora4diffusion.errors import UserError
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.training.lora import OWN_CAPTIONS, CaptionTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _bbox(img: torch.Tensor) -> tuple[int, int]:
    rows, cols = img.any(1).nonzero(), img.any(0).nonzero()
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def _centre_of_mass(img: torch.Tensor) -> tuple[float, float]:
    x = img.double()
    idx = torch.arange(FIELD, dtype=torch.float64)
    return float((x.sum(1) * idx).sum() / x.sum()), float((x.sum(0) * idx).sum() / x.sum())


def _mnist(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """n embedded digits, the digits 0-9 in turn (the split is sorted by digit)."""
    d = load_mnist("embedded").train
    idx = torch.stack([(d.labels == i % 10).nonzero()[i // 10, 0] for i in range(n)])
    return d.images[idx], d.labels[idx]


def _big(digit: torch.Tensor, zoom: int = 5, dark_on_light: bool = True, colour: bool = False) -> Image.Image:
    """An MNIST digit as a user's scan: zoomed, optionally black on white and tinted blue."""
    im = Image.fromarray(digit.numpy()).resize((FIELD * zoom, FIELD * zoom), Image.BILINEAR)
    im = ImageOps.expand(im, border=(0, 0, 10, 30), fill=0)  # more paper right and below: any size
    if dark_on_light:
        im = Image.fromarray(255 - np.asarray(im))
    if colour:
        a = np.asarray(im, dtype=np.float64) / 255
        im = Image.fromarray(np.stack([a * 255, a * 240, 128 + a * 127], -1).astype(np.uint8))
    return im


@pytest.mark.parametrize("size, box", [((300, 150), (40, 30, 120, 130)), ((90, 240), (10, 60, 80, 90)),
                                       ((64, 64), (20, 5, 30, 60))])
def test_ink_fits_the_20x20_box_keeping_aspect_and_is_centred_by_mass(size, box):
    """LeCun et al.'s recipe as a closed form: the ink's box scaled so that its long side is 20 (the short
    one in proportion), centre of mass within half a pixel of MNIST's centre pixel (14, 14)."""
    w, h = size
    im = Image.new("L", size, 240)  # dark ink on light paper: inverted by the border test
    ImageDraw.Draw(im).ellipse(box, fill=10)
    out = mnist_like(np.asarray(im, dtype=np.float64))
    bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
    rows, cols = _bbox(out)
    long_side, short_side = (rows, cols) if bh >= bw else (cols, rows)
    assert long_side == BOX
    assert abs(short_side - BOX * min(bw, bh) / max(bw, bh)) <= 1.5
    cy, cx = _centre_of_mass(out)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert out.dtype == torch.uint8 and out.max() == 255


def test_an_mnist_digit_scanned_back_comes_out_as_itself():
    """An MNIST digit zoomed x5, on white paper or tinted, comes back close to the original (MNIST was made
    by this recipe), and the polarity does not matter."""
    images, _ = _mnist(10)
    for digit in images:
        outs = [mnist_like(np.asarray(_big(digit, dark_on_light=d, colour=c).convert("L"), dtype=np.float64))
                for d, c in ((True, False), (False, False), (True, True))]
        for out in outs:
            assert abs(max(_bbox(out)) - max(_bbox(digit))) <= 1
            # the same picture up to MNIST's own whole-pixel rounding of the centre of mass
            r = max(np.corrcoef(digit.double().flatten().numpy(),
                                torch.roll(out, (dy, dx), (0, 1)).double().flatten().numpy())[0, 1]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1))
            assert r > 0.9, r
        assert (outs[0].int() - outs[1].int()).abs().max() <= 1  # the inverse scan: the same digit
    assert mnist_like(np.full((40, 40), 255.0)) is None  # blank paper has no ink


def _kohya(root, images, labels):
    """10_sks digit/ with .txt captions (one .caption), 3_sks seven/ with none (class words)."""
    a, b = root / "10_sks digit", root / "3_sks seven"
    a.mkdir(parents=True)
    b.mkdir()
    for i, (img, lab) in enumerate(zip(images[:6], labels[:6], strict=True)):
        _big(img, colour=i % 2 == 0).save(a / f"d{i}.png" if i % 3 else a / f"d{i}.jpg")
        ext = ".caption" if i == 1 else ".txt"
        (a / f"d{i}{ext}").write_text(f"a handwritten sks {int(lab)}\n")
    (a / "plain.png").write_bytes((a / "d1.png").read_bytes())  # a duplicate, captioned without the trigger
    (a / "plain.txt").write_text("the digit seven")
    (a / "broken.png").write_bytes(b"not a png")
    for i in range(2):
        _big(images[6 + i], dark_on_light=False).save(b / f"s{i}.png")
    return root


def test_kohya_layout_repeats_captions_and_warnings(tmp_path):
    images, labels = _mnist()
    data = read_captioned(_kohya(tmp_path / "k", images, labels), trigger="sks", tokenizer=Tokenizer.load())
    assert data.layout == "kohya" and len(data) == 9
    by_file = dict(zip(data.files, data.captions, strict=True))
    assert by_file["10_sks digit/d1.png"] == f"a handwritten sks {int(labels[1])}"  # the .caption file
    assert by_file["3_sks seven/s0.png"] == "sks seven"  # no caption: the class words
    assert data.repeats.tolist() == [10] * 7 + [3] * 2
    assert len(data.expanded()) == 76
    assert data.labels[:6].tolist() == labels[:6].tolist() and data.labels[-1] == 7
    notes = "\n".join(data.warnings)
    assert "plain.png: duplicate of 10_sks digit/d1.png" in notes
    assert "plain.png: caption 'the digit seven' has no trigger 'sks'" in notes
    assert "broken.png: not a readable image" in notes
    assert "only 9 images" in notes
    assert "9 images (kohya), 76 per epoch" in data.summary()


def _imagefolder(root, images, labels, captions=None):
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            _big(img, dark_on_light=i % 2 == 0).convert("RGB").save(root / f"{i}.jpg", quality=92)
            text = captions[i] if captions else f"the digit {int(lab)} in sks style"
            f.write(json.dumps({"file_name": f"{i}.jpg", "text": text}) + "\n")
    return root


def test_imagefolder_layout(tmp_path):
    images, labels = _mnist()
    data = read_captioned(_imagefolder(tmp_path / "hf", images, labels), trigger="sks",
                          tokenizer=Tokenizer.load())
    assert data.layout == "imagefolder" and len(data) == 12 and data.warnings == []
    assert data.captions[3] == f"the digit {int(labels[3])} in sks style"
    assert data.labels.tolist() == labels.tolist() and data.repeats.tolist() == [1] * 12
    for img in data.images:
        cy, cx = _centre_of_mass(img)
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def test_refusals_name_the_file(tmp_path):
    images, labels = _mnist(3)
    with pytest.raises(UserError, match="neither kohya's layout"):
        read_captioned(tmp_path)
    root = _imagefolder(tmp_path / "a", images, labels, captions=["a blorpy sks", "sks", "sks 3"])
    with pytest.raises(UserError, match=r"^0\.jpg: caption 'a blorpy sks'"):
        read_captioned(root, tokenizer=Tokenizer.load())
    data = read_captioned(root)  # without a tokenizer: read; a label base still needs the digit
    with pytest.raises(UserError, match="0.jpg: caption 'a blorpy sks' names no digit.*2 such"):
        as_digits(data, need_labels=True)
    assert len(as_digits(data, need_labels=False)) == 3
    (root / "metadata.jsonl").write_text('{"file_name": "../x.png", "text": "3"}\n')
    with pytest.raises(UserError, match="leaves the folder"):
        read_captioned(root)
    (root / "metadata.jsonl").write_text('{"file_name": "0.jpg", "text": "3"\n')
    with pytest.raises(UserError, match="line 1: not JSON"):
        read_captioned(root)
    (root / "metadata.jsonl").unlink()  # imagefolder's other table: metadata.csv
    (root / "metadata.csv").write_text('file_name,text\n0.jpg,"the digit 3, sks"\n2.jpg,sks 4\n')
    data = read_captioned(root, tokenizer=Tokenizer.load())
    assert data.files == ["0.jpg", "2.jpg"] and data.captions == ["the digit 3, sks", "sks 4"]
    assert data.labels.tolist() == [3, 4]


def test_prepare_data_writes_images_sheet_counts_and_one_line_warnings(tmp_path, capsys):
    images, labels = _mnist()
    src, out = _kohya(tmp_path / "k", images, labels), tmp_path / "prepared"
    assert main(["-q", "prepare-data", str(src), "--out", str(out), "--trigger", "sks"]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    warnings = cap.err.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: ") for w in warnings)
    assert "9 images (kohya), 76 per epoch" in cap.out
    counts = json.loads((out / "counts.json").read_text())
    assert counts["images"] == 9 and counts["per_epoch"] == 76 and counts["digits"]["7"] >= 2
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] >= 8 * 84 and sheet.size[1] >= 2 * 84
    again = read_captioned(out)  # the output is an imagefolder of MNIST-like digits: reading it is a no-op
    first = read_captioned(src)
    assert again.captions == first.captions
    for a, b in zip(again.images, first.images, strict=True):  # ink under 10 % of the peak goes: 1 px shifts
        assert np.corrcoef(a.double().flatten().numpy(), b.double().flatten().numpy())[0, 1] > 0.85
    assert main(["-q", "prepare-data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("layout", ["kohya", "imagefolder"])
def test_train_lora_on_a_captioned_folder(tiny_prompt_model, tmp_path, layout, caplog):
    images, labels = _mnist()
    make = _kohya if layout == "kohya" else _imagefolder
    src, out = make(tmp_path / "data", images, labels), tmp_path / "run"
    argv = ["train-lora", "--checkpoint", str(tiny_prompt_model), "--data", str(src),
            "--max-train-steps", "2", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--no-bf16"]
    with caplog.at_level("INFO", logger="lora4diffusion"):
        assert main(argv) == 0
    assert f"({layout})" in caplog.text and "per epoch with repeats" in caplog.text
    meta = read_metadata(out / "adapter.safetensors")
    assert meta["style"] == "data" and layout in meta["data"]
    assert main([*argv[:-5], "--style", "bold", "--out", str(tmp_path / "r2"), "--device", "cpu"]) == 2


def test_caption_task_feeds_each_image_its_own_caption():
    """The styled half's token ids are the image's caption (dropout: the empty prompt's), not a template."""
    tokenizer = Tokenizer.load()
    captions = ["a handwritten sks 7", "sks seven", "the digit 3 in sks style", "a handwritten sks 7"]
    task = CaptionTask(None, tokenizer, captions, "sks")
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([3, 0, 2, 1, 1])
    rows = task._captions(task.rows[idx], g, None, OWN_CAPTIONS)
    assert torch.equal(task.ids[rows], tokenizer.encode([captions[i] for i in idx.tolist()]))
    drop = torch.tensor([True, False, False, True, False])
    rows = task._captions(task.rows[idx], g, drop, OWN_CAPTIONS)
    assert torch.equal(task.ids[rows][drop], tokenizer.encode(["", ""]))
    assert torch.equal(task.ids[rows][~drop], tokenizer.encode([captions[i] for i in (0, 2, 1)]))


def test_a_label_base_refuses_captions_without_a_digit(tiny_label_run, tmp_path, capsys):
    images, labels = _mnist(3)
    src = _imagefolder(tmp_path / "hf", images, labels, captions=["sks", "a handwritten sks 2", "sks"])
    out = tmp_path / "run"
    assert main(["-q", "train-lora", "--checkpoint", str(tiny_label_run), "--data", str(src), "--out",
                 str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.jpg: caption 'sks' names no digit" in err[0] and "2 such" in err[0], err
    assert not out.exists()
    good = _kohya(tmp_path / "k", *_mnist())  # every caption or class names its digit
    assert main(["-q", "train-lora", "--checkpoint", str(tiny_label_run), "--data", str(good), "--out",
                 str(out), "--max-train-steps", "2", "--device", "cpu"]) == 0
    assert "kohya" in read_metadata(out / "adapter.safetensors")["data"]
    out = tmp_path / "emb"
    assert main(["-q", "train-embedding", "--style", "x", "--token", "<x>", "--data", str(src), "--out",
                 str(out)]) == 2
    assert "not yet an embedding" in capsys.readouterr().err and not out.exists()


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    """A wide stroke stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view) reads as the
    camera showed it: tall."""
    im = Image.new("L", (200, 100), 250)
    ImageDraw.Draw(im).rectangle((20, 40, 180, 60), fill=0)  # wide as stored
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "photo.jpg", exif=exif)
    rows, cols = _bbox(read_digit(tmp_path / "photo.jpg"))
    assert rows == BOX and cols < 8
