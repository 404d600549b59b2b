"""LoRA (Hu et al. 2021) for the UNet's nn.Linear and nn.Conv2d layers: wrappers, injection, merging.

Eq. 3 of the paper: h = W0 x + (alpha/r) B A x, with W0 frozen, A = ``down`` [r, in] random and B = ``up``
[out, r] zero, so an adapted model starts exactly equal to its base. With rsLoRA (Kalajdzievski 2023) the
scale is alpha/sqrt(r). As in PEFT, a wrapper (``LoRALinear``/``LoRAConv2d``) holds the layer it adapts as
``base_layer`` and any number of named adapters; each adapter also has a user multiplier ``weight`` (1 by
default; ``--lora a:0.5`` sets 0.5), so its branch adds weight * scale * B A x.

In the model's state dict adapter NAME is ``<path>.lora_down.NAME.weight`` and ``<path>.lora_up.NAME.weight``;
the base weights become ``<path>.base_layer.weight`` (``base_state_dict`` gives them their original names).
Files, fingerprints, PEFT interop, extraction and resizing are in ``lora4diffusion.lora.adapters``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import ResBlock

INITS = ("normal", "kaiming")  # normal: the seed's N(0, (1/r)^2) (PEFT "gaussian"); kaiming: PEFT's default


class LoRALayer(nn.Module):
    """A frozen base layer plus named low-rank branches; subclasses say how to build A and B."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():  # on the parameters (the reference set a module attribute)
            p.requires_grad_(False)
        self.lora_down = nn.ModuleDict()
        self.lora_up = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        self.init: dict[str, str] = {}
        self.weight: dict[str, float] = {}  # the user's per-adapter multiplier
        self.adapters_enabled = True
        self.merged_adapters: list[str] = []
        self._unmerged_weight: torch.Tensor | None = None  # W0 as it was before the first merge

    # --- subclass hooks ---
    def _make_pair(self, rank: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    # --- adapters ---
    def add_adapter(self, name: str, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                    dropout: float = 0.0) -> None:
        if name in self.lora_down:
            raise UserError(f"adapter {name!r} already exists on this layer")
        down, up = self._make_pair(rank)
        # fp32 whatever the base dtype: the branch is computed in fp32 (see forward)
        w0 = self.base_layer.weight
        down.to(device=w0.device, dtype=torch.float32)
        up.to(device=w0.device, dtype=torch.float32)
        if init == "normal":
            nn.init.normal_(down.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)  # B = 0: the adapted model starts as the base model
        self.lora_down[name], self.lora_up[name] = down, up
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank[name], self.alpha[name], self.rslora[name], self.weight[name] = rank, alpha, rslora, 1.0
        self.init[name] = init

    def scale(self, name: str) -> float:
        """alpha / r (eq. 3), or alpha / sqrt(r) with rsLoRA; the user's weight is not included."""
        r = self.rank[name]
        return self.alpha[name] / (math.sqrt(r) if self.rslora[name] else r)

    def set_scale(self, name: str, weight: float) -> None:
        """Set the multiplier of adapter ``name`` (0 switches it off exactly); merged weights are redone."""
        if name not in self.lora_down:
            raise UserError(f"no adapter named {name!r} (have {sorted(self.lora_down)})")
        merged = list(self.merged_adapters)
        if merged:
            self.unmerge()
        self.weight[name] = float(weight)
        if merged:
            self.merge(merged)

    def delta_weight(self, name: str) -> torch.Tensor:
        """weight * scale * B A in fp32, shaped like the base weight (conv: [out, r] @ [r, in*kh*kw])."""
        b, a = self.lora_up[name].weight, self.lora_down[name].weight
        delta = b.float().flatten(1) @ a.float().flatten(1)
        return (delta * (self.weight[name] * self.scale(name))).view(self.base_layer.weight.shape)

    # --- merging: fold the branches into W0 for inference speed ---
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        if not self.adapters_enabled:
            raise UserError("adapters are disabled; enable them before merging")
        names = list(self.lora_down) if names is None else list(names)
        w0 = self.base_layer.weight
        for name in names:
            if name not in self.lora_down:
                raise UserError(f"no adapter named {name!r} (have {sorted(self.lora_down)})")
            if name in self.merged_adapters:
                continue
            if self._unmerged_weight is None:
                self._unmerged_weight = w0.detach().clone()
            if self.weight[name] != 0:
                w0.add_(self.delta_weight(name).to(w0.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly: the pre-merge copy is put back, so no rounding error accumulates."""
        if self._unmerged_weight is not None:
            self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters.clear()

    def enable_adapters(self) -> None:
        self.adapters_enabled = True

    def disable_adapters(self) -> None:
        """Output = the base layer's. Merged adapters are unmerged first (they live inside W0)."""
        self.unmerge()
        self.adapters_enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapters_enabled:
            return out
        for name, down in self.lora_down.items():
            w = self.weight[name]
            if w == 0 or name in self.merged_adapters:  # skipping keeps scale 0 bit-identical to the base
                continue
            # The branch runs in fp32 even under bf16 autocast (input cast to the LoRA weights' dtype, as in
            # the seed and PEFT): the small factors and their product keep full precision; only the sum with
            # the base output takes that output's dtype.
            with torch.autocast(device_type=x.device.type, enabled=False):
                h = self.lora_up[name](down(self.lora_dropout[name](x.to(down.weight.dtype))))
                out = out + (h * (w * self.scale(name))).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.rank[n]}, alpha={self.alpha[n]:g}, w={self.weight[n]:g}"
                         for n in self.rank)


class LoRALinear(LoRALayer):
    """LoRA around an nn.Linear: A = Linear(in, r), B = Linear(r, out), no biases."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, name: str = "default"):
        super().__init__(base)
        self.add_adapter(name, rank, alpha, init, rslora, dropout)

    def _make_pair(self, rank: int) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        return nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)


class LoRAConv2d(LoRALayer):
    """LoRA around an nn.Conv2d, laid out as PEFT: A = the base's conv with r outputs, B = a 1x1 conv."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, name: str = "default"):
        super().__init__(base)
        self.add_adapter(name, rank, alpha, init, rslora, dropout)

    def _make_pair(self, rank: int) -> tuple[nn.Module, nn.Module]:
        b = self.base_layer
        down = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding, b.dilation, bias=False)
        return down, nn.Conv2d(rank, b.out_channels, 1, bias=False)


