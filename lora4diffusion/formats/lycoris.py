"""DoRA, LoHa and LoKr files in LyCORIS's extension of the kohya layout (``ss_network_module`` =
``lycoris.kohya``): what A1111, ComfyUI and LyCORIS itself load. ``export-lora --format kohya`` writes this
for a method other than LoRA; plain LoRA stays kohya's own file (kohya.py).

One safetensors file; per adapted module, named as kohya names it (``lora_unet_*`` / ``lora_te_*``,
formats/names.py), the tensors LyCORIS's modules save (``custom_state_dict`` in lycoris/modules/locon.py,
loha.py, lokr.py: no ``.weight`` on hada_* / lokr_* / dora_scale):
    DoRA  <name>.lora_down.weight, <name>.lora_up.weight   as kohya's LoRA
          <name>.dora_scale   our dora_magnitude, [out, 1] (conv [out, 1, 1, 1]) for norm_axis "out"
                              (LyCORIS's wd_on_out), [1, in] (conv [1, in, 1, 1]) for "in"
    LoHa  <name>.hada_w1_a [out, r], .hada_w1_b [r, in·kh·kw], .hada_w2_a, .hada_w2_b
    LoKr  <name>.lokr_w1 or .lokr_w1_a + .lokr_w1_b; .lokr_w2 ([b, d, kh, kw]) or .lokr_w2_a + .lokr_w2_b
    all   <name>.alpha   0-d; readers scale by alpha / r (r: the low-rank factors' size)
A LoKr module whose W1 and W2 are both full has scale 1 (ours, LyCORIS's, A1111's and ComfyUI's, which take
no r from it): its alpha is written as r, so a reader that divides by r gets 1 too. rsLoRA is written as
alpha * sqrt(r), as kohya.py does. Metadata: kohya.py's, with ``ss_network_args`` = {"algo": "lora" (DoRA,
with "dora_wd" and "wd_on_output"), "loha" or "lokr" (with "factor", "decompose_both", "full_matrix"),
"conv_dim" / "conv_alpha" where convs are adapted}, values as text as sd-scripts records them.

Reading a file without our ``lora4diffusion`` entry (one LyCORIS made): the method from the tensor names,
the rank from the factors, DoRA's norm axis from dora_scale's shape (as ComfyUI does), LoKr's options as
LyCORIS's ``make_module_from_state_dict`` infers them (lora/lokr_shapes.py), one alpha per adapter (a LoKr
module with both factors full says nothing). What our adapter cannot be is refused with one line naming the
module: Tucker factors (lora_mid, hada_t1/t2, lokr_t1/t2), DoRA on LoHa / LoKr (dora_scale beside
hada_/lokr_), different methods or ranks per module, LoKr shapes no single factor rule gives.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

import lora4diffusion.formats.ours as ours
from lora4diffusion.checkpoint import load_tensors, read_metadata, save_tensors
from lora4diffusion.errors import UserError
from lora4diffusion.formats.kohya import (
    check_header,
    kohya_alpha,
    network_metadata,
    read_alpha,
    trigger_extra,
)
from lora4diffusion.formats.names import KOHYA_TE, KOHYA_UNET, any_from_kohya, any_to_kohya, is_conv
from lora4diffusion.lora import lokr_shapes
from lora4diffusion.lora.adapters import MAX_RANK, UNKNOWN, Adapter, check_adapter
from lora4diffusion.lora.loha import LoHa
from lora4diffusion.lora.lokr import W1, W2, LoKr
from lora4diffusion.schema import shown

log = logging.getLogger("lora4diffusion")
NETWORK_MODULE = "lycoris.kohya"
ALGOS = {"dora": "lora", "loha": "loha", "lokr": "lokr"}  # LyCORIS's algo names (DoRA: lora + dora_wd)
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_TUCKER = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t1", "lokr_t2")
_OWN = (*_LOHA, *_LOKR, *_TUCKER, "dora_scale")  # names kohya's networks.lora never writes
KEY_RX = re.compile(r"^(lora_[a-z0-9]+_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale"
                    rf"|{'|'.join(re.escape(k) for k in (*_LOHA, *_LOKR, *_TUCKER))})$")


def looks_like(keys: list[str]) -> bool:
    """Keys only LyCORIS's modules write (hada_*, lokr_*, dora_scale, Tucker factors) on kohya names."""
    return any(k.startswith("lora_") and k.endswith(tuple("." + s for s in _OWN)) for k in keys)


