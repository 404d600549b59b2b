"""DoRA, LoHa and LoKr against their references on the shipped base's own layers: max differences.

    python benchmarks/method_oracles.py          # ~1 min on 2 CPU cores, fp32

For each method, an adapter (rank 4, alpha 4, random tensors at the size training gives them) on every
Linear and Conv2d of the shipped prompt base's UNet (`all-linear+conv`: attention, feed-forward, timestep
and ResBlock layers) is given to PEFT's layer of that method (``LoraConfig(use_dora=True)``, ``LoHaConfig``,
``LoKrConfig``) and to LyCORIS's module (lycoris-lora), and the three compute each layer's output on the same
random input and its merged weight. Prints, per method and layer type, the largest difference from ours,
absolute and relative to the largest |value|; and the whole UNet's eps with PEFT's model. peft and
lycoris-lora are test oracles: this script imports them, the package never.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from lora4diffusion.lora.layers import METHODS, inject_lora, lora_layers
from lora4diffusion.pipeline import Pipeline

TARGETS = "all-linear+conv"


def peft_model(unet: nn.Module, kind: str, paths: list[str], rank: int) -> nn.Module:
    import peft

    common = {"target_modules": paths, "r": rank}
    config = {"dora": lambda: peft.LoraConfig(lora_alpha=rank, use_dora=True, **common),
              "loha": lambda: peft.LoHaConfig(alpha=rank, **common),
              "lokr": lambda: peft.LoKrConfig(alpha=rank, **common)}[kind]()
    return peft.get_peft_model(copy.deepcopy(unet), config).base_model.model


def peft_param(layer: nn.Module, key: str) -> torch.Tensor:
    child = key.removesuffix(".weight")
    names = {"lora_down": "lora_A", "lora_up": "lora_B"}
    if child in names:
        return getattr(layer, names[child])["default"].weight
    if child == "dora_magnitude":
        return layer.lora_magnitude_vector["default"].weight
    return getattr(layer, child)["default"]


def lycoris_module(kind: str, base: nn.Module, t: dict[str, torch.Tensor], rank: int) -> nn.Module:
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    alpha = torch.tensor(float(rank))
    if kind == "dora":
        scale = t["dora_magnitude"].view(-1, *[1] * (base.weight.dim() - 1))
        return LoConModule.make_module_from_state_dict("x", base, t["lora_up"], t["lora_down"], None, alpha,
                                                       scale)
    if kind == "loha":
        return LohaModule.make_module_from_state_dict(
            "x", base, t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], None, None, alpha,
            None)
    return LokrModule.make_module_from_state_dict(
        "x", base, t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
        t.get("lokr_w2_a"), t.get("lokr_w2_b"), None, None, alpha, None)


def worst(diffs: list[tuple[float, float]]) -> str:
    """'max abs (max relative)' of (|ours - theirs|, |theirs|) pairs."""
    if not diffs:
        return "-"
    return f"{max(d for d, _ in diffs):.1e} ({max(d / s for d, s in diffs if s > 0):.1e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load("base")
    base_unet = pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    print("| method | layer | n | forward vs PEFT | forward vs LyCORIS | merged W vs PEFT |"
          " merged W vs LyCORIS |")
    print("|---|---|---|---|---|---|---|")
    eps_rows = []
    for kind in ("dora", "loha", "lokr"):
        ours = copy.deepcopy(base_unet)
        paths = inject_lora(ours, TARGETS, args.rank, float(args.rank), method=METHODS[kind])
        layers = lora_layers(ours)
        with torch.no_grad():
            for layer in layers.values():
                for p in layer.adapters["default"].parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        theirs = peft_model(base_unet, kind, paths, args.rank)
        with torch.no_grad():
            for path, layer in layers.items():
                target = theirs.get_submodule(path)
                for key, t in layer.adapters["default"].state_dict().items():
                    peft_param(target, key).copy_(t.view(peft_param(target, key).shape))
        found: dict[str, dict[str, list]] = {}
        with torch.no_grad():
            for path, layer in layers.items():
                base = layer.base_layer
                kind_of = type(base).__name__
                rows = found.setdefault(kind_of, {"fp": [], "fl": [], "wp": [], "wl": []})
                x = (torch.randn(8, base.in_features, generator=g) if kind_of == "Linear"
                     else torch.randn(2, base.in_channels, 8, 8, generator=g))
                out = layer(x)
                peft_layer = theirs.get_submodule(path)
                ref = peft_layer(x)
                rows["fp"].append((float((out - ref).abs().max()), float(ref.abs().max())))
                t = {k.removesuffix(".weight"): v for k, v in layer.adapters["default"].state_dict().items()}
                lyco = lycoris_module(kind, copy.deepcopy(base), t, args.rank)
                ref = lyco(x)
                rows["fl"].append((float((out - ref).abs().max()), float(ref.abs().max())))
                merged = base.weight + layer.delta_weight("default")
                peft_layer.merge()
                ref = peft_layer.get_base_layer().weight
                rows["wp"].append((float((merged - ref).abs().max()), float(ref.abs().max())))
                if kind != "loha":  # lycoris-lora 4.1.3's LohaModule.get_merged_weight scales twice
                    ref = lyco.get_merged_weight(multiplier=1.0, shape=merged.shape)[0]
                    ref = ref.view(merged.shape)
                    rows["wl"].append((float((merged - ref).abs().max()), float(ref.abs().max())))
                peft_layer.unmerge()
            for kind_of, rows in found.items():
                print(f"| {kind} | {kind_of} | {len(rows['fp'])} | {worst(rows['fp'])} |"
                      f" {worst(rows['fl'])} |"
                      f" {worst(rows['wp'])} | {worst(rows['wl'])} |")
            z = torch.randn(4, *base_unet_input(base_unet), generator=g)
            t = torch.tensor([10, 200, 500, 900])
            ctx = torch.randn(4, 16, base_unet.cfg.context_dim, generator=g)
            a, b = ours(z, t, ctx), theirs(z, t, ctx)
            eps_rows.append((kind, float((a - b).abs().max()), float(b.abs().max())))
    print("\n| method | whole-UNet eps vs PEFT: max abs | relative |")
    print("|---|---|---|")
    for kind, d, s in eps_rows:
        print(f"| {kind} | {d:.1e} | {d / s:.1e} |")


def base_unet_input(unet: nn.Module) -> tuple[int, int, int]:
    cfg = unet.cfg
    return cfg.in_channels, cfg.image_size, cfg.image_size


if __name__ == "__main__":
    main()