def _wrap(base: nn.Module, **kw) -> LoRALayer:
    return LoRALinear(base, **kw) if isinstance(base, nn.Linear) else LoRAConv2d(base, **kw)


def max_rank(base: nn.Module) -> int:
    """The rank of the base weight matrix (a conv kernel counts as [out, in * kh * kw])."""
    w = base.weight
    return min(w.shape[0], w[0].numel())


def lora_shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (A, B) for a base layer: Linear [r, in], [out, r]; Conv2d [r, in, kh, kw], [out, r, 1, 1]."""
    w = base.weight
    if isinstance(base, nn.Linear):
        return (rank, w.shape[1]), (w.shape[0], rank)
    return (rank, *w.shape[1:]), (w.shape[0], rank, 1, 1)


# ----- finding the layers to adapt -----
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> layer for every nn.Linear / nn.Conv2d (a wrapper stands for the layer it wraps)."""
    found: dict[str, nn.Module] = {}
    wrappers: list[str] = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(m, LoRALayer):
            found[path] = m.base_layer
            wrappers.append(path)
        elif isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            found[path] = m
    return found


def _parent(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.rpartition(".")[0])


_Preset = Callable[[str, nn.Module, nn.Module], bool]
PRESETS: dict[str, _Preset] = {
    # SD-style: all four projections of self- (attn1) and cross-attention (attn2)
    "attention": lambda p, m, model: re.search(r"(^|\.)attn[12]\.to_(q|k|v|out)$", p) is not None,
    # the seed's choice: cross-attention q/k/v only
    "reference": lambda p, m, model: re.search(r"(^|\.)attn2\.to_(q|k|v)$", p) is not None,
    # every nn.Linear. PEFT's all-linear leaves out the output head; our output layer is conv_out, a conv,
    # and the label embedding is an nn.Embedding, so nothing linear needs leaving out.
    "all-linear": lambda p, m, model: isinstance(m, nn.Linear),
    # the ResBlock convs (conv1, conv2 and a 1x1 skip); opt-in, e.g. "attention+conv"
    "conv": lambda p, m, model: isinstance(m, nn.Conv2d) and isinstance(_parent(model, p), ResBlock),
}