# ----- ours -> LyCORIS -----
def write(adapter: Adapter, path: str | Path, title: str = "") -> Path:
    """Write one LyCORIS-layout file at ``path`` (module doc); every module must have a kohya name."""
    if adapter.method not in ALGOS:
        raise UserError(f"a {adapter.method} adapter has no LyCORIS layout (DoRA, LoHa, LoKr)")
    alpha, tensors, convs = kohya_alpha(adapter), {}, False
    for m in adapter.modules:
        k, t = any_to_kohya(m), adapter.module_tensors(m)
        for key, value in t.items():
            tensors[f"{k}.{_their_key(key)}"] = _their_tensor(key, value, t, adapter)
        full = adapter.method == "lokr" and W1 in t and W2 in t
        tensors[f"{k}.alpha"] = torch.tensor(float(adapter.rank) if full else alpha, dtype=torch.float32)
        convs = convs or is_conv(m)
    args = {"algo": ALGOS[adapter.method]}
    if adapter.method == "dora":
        args.update(dora_wd="True", wd_on_output=str(adapter.options.get("norm_axis", "out") == "out"))
    if adapter.method == "lokr":
        opts = {**LoKr.options, **adapter.options}
        args.update({k: str(opts[k]) for k in ("factor", "decompose_both", "full_matrix")})
    if convs:
        args.update(conv_dim=str(adapter.rank), conv_alpha=repr(float(alpha)))
    path = Path(path)
    save_tensors(path, tensors, network_metadata(adapter, title, NETWORK_MODULE, args))
    return path


def _their_key(key: str) -> str:
    if key == "dora_magnitude.weight":
        return "dora_scale"
    return key if key.startswith("lora_") else key.removesuffix(".weight")


def _their_tensor(key: str, value: torch.Tensor, tensors: dict, adapter: Adapter) -> torch.Tensor:
    """DoRA's magnitude [n] as LyCORIS's dora_scale: [out, 1, ...] (wd_on_out) or [1, in, ...]."""
    if key != "dora_magnitude.weight":
        return value
    dims = tensors["lora_down.weight"].dim()
    if adapter.options.get("norm_axis", "out") == "out":
        return value.view(-1, *[1] * (dims - 1))
    return value.view(1, -1, *[1] * (dims - 2))


