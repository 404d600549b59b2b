"""A small MNIST CNN, trained by the project, used to score generated digits (accuracy and feature FID).

Input convention everywhere: float images [N, H, W] (or [N, 1, H, W]) in [0, 1], white digit on black;
anything not 28x28 (samples at 32 or 48 px) is resized with antialiased bilinear interpolation first.
The ``feature_dim``-wide penultimate layer (after ReLU, as Inception's pool3 for FID) gives the features.

Files: ``classifier.safetensors`` (weights) + ``classifier.json`` (architecture, held-out accuracy,
the command that trained it, wall time). The shipped one is in ``lora4diffusion/pretrained/classifier``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora4diffusion.checkpoint import load_weights, path_kind, read_json, save_tensors, write_json
from lora4diffusion.data import load_mnist
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.schema import integer, number, shown

FORMAT = "lora4diffusion-classifier"
VERSION = 1
log = logging.getLogger("lora4diffusion")
WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"


@dataclass
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64, 96)  # one conv pair per level; 28 -> 14 -> 7 between levels
    feature_dim: int = 128
    dropout: float = 0.0  # measured: 0.3 cost held-out accuracy with this little data and augmentation

    def __post_init__(self) -> None:
        # types and ranges checked, not coerced: classifier.json may come from anywhere
        if not isinstance(self.channels, (list, tuple)) or len(self.channels) != 3:
            raise UserError(f"bad classifier config: channels must be 3 integers, got {shown(self.channels)}")
        self.channels = tuple(integer(c, "classifier channels entry", 1, 1024) for c in self.channels)
        integer(self.feature_dim, "classifier feature_dim", 1, 4096)
        number(self.dropout, "classifier dropout", 0.0, 1.0)


def default_dir() -> Path:
    """Where the shipped classifier lives (lora4diffusion/pretrained/classifier)."""
    return Path(__file__).parent / "pretrained" / "classifier"


def to_input(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W] or [N, 1, H, W] in [0, 1] -> float32 [N, 1, 28, 28] in [0, 1] (antialiased resize)."""
    x = torch.as_tensor(images).float()
    x = x.unsqueeze(1) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[1] != 1:
        raise UserError(f"expected images [N, H, W] or [N, 1, H, W], got shape {tuple(images.shape)}")
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # BatchNorm is fine here: the classifier is only ever used in eval mode, with frozen statistics
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    """conv-conv-pool, conv-conv-pool, conv-conv, global average pool, Linear+ReLU (features), Linear."""

    def __init__(self, cfg: ClassifierConfig | None = None, info: dict | None = None):
        super().__init__()
        self.cfg = cfg or ClassifierConfig()
        self.info = info or {}  # what classifier.json recorded (accuracy, command); not used in forward
        c1, c2, c3 = self.cfg.channels
        self.body = nn.Sequential(
            _block(1, c1), _block(c1, c1), nn.MaxPool2d(2),
            _block(c1, c2), _block(c2, c2), nn.MaxPool2d(2),
            _block(c2, c3), _block(c3, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature = nn.Sequential(nn.Linear(c3, self.cfg.feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(self.cfg.dropout), nn.Linear(self.cfg.feature_dim, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, 1, 28, 28] in [0, 1] -> (logits [N, 10], features [N, F])."""
        f = self.feature(self.body((x - 0.5) / 0.5))
        return self.head(f), f

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (logits [N, 10], features [N, F]) in one batched, gradient-free eval-mode pass."""
        was_training = self.training
        self.eval()
        x = to_input(images)
        logits, feats = [], []
        for start in range(0, len(x), batch_size):
            lo, f = self(x[start : start + batch_size])
            logits.append(lo)
            feats.append(f)
        self.train(was_training)
        if not logits:
            return torch.zeros(0, 10), torch.zeros(0, self.cfg.feature_dim)
        return torch.cat(logits), torch.cat(feats)

    def predict(self, images: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (labels int64 [N], class probabilities [N, 10])."""
        logits, _ = self.embed(images, batch_size)
        return logits.argmax(1), logits.softmax(1)

    def features(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """Images -> penultimate-layer features float32 [N, feature_dim] (the FID embedding)."""
        return self.embed(images, batch_size)[1]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random small affine per image: shift up to +-2 px, rotation up to +-10 deg, scale 0.9..1.1."""
    n = len(x)
    u = lambda: torch.rand(n, generator=g) * 2 - 1  # noqa: E731 - uniform in [-1, 1]
    angle, scale = u() * math.radians(10), 1 + 0.1 * u()
    shift = torch.stack([u(), u()], 1) * (2 / 14)  # affine_grid works in [-1, 1]: 14 px per unit at 28 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred, _ = model.predict(images)
    return float((pred == labels).double().mean()) if len(labels) else float("nan")


def train_classifier(out_dir: str | Path, data: str = "embedded", epochs: int = 12, seed: int = 0,
                     batch_size: int = 64, lr: float = 3e-3, cfg: ClassifierConfig | None = None,
                     command: str | None = None, device: str | torch.device = "cpu",
                     bf16: bool = False) -> dict:
    """Train on the TRAIN split of ``load_mnist(data)`` only; save weights + JSON; return the JSON dict.

    One-cycle AdamW with label smoothing and on-the-fly affine augmentation. The held-out split is used
    only once, after training, for the recorded accuracy (no early stopping on it). ``device``: where the
    steps run (augmentation stays on the CPU: the same random stream everywhere); ``bf16``: autocast.
    """
    dev = resolve_device(device)
    if epochs <= 0 or batch_size <= 0:
        raise UserError(f"epochs and batch size must be > 0, got {epochs} and {batch_size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    splits = load_mnist(data)
    x = splits.train.images.float().div(255).unsqueeze(1)
    y = splits.train.labels
    torch.manual_seed(seed)  # weight init
    g = torch.Generator().manual_seed(seed)  # batch order and augmentation
    model = Classifier(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        perm, total = torch.randperm(len(y), generator=g), 0.0
        for start in range(0, len(y), batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one value per channel
                continue
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits, _ = model(augment(x[idx], g).to(dev))
            loss = F.cross_entropy(logits.float(), y[idx].to(dev), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("classifier epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, epochs, total / len(y),
                 time.time() - t0)
    wall = time.time() - t0
    model.cpu().eval()
    held = splits.heldout.images.float().div(255)
    held_acc = accuracy(model, held, splits.heldout.labels)
    python_call = (f'python -c "import torch; torch.set_num_threads({torch.get_num_threads()}); '
                   f'from lora4diffusion.classifier import train_classifier; '
                   f'train_classifier({str(out_dir)!r}, data={data!r}, epochs={epochs}, seed={seed})"')
    info = {
        "format": FORMAT, "version": VERSION, "classifier": asdict(model.cfg),
        "data": data, "data_source": splits.source, "train_digits": len(y),
        "heldout_digits": len(splits.heldout), "heldout_accuracy": held_acc,
        "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "device": dev.type, "bf16": bf16,
        "train_seconds": round(wall, 1), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "train_command": command or python_call,
    }
    save_tensors(out_dir / WEIGHTS_NAME, {k: v.float() for k, v in model.state_dict().items()})
    write_json(out_dir / CONFIG_NAME, info)
    model.info = info
    return info


def load_classifier(path: str | Path | None = None) -> Classifier:
    """Load a classifier directory (or its .safetensors file); None = the one shipped with the package."""
    path = Path(path) if path is not None else default_dir()
    directory = path.parent if path.suffix == ".safetensors" else path
    if path_kind(directory) != "dir":
        raise UserError(f"classifier {path} does not exist (expected a directory with {CONFIG_NAME})")
    where = directory / CONFIG_NAME
    info = read_json(where)
    if info.get("format") != FORMAT or type(info.get("version")) is not int or info["version"] != VERSION:
        raise UserError(f"{where}: not a lora4diffusion classifier config (v{VERSION})")
    fields = info.get("classifier")
    if not isinstance(fields, dict) or set(fields) - set(ClassifierConfig.__dataclass_fields__):
        raise UserError(f"{where}: malformed classifier config ({shown(fields, 80)})")
    try:
        cfg = ClassifierConfig(**fields)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    weights = directory / WEIGHTS_NAME
    model = load_weights(lambda: Classifier(cfg, info), weights)  # header checked before allocating
    for name, buf in model.named_buffers():
        if name.endswith("running_var") and bool((buf < 0).any()):  # BatchNorm would take sqrt of it
            raise UserError(f"{weights}: {name} holds negative variances")
    return model.eval()
