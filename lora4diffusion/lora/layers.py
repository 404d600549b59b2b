"""Adapted layers: a frozen nn.Linear / nn.Conv2d plus named adapters, and injecting them into a model.

A wrapper (``LoRALayer``, as PEFT's tuner layers) holds the layer it adapts as ``base_layer`` and any number
of named adapters, each an *adapter method*: an ``AdapterMethod`` (method.py) that owns its tensors and
knows its ΔW. Each adapter also has a user multiplier (``multipliers[name]``, 1 by default; ``--lora a:0.5``
sets 0.5), so for adapters i with multipliers m_i the layer computes

    h = W0 x + sum_i m_i ΔW_i x                       (a merged adapter is inside W0 instead: W0 += m_i ΔW_i)

The methods (``METHODS``), each starting at ΔW = 0 so an adapted model starts exactly equal to its base:
- LoRA (Hu et al. 2021, eq. 3; lora.py): ΔW = (alpha/r) B A, A = ``lora_down`` [r, in], B = ``lora_up``
  [out, r] (rsLoRA, Kalajdzievski 2023: alpha/sqrt(r));
- DoRA (Liu et al. 2024, eq. 5; dora.py): W0 + ΔW = m (W0 + ΔW_LoRA) / ||W0 + ΔW_LoRA||, m trained;
- LoHa (FedPara, Hyeon-Woo et al. 2022; loha.py): ΔW = (alpha/r) (W1a W1b) ⊙ (W2a W2b);
- LoKr (LyCORIS, Yeh et al. 2024; lokr.py): ΔW = (alpha/r) W1 ⊗ W2;
- OFT (Qiu et al. 2023, eq. 2; oft.py): W0 + ΔW = W0 R^T, R block-diagonal orthogonal (Cayley).

The contract: a new method (DoRA, LoHa, LoKr, ...) is one file with a subclass of ``AdapterMethod`` plus one
line in ``METHODS``; it implements
- ``__init__(base, rank, alpha, init, rslora, dropout, **options)``: its tensors, shaped and initialised for
  the base nn.Linear / nn.Conv2d (ΔW = 0 at first, as LoRA's B = 0), each held in a child module;
  ``options`` are its own settings (LoKr: ``factor``; DoRA: ``norm_axis``), declared with their defaults;
- ``keys`` and ``shapes(base, rank, **options)``: the names its tensors may have (its own ``state_dict()``
  keys) and their shapes on a base, which adapter files are checked against before any model is touched;
  ``problem``: the checks a file's tensors must pass on their own;
- ``delta_weight(m, W0)``: m ΔW in fp32, shaped like the base weight (what merging adds to W0); W0 is the
  base weight without merged adapters (only DoRA's ΔW depends on it);
- ``forward(x, m, W0)``: m ΔW x, run in fp32 with autocast off (the default applies ``delta_weight`` with the
  base's linear / conv operation; LoRA computes B (A x) instead);
- ``metadata()``: its settings (rank, alpha, init, rslora, dropout, options), written into adapter files;
- ``up_keys``: the "B" factor of each A/B pair, which LoRA+ trains with a larger learning rate.
The wrapper then gives every method, unchanged: multipliers (0 skips the adapter, so the output is the base's
bit for bit), per-row multipliers for a batch whose rows carry different adapters (``row_multipliers_while``),
merging and exact unmerging, enabling, deleting, ``base_state_dict`` and the base fingerprint, saving and
loading adapter files (adapters.py) and the format exports built on them.

State-dict keys: child C of adapter NAME at module <path> is stored as ``<path>.C.NAME`` (LoRA:
``<path>.lora_down.NAME.weight``, ``<path>.lora_up.NAME.weight``); the base weights become
``<path>.base_layer.weight`` (``base_state_dict`` gives them their original names). In an adapter file the
same tensors are ``<path>.<key>`` (``<path>.lora_down.weight``): the adapter's name is chosen when loading.
Which layers: ``targets.py``. Files, fingerprints and PEFT interop: ``adapters.py``; extraction and
resizing: ``extract.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.lora.dora import DoRA
from lora4diffusion.lora.loha import LoHa
from lora4diffusion.lora.lokr import LoKr
from lora4diffusion.lora.lora import INITS, LoRA
from lora4diffusion.lora.method import AdapterMethod
from lora4diffusion.lora.oft import OFT
from lora4diffusion.lora.targets import adaptable_modules, max_rank, resolve_targets

# adapter files name their method by kind
METHODS: dict[str, type[AdapterMethod]] = {m.kind: m for m in (LoRA, DoRA, LoHa, LoKr, OFT)}


class LoRALayer(nn.Module):
    """A frozen base layer plus named adapters (``adapters[name]``, each an AdapterMethod).

    The adapters' child modules are registered here, under one ModuleDict per child name (``lora_down``,
    ``lora_up``, ...) keyed by adapter name, so the state-dict keys are ``<child>.<name>.<param>``; the
    ``adapters`` dict itself is a plain dict (registering it too would list every tensor twice).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():  # on the parameters (the reference set a module attribute)
            p.requires_grad_(False)
        self.adapters: dict[str, AdapterMethod] = {}
        self.multipliers: dict[str, float] = {}  # the user's per-adapter multiplier m
        # per-row multipliers [B] of one call whose prompts carry different adapters (peft's adapter_names=):
        # while set, they replace ``multipliers[name]`` for that adapter (``row_multipliers_while``)
        self.row_multipliers: dict[str, torch.Tensor] = {}
        self.adapters_enabled = True
        self.merged_adapters: list[str] = []
        self._unmerged_weight: torch.Tensor | None = None  # W0 as it was before the first merge

    # --- adapters ---
    def add_adapter(self, name: str, method: AdapterMethod) -> None:
        if name in self.adapters:
            raise UserError(f"adapter {name!r} already exists on this layer")
        if [*method.parameters(recurse=False), *method.buffers(recurse=False)]:
            raise TypeError(f"{type(method).__name__}: keep tensors in child modules (see lora/layers.py)")
        for child, module in method.named_children():
            if child not in self._modules:
                self.add_module(child, nn.ModuleDict())
            store = self._modules[child]
            if not isinstance(store, nn.ModuleDict):
                raise TypeError(f"{type(method).__name__}: child name {child!r} is taken by the wrapper")
            store[name] = module
        self.adapters[name] = method
        self.multipliers[name] = 1.0

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` and its tensors (merged adapters: see ``delete_adapter``)."""
        for child, _ in self.adapters.pop(name).named_children():
            del self._modules[child][name]
        del self.multipliers[name]

    def _require(self, name: str) -> AdapterMethod:
        if name not in self.adapters:
            raise UserError(f"no adapter named {name!r} (have {sorted(self.adapters)})")
        return self.adapters[name]

    def state_key(self, name: str, key: str) -> str:
        """Key ``key`` of adapter ``name`` as this layer's state dict names it (``lora_down.NAME.weight``)."""
        child, _, rest = key.partition(".")
        return f"{child}.{name}.{rest}"

    def set_multiplier(self, name: str, multiplier: float) -> None:
        """Set the multiplier of adapter ``name`` (0 switches it off exactly); merged weights are redone."""
        self._require(name)
        merged = list(self.merged_adapters)
        if merged:
            self.unmerge()
        self.multipliers[name] = float(multiplier)
        if merged:
            self.merge(merged)

    @property
    def original_weight(self) -> torch.Tensor:
        """W0 without any merged adapter (what a method whose ΔW depends on W0, DoRA, is relative to)."""
        w = self._unmerged_weight
        return self.base_layer.weight if w is None else w

    def delta_weight(self, name: str) -> torch.Tensor:
        """m ΔW of adapter ``name`` in fp32, shaped like the base weight."""
        return self.adapters[name].delta_weight(self.multipliers[name], self.original_weight)

    # --- merging: fold the adapters into W0 for inference speed ---
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        if not self.adapters_enabled:
            raise UserError("adapters are disabled; enable them before merging")
        names = list(self.adapters) if names is None else list(names)
        w0 = self.base_layer.weight
        for name in names:
            self._require(name)
            if name in self.merged_adapters:
                continue
            if self._unmerged_weight is None:
                self._unmerged_weight = w0.detach().clone()
            if self.multipliers[name] != 0:
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

    def train(self, mode: bool = True) -> LoRALayer:
        super().train(mode)
        for method in self.adapters.values():  # not registered as modules (their children are)
            method.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapters_enabled:
            return out
        for name, method in self.adapters.items():
            rows = self.row_multipliers.get(name)
            if rows is not None and name not in self.merged_adapters:
                # h_b = W0 x_b + m_b ΔW x_b for each row b: ΔW is linear in m (AdapterMethod.forward), so one
                # forward at m = 1 scaled row by row serves the batch; a row with m_b = 0 adds exactly +0
                with torch.autocast(device_type=x.device.type, enabled=False):
                    delta = method(x, 1.0, self.original_weight)
                    out = out + (delta * _per_row(rows, delta)).to(out.dtype)
                continue
            m = self.multipliers[name]
            if m == 0 or name in self.merged_adapters:  # skipping keeps m = 0 bit-identical to the base
                continue
            # The adapter runs in fp32 even under bf16 autocast; only the sum with the base output takes that
            # output's dtype.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = out + method(x, m, self.original_weight).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {type(a).__name__}({a.extra_repr()}), m={self.multipliers[n]:g}"
                         for n, a in self.adapters.items())


def _per_row(rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The [n] row multipliers shaped to broadcast over ``delta`` [B, ...]: B = n, or B = k n when the batch
    is the n rows repeated k times (classifier-free guidance runs [conditional; unconditional], so row b and
    row n + b are one prompt's and take its adapters)."""
    n, b = rows.numel(), delta.shape[0]
    if b % n:
        raise RuntimeError(f"a batch of {b} rows for {n} per-row adapter weights")
    rows = rows.to(device=delta.device, dtype=delta.dtype).repeat(b // n)
    return rows.view(b, *[1] * (delta.dim() - 1))


class LoRALinear(LoRALayer):
    """An nn.Linear in a LoRALayer with one LoRA adapter ``name``: A = Linear(in, r), B = Linear(r, out)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, name: str = "default"):
        super().__init__(base)
        self.add_adapter(name, LoRA(base, rank, alpha, init, rslora, dropout))


class LoRAConv2d(LoRALayer):
    """An nn.Conv2d in a LoRALayer with one LoRA adapter ``name``: A = the base's conv with r outputs, B = a
    1x1 conv."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, init: str = "normal", rslora: bool = False,
                 dropout: float = 0.0, name: str = "default"):
        super().__init__(base)
        self.add_adapter(name, LoRA(base, rank, alpha, init, rslora, dropout))


# ----- injection -----
def inject_lora(model: nn.Module, targets: str | Sequence[str], rank: int, alpha: float,
                name: str = "default", init: str = "normal", rslora: bool = False, dropout: float = 0.0,
                method: type[AdapterMethod] = LoRA, options: dict | None = None) -> list[str]:
    """Add adapter ``name`` (a ``method``, LoRA by default, with its ``options``) to every matched layer;
    afterwards only that adapter is trainable.

    Returns the adapted module paths. Everything is validated before the model is touched.
    """
    return inject_lora_at(model, resolve_targets(model, targets), rank, alpha, name, init, rslora, dropout,
                          method, options)


def inject_lora_at(model: nn.Module, paths: Sequence[str], rank: int, alpha: float, name: str = "default",
                   init: str = "normal", rslora: bool = False, dropout: float = 0.0,
                   method: type[AdapterMethod] = LoRA, options: dict | None = None) -> list[str]:
    """``inject_lora`` for exact module paths (used when loading an adapter file)."""
    options = method.check_options(options or {})
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
        unfit = method.unfit(base, rank, **options)
        if unfit:
            raise UserError(f"module {path}: {unfit}")
        existing = model.get_submodule(path)
        if isinstance(existing, LoRALayer) and name in existing.adapters:
            raise UserError(f"module {path} already has an adapter named {name!r}")
    for path in paths:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoRALayer):
            parent, _, child = path.rpartition(".")
            layer = LoRALayer(layer)
            setattr(model.get_submodule(parent), child, layer)
        layer.add_adapter(name, method(layer.base_layer, rank, alpha, init, rslora, dropout, **options))
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        if name in layer.adapters:
            layer.adapters[name].requires_grad_(True)
    return list(paths)


# ----- whole-model helpers -----
def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALayer)}


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_adapter_weight(model: nn.Module, name: str, weight: float) -> None:
    """Set adapter ``name``'s multiplier on every layer (0 gives the base model's outputs exactly)."""
    layers = [m for m in lora_layers(model).values() if name in m.adapters]
    if not layers:
        raise UserError(f"the model has no adapter named {name!r} (have {adapter_names(model)})")
    for layer in layers:
        layer.set_multiplier(name, weight)


def set_adapter_weights(model: nn.Module, name: str, weight_of: Callable[[str], float]) -> None:
    """Set adapter ``name``'s multiplier on each layer to ``weight_of(module path)`` (per-block weights)."""
    layers = {p: m for p, m in lora_layers(model).items() if name in m.adapters}
    if not layers:
        raise UserError(f"the model has no adapter named {name!r} (have {adapter_names(model)})")
    for path, layer in layers.items():
        layer.set_multiplier(name, weight_of(path))


def _put_back_base(model: nn.Module, path: str, layer: LoRALayer) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (PEFT's delete_adapter); a layer left without adapters gets
    its plain base layer back, so removing every adapter restores the base model exactly."""
    layers = {p: m for p, m in lora_layers(model).items() if name in m.adapters}
    if not layers:
        raise UserError(f"the model has no adapter named {name!r} (have {adapter_names(model)})")
    for path, layer in layers.items():
        merged = [n for n in layer.merged_adapters if n != name]
        layer.unmerge()  # W0 back exactly, then the others are merged again
        layer.remove_adapter(name)
        if merged:
            layer.merge(merged)
        if not layer.adapters:
            _put_back_base(model, path, layer)


def merge_lora(model: nn.Module, names: Sequence[str] | None = None) -> None:
    for layer in lora_layers(model).values():
        layer.merge([n for n in names if n in layer.adapters] if names is not None else None)


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextmanager
def merged_while(models: Sequence[nn.Module | None]) -> Iterator[None]:
    """Every enabled adapter of ``models`` with a weight other than 0 folded into its layer's weight for the
    duration (W0 + m ΔW: a forward then costs what the base's does), and afterwards every weight put back
    exactly as it was: the pre-merge copy is restored (``LoRALayer.unmerge``), then what was merged before
    (``fuse_lora``) is merged again by the same operations, so the same bits. Inside, outputs differ from
    unmerged ones by rounding (docs/RELIABILITY.md: W0 + m ΔW is rounded once)."""
    layers = [layer for model in models if model is not None for layer in lora_layers(model).values()
              if layer.adapters_enabled]
    before = [list(layer.merged_adapters) for layer in layers]
    try:
        for layer in layers:
            layer.merge([n for n, m in layer.multipliers.items() if m != 0])
        yield
    finally:
        for layer, fused in zip(layers, before, strict=True):
            layer.unmerge()
            if fused:
                layer.merge(fused)


@contextmanager
def row_multipliers_while(models: Sequence[nn.Module | None],
                          weight_of: Callable[[nn.Module, str, str], list[float] | None]) -> Iterator[None]:
    """Per-row multipliers for the duration: adapter ``name`` at module ``path`` of ``model`` gets the [B]
    multipliers ``weight_of(model, path, name)`` (None: its usual multiplier), so one forward serves a batch
    whose rows carry different adapters (peft's ``adapter_names=``); afterwards they are cleared."""
    layers = [layer for model in models if model is not None for layer in lora_layers(model).values()]
    try:
        for model in models:
            for path, layer in lora_layers(model).items() if model is not None else ():
                for name in layer.adapters:
                    rows = weight_of(model, path, name)
                    if rows is not None:
                        layer.row_multipliers[name] = torch.tensor(rows, dtype=torch.float32,
                                                                   device=layer.base_layer.weight.device)
        yield
    finally:
        for layer in layers:
            layer.row_multipliers.clear()


def enable_lora(model: nn.Module, enabled: bool = True) -> None:
    for layer in lora_layers(model).values():
        layer.enable_adapters() if enabled else layer.disable_adapters()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain base layers back, with every enabled adapter merged in (PEFT's merge_and_unload), so
    ``folders.model.save_model`` writes an ordinary model. Base parameters stay frozen."""
    for path, layer in lora_layers(model).items():
        if merge and layer.adapters_enabled:
            layer.merge()
        _put_back_base(model, path, layer)
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names, without adapter tensors and merged deltas."""
    layers = lora_layers(model)
    adapter_keys = {f"{path}.{layer.state_key(n, k)}" for path, layer in layers.items()
                    for n, method in layer.adapters.items() for k in method.state_dict()}
    out = {}
    for key, t in model.state_dict().items():
        if key in adapter_keys:
            continue
        path, _, leaf = key.rpartition(".base_layer.")
        if path in layers:
            if leaf == "weight" and layers[path]._unmerged_weight is not None:
                t = layers[path]._unmerged_weight
            key = f"{path}.{leaf}"
        out[key] = t
    return out


def adapter_parameter_names(model: nn.Module, name: str) -> set[str]:
    """The names (as ``model.named_parameters()`` gives them) of adapter ``name``'s tensors."""
    return {f"{path}.{layer.state_key(name, k)}" for path, layer in lora_layers(model).items()
            if name in layer.adapters for k, _ in layer.adapters[name].named_parameters()}


def lora_parameter_count(model: nn.Module, name: str | None = None) -> int:
    """Number of adapter parameters (of adapter ``name``, or of all adapters)."""
    return sum(p.numel() for layer in lora_layers(model).values() for n, method in layer.adapters.items()
               if name is None or n == name for p in method.parameters())


def lora_summary(model: nn.Module, name: str | None = None) -> dict:
    """Counts for the report: adapter parameters, base parameters and the adapters' share of the base."""
    lora = lora_parameter_count(model, name)
    base = sum(t.numel() for t in base_state_dict(model).values())
    return {"lora_params": lora, "base_params": base, "share": lora / base if base else 0.0,
            "modules": len([m for m in lora_layers(model).values() if name is None or name in m.adapters])}