def _patterns(targets: str | Sequence[str]) -> list[str]:
    """A string is split on ',' and '+' (unless it is one 're:' regex); a list is taken as it is."""
    if isinstance(targets, str):
        items = [targets] if targets.startswith("re:") else re.split(r"[,+]", targets)
    else:
        items = list(targets)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise UserError("no LoRA targets given")
    return items


def _matcher(pattern: str) -> _Preset:
    if pattern in PRESETS:
        return PRESETS[pattern]
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise UserError(f"LoRA target {pattern!r} is not a valid regular expression ({e})") from None
        return lambda p, m, model: rx.fullmatch(p) is not None
    # an exact module path, or its last components: "to_q" matches "mid_attn.attn1.to_q"
    return lambda p, m, model: p == pattern or p.endswith("." + pattern)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths (model order) matched by presets, suffixes, exact paths or 're:' full-match regexes."""
    candidates = adaptable_modules(model)
    chosen: set[str] = set()
    for pattern in _patterns(targets):
        match = _matcher(pattern)
        hits = {p for p, m in candidates.items() if match(p, m, model)}
        if not hits:
            raise UserError(f"LoRA target {pattern!r} matches no nn.Linear/nn.Conv2d module of the model"
                            f" (presets: {', '.join(PRESETS)})")
        chosen |= hits
    return [p for p in candidates if p in chosen]


# ----- injection -----
def inject_lora(model: nn.Module, targets: str | Sequence[str], rank: int, alpha: float,
                name: str = "default", init: str = "normal", rslora: bool = False, dropout: float = 0.0,
                ) -> list[str]:
    """Add adapter ``name`` to every matched layer; afterwards only that adapter is trainable.

    Returns the adapted module paths. Everything is validated before the model is touched.
    """
    return inject_lora_at(model, resolve_targets(model, targets), rank, alpha, name, init, rslora, dropout)


def inject_lora_at(model: nn.Module, paths: Sequence[str], rank: int, alpha: float, name: str = "default",
                   init: str = "normal", rslora: bool = False, dropout: float = 0.0) -> list[str]:
    """``inject_lora`` for exact module paths (used when loading an adapter file)."""
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank}")
    if not alpha > 0 or not math.isfinite(alpha):
        raise UserError(f"LoRA alpha must be > 0, got {alpha}")
    if init not in INITS:
        raise UserError(f"unknown LoRA init {init!r} (choose from {', '.join(INITS)})")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if not name or "." in name:
        raise UserError(f"adapter name {name!r} must be non-empty and contain no '.'")
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise UserError("no modules to adapt")
    candidates = adaptable_modules(model)
    for path in paths:
        if path not in candidates:
            raise UserError(f"this model has no nn.Linear/nn.Conv2d module {path!r}")
        base = candidates[path]
        if rank > max_rank(base):
            raise UserError(f"LoRA rank {rank} exceeds the rank {max_rank(base)} of module {path}"
                            f" (weight {tuple(base.weight.shape)})")
        existing = model.get_submodule(path)
        if isinstance(existing, LoRALayer) and name in existing.lora_down:
            raise UserError(f"module {path} already has an adapter named {name!r}")
    for path in paths:
        existing = model.get_submodule(path)
        if isinstance(existing, LoRALayer):
            existing.add_adapter(name, rank, alpha, init, rslora, dropout)
        else:
            parent, _, child = path.rpartition(".")
            wrapper = _wrap(existing, rank=rank, alpha=alpha, init=init, rslora=rslora, dropout=dropout,
                            name=name)
            setattr(model.get_submodule(parent), child, wrapper)
    for key, p in model.named_parameters():
        p.requires_grad_(f".lora_down.{name}." in key or f".lora_up.{name}." in key)
    return list(paths)


# ----- whole-model helpers -----
def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALayer)}


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_down))
    return list(names)


def set_adapter_weight(model: nn.Module, name: str, weight: float) -> None:
    layers = [m for m in lora_layers(model).values() if name in m.lora_down]
    if not layers:
        raise UserError(f"the model has no adapter named {name!r} (have {adapter_names(model)})")
    for layer in layers:
        layer.set_scale(name, weight)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (PEFT's delete_adapter); a layer left without adapters gets
    its plain base layer back, so removing every adapter restores the base model exactly."""
    layers = {p: m for p, m in lora_layers(model).items() if name in m.lora_down}
    if not layers:
        raise UserError(f"the model has no adapter named {name!r} (have {adapter_names(model)})")
    for path, layer in layers.items():
        merged = [n for n in layer.merged_adapters if n != name]
        layer.unmerge()  # W0 back exactly, then the others are merged again
        for d in (layer.lora_down, layer.lora_up, layer.lora_dropout):
            del d[name]
        for d in (layer.rank, layer.alpha, layer.rslora, layer.init, layer.weight):
            d.pop(name, None)
        if merged:
            layer.merge(merged)
        if not layer.lora_down:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)


