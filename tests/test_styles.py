"""LoRA style data: built-in bold/thin/italic transforms, custom styles from image folders and CSV tables,
few-shot selection and the errors for bad input. Offline: images are drawn here with Pillow."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora4diffusion import styles
from lora4diffusion.data import load_mnist
from lora4diffusion.errors import UserError
from lora4diffusion.styles import STYLES, apply_style, load_style_data, style_description


@pytest.fixture(scope="module")
def train():
    return load_mnist("embedded").train


@pytest.fixture(scope="module")
def sample(train):
    return train.images[::9]  # 500 digits, all classes (the split is sorted by class)


def ink(x: torch.Tensor) -> float:
    return float(x.float().mean())


# ---------------------------------------------------------------------------------------- transforms


def test_ink_ratios_on_real_digits(sample):
    base = ink(sample)
    bold, thin, italic = (apply_style(sample, s) for s in STYLES)
    assert ink(bold) >= 1.5 * base
    assert 0.5 * base < ink(thin) < 0.85 * base
    assert (thin.flatten(1).amax(1) > 127).all()  # thinner, never erased
    assert abs(ink(italic) / base - 1) < 0.15
    assert (italic.float().sum((1, 2)) > 0.98 * sample.float().sum((1, 2))).all()  # nothing cut off


def test_italic_moves_top_half_right_of_bottom_half(sample):
    assert styles.slant(apply_style(sample, "italic")) > styles.slant(sample) + 3


def test_italic_shears_a_vertical_bar_in_closed_form():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 2:18, 14] = 255  # off-centre: the sheared bar's bounding box is then re-centred in the frame
    out = apply_style(img, "italic")[0].float()
    cols = torch.arange(28.0)
    for r in range(4, 16):  # away from the bar's ends, where bilinear blurs vertically too
        centroid = float((out[r] * cols).sum() / out[r].sum())
        # column grows going up; the bar's middle row (9.5) lands on the frame's middle column (13.5)
        assert centroid == pytest.approx(13.5 + styles.ITALIC_SHEAR * (9.5 - r), abs=0.1)
    assert ink(out) == pytest.approx(ink(img), rel=0.02)


def test_bold_turns_a_pixel_into_a_3x3_block():
    img = torch.zeros(2, 28, 28, dtype=torch.uint8)
    img[0, 10, 20] = 255
    img[1, 0, 0] = 100  # corner: the frame edge adds nothing
    out = apply_style(img, "bold")
    want = torch.zeros(2, 28, 28, dtype=torch.uint8)
    want[0, 9:12, 19:22] = 255
    want[1, :2, :2] = 100
    assert torch.equal(out, want)


def test_thin_narrows_a_stroke_but_keeps_its_peak_brightness():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 4:24, 12:17] = torch.tensor([50, 180, 200, 180, 50], dtype=torch.uint8)  # an MNIST-like stroke
    out = apply_style(img, "thin")
    assert abs(int(out.max()) - 200) <= 1  # the downscale alone would dim the eroded stroke
    assert ink(out) < 0.9 * ink(img)
    assert out[0, 10, :11].max() == 0 and out[0, 10, 18:].max() == 0  # no wider than before


@pytest.mark.parametrize("style", STYLES)
def test_shape_and_dtype_preserved(style):
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    out = apply_style(x, style)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert apply_style(x[:0], style).shape == (0, 28, 28)
    assert torch.equal(apply_style(torch.zeros_like(x), style), torch.zeros_like(x))


def test_apply_style_rejects_bad_input():
    x = torch.zeros(2, 28, 28, dtype=torch.uint8)
    with pytest.raises(UserError, match="unknown style 'wavy'.*bold, thin, italic"):
        apply_style(x, "wavy")
    with pytest.raises(TypeError, match="uint8"):
        apply_style(x.float(), "bold")
    with pytest.raises(UserError, match=r"\[N, H, W\]"):
        apply_style(x[0], "bold")


def test_builtin_style_uses_only_the_train_split(train):
    d = load_style_data("bold")
    assert d.source == "style bold on embedded MNIST (4500 digits)"
    assert torch.equal(d.labels, train.labels) and d.labels.dtype == torch.int64
    assert torch.equal(d.images, apply_style(train.images, "bold"))


def test_style_description_is_one_line(tmp_path):
    (tmp_path / "s.csv").write_text("a.png,1\n")
    for s in (*STYLES, str(tmp_path), str(tmp_path / "s.csv")):
        text = style_description(s)
        assert text and "\n" not in text
    with pytest.raises(UserError, match="unknown style"):
        style_description("wavy")


# --------------------------------------------------------------------------------------- custom styles


def digit(h: int = 28, w: int = 28, light_background: bool = False) -> np.ndarray:
    """A plus sign of ink centred on the background, uint8 [h, w]."""
    a = np.zeros((h, w), np.uint8)
    a[h // 4 : 3 * h // 4, w // 2 - max(1, w // 10) : w // 2 + max(1, w // 10)] = 255
    a[h // 2 - max(1, h // 10) : h // 2 + max(1, h // 10), w // 4 : 3 * w // 4] = 255
    return 255 - a if light_background else a


def make_folder(root: Path) -> list[int]:
    """Subfolders 0-9 with PNGs of several sizes/modes, a JPEG, black-on-white, RGBA; returns labels."""
    labels = []
    for d in range(10):
        sub = root / str(d)
        sub.mkdir(parents=True)
        Image.fromarray(digit(28 + 4 * d, 28 + 4 * d)).save(sub / "a.png")  # L, sizes 28..64
        Image.fromarray(digit(40, 30)).convert("RGB").save(sub / "b.png")
        labels += [d, d]
    Image.fromarray(digit(50, 50, light_background=True)).save(root / "3" / "c_black_on_white.png")
    rgba = np.zeros((32, 32, 4), np.uint8)  # black ink on a transparent background
    rgba[..., 3] = digit(32, 32)
    Image.fromarray(rgba, "RGBA").save(root / "5" / "d_rgba.png")
    Image.fromarray(digit(36, 36)).convert("RGB").save(root / "7" / "e.jpg", quality=95)
    (root / "1" / "notes.txt").write_text("not an image\n")
    (root / "1" / "broken.png").write_bytes(b"not a png either")
    return sorted(labels + [3, 5, 7])


def border_mean(x: torch.Tensor) -> float:
    return float(torch.cat([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]]).float().mean())


def test_folder_loading(tmp_path, caplog):
    labels = make_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lora4diffusion"):
        d = load_style_data(str(tmp_path))
    assert d.labels.tolist() == labels and d.labels.dtype == torch.int64
    assert d.images.shape == (len(labels), 28, 28) and d.images.dtype == torch.uint8
    assert d.source == f"style folder {tmp_path} ({len(labels)} digits)"
    for img in d.images:  # every one white-on-black, inverted or composited as needed
        assert border_mean(img) < 127 and img[14, 14] > 200
    assert [r.getMessage() for r in caplog.records] == [f"skipped 2 non-image files in {tmp_path}"]


def test_folder_keeps_aspect_ratio_and_scales_16_bit(tmp_path):
    (tmp_path / "1").mkdir()
    bar = np.zeros((40, 8), np.uint16)
    bar[:, 2:6] = 128 * 257  # mid-grey in 16 bits: must come out near 128, not clipped to 255
    Image.fromarray(bar).save(tmp_path / "1" / "bar.png")  # a tall image
    img = load_style_data(str(tmp_path)).images[0]
    assert 120 <= img.max() <= 130
    assert img[:, :10].max() == 0 and img[:, 18:].max() == 0  # padded to square, not stretched to 28 wide


def test_folder_missing_digits_warns_once(tmp_path, caplog):
    for d in (0, 1):
        (tmp_path / str(d)).mkdir()
        Image.fromarray(digit()).save(tmp_path / str(d) / "x.png")
    with caplog.at_level(logging.WARNING, logger="lora4diffusion"):
        d = load_style_data(str(tmp_path), per_digit=5)  # fewer than 5 available: use what exists
    assert d.labels.tolist() == [0, 1]
    assert [r.getMessage() for r in caplog.records] == [
        "style data has no examples of digit(s) 2, 3, 4, 5, 6, 7, 8, 9"
    ]


def test_csv_loading_with_and_without_header(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    for d in range(3):
        Image.fromarray(digit(30, 30)).save(tmp_path / "img" / f"{d}.png")
    (tmp_path / "img" / "notes.txt").write_text("hello")
    absolute = tmp_path / "img" / "2.png"
    rows = f"img/0.png,0\nimg/1.png,1\n\n{absolute},2\nimg/notes.txt,3\n"
    (tmp_path / "plain.csv").write_text(rows)
    (tmp_path / "header.csv").write_text("path,label\n" + rows)
    with caplog.at_level(logging.WARNING, logger="lora4diffusion"):
        for name in ("plain.csv", "header.csv"):
            d = load_style_data(str(tmp_path / name))
            assert d.labels.tolist() == [0, 1, 2] and d.images.shape == (3, 28, 28)
    assert caplog.records[0].getMessage() == f"skipped 1 non-image files in {tmp_path / 'plain.csv'}"


@pytest.mark.parametrize(
    "rows, match",
    [
        ("path,label\na.png,1\na.png,12\n", "row 3: label '12' is not a digit 0-9"),
        ("a.png,1\nb.png,x\n", "row 2: label 'x'"),
        ("a.png,1\nmissing.png,4\n", "row 2: image .*missing.png does not exist"),
        ("a.png,1,extra\n", "row 1: expected 'path,label', got 3 fields"),
        ("path,label\n", "no readable images"),
    ],
)
def test_csv_errors_name_the_row(tmp_path, rows, match):
    Image.fromarray(digit()).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text(rows)
    with pytest.raises(UserError, match=match) as e:
        load_style_data(str(tmp_path / "t.csv"))
    assert "\n" not in str(e.value)


def test_train_lora_help_describes_the_table_the_reader_reads(tmp_path, capsys):
    """--help said "rows: label, then 784 pixel values" while the reader wants 'path,label': the help now
    quotes the reader's own description (styles.CSV_FORMAT), and a table written as it says is read."""
    from lora4diffusion.cli import main

    with pytest.raises(SystemExit):
        main(["train-lora", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"FILE.csv ({styles.CSV_FORMAT})" in text and "784" not in text
    assert "'path,label'" in styles.CSV_FORMAT
    for d in range(2):  # as described: an image path relative to the table, its digit, a header row
        Image.fromarray(digit()).save(tmp_path / f"{d}.png")
    (tmp_path / "t.csv").write_text("path,label\n0.png,0\n1.png,1\n")
    assert load_style_data(str(tmp_path / "t.csv")).labels.tolist() == [0, 1]


# --------------------------------------------------------------------------------------------- few-shot


def test_per_digit_few_shot_is_seeded():
    a = load_style_data("italic", per_digit=3, seed=0)
    assert torch.bincount(a.labels, minlength=10).tolist() == [3] * 10
    assert a.source == "style italic on embedded MNIST, 3 per digit (30 digits)"
    b = load_style_data("italic", per_digit=3, seed=0)
    c = load_style_data("italic", per_digit=3, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown style 'wavy': not one of bold, thin, italic"):
        load_style_data("wavy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        load_style_data(str(tmp_path / "empty"))
    (tmp_path / "nodigits" / "a").mkdir(parents=True)
    (tmp_path / "nodigits" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="no digit subfolders 0-9"):
        load_style_data(str(tmp_path / "nodigits"))
    (tmp_path / "noimages" / "4").mkdir(parents=True)
    (tmp_path / "noimages" / "4" / "x.txt").write_text("text")
    with pytest.raises(UserError, match="no readable images"):
        load_style_data(str(tmp_path / "noimages"))
    (tmp_path / "s.txt").write_text("text")
    with pytest.raises(UserError, match="neither a folder nor a .csv file"):
        load_style_data(str(tmp_path / "s.txt"))
    for bad in (0, -2, True, 1.5):
        with pytest.raises(UserError, match="per_digit must be a positive integer"):
            load_style_data("bold", per_digit=bad)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", denied)  # chmod does not stop root, so fake the failure
    with pytest.raises(UserError, match="cannot read it \\(Permission denied\\)"):
        load_style_data(str(tmp_path / "noimages"))