# ----- LyCORIS -> ours -----
def read(path: str | Path) -> Adapter:
    """A LyCORIS-layout DoRA / LoHa / LoKr file (ours or another tool's) as our Adapter."""
    path = Path(path)
    meta = read_metadata(path)
    check_header(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_tensors(path).items():
        match = KEY_RX.match(key)
        if not match:
            raise UserError(f"{path}: unexpected tensor {shown(key, 80)} (LyCORIS DoRA / LoHa / LoKr:"
                            " lora_down/lora_up/dora_scale, hada_*, lokr_*, alpha)")
        if not match[1].startswith((KOHYA_UNET, KOHYA_TE)):
            raise UserError(f"{path}: module {shown(match[1], 80)} is not supported (lora_unet_* and"
                            " lora_te_* only)")
        if match[2] in _TUCKER:
            raise UserError(f"{path}: module {match[1]}: Tucker factors ({match[2]}) are not supported")
        parts.setdefault(match[1], {})[match[2]] = t
    if not parts:
        raise UserError(f"{path}: the file holds no LyCORIS tensors")
    methods = {name: _method(name, p, path) for name, p in parts.items()}
    kinds = dict(zip(methods.values(), methods.keys(), strict=False))
    if len(kinds) > 1:
        (k1, m1), (k2, m2) = list(kinds.items())[:2]
        raise UserError(f"{path}: modules use different methods ({m1}: {k1}, {m2}: {k2}); one method per"
                        " adapter is supported")
    method = next(iter(kinds))
    modules = {name: _our_tensors(method, name, p, path) for name, p in parts.items()}
    rank, options = _rank_and_options(method, modules, meta, path)
    tensors = {f"{any_from_kohya(name)}.{k}": v for name, t in modules.items() for k, v in t.items()}
    if ours.META_KEY in meta:
        adapter = ours.from_blob(tensors, meta[ours.META_KEY], path)
        seen = lokr_shapes.common_rank(modules) if method == "lokr" else rank  # None: every LoKr module full
        if adapter.method != method or (seen is not None and adapter.rank != seen):
            raise UserError(f"{path}: the tensors are a rank-{seen} {method}, the metadata says a rank-"
                            f"{adapter.rank} {adapter.method}")
        odd = next((n for n, t in modules.items() if method == "lokr"
                    and not lokr_shapes.fits(t, adapter.rank, adapter.options)), None)
        if odd is not None:
            raise UserError(f"{path}: module {odd}: the metadata's LoKr options {adapter.options} do not give"
                            " its tensors' shapes")
        return adapter
    alpha = _alpha(method, parts, modules, rank, path)
    extra = {"source": "lycoris", **trigger_extra(meta)}
    adapter = Adapter(tensors, rank, alpha, init="lycoris", fingerprint=UNKNOWN, extra=extra, method=method,
                      options=options)
    return check_adapter(adapter, path)


def _method(name: str, p: dict[str, torch.Tensor], path: Path) -> str:
    """One module's method from its tensor names; a mix (DoRA on LoHa / LoKr too) is refused."""
    found = {m for m, keys in (("loha", _LOHA), ("lokr", _LOKR), ("lora", ("lora_down.weight",
                                                                          "lora_up.weight")))
             if any(k in p for k in keys)}
    if len(found) != 1:
        what = "no weights" if not found else " and ".join(sorted(found)) + " tensors"
        raise UserError(f"{path}: module {name} holds {what}")
    method = found.pop()
    if "dora_scale" in p and method != "lora":
        raise UserError(f"{path}: module {name}: dora_scale on {method} (LyCORIS's weight decomposition on"
                        f" {method}) is not supported; DoRA is LoRA + dora_scale")
    return "dora" if "dora_scale" in p else method


def _our_tensors(method: str, name: str, p: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """One module's tensors under our keys (fp32); DoRA's dora_scale as dora_magnitude [n]."""
    out = {(k if k.startswith("lora_") else f"{k}.weight"): t.float() for k, t in p.items()
           if k not in ("alpha", "dora_scale")}
    if method == "dora":
        down, up = out.get("lora_down.weight"), out.get("lora_up.weight")
        if down is None or up is None or down.dim() < 2 or up.dim() < 1:
            raise UserError(f"{path}: module {name} lacks its lora_down or lora_up weight")
        out["dora_magnitude.weight"] = p["dora_scale"].float().reshape(-1)
        out["axis"] = _axis(name, p["dora_scale"], up.shape[0], down.shape[1], down.dim(), path)
    return out


def _axis(name: str, scale: torch.Tensor, out: int, inn: int, dims: int, path: Path) -> str:
    """DoRA's norm axis from dora_scale's shape, as ComfyUI tells them apart: [out, 1, ...] is LyCORIS's
    wd_on_out, [1, in, ...] the input axis (A1111's)."""
    shape = tuple(scale.shape)
    if shape == (out, *[1] * (dims - 1)):
        return "out"
    if shape == (1, inn, *[1] * (dims - 2)):
        return "in"
    raise UserError(f"{path}: module {name}: dora_scale {shape} is neither [out, 1, ...] ({out}) nor"
                    f" [1, in, ...] ({inn})")


def _rank_and_options(method: str, modules: dict[str, dict], meta: dict[str, str],
                      path: Path) -> tuple[int | None, dict]:
    """The adapter's rank (None: a LoKr whose modules are all full shows none) and method options, from the
    tensors; a UserError names the module that disagrees."""
    try:
        if method == "dora":
            axes = {t.pop("axis"): name for name, t in modules.items()}
            if len(axes) > 1:
                raise UserError(f"modules normalise DoRA on different axes ({axes['out']}: out, {axes['in']}:"
                                " in); one norm axis per adapter is supported")
            pairs = {n: (t["lora_down.weight"], t["lora_up.weight"]) for n, t in modules.items()}
            return ours.common_rank(pairs, path), {"norm_axis": "in"} if "in" in axes else {}
        if method == "loha":
            for name, t in modules.items():
                w = t.get("hada_w1_a.weight")
                problem = LoHa.problem(t, w.shape[1] if w is not None and w.dim() == 2 else 1)
                if problem:
                    raise UserError(f"module {name}: {problem}")
            ranks = {t["hada_w1_a.weight"].shape[1]: n for n, t in modules.items()}
            if len(ranks) > 1:
                (r1, m1), (r2, m2) = list(ranks.items())[:2]
                raise UserError(f"modules have different ranks ({m1}: {r1}, {m2}: {r2}); one rank per adapter"
                                " is supported")
            return next(iter(ranks)), {}
        for name, t in modules.items():
            problem = LoKr.problem(t, lokr_shapes.low_rank(t) or 1)
            if problem:
                raise UserError(f"module {name}: {problem}")
        rank = lokr_shapes.common_rank(modules)
        args = _network_args(meta)
        hint_rank = _int(meta.get("ss_network_dim"), 1, MAX_RANK) or 1
        hint_factor = _int(args.get("factor"), 1, 1 << 20)
        found_rank, options = lokr_shapes.infer_options(modules, hint_rank, hint_factor)
        return (rank if rank is not None else found_rank), options
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _alpha(method: str, parts: dict, modules: dict, rank: int | None, path: Path) -> float:
    """The one alpha of the modules that have one to give (a LoKr module with both factors full has
    none); a missing or 0 alpha is r, as kohya and LyCORIS read it."""
    alphas, missing = {}, []
    for name, p in parts.items():
        if method == "lokr" and lokr_shapes.low_rank(modules[name]) is None:
            continue
        value = read_alpha(p["alpha"], f"{name}.alpha", path) if "alpha" in p else 0.0
        alphas[name] = value if value else float(rank)
        if not value:
            missing.append(name)
    if missing:
        log.warning("%s: %d module(s) without .alpha or with alpha 0 (e.g. %s): alpha = rank = %d, as LyCORIS"
                    " does", path, len(missing), missing[0], rank)
    distinct = dict(zip(alphas.values(), alphas.keys(), strict=True))
    if len(distinct) > 1:
        (a1, m1), (a2, m2) = list(distinct.items())[:2]
        raise UserError(f"{path}: modules have different alphas ({m1}: {a1:g}, {m2}: {a2:g}); one alpha per"
                        " adapter is supported")
    return next(iter(distinct), float(rank or 1))


def _network_args(meta: dict[str, str]) -> dict:
    """ss_network_args as a dict ({} where absent or not a JSON object): only hints, the tensors decide."""
    try:
        args = json.loads(meta.get("ss_network_args", "{}"))
    except (ValueError, RecursionError):
        return {}
    return args if isinstance(args, dict) else {}


def _int(value: object, lo: int, hi: int) -> int | None:
    """An integer hint from metadata text (None where it is not one in [lo, hi])."""
    try:
        n = int(str(value))
    except ValueError:
        return None
    return n if lo <= n <= hi else None


__all__ = ["NETWORK_MODULE", "looks_like", "read", "write"]
