"""PEFT's adapter folder for each adapter method: its tensor names, its ``adapter_config.json``, and our
settings read back from them. ``adapters.export_peft`` / ``import_peft`` write and read the folder.

As ``PeftModel.save_pretrained`` writes them (peft 0.22; keys ``base_model.model.<module path>.<leaf>``):
- LoRA: ``LoraConfig`` (peft_type LORA); ``lora_A.weight`` = our lora_down, ``lora_B.weight`` = lora_up;
- DoRA: the same with ``use_dora: true`` plus ``lora_magnitude_vector`` (no ``.weight``): [out] on a Linear,
  [1, out, 1, 1] on a Conv2d (peft/tuners/lora/dora.py keeps the conv norm with keepdim), our
  dora_magnitude [out] either way. PEFT's DoRA normalises per output channel only: norm_axis "in" is refused;
- LoHa: ``LoHaConfig`` (LOHA); ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` as ours
  (conv: [r, in·kh·kw], PEFT's layout without ``use_effective_conv2d``);
- LoKr: ``LoKrConfig`` (LOKR); ``lokr_w1`` / ``lokr_w1_a`` / ``lokr_w1_b`` / ``lokr_w2`` / ... as ours.
PEFT has no rsLoRA for LoHa / LoKr (scale alpha / r): alpha * sqrt(r) is written so the scale is ours.

LoKr differs in two places (peft/tuners/lokr/layer.py): PEFT scales every module by alpha / r, where ours and
LyCORIS use 1 when W1 and W2 are both full; and PEFT's ``factorization`` returns (factor, n / factor)
unsorted when the factor divides n, where ours (LyCORIS's) sorts it. So a module whose factors are both full
gets ``alpha_pattern`` = its r (scale 1), and ``rank_pattern`` a rank at which PEFT builds it full too where
only ``full_matrix`` made it so (PEFT has no such option); a module PEFT would split otherwise is refused.
"""

from __future__ import annotations

import math
import re
from typing import Protocol

import torch

from lora4diffusion.errors import UserError
from lora4diffusion.lora import lokr_shapes
from lora4diffusion.lora.loha import LoHa
from lora4diffusion.lora.lokr import W1, W1A, W2, W2A, LoKr, factorization
from lora4diffusion.lora.method import MAX_ALPHA, MAX_RANK
from lora4diffusion.schema import boolean, integer, number, shown

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (the tuner model).model (the UNet)
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "loha": "LOHA", "lokr": "LOKR"}
# our key -> PEFT's name after "<module path>."
LEAVES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
          "dora_magnitude.weight": "lora_magnitude_vector",
          **{k: k.removesuffix(".weight") for k in (*LoHa.keys, *LoKr.keys)}}
KEY_RX = re.compile(rf"^{re.escape(PEFT_PREFIX)}(.+)\.(lora_[AB](?:\.[^.]+)?\.weight|lora_magnitude_vector"
                    r"(?:\.weight)?|hada_[wt][12](?:_[ab])?|lokr_[wt][12](?:_[ab])?)$")
# the tensors each peft_type holds (Tucker's hada_t1/hada_t2/lokr_t2 are named apart: refused with a reason)
_LEAF_RX = {"LORA": r"lora_[AB]|lora_magnitude_vector", "LOHA": r"hada_w[12]_[ab]",
            "LOKR": r"lokr_w[12](_[ab])?"}
# LoraConfig options beyond plain LoRA (one rank, one alpha, A and B only): refused where they are set
PEFT_OPTIONS = ("rank_pattern", "alpha_pattern", "use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save",
                "target_parameters", "layer_replication", "trainable_token_indices")
# LoHaConfig / LoKrConfig options that change which modules or layers are adapted: refused where set
_LYCORIS_OPTIONS = ("modules_to_save", "layers_to_transform", "layers_pattern")


