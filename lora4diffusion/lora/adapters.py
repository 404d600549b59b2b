"""Adapter files: save/load with a base-model fingerprint, and PEFT interop.

An adapter directory holds ``adapter.safetensors``: only the adapter's tensors, keyed ``<module path>.<key>``
with the method's keys (layers.py); for LoRA
    <module path>.lora_down.weight   A, [r, in] (conv: [r, in, kh, kw])
    <module path>.lora_up.weight     B, [out, r] (conv: [out, r, 1, 1])
and string metadata: format, version, rank, alpha, scale_rule (standard = alpha/r, rslora = alpha/sqrt(r)),
targets (JSON list of module paths), init, dropout, base_fingerprint, ``method`` for a method other than LoRA
(so LoRA files are as they always were), plus whatever the caller adds (style, steps, ...). The adapter's name
is not in the keys: it is chosen when loading (one file can be loaded twice). Extraction and resizing by SVD
are in ``extract.py``.

A pivotal-tuning adapter (training/lora.py ``pivotal_token``) also carries its placeholder token's vectors,
in the layout AUTOMATIC1111 reads from LoRA files (bundled embeddings, extensions-builtin/Lora/networks.py):
    bundle_emb.<token>.string_to_param.*     [n, D]: the token's vectors (lora/embeddings.py)
``Adapter.embeddings`` holds them (token -> vectors); loading the adapter puts the token in place.

PEFT's layout is the same with other names (``base_model.model.<path>.lora_A.weight`` = our down,
``lora_B`` = our up, same conv layout, same scaling rule), so conversion is renaming plus a config file;
DoRA, LoHa and LoKr have their PEFT names and config fields too (peft_layout.py).
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

from lora4diffusion.catalog import resolve, shipped
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
    METHODS,
    LoRALayer,
    adapter_names,
    base_state_dict,
    inject_lora_at,
    lora_layers,
    set_adapter_weight,
)
from lora4diffusion.lora.lora import INITS
from lora4diffusion.lora.method import MAX_ALPHA, MAX_RANK
from lora4diffusion.lora.peft_layout import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    config_settings,
    lokr_settings,
    our_key,
    our_tensor,
    peft_config,
    peft_tensors,
)
from lora4diffusion.lora.targets import adaptable_modules
from lora4diffusion.schema import boolean, float_text, int_text, integer, number, shown, string

log = logging.getLogger("lora4diffusion")
FORMAT = "lora4diffusion-adapter"
VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
UNKNOWN = "unknown"  # fingerprint of adapters from elsewhere (PEFT): not checked on load
BLOB_KEY = "lora4diffusion"  # our settings, as one metadata entry of another format's file
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_RESERVED = ("format", "version", "rank", "alpha", "scale_rule", "targets", "init", "dropout",
             "base_fingerprint")  # required
METHOD_KEY = "method"  # written for methods other than LoRA only
OPTIONS_KEY = "options"  # the method's own options (JSON), written only when some differ from the defaults
BUNDLE = "bundle_emb."  # AUTOMATIC1111's prefix of embeddings bundled in a LoRA file
BUNDLE_PARAM = ".string_to_param.*"


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
    method: str = "lora"  # the AdapterMethod's kind (layers.METHODS)
    options: dict = field(default_factory=dict)  # the method's own options (LoKr: factor, ...)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # bundled tokens -> [n, D] (pivotal)

    @property
    def modules(self) -> list[str]:
        """The adapted module paths, in file order (a module is named by any of its method's keys)."""
        ends = tuple("." + k for k in METHODS[self.method].keys)
        found: dict[str, None] = {}
        for key in self.tensors:
            end = next((e for e in ends if key.endswith(e)), None)
            if end is not None:
                found[key.removesuffix(end)] = None
        return list(found)

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """One module's tensors by the method's keys (LoRA: lora_down.weight, lora_up.weight)."""
        keys = METHODS[self.method].keys
        return {k: self.tensors[f"{module}.{k}"] for k in keys if f"{module}.{k}" in self.tensors}

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA's (A, B) of ``module``."""
        return self.tensors[f"{module}.lora_down.weight"], self.tensors[f"{module}.lora_up.weight"]

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "version": str(VERSION), "rank": str(self.rank),
                "alpha": repr(float(self.alpha)), "scale_rule": "rslora" if self.rslora else "standard",
                "targets": json.dumps(self.modules), "init": self.init, "dropout": repr(float(self.dropout)),
                "base_fingerprint": self.fingerprint}
        if self.method != "lora":
            meta[METHOD_KEY] = self.method
        if self.options:
            meta[OPTIONS_KEY] = json.dumps(self.options, sort_keys=True)
        clash = set(self.extra) & set(meta)
        if clash:
            raise ValueError(f"metadata keys {sorted(clash)} are reserved")
        return {**meta, **self.extra}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ADAPTER_FILE
        tensors = {**{k: v.float() for k, v in self.tensors.items()}, **bundle_tensors(self.embeddings)}
        save_tensors(path, tensors, self.metadata())
        return path


