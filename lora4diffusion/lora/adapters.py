"""LoRA adapter files: save/load with a base-model fingerprint, PEFT interop, extraction and resizing.

An adapter directory holds ``adapter.safetensors``: only LoRA tensors, keyed
    <module path>.lora_down.weight   A, [r, in] (conv: [r, in, kh, kw])
    <module path>.lora_up.weight     B, [out, r] (conv: [out, r, 1, 1])
and string metadata: format, version, rank, alpha, scale_rule (standard = alpha/r, rslora = alpha/sqrt(r)),
targets (JSON list of module paths), init, dropout, base_fingerprint, plus whatever the caller adds (style,
steps, ...). The adapter's name is not in the keys: it is chosen when loading (one file can be loaded twice).

PEFT's layout is the same with other names (``base_model.model.<path>.lora_A.weight`` = our down,
``lora_B`` = our up, same conv layout, same scaling rule), so conversion is renaming plus a config file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.checkpoint import (
    FLOAT_DTYPES,
    load_tensors,
    path_kind,
    read_json,
    read_metadata,
    save_tensors,
    tensor_header,
    write_json,
)
from lora4diffusion.errors import UserError
from lora4diffusion.finite import require_finite
from lora4diffusion.lora.layers import (
    INITS,
    adaptable_modules,
    adapter_names,
    base_state_dict,
    inject_lora_at,
    lora_layers,
    lora_shapes,
    resolve_targets,
    set_adapter_weight,
)
from lora4diffusion.schema import boolean, float_text, int_text, integer, number, shown, string

log = logging.getLogger("lora4diffusion")
FORMAT = "lora4diffusion-adapter"
VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
UNKNOWN = "unknown"  # fingerprint of adapters from elsewhere (PEFT): not checked on load
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model (the UNet)
MAX_RANK = 4096  # far above any MNIST-sized layer; a bigger rank is a broken or hostile file
MAX_ALPHA = 1e6  # scale alpha/r > 1e6 turns any delta into inf/NaN outputs (alpha 1e30 is not an adapter)
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_RESERVED = ("format", "version", "rank", "alpha", "scale_rule", "targets", "init", "dropout",
             "base_fingerprint")


@dataclass
class Adapter:
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    rslora: bool = False
    init: str = "normal"
    dropout: float = 0.0
    fingerprint: str = UNKNOWN
    extra: dict[str, str] = field(default_factory=dict)  # the caller's metadata (style, steps, ...)

    @property
    def modules(self) -> list[str]:
        return [k.removesuffix(".lora_down.weight") for k in self.tensors if k.endswith(".lora_down.weight")]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"{module}.lora_down.weight"], self.tensors[f"{module}.lora_up.weight"]

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "version": str(VERSION), "rank": str(self.rank),
                "alpha": repr(float(self.alpha)), "scale_rule": "rslora" if self.rslora else "standard",
                "targets": json.dumps(self.modules), "init": self.init, "dropout": repr(float(self.dropout)),
                "base_fingerprint": self.fingerprint}
        clash = set(self.extra) & set(meta)
        if clash:
            raise ValueError(f"metadata keys {sorted(clash)} are reserved")
        return {**meta, **self.extra}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ADAPTER_FILE
        save_tensors(path, {k: v.float() for k, v in self.tensors.items()}, self.metadata())
        return path


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the UNet config (canonical JSON) and the base weights (sorted names, shapes, fp32 bytes).

    LoRA tensors and merged deltas are left out, so the value depends only on the base checkpoint.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    h.update(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else None, sort_keys=True).encode())
    for key, t in sorted(base_state_dict(model).items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"\n{key}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_from_model(model: nn.Module, name: str = "default") -> Adapter:
    layers = {p: m for p, m in lora_layers(model).items() if name in m.lora_down}
    if not layers:
        raise UserError(f"the model has no adapter named {name!r} (have {adapter_names(model)})")
    settings = {(m.rank[name], m.alpha[name], m.rslora[name], m.init[name]) for m in layers.values()}
    if len(settings) > 1:
        raise UserError(f"adapter {name!r} has different rank/alpha/init on different modules; not saveable")
    (rank, alpha, rslora, init), first = settings.pop(), next(iter(layers.values()))
    drop = first.lora_dropout[name]
    tensors = {}
    for path, m in layers.items():
        tensors[f"{path}.lora_down.weight"] = m.lora_down[name].weight.detach().float().cpu()
        tensors[f"{path}.lora_up.weight"] = m.lora_up[name].weight.detach().float().cpu()
    return Adapter(tensors, rank, alpha, rslora, init, getattr(drop, "p", 0.0), base_fingerprint(model))


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default",
                 metadata: dict | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory/adapter.safetensors``; returns the file."""
    adapter = adapter_from_model(model, name)
    adapter.extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return adapter.save(directory)