def merge_lora(model: nn.Module, names: Sequence[str] | None = None) -> None:
    for layer in lora_layers(model).values():
        layer.merge([n for n in names if n in layer.lora_down] if names is not None else None)


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def enable_lora(model: nn.Module, enabled: bool = True) -> None:
    for layer in lora_layers(model).values():
        layer.enable_adapters() if enabled else layer.disable_adapters()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain base layers back, with every enabled adapter merged in (PEFT's merge_and_unload), so
    ``folders.model.save_model`` writes an ordinary model. Base parameters stay frozen."""
    for path, layer in lora_layers(model).items():
        if merge and layer.adapters_enabled:
            layer.merge()
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names, without LoRA tensors and without merged deltas."""
    layers = lora_layers(model)
    out = {}
    for key, t in model.state_dict().items():
        if ".lora_down." in key or ".lora_up." in key:
            continue
        path, _, leaf = key.rpartition(".base_layer.")
        if path in layers:
            if leaf == "weight" and layers[path]._unmerged_weight is not None:
                t = layers[path]._unmerged_weight
            key = f"{path}.{leaf}"
        out[key] = t
    return out


def lora_parameter_count(model: nn.Module, name: str | None = None) -> int:
    """Number of LoRA parameters (of adapter ``name``, or of all adapters)."""
    def is_lora(key: str) -> bool:
        if name is None:
            return ".lora_down." in key or ".lora_up." in key
        return f".lora_down.{name}." in key or f".lora_up.{name}." in key

    return sum(p.numel() for k, p in model.named_parameters() if is_lora(k))


def lora_summary(model: nn.Module, name: str | None = None) -> dict:
    """Counts for the report: LoRA parameters, base parameters and the LoRA share of the base."""
    lora = lora_parameter_count(model, name)
    base = sum(t.numel() for t in base_state_dict(model).values())
    return {"lora_params": lora, "base_params": base, "share": lora / base if base else 0.0,
            "modules": len([m for m in lora_layers(model).values() if name is None or name in m.lora_down])}
