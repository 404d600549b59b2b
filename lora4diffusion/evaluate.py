"""Scoring generated digits with the project's own MNIST classifier.

Numbers: conditional accuracy (the classifier reads the digit that was asked for), per-digit accuracy,
FID in the classifier's feature space against the held-out real digits (``fid_classifier``), mean ink.
Each comes with the same number measured on real digits, so it can be read on a scale:
    real_vs_real_fid   FID of a slice of TRAIN digits against the held-out digits, with as many train digits
                       as there are samples and the same label mix (FID is biased upward at small n, so the
                       floor must use a comparable n). Train digits were seen by the classifier: a floor,
                       not an unbiased estimate.
    heldout accuracy and mean ink of the real held-out digits.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from lora4diffusion.checkpoint import check_readable
from lora4diffusion.classifier import Classifier, load_classifier, to_input
from lora4diffusion.data import MNISTSplits, load_mnist
from lora4diffusion.errors import UserError
from lora4diffusion.styles import slant

log = logging.getLogger("lora4diffusion")


# ------------------------------------------------------------------------------------------------ samples


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an ``.npz`` written by ``lora4diffusion sample`` -> (images float32 [N, H, W] in [0, 1], labels).

    ``images`` may also be [N, 1, H, W] (squeezed to [N, H, W]); any real dtype is accepted but every value
    must be finite and in [0, 1]. ``labels`` must be N integers 0..9. Anything else is a UserError.
    """
    path = Path(path)
    check_readable(path)  # not found, not a file, permission denied: said so, not "not a readable .npz file"
    unreadable = _UNREADABLE
    _check_npz_headers(path)
    try:
        f = np.load(path, allow_pickle=False)  # no pickle: object arrays raise ValueError when read
    except unreadable as e:
        raise UserError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # a .npy file loads as a bare array
        raise UserError(f"{path}: not an .npz archive (expected arrays 'images' and 'labels')")
    with f:
        missing = [k for k in ("images", "labels") if k not in f.files]
        if missing:
            raise UserError(f"{path}: no array {' or '.join(repr(k) for k in missing)} (has {f.files})")
        try:
            images, labels = f["images"], f["labels"]
        except unreadable as e:
            raise UserError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    return _check_samples(images, labels, str(path))


# what zipfile/numpy raise for a broken archive (RuntimeError: an encrypted member)
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
               RuntimeError)
MAX_SAMPLES_BYTES = 512 << 20  # 170,000 float32 28x28 digits; numpy allocates a header's shape up front


