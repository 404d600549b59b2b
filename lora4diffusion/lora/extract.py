"""LoRA by truncated SVD: extract an adapter from a fine-tuned model, resize one to a lower rank, or turn an
adapter of another method (DoRA, LoHa, LoKr) into a LoRA.

Eckart-Young: the best rank-k approximation of a matrix in Frobenius norm is its SVD truncated to the k
largest singular values; its relative error is sqrt(sum of the discarded s_i^2 / sum of all s_i^2). A conv
kernel is factored as the matrix [out, in * kh * kw], as LoRA lays it out (lora.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import Adapter, base_fingerprint, read_adapter
from lora4diffusion.lora.layers import base_state_dict, lora_layers
from lora4diffusion.lora.lora import LoRA
from lora4diffusion.lora.targets import adaptable_modules, resolve_targets

log = logging.getLogger("lora4diffusion")


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


def factor_delta(module: str, delta: torch.Tensor, rank: int, scale: float,
                 ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``_low_rank`` of module ``module``'s delta [out, in]: (B, A, tail energy, energy); a UserError names
    the module."""
    try:
        return _low_rank(delta, rank, scale)
    except UserError as e:
        raise UserError(f"module {module}: {e}") from None


def relative_errors(parts: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Relative Frobenius errors ||delta - approx|| / ||delta|| per module and "overall" (0 if delta = 0)."""
    def rel(tail: float, total: float) -> float:
        return math.sqrt(tail / total) if total > 0 else 0.0

    overall = rel(sum(t for t, _ in parts.values()), sum(e for _, e in parts.values()))
    return {"overall": overall, **{m: rel(*te) for m, te in parts.items()}}


def extract_lora(base_model: nn.Module, tuned_model: nn.Module, rank: int, targets: str | list[str],
                 ) -> tuple[Adapter, dict[str, float]]:
    """The best rank-``rank`` LoRA of the weight deltas tuned - base in the ``targets`` modules.

    Returns the adapter (alpha = rank, so scale 1 and B A = the approximated delta) and the relative
    errors (see ``relative_errors``). Changed tensors outside the targets cannot be represented: their whole
    delta counts in "overall" (it is error the adapter leaves), "uncaptured" says how many there are, and a
    warning names one.
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
        b, a, tail, total = factor_delta(path, delta, rank, 1.0)
        shapes = LoRA.shapes(modules[path], rank)
        tensors[f"{path}.lora_down.weight"] = a.float().reshape(shapes["lora_down.weight"])
        tensors[f"{path}.lora_up.weight"] = b.float().reshape(shapes["lora_up.weight"])
        parts[path] = (tail, total)
    covered = {f"{p}.weight" for p in paths}
    ignored = [k for k in base if k not in covered and not torch.equal(base[k], tuned[k])]
    if ignored:
        log.warning("extract: %d changed tensors outside the targets are not captured (e.g. %s)",
                    len(ignored), ignored[0])
    missed = [float((tuned[k].double() - base[k].double()).pow(2).sum()) for k in ignored]
    adapter = Adapter(tensors, rank, float(rank), init="extracted", fingerprint=base_fingerprint(base_model))
    errors = relative_errors(parts)
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
    if adapter.method != LoRA.kind:  # its ΔW may depend on W0 (DoRA): convert_to_lora, on its base
        raise UserError(f"resizing factors LoRA adapters; this one is {adapter.method} (convert_to_lora)")
    if not isinstance(new_rank, int) or not 1 <= new_rank <= adapter.rank:
        raise UserError(f"new rank must be between 1 and the adapter's rank {adapter.rank}, got {new_rank}")
    new = Adapter({}, new_rank, adapter.alpha, adapter.rslora, adapter.init, adapter.dropout,
                  adapter.fingerprint, {**adapter.extra, "resized_from_rank": str(adapter.rank)})
    parts = {}
    for m in adapter.modules:
        a, b = adapter.pair(m)
        delta = adapter.scale * (b.double().flatten(1) @ a.double().flatten(1))
        b2, a2, tail, total = factor_delta(m, delta, new_rank, new.scale)
        new.tensors[f"{m}.lora_down.weight"] = a2.float().reshape(new_rank, *a.shape[1:])
        new.tensors[f"{m}.lora_up.weight"] = b2.float().reshape(b.shape[0], new_rank, *b.shape[2:])
        parts[m] = (tail, total)
    return new, relative_errors(parts)


def convert_to_lora(parts: dict[str, nn.Module], name: str, rank: int, source: Adapter,
                    ) -> tuple[Adapter, dict[str, float]]:
    """Adapter ``name`` (any method), loaded into the models of ``parts`` (by key prefix: "" for a UNet,
    "text_encoder." for a text encoder), as a rank-``rank`` LoRA: the truncated SVD of each module's ΔW at
    multiplier 1 (for DoRA, W' - W0 on this base). alpha = rank (scale 1); ``source`` gives the fingerprint
    and metadata. Returns the adapter and the relative Frobenius errors (``relative_errors``)."""
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank}")
    tensors, parts_err = {}, {}
    for prefix, model in parts.items():
        for path, layer in lora_layers(model).items():
            if name not in layer.adapters:
                continue
            with torch.no_grad():
                delta = layer.adapters[name].delta_weight(1.0, layer.original_weight).double().flatten(1)
            if rank > min(delta.shape):
                raise UserError(f"rank {rank} exceeds the rank of module {prefix}{path} (weight"
                                f" {tuple(layer.base_layer.weight.shape)})")
            b, a, tail, total = factor_delta(prefix + path, delta.cpu(), rank, 1.0)
            shapes = LoRA.shapes(layer.base_layer, rank)
            tensors[f"{prefix}{path}.lora_down.weight"] = a.float().reshape(shapes["lora_down.weight"])
            tensors[f"{prefix}{path}.lora_up.weight"] = b.float().reshape(shapes["lora_up.weight"])
            parts_err[prefix + path] = (tail, total)
    if not tensors:
        raise UserError(f"no module holds adapter {name!r}")
    extra = {**source.extra, "converted_from": source.method}
    adapter = Adapter(tensors, rank, float(rank), init="extracted", fingerprint=source.fingerprint,
                      extra=extra)
    return adapter, relative_errors(parts_err)
