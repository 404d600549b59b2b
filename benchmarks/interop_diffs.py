"""The shipped label pixel base and its adapters through diffusers: max differences (INTEROP.md).

    HF_HUB_OFFLINE=1 python benchmarks/interop_diffs.py      # ~1 min on 2 CPU cores, fp32

Prints a Markdown table. diffusers and peft are test oracles: this script imports them, the package never.
Measured on the shipped `pixel-base` (28x28, 32/64/64 channels, T = 1000):
  - eps of diffusers' UNet2DConditionModel (export-diffusers folder) vs our UNet, 16 random (x_t, t, label);
  - DDIM 20 steps, guidance 1.25: diffusers' DDIMScheduler + UNet loop vs our `sample`, on [0, 1] pixels;
  - the shipped `bold-pixel` adapter exported as a diffusers LoRA, loaded with `load_lora_adapter`, at
    weights 1 and 0.5 and fused, vs ours; and as a kohya file through diffusers' kohya converter;
  - the output change of our eps-1e-6 Transformer GroupNorm vs the 1e-5 the base was trained with.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from lora4diffusion.diffusion import DDIMSampler, NoiseSchedule, sample
from lora4diffusion.formats import write_lora
from lora4diffusion.formats.diffusers import export_diffusers
from lora4diffusion.lora.adapters import load_adapter, read_adapter, shipped_adapters
from lora4diffusion.lora.layers import merge_lora, set_adapter_weight
from lora4diffusion.models.unet import NULL_LABEL, TransformerBlock
from lora4diffusion.pipeline import Pipeline


def main() -> None:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    torch.manual_seed(0)
    pipe = Pipeline.load("pixel-base")
    model = pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 1000, (16,), generator=g)
    y = torch.arange(16) % 11

    def ours() -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, y)

    def gap(dunet) -> float:
        return (ours() - theirs(dunet)).abs().max().item()

    def theirs(dunet) -> torch.Tensor:
        with torch.no_grad():
            ctx = model.context(y)
            return dunet(x, t, encoder_hidden_states=ctx, class_labels=ctx.mean(1)).sample

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_diffusers(model, pipe.diffusion, tmp / "d")
        dunet = UNet2DConditionModel.from_pretrained(tmp / "d" / "unet").eval()
        rows.append(("UNet eps, diffusers vs ours", gap(dunet)))

        sampler = DDIMSampler(NoiseSchedule(pipe.diffusion))
        sampler.set_timesteps(20)
        labels, w = torch.arange(10), 1.25
        mine, _ = sample(model, sampler, labels, (1, 28, 28), w, torch.Generator().manual_seed(1))
        sched = DDIMScheduler.from_pretrained(tmp / "d" / "scheduler")
        sched.set_timesteps(20)
        xt = torch.randn((10, 1, 28, 28), generator=torch.Generator().manual_seed(1))
        ctx = model.context(torch.cat([labels, torch.full_like(labels, NULL_LABEL)])).detach()
        for step in sched.timesteps:
            with torch.no_grad():
                c, u = dunet(torch.cat([xt, xt]), step, encoder_hidden_states=ctx,
                             class_labels=ctx.mean(1)).sample.chunk(2)
            xt = sched.step(u + w * (c - u), step, xt).prev_sample
        pix = ((mine.clamp(-1, 1) - xt.clamp(-1, 1)).abs().max() / 2).item()
        rows.append(("DDIM 20 + guidance 1.25 loop, [0, 1] pixels", pix))

        bold = read_adapter(shipped_adapters()["bold-pixel"])
        path = write_lora(bold, "diffusers", tmp / "dl")
        dunet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name="bold")
        load_adapter(model, bold, name="bold", weight=1.0)  # the shipped bold-pixel, named "bold" here
        for weight in (1.0, 0.5):
            set_adapter_weight(model, "bold", weight)
            dunet.set_adapters(["bold"], weights=[weight])
            rows.append((f"bold, diffusers LoRA, weight {weight:g}", gap(dunet)))
        kpath = write_lora(bold, "kohya", tmp / "kl", title="bold")
        state, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(kpath)))
        kunet = UNet2DConditionModel.from_pretrained(tmp / "d" / "unet").eval()
        kunet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="bold")
        set_adapter_weight(model, "bold", 1.0)
        rows.append(("bold, kohya file via diffusers' converter, weight 1 (class_embedding LoRA dropped)",
                     (ours() - theirs(kunet)).abs().max().item()))
        partial = Pipeline.load("pixel-base")  # bold minus its context_pool (= class_embedding) module
        cut = {k: v for k, v in bold.tensors.items() if not k.startswith("context_pool.")}
        load_adapter(partial.unet, replace(bold, tensors=cut), name="bold")
        with torch.no_grad():
            c = model.context(y)
            rest = partial.unet(x, t, y) - kunet(x, t, encoder_hidden_states=c, class_labels=c.mean(1)).sample
        rows.append(("the same vs ours without that module's LoRA", rest.abs().max().item()))
        merge_lora(model)
        dunet.set_adapters(["bold"], weights=[1.0])
        dunet.fuse_lora(lora_scale=1.0)
        rows.append(("bold fused (ours merged, diffusers fuse_lora)", gap(dunet)))

    fresh = Pipeline.load("pixel-base").unet.eval()
    with torch.no_grad():
        a = fresh(x, t, y)
        for m in fresh.modules():
            if isinstance(m, TransformerBlock):
                m.norm.eps = 1e-5
        b = fresh(x, t, y)
    rows.append((f"Transformer GroupNorm eps 1e-6 vs 1e-5 (eps output; max |eps| {a.abs().max():.1f})",
                 (a - b).abs().max().item()))
    print("| check | max abs difference |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value:.1e} |")


if __name__ == "__main__":
    main()