def _check_npz_headers(path: Path) -> None:
    """Read the .npy headers of ``images`` and ``labels`` inside the zip before numpy does: numpy allocates
    the declared shape before reading a byte, so a 50-byte header claiming [10^12, 28, 28] would exhaust
    memory (or be killed) instead of failing. Declared sizes must fit the limit and the member's real size."""
    try:
        with open(path, "rb") as raw:
            if raw.read(6) == b"\x93NUMPY":  # a bare .npy: numpy would allocate its shape before we refuse it
                raise UserError(f"{path}: not an .npz archive (expected arrays 'images' and 'labels')")
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for key in ("images", "labels"):
                if f"{key}.npy" not in names:
                    continue  # load_samples names what is missing
                info = zf.getinfo(f"{key}.npy")
                with zf.open(info) as fp:
                    version = np.lib.format.read_magic(fp)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
                    else:
                        raise UserError(f"{path}: {key}: unsupported .npy format version {version}")
                if dtype.hasobject:
                    raise UserError(f"{path}: not a readable .npz file ({key} holds pickled Python objects,"
                                    " which are never loaded)")
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > MAX_SAMPLES_BYTES:
                    raise UserError(f"{path}: {key} declares shape {shape} of {dtype} ({nbytes} bytes),"
                                    f" over the {MAX_SAMPLES_BYTES >> 20} MiB limit")
                if nbytes > info.file_size:
                    raise UserError(f"{path}: {key} declares shape {shape} ({nbytes} bytes) but holds"
                                    f" {info.file_size} bytes: truncated or corrupt")
    except UserError:
        raise
    except (*_UNREADABLE, KeyError) as e:
        raise UserError(f"{path}: not a readable .npz file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_samples(images: np.ndarray, labels: np.ndarray, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or min(images.shape[1:], default=0) < 8:
        raise UserError(f"{where}: images must be [N, H, W] or [N, 1, H, W], H, W >= 8; got {images.shape}")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise UserError(f"{where}: images must be numbers in [0, 1], got dtype {images.dtype}")
    if len(images) == 0:
        raise UserError(f"{where}: no images")
    images = images.astype(np.float32)
    bad = int((~np.isfinite(images)).sum())
    if bad:
        raise UserError(f"{where}: {bad} image values are NaN or infinite")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise UserError(f"{where}: image values must lie in [0, 1], found {lo:g}..{hi:g}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise UserError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 9:
        raise UserError(f"{where}: labels must be digits 0..9, found {labels.min()}..{labels.max()}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------------------ FID


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # tiny negative eigenvalues are rounding noise


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)) for two Gaussians, in float64.

    Tr (s1 s2)^(1/2) = Tr (r s2 r)^(1/2) with r = s1^(1/2): ``s1 s2`` is similar to the symmetric PSD matrix
    ``r s2 r``, so two symmetric eigendecompositions replace a general (complex, less stable) sqrtm.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    d = len(mu1)
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: means {mu1.shape} {mu2.shape}, covariances {s1.shape} {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, F] features, in float64."""
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two [N, F] feature sets (FID, Heusel et al. 2017)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# ------------------------------------------------------------------------------------------------ scores


def _matching_train_slice(splits: MNISTSplits, labels: torch.Tensor) -> torch.Tensor:
    """Indices of train digits with the same label counts as ``labels`` (capped per class), fixed order."""
    perm = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    train_labels = splits.train.labels[perm]
    counts = torch.bincount(labels, minlength=10)
    picks = [perm[train_labels == c][: int(counts[c])] for c in range(10)]
    return torch.cat(picks).sort().values


def evaluate_samples(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier | None = None,
                     reference: MNISTSplits | str | None = None) -> dict:
    """Score generated ``images`` (float [N, H, W] in [0, 1]) that were asked to be digits ``labels``.

    ``classifier``: default the shipped one. ``reference``: real digits, as splits or a ``load_mnist``
    source (default ``"embedded"``). Returns a JSON-ready dict (see the module docstring).
    """
    images, labels = _check_samples(np.asarray(images), np.asarray(labels), "samples")
    n = len(labels)
    if n < 2:
        raise UserError("need at least 2 samples (FID needs a covariance)")
    clf = classifier if classifier is not None else load_classifier()
    splits = load_mnist(reference or "embedded") if not isinstance(reference, MNISTSplits) else reference
    held_x, held_y = splits.heldout.images.float() / 255, splits.heldout.labels
    if len(held_y) < 2:
        raise UserError(f"reference {splits.source} has {len(held_y)} held-out digits, need at least 2")

    floor_idx = _matching_train_slice(splits, labels)
    floor_x = splits.train.images[floor_idx].float() / 255
    # one pass over samples, held-out and floor digits (resized to 28 px first so they concatenate)
    logits, all_feats = clf.embed(torch.cat([to_input(images), to_input(held_x), to_input(floor_x)]))
    feats, held_feats, floor_feats = all_feats.split([n, len(held_y), len(floor_idx)])
    pred, held_pred = logits[:n].argmax(1), logits[n : n + len(held_y)].argmax(1)

    correct = pred == labels
    per_digit = {d: float(correct[labels == d].double().mean()) if (labels == d).any() else None
                 for d in range(10)}
    return {
        "n": n,
        "image_size": list(images.shape[1:]),
        "accuracy": float(correct.double().mean()),
        "per_digit_accuracy": per_digit,
        "per_digit_n": {d: int((labels == d).sum()) for d in range(10)},
        "fid_classifier": fid(feats, held_feats),
        "fid_n": {"samples": n, "heldout": len(held_y)},
        "mean_ink": float(images.double().mean()),
        "reference": {
            "source": splits.source,
            "heldout_n": len(held_y),
            "heldout_accuracy": float((held_pred == held_y).double().mean()),
            "heldout_mean_ink": float(held_x.double().mean()),
            "real_vs_real_fid": fid(floor_feats, held_feats) if len(floor_idx) >= 2 else None,
            "real_vs_real_n": {"train_slice": len(floor_idx), "heldout": len(held_y)},
            "real_vs_real_note": "train digits (same label mix; seen by the classifier) vs held-out digits",
        },
        "classifier": {"feature_dim": clf.cfg.feature_dim,
                       "recorded_heldout_accuracy": clf.info.get("heldout_accuracy"),
                       "trained_on": clf.info.get("data_source")},
    }


def style_scores(images: torch.Tensor, labels: torch.Tensor, base: dict | None = None,
                 classifier: Classifier | None = None) -> dict[str, float]:
    """The few numbers that say whether a style took: ``accuracy`` (the classifier reads the digit asked
    for), mean ``ink`` and ``slant`` (``styles.slant``) of ``images`` [N, H, W] in [0, 1]; with ``base``
    (this function's result for the base model's images of the same labels and seeds) also ``ink_ratio``
    (ink / the base's) and ``slant_diff`` (slant - the base's, px): the style's effect, with the seeds'
    own variation cancelled. No FID: cheap enough to run while training (``training/scores.py``)."""
    clf = classifier if classifier is not None else load_classifier()
    logits, _ = clf.embed(images)  # batched, gradient-free, eval mode
    out = {"accuracy": float((logits.argmax(1) == labels.to(logits.device)).double().mean()),
           "ink": float(torch.as_tensor(images).double().mean()), "slant": slant(images)}
    if base is not None:
        out["ink_ratio"] = out["ink"] / base["ink"]
        out["slant_diff"] = out["slant"] - base["slant"]
    return out


def percent(x: float | None) -> str:
    """0.973 -> '97.3%'; None -> '-'."""
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(result: dict, as_json: bool = False) -> str:
    """The result of ``evaluate_samples`` as an aligned table (or as indented JSON)."""
    if as_json:
        return json.dumps(result, indent=2)
    ref = result["reference"]
    fn, rn = result["fid_n"], ref["real_vs_real_n"]
    floor = "-" if ref["real_vs_real_fid"] is None else f"{ref['real_vs_real_fid']:.3f}"
    h, w = result["image_size"]
    rows = [
        ("", "generated", "real"),
        ("digits (n)", str(result["n"]), f"{ref['heldout_n']} held-out"),
        ("classifier accuracy", percent(result["accuracy"]), percent(ref["heldout_accuracy"])),
        ("FID (classifier features)", f"{result['fid_classifier']:.3f}", f"{floor} (floor)"),
        ("  FID n (vs held-out)", f"{fn['samples']} vs {fn['heldout']}",
         f"{rn['train_slice']} train vs {rn['heldout']}"),
        ("mean ink", f"{result['mean_ink']:.4f}", f"{ref['heldout_mean_ink']:.4f}"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}".rstrip() for a, b, c in rows]
    lines.append("")
    digits = [d for d in range(10) if result["per_digit_n"][d]]
    lines.append("digit     " + "".join(f"{d:>7}" for d in digits))
    lines.append("n         " + "".join(f"{result['per_digit_n'][d]:>7}" for d in digits))
    lines.append("accuracy  " + "".join(f"{percent(result['per_digit_accuracy'][d]):>7}" for d in digits))
    lines.append("")
    lines.append(f"samples {h}x{w}; real digits: {ref['source']}; floor = {ref['real_vs_real_note']}")
    if "source" in result:  # added by the evaluate command: the .npz, or the checkpoint and sampling settings
        lines.append("samples from " + ", ".join(f"{k} {v}" for k, v in result["source"].items()))
    return "\n".join(lines)
