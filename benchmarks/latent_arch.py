"""Which latent UNet can be >= 4x faster than the pixel base: inference cost of candidate layouts, measured.

    python benchmarks/latent_arch.py [--steps 10]     # 2 threads, bf16 autocast, each at its default batch

For each UNet (random weights: cost does not depend on them): parameters, GFLOP per forward at batch 1
(torch.utils.flop_counter), the median milliseconds of one forward of a sampling batch under bf16 autocast
(Pipeline's default batch x 2 rows for guidance: 100 rows for the pixel model, 500 for latent ones), and the
implied seconds per 100 digits at DDIM --steps (default the pipeline's; 2 x steps forwards per digit with
guidance, + the VAE decode for latent models, measured on the shipped VAE in fp32 and bf16). Prints a
Markdown table.
"""

from __future__ import annotations

import argparse

import torch
from bench import _median_time  # this folder's script
from torch.utils.flop_counter import FlopCounterMode

from lora4diffusion.diffusion import DEFAULT_STEPS
from lora4diffusion.distributed import keep_freed_memory
from lora4diffusion.folders.vae import load_vae
from lora4diffusion.latents import decode_latents
from lora4diffusion.models.unet import UNet, UNetConfig, count_parameters
from lora4diffusion.pipeline import LATENT_BATCH, PIXEL_BATCH

PIXEL = dict(image_size=28, in_channels=1, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1)
LATENT = dict(image_size=8, in_channels=4, num_res_blocks=1, conditioning="text")
CANDIDATES = {
    "pixel base (28x28, ch 32-64-64, attention 7x7 + mid)": UNetConfig(**PIXEL, attn_levels=(2,)),
    "latent fast (ch 32-64, attention 8x8, 4x4 + mid)": UNetConfig(
        **LATENT, base_channels=32, channel_mults=(1, 2), attn_levels=(0, 1)
    ),
    "latent ch 48-96, attention 8x8, 4x4 + mid (base until 2026-11-29)": UNetConfig(
        **LATENT, base_channels=48, channel_mults=(1, 2), attn_levels=(0, 1)
    ),
    "latent ch 48-96, attention 4x4 + mid": UNetConfig(
        **LATENT, base_channels=48, channel_mults=(1, 2), attn_levels=(1,)
    ),
    "latent ch 40-80, attention 4x4 + mid": UNetConfig(
        **LATENT, base_channels=40, channel_mults=(1, 2), attn_levels=(1,)
    ),
    "latent ch 48-96, attention mid only": UNetConfig(
        **LATENT, base_channels=48, channel_mults=(1, 2), attn_levels=()
    ),
    "latent ch 32-64, attention 4x4 + mid": UNetConfig(
        **LATENT, base_channels=32, channel_mults=(1, 2), attn_levels=(1,)
    ),
    "latent ch 32-64-64 (8x8, 4x4, 2x2), attention 4x4, 2x2 + mid (base)": UNetConfig(
        **LATENT, base_channels=32, channel_mults=(1, 2, 2), attn_levels=(1, 2)
    ),
}


def _inputs(cfg: UNetConfig, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.full((rows,), 500)
    if cfg.conditioning == "text":
        return x, t, torch.randn(rows, 16, cfg.context_dim)  # the text encoder's 16 x 64 states
    return x, t, torch.zeros(rows, dtype=torch.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, help="rows per forward (default: 2 x the Pipeline's batch)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps per digit")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI does: the pixel model's large activations page-fault without it
    torch.manual_seed(0)
    vae, _ = load_vae(None)  # the shipped VAE
    z = torch.randn(args.rows or 2 * LATENT_BATCH, vae.cfg.latent_channels, 8, 8)
    decode_ms = {}
    with torch.no_grad():
        for bf16 in (False, True):
            decode_ms[bf16] = 1000 * _median_time(lambda b=bf16: decode_latents(vae, z, bf16=b), args.repeats)
    print(f"VAE decode of {len(z)} latents: fp32 {decode_ms[False]:.1f} ms, bf16 {decode_ms[True]:.1f} ms\n")
    print("| UNet | params | GFLOP/fwd | rows | ms per forward (bf16) | s per 100 digits (decode incl.) |")
    print("|---|---|---|---|---|---|")
    for name, cfg in CANDIDATES.items():
        model = UNet(cfg).eval()
        x, t, c = _inputs(cfg, 1)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, c)
        rows = args.rows or 2 * (LATENT_BATCH if cfg.in_channels == 4 else PIXEL_BATCH)
        x, t, c = _inputs(cfg, rows)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ms = 1000 * _median_time(lambda m=model, a=(x, t, c): m(*a), args.repeats, warmup=3)
        per_100 = 2 * args.steps * 100 / rows  # forwards of `rows` rows per 100 digits (guidance doubles)
        decode = decode_ms[True] * 100 / len(z) if cfg.in_channels == 4 else 0.0
        seconds = (per_100 * ms + decode) / 1000
        print(f"| {name} | {count_parameters(model) / 1e6:.2f} M | {counter.get_total_flops() / 1e9:.3f} |"
              f" {rows} | {ms:.1f} | {seconds:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
