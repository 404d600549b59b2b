"""CPU benchmark: training and sampling throughput, FLOPs, achieved GFLOP/s against a measured GEMM peak,
peak memory, and LoRA against full fine-tuning. Prints a Markdown table; timings are medians.

    python benchmarks/bench.py                 # everything, default architecture (the `fast`/`base` preset)
    python benchmarks/bench.py --only core     # or: gemm, core, attention, lora

Each measurement runs in its own subprocess so its peak RSS (ru_maxrss) is its own. Not a test: numbers depend
on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- measurements (each runs in a child process) -----
def m_gemm(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        t = _median_time(lambda a=a, b=b: a @ b, repeats=20, warmup=3)
        out[str(dtype).split(".")[-1]] = 2 * 1024**3 / t / 1e9
    return {"gemm_gflops": out}


def _model():
    import torch

    from lora4diffusion.models.unet import UNet
    from lora4diffusion.training.base import presets

    torch.manual_seed(0)
    cfg = presets()["base"][0]
    return UNet(cfg), cfg


def m_flops() -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lora4diffusion.models.unet import count_parameters

    model, cfg = _model()
    x = torch.randn(1, 1, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as fc:
        model(x, torch.tensor([500]), torch.tensor([3]))
    return {
        "params": count_parameters(model),
        "gflop_per_forward": fc.get_total_flops() / 1e9,
        "image_size": cfg.image_size,
    }


def _train_step(model, cfg, batch: int, bf16: bool, channels_last: bool):
    """One optimiser step on a fixed random batch, set up as training.loop.Trainer does (AdamW on what
    trains)."""
    import torch

    from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    sched = NoiseSchedule(DiffusionConfig())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    x0 = torch.randn(batch, 1, cfg.image_size, cfg.image_size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = sched.training_loss(model, x0, y, p_uncond=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def m_train(threads: int, bf16: bool, batch: int = 128, steps: int = 6, channels_last: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, cfg = _model()
    t = _median_time(_train_step(model, cfg, batch, bf16, channels_last), repeats=steps, warmup=2)
    return {"train_images_per_s": batch / t, "peak_rss_mb": _rss_mb()}


def m_sample(threads: int, bf16: bool, steps: int, guidance: float) -> dict:
    """100 digits through Pipeline.generate, as `sample` runs them (its batch size, glibc setting)."""
    import torch

    from lora4diffusion.diffusion import DiffusionConfig
    from lora4diffusion.distributed import keep_freed_memory
    from lora4diffusion.pipeline import Pipeline

    torch.set_num_threads(threads)
    keep_freed_memory()
    model, _ = _model()
    pipe = Pipeline(model, DiffusionConfig(), {})
    labels = [d % 10 for d in range(100)]

    def run():
        pipe.generate(labels, steps=steps, guidance=guidance, bf16=bf16)

    t = _median_time(run, repeats=3, warmup=0)  # 100 x steps forwards per run: long enough to need no warm-up
    return {"sample_s_per_100": t, "peak_rss_mb": _rss_mb()}


def m_attention(threads: int) -> dict:
    """Plain matmul-softmax attention vs F.scaled_dot_product_attention, forward+backward, bf16 autocast."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = {}
    for tokens in (49, 196):
        q, k, v = (torch.randn(128, 4, tokens, 16, requires_grad=True) for _ in range(3))

        def plain(q=q, k=k, v=v):
            w = (q @ k.transpose(-1, -2)) * 0.25
            (w.float().softmax(-1).to(v.dtype) @ v).sum().backward()

        def sdpa(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        for name, fn in (("plain", plain), ("sdpa", sdpa)):
            with torch.autocast("cpu", torch.bfloat16):
                out[f"{name}_{tokens}_ms"] = 1e3 * _median_time(fn, repeats=7, warmup=2)
    return {"attention": out}


def m_lora(threads: int, targets: str, rank: int, full: bool, batch: int = 64) -> dict:
    import torch

    from lora4diffusion.lora.layers import inject_lora, lora_summary

    torch.set_num_threads(threads)
    model, cfg = _model()
    base_params = sum(p.numel() for p in model.parameters())
    if full:
        trainable = base_params
    else:
        inject_lora(model, targets, rank, float(rank))
        trainable = lora_summary(model)["lora_params"]
    t = _median_time(_train_step(model, cfg, batch, True, False), repeats=6, warmup=2)
    return {
        "step_s": t,
        "trainable": trainable,
        "share": trainable / base_params,
        "file_bytes": 4 * trainable,
        "base_file_bytes": 4 * base_params,
        "peak_rss_mb": _rss_mb(),
    }


def _child(name: str, **kw) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import bench; "
        f"print(json.dumps(bench.m_{name}(**{kw!r})))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the pipeline default)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--only", choices=["gemm", "core", "attention", "lora"])
    args = ap.parse_args()
    from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS

    steps = args.steps or DEFAULT_STEPS
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    th = args.threads
    print(f"machine: {platform.machine()}, {th} threads, python {platform.python_version()}")

    def want(section: str) -> bool:
        return args.only in (None, section)

    gemm = _child("gemm", threads=th)["gemm_gflops"] if want("gemm") or want("core") else None
    if gemm:
        print("\n| GEMM 1024^3 | GFLOP/s |\n|---|---|")
        print(f"| fp32 | {gemm['float32']:.0f} |\n| bf16 | {gemm['bfloat16']:.0f} |")
    if want("core"):
        fl = _child("flops")
        print(
            f"\nmodel: {fl['params'] / 1e6:.2f} M parameters, {fl['gflop_per_forward']:.3f} GFLOP per"
            f" forward at {fl['image_size']}x{fl['image_size']}"
        )
        print("\n| measurement | value | achieved GFLOP/s | share of GEMM peak | peak RSS MB |")
        print("|---|---|---|---|---|")
        for bf16, cl in ((False, False), (True, False), (True, True)):
            r = _child("train", threads=th, bf16=bf16, channels_last=cl)
            dt = "bfloat16" if bf16 else "float32"
            gf = 3 * fl["gflop_per_forward"] * r["train_images_per_s"]  # backward ~ 2x forward
            what = ("bf16 autocast" if bf16 else "fp32") + (", channels_last" if cl else "")
            print(
                f"| train images/s ({what}) | {r['train_images_per_s']:.0f} | "
                f"{gf:.0f} | {100 * gf / gemm[dt]:.0f}% of {dt} | {r['peak_rss_mb']:.0f} |"
            )
        for bf16 in (False, True):
            r = _child("sample", threads=th, bf16=bf16, steps=steps, guidance=guidance)
            fwd = 100 * steps * (1 if guidance == 1 else 2)
            dt = "bfloat16" if bf16 else "float32"
            gf = fl["gflop_per_forward"] * fwd / r["sample_s_per_100"]
            print(
                f"| sample s / 100 digits (DDIM {steps}, w={guidance}, {'bf16' if bf16 else 'fp32'}) | "
                f"{r['sample_s_per_100']:.1f} | {gf:.0f} | {100 * gf / gemm[dt]:.0f}% of {dt} | "
                f"{r['peak_rss_mb']:.0f} |"
            )
    if want("attention"):
        a = _child("attention", threads=th)["attention"]
        print("\n| attention fwd+bwd, bf16, batch 128 x 4 heads | plain ms | SDPA ms |\n|---|---|---|")
        for tokens in (49, 196):
            print(f"| {tokens} tokens | {a[f'plain_{tokens}_ms']:.1f} | {a[f'sdpa_{tokens}_ms']:.1f} |")
    if want("lora"):
        print(
            "\n| fine-tuning (batch 64, bf16) | trainable params | share | step s | ratio to full | file | "
            "peak RSS MB |\n|---|---|---|---|---|---|---|"
        )
        full = _child("lora", threads=th, targets="", rank=0, full=True)
        rows = [("full fine-tuning", full)]
        for targets, rank in (("all-linear", 4), ("attention", 4), ("reference", 4), ("attention+conv", 4)):
            rows.append(
                (
                    f"LoRA {targets} r={rank}",
                    _child("lora", threads=th, targets=targets, rank=rank, full=False),
                )
            )
        for name, r in rows:
            print(
                f"| {name} | {r['trainable']:,} | {100 * r['share']:.2f}% | {r['step_s']:.3f} | "
                f"{r['step_s'] / full['step_s']:.2f}x | {r['file_bytes'] / 1024:.0f} KiB "
                f"({100 * r['file_bytes'] / r['base_file_bytes']:.1f}% of base) | {r['peak_rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