def shipped_adapters() -> dict[str, Path]:
    """The example adapters shipped inside the package (trained on the shipped base), by name."""
    from lora4diffusion.catalog import shipped

    return shipped("adapter")


def resolve_adapter(path: str | Path) -> Path:
    """A path; or, where no such path exists, the name of a shipped adapter (``bold``, ``italic``); else a
    UserError suggesting the nearest names (catalog.resolve)."""
    from lora4diffusion.catalog import resolve

    return resolve(path, "adapter")


def _adapter_file(path: str | Path) -> Path:
    path = resolve_adapter(path)
    if path_kind(path) == "dir":
        path = path / ADAPTER_FILE
    if path_kind(path) != "file":
        raise UserError(f"adapter {path}: file not found")
    return path


def _check(adapter: Adapter, where: str | Path) -> Adapter:
    """Every module needs A and B of rank ``adapter.rank`` in the Linear or Conv2d layout."""
    if not adapter.tensors:
        raise UserError(f"{where}: the adapter holds no LoRA tensors")
    for key in adapter.tensors:
        if not key.endswith((".lora_down.weight", ".lora_up.weight")):
            raise UserError(f"{where}: unexpected tensor {key!r} (an adapter holds only LoRA tensors)")
    for m in adapter.modules:
        if f"{m}.lora_up.weight" not in adapter.tensors:
            raise UserError(f"{where}: module {m} has lora_down but no lora_up")
        a, b = adapter.pair(m)
        ok = a.dim() in (2, 4) and b.dim() == a.dim() and a.shape[0] == b.shape[1] == adapter.rank
        if not ok or (a.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
            raise UserError(f"{where}: module {m}: tensors {tuple(a.shape)}/{tuple(b.shape)} are not a rank-"
                            f"{adapter.rank} LoRA pair")
    if len(adapter.modules) * 2 != len(adapter.tensors):
        raise UserError(f"{where}: some lora_up tensors have no lora_down")
    return adapter


def read_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter file (or the directory holding ``adapter.safetensors``)."""
    path = _adapter_file(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a lora4diffusion adapter (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise UserError(f"{path}: unsupported adapter version {meta.get('version')!r}")
    missing = [k for k in _RESERVED if k not in meta]
    if missing:
        raise UserError(f"{path}: malformed adapter metadata (missing {', '.join(missing)})")
    try:
        rank = int_text(meta["rank"], "rank", 1, MAX_RANK)
        alpha = float_text(meta["alpha"], "alpha", 0.0, MAX_ALPHA, lo_open=True)
        rule = string(meta["scale_rule"], "scale_rule", ("standard", "rslora"))
        dropout = float_text(meta["dropout"], "dropout", 0.0, 1.0)
        if dropout >= 1.0:
            raise UserError(f"dropout must be < 1, got {dropout:g}")
        fingerprint = meta["base_fingerprint"]
        if fingerprint != UNKNOWN and not _FINGERPRINT.fullmatch(fingerprint):
            raise UserError(f"base_fingerprint must be 64 hex digits or {UNKNOWN!r}, got {shown(fingerprint)}"
                            )
        try:
            targets = json.loads(meta["targets"])
        except (json.JSONDecodeError, RecursionError):
            targets = None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise UserError(f"targets must be a JSON list of module names, got {shown(meta['targets'])}")
    except UserError as e:
        raise UserError(f"{path}: malformed adapter metadata ({e})") from None
    header = tensor_header(path)
    for key, (_shape, dtype) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}: tensor {key} has dtype {dtype}; LoRA weights are floats")
    adapter = Adapter(load_tensors(path), rank, alpha, rule == "rslora", meta["init"], dropout, fingerprint,
                      {k: v for k, v in meta.items() if k not in _RESERVED})
    _check(adapter, path)
    if sorted(targets) != sorted(adapter.modules):
        raise UserError(f"{path}: the metadata's targets ({len(targets)} modules) do not match the tensors"
                        f" ({len(adapter.modules)} modules)")
    return adapter


def _default_name(model: nn.Module, path: Path) -> str:
    stem = path.parent.name if path.name == ADAPTER_FILE else (path.name if path.is_dir() else path.stem)
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "adapter"
    taken, name, i = set(adapter_names(model)), base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _check_fits(model: nn.Module, adapter: Adapter, where: str | Path) -> None:
    """Every adapter module exists in ``model`` (as an adaptable layer) with the adapter's shapes."""
    candidates = adaptable_modules(model)
    for m in adapter.modules:
        if m not in candidates:
            raise UserError(f"{where}: adapter module {shown(m, 80)} does not exist in this model")
        a, b = adapter.pair(m)
        want = lora_shapes(candidates[m], adapter.rank)
        if (tuple(a.shape), tuple(b.shape)) != want:
            raise UserError(f"{where}: module {m}: adapter shapes {tuple(a.shape)}/{tuple(b.shape)},"
                            f" this model needs {want[0]}/{want[1]}")


def load_adapter(model: nn.Module, path: str | Path | Adapter, name: str | None = None, weight: float = 1.0,
                 force: bool = False, reader: Callable[[Path], Adapter] | None = None) -> str:
    """Inject an adapter into ``model`` and load its tensors; returns the adapter name used.

    ``path``: our adapter file or its directory, a PEFT adapter directory, or an Adapter; ``reader`` (e.g.
    ``lora4diffusion.formats.read_any``, which also reads diffusers and kohya files) replaces the built-in
    reading of a path. The name defaults to the directory (file) name, made unique. Refuses an adapter
    trained on a different base (fingerprint mismatch) unless ``force``, and checks every module's shapes
    before touching the model.
    """
    if not isinstance(path, Adapter):
        path = resolve_adapter(path)
    if isinstance(path, Adapter):
        adapter = path
    elif reader is not None:
        adapter = reader(Path(path))
    elif (Path(path) / PEFT_CONFIG).is_file() and not (Path(path) / ADAPTER_FILE).exists():
        adapter = import_peft(path)  # a PEFT adapter directory: no fingerprint to check
    else:
        adapter = read_adapter(path)
    where = "adapter" if isinstance(path, Adapter) else str(path)
    if name is None:
        name = "default" if isinstance(path, Adapter) else _default_name(model, Path(path))
    if adapter.fingerprint != UNKNOWN:
        mine = base_fingerprint(model)
        if adapter.fingerprint != mine and not force:
            raise UserError(f"{where}: adapter was trained on a different base model (fingerprint "
                            f"{adapter.fingerprint[:12]}, this base {mine[:12]}); use --force to load anyway")
        if adapter.fingerprint != mine:
            log.warning("%s: loading an adapter trained on a different base model (--force)", where)
    _check_fits(model, adapter, where)
    init = adapter.init if adapter.init in INITS else "normal"  # only a record; the weights are loaded below
    inject_lora_at(model, adapter.modules, adapter.rank, adapter.alpha, name, init, adapter.rslora,
                   adapter.dropout)
    layers = lora_layers(model)
    with torch.no_grad():
        for m in adapter.modules:
            a, b = adapter.pair(m)
            layers[m].lora_down[name].weight.copy_(a)
            layers[m].lora_up[name].weight.copy_(b)
    set_adapter_weight(model, name, weight)
    return name


# ----- PEFT interop -----
def export_peft(source: nn.Module | Adapter | str | Path, out_dir: str | Path, name: str = "default") -> Path:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained(UNet(...), out_dir)`` loads onto the same base."""
    if isinstance(source, nn.Module):
        adapter = adapter_from_model(source, name)
    else:
        adapter = source if isinstance(source, Adapter) else read_adapter(source)
    out_dir = Path(out_dir)
    require_finite(adapter.tensors, "export-peft")
    if not math.isfinite(adapter.alpha):
        raise UserError(f"export-peft: the adapter's alpha is {adapter.alpha}; nothing was written")
    tensors = {}
    for m in adapter.modules:
        a, b = adapter.pair(m)
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = a, b
    save_tensors(out_dir / PEFT_WEIGHTS, tensors, {"format": "pt"})
    write_json(out_dir / PEFT_CONFIG, {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "use_rslora": adapter.rslora,
        "target_modules": adapter.modules,  # exact paths: PEFT matches `key == target` first
        "lora_dropout": adapter.dropout, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": "gaussian" if adapter.init == "normal" else True,  # seed's N(0, 1/r) = gaussian
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    })
    return out_dir


def import_peft(peft_dir: str | Path, base_model: nn.Module | None = None) -> Adapter:
    """Read a PEFT LoRA adapter directory as an Adapter (``.save(dir)`` writes our format). PEFT records no
    base fingerprint: pass ``base_model`` to record its fingerprint, else the adapter loads unchecked."""
    peft_dir = Path(peft_dir)
    config = read_json(peft_dir / PEFT_CONFIG)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{peft_dir}: not a PEFT LoRA adapter (peft_type {shown(config.get('peft_type'))})")
    options = ("rank_pattern", "alpha_pattern", "use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save",
               "target_parameters", "layer_replication", "trainable_token_indices")
    unsupported = [k for k in options if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise UserError(f"{peft_dir}: PEFT options {unsupported} are not supported (plain LoRA only)")
    where = peft_dir / PEFT_CONFIG
    try:  # PEFT's own LoraConfig accepts these types; anything else is a broken or foreign file
        rank = integer(config.get("r"), "r", 1, MAX_RANK)
        alpha = number(config.get("lora_alpha", 8), "lora_alpha", 0.0, MAX_ALPHA, lo_open=True)
        rslora = boolean(config.get("use_rslora", False), "use_rslora")
        dropout = number(config.get("lora_dropout", 0.0), "lora_dropout", 0.0, 1.0)
        if dropout >= 1.0:
            raise UserError(f"lora_dropout must be < 1, got {dropout:g}")
        init_weights = config.get("init_lora_weights", True)
        if init_weights not in (True, False, "gaussian") or not isinstance(init_weights, (bool, str)):
            # pissa, olora, loftq, eva, corda, ... also rewrite the BASE weights: this adapter alone is wrong
            raise UserError(f"init_lora_weights {shown(init_weights)} is not supported (true, false or"
                            " 'gaussian'; pissa/olora/loftq/eva/corda change the base weights too)")
        targets = config.get("target_modules")
        if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)
        ):
            raise UserError(f"target_modules must be a string or a list of strings, got {shown(targets)}")
    except UserError as e:
        raise UserError(f"{where}: malformed PEFT config ({e})") from None
    weights = peft_dir / PEFT_WEIGHTS
    if not weights.is_file() and (peft_dir / "adapter_model.bin").is_file():
        raise UserError(f"{peft_dir}: only adapter_model.safetensors is read (pickled .bin is not loaded)")
    key_rx = re.compile(rf"^{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    for key, (_shape, dtype) in tensor_header(weights).items():
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{weights}: tensor {key} has dtype {dtype}; LoRA weights are floats")
    tensors = {}
    for key, t in load_tensors(weights).items():
        match = key_rx.match(key)
        if not match:
            raise UserError(f"{weights}: unexpected tensor {shown(key, 80)} (plain LoRA A/B weights only)")
        tensors[f"{match[1]}.lora_{'down' if match[2] == 'A' else 'up'}.weight"] = t.float()
    init = {"gaussian": "normal", True: "kaiming"}.get(init_weights, "peft")
    fingerprint = base_fingerprint(base_model) if base_model is not None else UNKNOWN
    adapter = _check(Adapter(tensors, rank, alpha, rslora, init, dropout, fingerprint, {"source": "peft"}),
                     weights)
    if base_model is not None:  # every module must exist in the base with the right shapes
        _check_fits(base_model, adapter, weights)
    return adapter


def load_peft(model: nn.Module, peft_dir: str | Path, name: str = "default", weight: float = 1.0) -> str:
    return load_adapter(model, import_peft(peft_dir), name, weight)


# ----- extraction and resizing: truncated SVD (Eckart-Young: the best rank-k approximation) -----
def _low_rank(delta: torch.Tensor, rank: int, scale: float,
              ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """delta [out, in] ~= scale * B A with B [out, rank], A [rank, in]; returns (B, A, tail energy, energy).

    sqrt(S) goes to both sides, so A and B have similar magnitudes (better conditioned for further training).
    """
    delta = delta.double()
    if not bool(torch.isfinite(delta).all()):  # SVD of NaN/inf raises deep in LAPACK (or returns NaN)
        raise UserError("the weight difference holds NaN or infinite values; cannot factor it")
    try:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    except torch.linalg.LinAlgError as e:  # did not converge: pathological values
        raise UserError(f"SVD did not converge ({str(e).splitlines()[0][:100]})") from None
    root = (s[:rank] / scale).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], float((s[rank:] ** 2).sum()), float((s**2).sum())


def _named(module: str, fn, *args):
    try:
        return fn(*args)
    except UserError as e:
        raise UserError(f"module {module}: {e}") from None


def _errors(parts: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Relative Frobenius errors ||delta - approx|| / ||delta|| per module and "overall" (0 if delta = 0)."""
    def rel(tail: float, total: float) -> float:
        return math.sqrt(tail / total) if total > 0 else 0.0

    overall = rel(sum(t for t, _ in parts.values()), sum(e for _, e in parts.values()))
    return {"overall": overall, **{m: rel(*te) for m, te in parts.items()}}


def extract_lora(base_model: nn.Module, tuned_model: nn.Module, rank: int, targets,
                 ) -> tuple[Adapter, dict[str, float]]:
    """The best rank-``rank`` LoRA of the weight deltas tuned - base in the ``targets`` modules.

    Returns the adapter (alpha = rank, so scale 1 and B A = the approximated delta) and the relative
    errors (see ``_errors``). Changed tensors outside the targets cannot be represented: their whole delta
    counts in "overall" (it is error the adapter leaves), "uncaptured" says how many there are, and a warning
    names one.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank}")
    paths = resolve_targets(base_model, targets)
    modules = adaptable_modules(base_model)
    base, tuned = base_state_dict(base_model), base_state_dict(tuned_model)
    if set(base) != set(tuned) or any(base[k].shape != tuned[k].shape for k in base):
        raise UserError("the tuned model does not have the base model's architecture")
    tensors, parts = {}, {}
    for path in paths:
        w0 = base[f"{path}.weight"]
        if rank > min(w0.shape[0], w0[0].numel()):
            raise UserError(f"rank {rank} exceeds the rank of module {path} (weight {tuple(w0.shape)})")
        delta = (tuned[f"{path}.weight"].double() - w0.double()).flatten(1)
        b, a, tail, total = _named(path, _low_rank, delta, rank, 1.0)
        shape_a, shape_b = lora_shapes(modules[path], rank)
        tensors[f"{path}.lora_down.weight"] = a.float().reshape(shape_a)
        tensors[f"{path}.lora_up.weight"] = b.float().reshape(shape_b)
        parts[path] = (tail, total)
    covered = {f"{p}.weight" for p in paths}
    ignored = [k for k in base if k not in covered and not torch.equal(base[k], tuned[k])]
    if ignored:
        log.warning("extract: %d changed tensors outside the targets are not captured (e.g. %s)",
                    len(ignored), ignored[0])
    missed = [float((tuned[k].double() - base[k].double()).pow(2).sum()) for k in ignored]
    adapter = Adapter(tensors, rank, float(rank), init="extracted", fingerprint=base_fingerprint(base_model))
    errors = _errors(parts)
    tail = sum(t for t, _ in parts.values()) + sum(missed)
    total = sum(e for _, e in parts.values()) + sum(missed)
    errors["overall"] = math.sqrt(tail / total) if total > 0 else 0.0
    errors["uncaptured"] = float(len(ignored))
    return adapter, errors


def resize_adapter(source: Adapter | str | Path, new_rank: int) -> tuple[Adapter, dict[str, float]]:
    """Reduce an adapter to ``new_rank`` by truncated SVD of each module's scale * B A.

    alpha and the scale rule are kept (the factors absorb the new scale); returns the adapter and the relative
    Frobenius errors per module and "overall" (= the discarded singular values' energy share, Eckart-Young).
    """
    adapter = source if isinstance(source, Adapter) else read_adapter(source)
    if not isinstance(new_rank, int) or not 1 <= new_rank <= adapter.rank:
        raise UserError(f"new rank must be between 1 and the adapter's rank {adapter.rank}, got {new_rank}")
    new = Adapter({}, new_rank, adapter.alpha, adapter.rslora, adapter.init, adapter.dropout,
                  adapter.fingerprint, {**adapter.extra, "resized_from_rank": str(adapter.rank)})
    parts = {}
    for m in adapter.modules:
        a, b = adapter.pair(m)
        delta = adapter.scale * (b.double().flatten(1) @ a.double().flatten(1))
        b2, a2, tail, total = _named(m, _low_rank, delta, new_rank, new.scale)
        new.tensors[f"{m}.lora_down.weight"] = a2.float().reshape(new_rank, *a.shape[1:])
        new.tensors[f"{m}.lora_up.weight"] = b2.float().reshape(b.shape[0], new_rank, *b.shape[2:])
        parts[m] = (tail, total)
    return new, _errors(parts)