class Adapter(Protocol):
    """What this module reads of ``adapters.Adapter`` (which imports this module, so it is not imported)."""

    method: str
    rank: int
    alpha: float
    rslora: bool
    dropout: float
    init: str
    options: dict

    @property
    def modules(self) -> list[str]: ...

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]: ...


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of a size (peft/tuners/lokr/layer.py): LyCORIS's, but (factor, n / factor) unsorted when
    the factor divides n."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)


# ----- ours -> PEFT -----
def peft_alpha(adapter: Adapter) -> float:
    """The alpha PEFT needs for our scale: rsLoRA's alpha / sqrt(r) as alpha' / r for LoHa and LoKr, which
    PEFT scales by alpha / r only (LoraConfig has use_rslora)."""
    rs = adapter.rslora and adapter.method in ("loha", "lokr")
    return adapter.alpha * math.sqrt(adapter.rank) if rs else adapter.alpha


def pattern_key(module: str) -> str:
    """A rank_pattern / alpha_pattern key matching exactly ``module`` (PEFT matches keys as regexes on the
    end of a module's name; "^" anchors it at the start, as diffusers writes them)."""
    return "^" + re.escape(module)


def peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (DoRA's conv magnitude as [1, out, 1, 1])."""
    out = {}
    for m in adapter.modules:
        tensors = adapter.module_tensors(m)
        conv = tensors.get("lora_down.weight", torch.zeros(1)).dim() == 4
        for key, t in tensors.items():
            if key == "dora_magnitude.weight" and conv:
                t = t.view(1, -1, 1, 1)
            out[f"{PEFT_PREFIX}{m}.{LEAVES[key]}"] = t
    return out


def peft_config(adapter: Adapter) -> dict:
    """The adapter_config.json that makes PEFT build this adapter's layers with our tensors and our scales;
    a UserError for what PEFT cannot hold (DoRA's norm_axis "in", a LoKr split PEFT would make otherwise)."""
    method = adapter.method
    if method not in PEFT_TYPES:
        raise UserError(f"PEFT's folders hold LoRA, DoRA, LoHa and LoKr adapters, not {method}")
    common = {"peft_type": PEFT_TYPES[method], "task_type": None, "base_model_name_or_path": None,
              "inference_mode": True, "r": adapter.rank, "target_modules": adapter.modules,  # exact paths
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    if method in ("lora", "dora"):
        if adapter.options.get("norm_axis", "out") != "out":
            raise UserError("PEFT's DoRA (use_dora) normalises per output channel; this DoRA's norm_axis is"
                            " 'in' (A1111's): write it as kohya instead")
        return {**common, "lora_alpha": adapter.alpha, "use_rslora": adapter.rslora,
                "lora_dropout": adapter.dropout, "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": "gaussian" if adapter.init == "normal" else True,  # N(0, 1/r) = gaussian
                "use_dora": method == "dora"}
    lycoris = {**common, "alpha": peft_alpha(adapter), "rank_dropout": 0.0, "module_dropout": 0.0,
               "use_effective_conv2d": False, "exclude_modules": None, "layers_to_transform": None,
               "layers_pattern": None}
    if method == "loha":
        return {**lycoris, "init_weights": True}
    return {**lycoris, **_lokr_fields(adapter, lycoris["alpha"])}


def _lokr_fields(adapter: Adapter, alpha: float) -> dict:
    """LoKrConfig's own fields, with rank_pattern / alpha_pattern for the modules whose W1 and W2 are both
    full (module doc); a module PEFT would split otherwise is a UserError naming it."""
    opts = {**LoKr.options, **adapter.options}
    mine = {"factor": opts["factor"], "decompose_both": opts["decompose_both"]}  # PEFT has no full_matrix
    ranks, alphas, full = {}, {}, []
    for m in adapter.modules:
        t = adapter.module_tensors(m)
        if not (W1 in t and W2 in t):
            if not lokr_shapes.fits(t, adapter.rank, mine, peft_factorization):
                raise UserError(_split_refusal(m, opts["factor"]))
            continue
        full.append(m)
        r = adapter.rank
        if not lokr_shapes.fits(t, r, mine, peft_factorization):  # full by full_matrix only: PEFT needs
            b, d = t[W2].shape[:2]  # r >= max(b, d) / 2 to build W2 full (and then W1 too)
            r = max(r, math.ceil(max(b, d) / 2))
            if not lokr_shapes.fits(t, r, mine, peft_factorization):
                raise UserError(_split_refusal(m, opts["factor"]))
            ranks[pattern_key(m)] = r
        alphas[pattern_key(m)] = float(r)  # PEFT's scale alpha / r = 1, as ours and LyCORIS's
    if len(full) == len(adapter.modules) and not ranks:  # all full at rank r: one alpha = r says it
        alpha, alphas = float(adapter.rank), {}
    init = "lycoris" if adapter.init == "normal" else True  # W2 = 0 (LyCORIS's), or PEFT's W1 = 0
    return {"alpha": alpha, "decompose_both": mine["decompose_both"], "decompose_factor": mine["factor"],
            "rank_dropout_scale": False, "init_weights": init, "rank_pattern": ranks, "alpha_pattern": alphas}


def _split_refusal(module: str, factor: int) -> str:
    return (f"module {module}: PEFT's LoKr would split it differently (peft's factorization keeps"
            f" (factor, n / factor) unsorted when factor {factor} divides n; ours and LyCORIS's sort it);"
            " write it as kohya or use factor -1")


# ----- PEFT -> ours -----
def lora_config_settings(config: object, rank_default: int | None = None, prefix: str = "",
                         dora: bool = False) -> dict:
    """Adapter settings from a PEFT ``LoraConfig`` as JSON: PEFT's adapter_config.json, and diffusers'
    ``lora_adapter_metadata`` (the same fields). Types as PEFT's LoraConfig takes them (``r`` an integer,
    ``use_rslora`` true/false, not "no"), ranges as ours (``check_settings``); options we lack are refused
    (``use_dora`` too unless ``dora``: PEFT folders hold DoRA, diffusers' files here do not).
    ``rank_default``: the rank when ``r`` is absent (diffusers; PEFT's file always has it). A UserError
    naming the field (as ``prefix`` + its name: diffusers' ``unet.lora_alpha``); the caller adds the file."""
    if not isinstance(config, dict):
        raise UserError(f"expected a JSON object of LoraConfig fields, got {shown(config)}")
    unsupported = [prefix + k for k in PEFT_OPTIONS if config.get(k) and not (dora and k == "use_dora")]
    if config.get("bias", "none") != "none":
        unsupported.append(prefix + "bias")
    if unsupported:
        raise UserError(f"LoRA options {unsupported} are not supported (plain LoRA with one rank and alpha)")
    if dora:
        boolean(config.get("use_dora", False), prefix + "use_dora")
    rank = integer(config.get("r", rank_default), prefix + "r", 1, MAX_RANK)
    alpha = config.get("lora_alpha", 8 if rank_default is None else rank)  # PEFT's default; diffusers': r
    alpha = number(alpha, prefix + "lora_alpha", 0.0, MAX_ALPHA, lo_open=True)
    rslora = boolean(config.get("use_rslora", False), prefix + "use_rslora")
    dropout = number(config.get("lora_dropout", 0.0), prefix + "lora_dropout", 0.0, 1.0)
    if dropout >= 1.0:
        raise UserError(f"{prefix}lora_dropout must be < 1, got {dropout:g}")
    init_weights = config.get("init_lora_weights", True)
    if init_weights not in (True, False, "gaussian") or not isinstance(init_weights, (bool, str)):
        # pissa, olora, loftq, eva, corda, ... also rewrite the BASE weights: this adapter alone is wrong
        raise UserError(f"{prefix}init_lora_weights {shown(init_weights)} is not supported (true, false or"
                        " 'gaussian'; pissa/olora/loftq/eva/corda change the base weights too)")
    _targets(config, prefix)
    init = {"gaussian": "normal", True: "kaiming"}.get(init_weights, "peft")
    return {"rank": rank, "alpha": alpha, "rslora": rslora, "dropout": dropout, "init": init}


def _targets(config: dict, prefix: str = "") -> None:
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise UserError(f"{prefix}target_modules must be a string or a list of strings, got {shown(targets)}")


def config_settings(config: dict) -> dict:
    """Our adapter settings (``method``, rank, alpha, rslora, dropout, init, ``options``) from an
    adapter_config.json of peft_type LORA (with or without use_dora), LOHA or LOKR; LoKr's per-module
    ``patterns`` ({module name: (r, alpha)} as written) come along for ``lokr_settings``. A UserError names
    the field."""
    kind = config.get("peft_type")
    if kind == "LORA":
        settings = lora_config_settings(config, dora=True)
        return {**settings, "method": "dora" if config.get("use_dora") else "lora", "options": {}}
    if kind not in ("LOHA", "LOKR"):
        raise UserError(f"peft_type {shown(kind)} is not supported (LORA, with or without use_dora; LOHA;"
                        " LOKR)")
    unsupported = [k for k in _LYCORIS_OPTIONS if config.get(k)]
    if unsupported:
        raise UserError(f"{kind} options {unsupported} are not supported (every adapted module in the file)")
    rank = integer(config.get("r", 8), "r", 1, MAX_RANK)  # LoHaConfig / LoKrConfig default r = alpha = 8
    alpha = number(config.get("alpha", 8), "alpha", 0.0, MAX_ALPHA, lo_open=True)
    _targets(config)
    init = config.get("init_weights", True)
    init = {"lycoris": "normal", True: "kaiming"}.get(init, "peft") if isinstance(init, (bool, str)) \
        else "peft"
    settings = {"method": kind.lower(), "rank": rank, "alpha": alpha, "rslora": False, "dropout": 0.0,
                "init": init, "options": {}}
    patterns = {name: config.get(name) or {} for name in ("rank_pattern", "alpha_pattern")}
    for name, value in patterns.items():
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a JSON object, got {shown(value)}")
        if value and kind == "LOHA":
            raise UserError(f"{name} {shown(value)} is not supported (one rank and alpha per adapter)")
    if kind == "LOKR":
        factor = integer(config.get("decompose_factor", -1), "decompose_factor", -1, MAX_RANK)
        if factor == 0:
            raise UserError("decompose_factor must be -1 or >= 1, got 0")
        both = boolean(config.get("decompose_both", False), "decompose_both")
        settings["options"] = {k: v for k, v in (("factor", factor), ("decompose_both", both))
                               if v != LoKr.options[k]}
        settings["patterns"] = patterns
    return settings


def _pattern_names(patterns: dict) -> list[tuple[object, bool, str]]:
    """(key, anchored, module name) of each rank_pattern / alpha_pattern key. PEFT's ``get_pattern_key``
    runs keys as regexes on the end of a module's name; here a key must be a name: anchored and escaped
    ("^a\\.b", what we write), escaped, or plain (a dotted name matches itself as a regex). Keys are never
    run as regexes (a file's regex could be slow); any other key is a UserError."""
    out = []
    for key in patterns:
        anchored = key.startswith("^")
        name = key[1:] if anchored else key
        plain = re.sub(r"\\(.)", r"\1", name)
        if name != re.escape(plain) and not re.fullmatch(r"[\w.]+", name):
            raise UserError(f"pattern key {shown(key, 80)} is not a module name (regex patterns are not"
                            " read)")
        out.append((key, anchored, plain))
    return out


def _pattern(patterns: dict, names: list[tuple[object, bool, str]], module: str, default: object) -> object:
    """The value PEFT picks for ``module``: the first key naming it (a key not anchored also names any
    module ending in ".<name>", as PEFT's suffix match)."""
    for key, anchored, name in names:
        if module == name or (not anchored and module.endswith("." + name)):
            return patterns[key]
    return default


def lokr_settings(settings: dict, modules: dict[str, dict[str, torch.Tensor]]) -> dict:
    """LoKr settings from a LOKR config and the tensors (by module): PEFT's per-module (r, alpha) must give
    our scales (alpha / r on low-rank modules, one rank and alpha; 1 on modules with W1 and W2 full), and
    our layout with the config's factor must give every module's shapes (``full_matrix`` where only the
    patterns made modules full). The tensors have passed ``LoKr.problem``. A UserError names the module."""
    rank, alpha, opts = settings["rank"], settings["alpha"], settings["options"]
    patterns = settings.pop("patterns")
    ranks, alphas = patterns["rank_pattern"], patterns["alpha_pattern"]
    rank_names, alpha_names = _pattern_names(ranks), _pattern_names(alphas)
    for m, t in modules.items():
        r_m = integer(_pattern(ranks, rank_names, m, rank), f"rank_pattern for {m}", 1, MAX_RANK)
        a_m = number(_pattern(alphas, alpha_names, m, alpha), f"alpha_pattern for {m}", 0.0, MAX_ALPHA,
                     lo_open=True)
        low = W1A in t or W2A in t
        if low and (r_m, a_m) != (rank, alpha):
            raise UserError(f"module {m}: rank {r_m} / alpha {a_m:g} differ from the adapter's {rank} /"
                            f" {alpha:g}; one rank and alpha per adapter is supported")
        if not low and a_m != r_m:
            raise UserError(f"module {m}: PEFT scales its full Kronecker factors by alpha / r ="
                            f" {a_m / r_m:g}; ours and LyCORIS's by 1 (its alpha_pattern must be its rank)")
    for full_matrix in (False, True):
        options = {**opts, **({"full_matrix": True} if full_matrix else {})}
        bad = next((m for m, t in modules.items() if not lokr_shapes.fits(t, rank, options)), None)
        if bad is None:
            return {**settings, "options": options}
        if any(W1A in t or W2A in t for t in modules.values()):
            break  # full_matrix would make every module full
    raise UserError(f"module {bad}: its LoKr factors are not our (LyCORIS's) layout at rank {rank} with"
                    f" decompose_factor {opts.get('factor', -1)} (PEFT keeps (factor, n / factor) unsorted"
                    " when the factor divides n; ours sorts it)")


def our_key(key: str, kind: str) -> tuple[str, str]:
    """(module path, our key) of a PEFT tensor name in a ``kind`` (peft_type) folder; a UserError for a name
    that folder cannot hold."""
    match = KEY_RX.match(key)
    leaf = match[2] if match else ""
    if match and re.fullmatch(r"hada_t[12]|lokr_t[12]", leaf):
        raise UserError(f"module {shown(match[1], 80)}: Tucker factors ({leaf}, use_effective_conv2d) are not"
                        " supported")
    if not match or not re.match(rf"(?:{_LEAF_RX[kind]})(?:\.|$)", leaf):
        raise UserError(f"unexpected tensor {shown(key, 80)} (a PEFT {kind} adapter holds"
                        f" {_LEAF_RX[kind].replace('|', ', ')} weights)")
    if leaf.startswith("lora_"):
        ours = {"A": "lora_down.weight", "B": "lora_up.weight"}.get(leaf[5:6], "dora_magnitude.weight")
    else:
        ours = f"{leaf}.weight"
    return match[1], ours


def our_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    """DoRA's magnitude as ours ([out]) from PEFT's [out] or conv [1, out, 1, 1]; other tensors as they are.
    Another magnitude shape is left as it is (``DoRA.problem`` names it)."""
    if key == "dora_magnitude.weight" and t.dim() == 4 and t.shape[0] == 1 and t.shape[2:] == (1, 1):
        return t.reshape(-1)
    return t


__all__ = ["LEAVES", "PEFT_CONFIG", "PEFT_OPTIONS", "PEFT_PREFIX", "PEFT_TYPES", "PEFT_WEIGHTS",
           "config_settings", "lokr_settings", "lora_config_settings", "our_key", "our_tensor", "peft_alpha",
           "peft_config", "peft_factorization", "peft_tensors"]