def bundle_tensors(embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tokens' vectors under A1111's bundled-embedding keys: ``bundle_emb.<token>.string_to_param.*``."""
    return {f"{BUNDLE}{token}{BUNDLE_PARAM}": v.detach().float().cpu().contiguous()
            for token, v in embeddings.items()}


def bundled_tokens(header: dict[str, tuple]) -> dict[str, int]:
    """Token -> number of vectors of the embeddings an adapter file bundles, from its header alone
    (``checkpoint.tensor_header``: key -> (shape, dtype)), named as ``split_bundled`` names them."""
    out = {}
    for key, (shape, _dtype) in header.items():
        name = key[len(BUNDLE):].partition(".")[0] if key.startswith(BUNDLE) else ""
        if name:
            token = name if name.startswith("<") else f"<{name.lower()}>"
            out[token] = int(shape[0]) if len(shape) == 2 else 1
    return out


def split_bundled(tensors: dict[str, torch.Tensor], where: object) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the LoRA tensors, the bundled embeddings by token) of a file's tensors. A1111 names a bundled
    embedding by its file name ("bold_ti"): a name that is not a placeholder becomes ``<name>``."""
    rest, embeddings = {}, {}
    for key, t in tensors.items():
        if not key.startswith(BUNDLE):
            rest[key] = t
            continue
        name, _, vec = key[len(BUNDLE):].partition(".")
        if vec not in ("string_to_param.*", "emb_params") or not name:
            raise UserError(f"{where}: bundled embedding key {shown(key, 80)} is not"
                            f" {BUNDLE}NAME{BUNDLE_PARAM} (A1111's layout)")
        token = name if name.startswith("<") else f"<{name.lower()}>"
        if token in embeddings:
            raise UserError(f"{where}: embedding {name} is bundled twice")
        embeddings[token] = t.unsqueeze(0) if t.dim() == 1 else t
    return rest, embeddings


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the UNet config (canonical JSON) and the base weights (sorted names, shapes, fp32 bytes).

    Adapter tensors and merged deltas are left out, so the value depends only on the base checkpoint.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    h.update(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else None, sort_keys=True).encode())
    for key, t in sorted(base_state_dict(model).items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"\n{key}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_settings(layers: list[LoRALayer], name: str) -> dict:
    """Adapter ``name``'s method and settings (``metadata()``) on ``layers``, as Adapter fields; a file
    records one set, so a method, rank, alpha, init or option differing between layers is refused (dropout:
    the first layer's)."""
    found = [{"method": layer.adapters[name].kind, **layer.adapters[name].metadata()} for layer in layers]
    if len({(s["method"], s["rank"], s["alpha"], s["rslora"], s["init"], json.dumps(s.get("options")))
            for s in found}) > 1:
        raise UserError(f"adapter {name!r} has different rank/alpha/init on different modules; not saveable")
    return found[0]


def adapter_tensors(model: nn.Module, name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors in ``model``, keyed as in a file: ``<prefix><path>.<key>`` (fp32, CPU)."""
    return {f"{prefix}{path}.{k}": t.detach().float().cpu() for path, layer in lora_layers(model).items()
            if name in layer.adapters for k, t in layer.adapters[name].state_dict().items()}


def adapter_from_model(model: nn.Module, name: str = "default") -> Adapter:
    layers = [m for m in lora_layers(model).values() if name in m.adapters]
    if not layers:
        raise UserError(f"the model has no adapter named {name!r} (have {adapter_names(model)})")
    settings = adapter_settings(layers, name)
    return Adapter(adapter_tensors(model, name), fingerprint=base_fingerprint(model), **settings)


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default",
                 metadata: dict | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory/adapter.safetensors``; returns the file."""
    adapter = adapter_from_model(model, name)
    adapter.extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return adapter.save(directory)


def shipped_adapters() -> dict[str, Path]:
    """The example adapters shipped inside the package (trained on the shipped base), by name."""
    return shipped("adapter")


def resolve_adapter(path: str | Path) -> Path:
    """A path; or, where no such path exists, the name of a shipped adapter (``bold``, ``italic``); else a
    UserError suggesting the nearest names (catalog.resolve)."""
    return resolve(path, "adapter")


def _adapter_file(path: str | Path) -> Path:
    path = resolve_adapter(path)
    if path_kind(path) == "dir":
        path = path / ADAPTER_FILE
    if path_kind(path) != "file":
        raise UserError(f"adapter {path}: file not found")
    return path


def _structure(adapter: Adapter, where: str | Path) -> None:
    """Every module has each of the method's tensors (LoRA: A and B), passing the method's own checks (LoRA:
    rank ``adapter.rank`` in the Linear or Conv2d layout)."""
    method = METHODS[adapter.method]
    if not adapter.tensors:
        raise UserError(f"{where}: the adapter holds no {method.__name__} tensors")
    for key in adapter.tensors:
        if not key.endswith(tuple(f".{k}" for k in method.keys)):
            raise UserError(f"{where}: unexpected tensor {shown(key, 80)} (an adapter holds only"
                            f" {method.__name__} tensors)")
    for m in adapter.modules:
        problem = method.problem(adapter.module_tensors(m), adapter.rank, **adapter.options)
        if problem:
            raise UserError(f"{where}: module {m}: {problem}")


def check_settings(rank: object, alpha: object, rslora: object = False, dropout: object = 0.0,
                   init: object = "normal", fingerprint: object = UNKNOWN, method: object = "lora",
                   options: object = None) -> None:
    """The one check of an adapter's settings, whichever file (or Python caller) they come from: rank an
    integer in 1..MAX_RANK, alpha a finite number in (0, MAX_ALPHA], rslora a bool, dropout in [0, 1), init
    a string, the fingerprint 64 hex digits or 'unknown', a known method and options it has (of the right
    types). A UserError naming the field."""
    string(method, METHOD_KEY, tuple(METHODS))
    if not isinstance(options if options is not None else {}, dict):
        raise UserError(f"options must be a JSON object, got {shown(options)}")
    METHODS[method].check_options(options or {})
    integer(rank, "rank", 1, MAX_RANK)
    number(alpha, "alpha", 0.0, MAX_ALPHA, lo_open=True)
    boolean(rslora, "rslora")
    if number(dropout, "dropout", 0.0, 1.0) >= 1.0:
        raise UserError(f"dropout must be < 1, got {dropout:g}")
    if not isinstance(init, str) or len(init) > 64:
        raise UserError(f"init must be a short string, got {shown(init)}")
    if fingerprint != UNKNOWN and not (isinstance(fingerprint, str) and _FINGERPRINT.fullmatch(fingerprint)):
        raise UserError(f"base_fingerprint must be 64 hex digits or {UNKNOWN!r}, got {shown(fingerprint)}")


def check_adapter(adapter: Adapter, where: str | Path) -> Adapter:
    """What every reader (ours, PEFT, diffusers, kohya) hands back passes here: the settings
    (``check_settings``), float tensors (an int64 or bool tensor is refused, not cast), the caller's
    metadata text -> text, and the structure (every module's tensors, the method's own checks)."""
    try:
        check_settings(adapter.rank, adapter.alpha, adapter.rslora, adapter.dropout, adapter.init,
                       adapter.fingerprint, adapter.method, adapter.options)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    for key, t in adapter.tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise UserError(f"{where}: tensor {shown(key, 80)} has dtype {what}; LoRA weights are floats")
    for key, value in adapter.extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UserError(f"{where}: metadata {shown(key)} must be text, got {shown(value)}")
    _structure(adapter, where)
    return adapter


def require_float_tensors(path: Path, keep: Callable[[str], bool] = lambda key: True) -> None:
    """Every tensor of ``path`` that ``keep`` selects is a float tensor, from the header alone (before any
    tensor is read): LoRA weights are floats, an int64 or bool tensor is refused rather than cast."""
    for key, (_shape, dtype) in tensor_header(path).items():
        if keep(key) and dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}: tensor {shown(key, 80)} has dtype {dtype}; LoRA weights are floats")


def parse_metadata(meta: dict[str, str]) -> dict:
    """Our adapter settings from their text form (``Adapter.metadata()``: an adapter.safetensors header, or
    the ``lora4diffusion`` entry other formats carry): the fields of ``Adapter`` plus ``targets``. A missing
    or malformed value is a UserError naming the field (the caller adds the file)."""
    if meta.get("format") != FORMAT:
        raise UserError(f"format is {shown(meta.get('format'))}, not {FORMAT!r}")
    if meta.get("version") != str(VERSION):
        raise UserError(f"unsupported adapter version {shown(meta.get('version'))} (this release reads"
                        f" {VERSION})")
    missing = [k for k in _RESERVED if k not in meta]
    if missing:
        raise UserError(f"missing {', '.join(missing)}")
    method = string(meta.get(METHOD_KEY, "lora"), METHOD_KEY, tuple(METHODS))
    rank = int_text(meta["rank"], "rank", 1, MAX_RANK)
    alpha = float_text(meta["alpha"], "alpha", 0.0, MAX_ALPHA, lo_open=True)
    rule = string(meta["scale_rule"], "scale_rule", ("standard", "rslora"))
    dropout = float_text(meta["dropout"], "dropout", 0.0, 1.0)
    init, fingerprint = meta["init"], meta["base_fingerprint"]
    try:
        options = json.loads(meta.get(OPTIONS_KEY, "{}"))
    except (ValueError, RecursionError):
        raise UserError(f"options must be a JSON object, got {shown(meta[OPTIONS_KEY])}") from None
    check_settings(rank, alpha, rule == "rslora", dropout, init, fingerprint, method, options)
    try:
        targets = json.loads(meta["targets"]) if isinstance(meta["targets"], str) else None
    except (ValueError, RecursionError):  # not JSON, too deep, or an integer of more than 4300 digits
        targets = None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UserError(f"targets must be a JSON list of module names, got {shown(meta['targets'])}")
    return {"rank": rank, "alpha": alpha, "rslora": rule == "rslora", "init": init, "dropout": dropout,
            "fingerprint": fingerprint, "method": method, "options": options, "targets": targets}


def read_adapter_metadata(path: str | Path) -> tuple[Path, dict, dict[str, str]]:
    """(the file, its settings as ``parse_metadata`` gives them, the raw metadata) of our adapter file or
    folder, from the header alone: every check ``read_adapter`` makes before reading a tensor."""
    path = _adapter_file(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        found = f"format {shown(meta['format'])}" if "format" in meta else "no 'format' entry in its metadata"
        raise UserError(f"{path}: not a lora4diffusion adapter ({found}); diffusers, kohya and PEFT files are"
                        " read where an adapter is expected (sample --lora, info, export-lora, resize)")
    try:
        settings = parse_metadata(meta)
    except UserError as e:
        raise UserError(f"{path}: malformed adapter metadata ({e})") from None
    require_float_tensors(path)
    return path, settings, meta


def read_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter file (or the directory holding ``adapter.safetensors``)."""
    path, settings, meta = read_adapter_metadata(path)
    targets = settings.pop("targets")
    extra = {k: v for k, v in meta.items() if k not in (*_RESERVED, METHOD_KEY, OPTIONS_KEY)}
    tensors, embeddings = split_bundled(load_tensors(path), path)
    adapter = Adapter(tensors, extra=extra, embeddings=embeddings, **settings)
    check_adapter(adapter, path)
    if sorted(targets) != sorted(adapter.modules):
        raise UserError(f"{path}: the metadata's targets ({len(targets)} modules) do not match the tensors"
                        f" ({len(adapter.modules)} modules)")
    return adapter


def settings_blob(adapter: Adapter) -> str:
    """Our settings as one JSON text (``Adapter.metadata()``), the ``lora4diffusion`` entry other formats'
    files carry so that ours -> X -> ours is exact."""
    return json.dumps(adapter.metadata(), sort_keys=True)


def adapter_from_blob(tensors: dict[str, torch.Tensor], text: str, where: object) -> Adapter:
    """An Adapter from our tensor names and a ``settings_blob`` text: the same settings, parsed and checked
    by the same function as an adapter.safetensors header (``parse_metadata``)."""
    try:
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError):
            raise UserError(f"not JSON ({shown(text)})") from None
        if not isinstance(meta, dict):
            raise UserError(f"expected a JSON object, got {shown(meta)}")
        odd = next((k for k, v in meta.items() if not isinstance(v, str)), None)
        if odd is not None:  # Adapter.metadata() is text -> text, as safetensors metadata
            raise UserError(f"{shown(odd)} must be text, got {shown(meta[odd])}")
        settings = parse_metadata(meta)
    except UserError as e:
        raise UserError(f"{where}: malformed '{BLOB_KEY}' metadata ({e})") from None
    order = settings.pop("targets")
    extra = {k: v for k, v in meta.items() if k not in (*_RESERVED, METHOD_KEY, OPTIONS_KEY)}
    adapter = Adapter(tensors, extra=extra, **settings)
    if set(order) == set(adapter.modules):  # the file's tensor order is sorted: restore the model's
        adapter.tensors = {f"{m}.{k}": t for m in order for k, t in adapter.module_tensors(m).items()}
    return check_adapter(adapter, where)


def default_name(model: nn.Module, path: Path) -> str:
    """An adapter name from its directory (or file) name, unique in ``model``: bold, bold_2, ..."""
    stem = path.parent.name if path.name == ADAPTER_FILE else (path.name if path.is_dir() else path.stem)
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "adapter"
    taken, name, i = set(adapter_names(model)), base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def check_fits(model: nn.Module, adapter: Adapter, where: str | Path) -> None:
    """Every adapter module exists in ``model`` (as an adaptable layer) with the adapter's shapes."""
    candidates = adaptable_modules(model)
    method = METHODS[adapter.method]
    for m in adapter.modules:
        if m not in candidates:
            raise UserError(f"{where}: adapter module {shown(m, 80)} does not exist in this model")
        have = {k: tuple(t.shape) for k, t in adapter.module_tensors(m).items()}
        want = method.shapes(candidates[m], adapter.rank, **adapter.options)
        if have != want:
            raise UserError(f"{where}: module {m}: adapter shapes {'/'.join(map(str, have.values()))},"
                            f" this model needs {'/'.join(str(s) for s in want.values())}")


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
    check_adapter(adapter, where)  # whichever reader (or Python caller) made it: the same checks
    if name is None:
        name = "default" if isinstance(path, Adapter) else default_name(model, Path(path))
    if adapter.fingerprint != UNKNOWN:
        mine = base_fingerprint(model)
        if adapter.fingerprint != mine and not force:
            raise UserError(f"{where}: adapter was trained on a different base model (fingerprint "
                            f"{adapter.fingerprint[:12]}, this base {mine[:12]}); use --force to load anyway")
        if adapter.fingerprint != mine:
            log.warning("%s: loading an adapter trained on a different base model (--force)", where)
    check_fits(model, adapter, where)
    init = adapter.init if adapter.init in INITS else "normal"  # only a record; the weights are loaded below
    inject_lora_at(model, adapter.modules, adapter.rank, adapter.alpha, name, init, adapter.rslora,
                   adapter.dropout, METHODS[adapter.method], adapter.options)
    layers = lora_layers(model)
    with torch.no_grad():
        for m in adapter.modules:  # copy_ into the parameters: device and dtype stay the model's
            layers[m].adapters[name].load_state_dict(adapter.module_tensors(m))
    set_adapter_weight(model, name, weight)
    return name


# ----- PEFT interop (each method's names and config fields: peft_layout.py) -----
def export_peft(source: nn.Module | Adapter | str | Path, out_dir: str | Path, name: str = "default") -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained(UNet(...), out_dir)`` loads onto the same base: a LoraConfig for LoRA and
    DoRA, a LoHaConfig, a LoKrConfig. Our settings ride along as the weights' ``lora4diffusion`` metadata
    entry (PEFT ignores it) so that ours -> PEFT -> ours is exact. What PEFT cannot hold is refused before
    anything is written."""
    if isinstance(source, nn.Module):
        adapter = adapter_from_model(source, name)
    else:
        adapter = source if isinstance(source, Adapter) else read_adapter(source)
    out_dir = Path(out_dir)
    require_finite(adapter.tensors, "export-peft")
    if not math.isfinite(adapter.alpha):
        raise UserError(f"export-peft: the adapter's alpha is {adapter.alpha}; nothing was written")
    try:
        config = peft_config(adapter)
    except UserError as e:
        raise UserError(f"export-peft: {e}; nothing was written") from None
    meta = {"format": "pt", BLOB_KEY: settings_blob(adapter)}
    save_tensors(out_dir / PEFT_WEIGHTS, peft_tensors(adapter), meta)
    write_json(out_dir / PEFT_CONFIG, config)
    return out_dir


def import_peft(peft_dir: str | Path, base_model: nn.Module | None = None) -> Adapter:
    """Read a PEFT adapter directory (LoRA, DoRA, LoHa or LoKr) as an Adapter (``.save(dir)`` writes our
    format). adapter_config.json decides what the adapter is; where the weights also carry our settings
    entry (written by ``export_peft``) and it says the same, it restores what PEFT does not record (rsLoRA,
    init, the fingerprint, the caller's metadata). ``base_model``: check every module fits it and record its
    fingerprint where the file has none (one it has must be this base's)."""
    peft_dir = Path(peft_dir)
    where = peft_dir / PEFT_CONFIG
    config = read_json(where)
    try:
        settings = config_settings(config)
    except UserError as e:
        raise UserError(f"{where}: malformed PEFT config ({e})") from None
    weights = peft_dir / PEFT_WEIGHTS
    if not weights.is_file() and (peft_dir / "adapter_model.bin").is_file():
        raise UserError(f"{peft_dir}: only adapter_model.safetensors is read (pickled .bin is not loaded)")
    require_float_tensors(weights)
    tensors, modules = {}, {}
    for key, t in load_tensors(weights).items():
        try:
            module, ours = our_key(key, config["peft_type"])
        except UserError as e:
            raise UserError(f"{weights}: {e}") from None
        tensors[f"{module}.{ours}"] = modules.setdefault(module, {})[ours] = our_tensor(ours, t.float())
    if settings["method"] == "lokr":  # each module's factors first, then the options that give their shapes
        _structure(Adapter(tensors, settings["rank"], settings["alpha"], method="lokr"), weights)
        try:
            settings = lokr_settings(settings, modules)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    adapter = check_adapter(Adapter(tensors, extra={"source": "peft"}, **settings), weights)
    ours = _own_settings(adapter, config, read_metadata(weights), weights)
    if ours is not None:
        adapter = ours
    if base_model is not None:
        mine = base_fingerprint(base_model)
        if adapter.fingerprint not in (UNKNOWN, mine):
            raise UserError(f"{weights}: adapter was trained on a different base model (fingerprint"
                            f" {adapter.fingerprint[:12]}, this base {mine[:12]})")
        adapter.fingerprint = mine
        check_fits(base_model, adapter, weights)  # every module must exist in the base with the right shapes
    return adapter


def _own_settings(adapter: Adapter, config: dict, meta: dict[str, str], where: Path) -> Adapter | None:
    """The Adapter our settings entry describes, where the weights carry one and adapter_config.json is what
    ``export_peft`` writes for it (else None, with a warning if the entry disagrees: the config was edited,
    and it is what PEFT reads)."""
    if BLOB_KEY not in meta:
        return None
    ours = adapter_from_blob(adapter.tensors, meta[BLOB_KEY], where)
    try:
        expected = peft_config(ours)
    except UserError:
        expected = {}
    fields = ("peft_type", "r", "lora_alpha", "alpha", "use_rslora", "use_dora", "decompose_both",
              "decompose_factor", "rank_pattern", "alpha_pattern")
    same = all(expected.get(k) == config.get(k) for k in fields) and sorted(ours.modules) == sorted(
        adapter.modules)
    if not same:
        log.warning("%s: its '%s' entry does not match %s (edited?); reading the config, as PEFT does", where,
                    BLOB_KEY, PEFT_CONFIG)
        return None
    return ours


def load_peft(model: nn.Module, peft_dir: str | Path, name: str = "default", weight: float = 1.0) -> str:
    return load_adapter(model, import_peft(peft_dir), name, weight)
