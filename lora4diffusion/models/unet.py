"""A small Stable-Diffusion-style denoising UNet, written from scratch.

Shape of the network (as in SD's UNet2DConditionModel, miniaturised):
    conv_in -> [ResBlock (+ Transformer)] x n per level, stride-2 downsample between levels
            -> mid: ResBlock, Transformer, ResBlock
            -> mirrored up path with skip concatenation, nearest upsample + conv
            -> GroupNorm, SiLU, conv_out (predicts the noise eps)
A Transformer block is SD's: GroupNorm, proj_in, [self-attention, cross-attention to the label context,
GEGLU feed-forward] each pre-LayerNorm with a residual, proj_out, residual.

Conditioning (`UNetConfig.conditioning`):
- "label" (the reference's design, the shipped label base): a label (0..9, or NULL_LABEL=10 for
  classifier-free guidance) becomes a *sequence* of `context_tokens` learned vectors. Several tokens matter:
  with a single key, softmax over keys is identically 1, so to_q/to_k get exactly zero gradient (the
  reference's bug). The context's mean is also added to the timestep embedding, as SDXL adds its pooled text
  embedding.
- "text" (SD 1.x): the third argument of forward is the context itself, a text encoder's last hidden state
  [B, L, context_dim]; the UNet has no label table and adds NOTHING to the timestep embedding, exactly as SD
  1.x's UNet, so diffusers' StableDiffusionPipeline (which passes no class_labels) computes the same thing.

The attention projections are named to_q, to_k, to_v, to_out as in SD/diffusers so LoRA targets read the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.schema import integer, number, shown

NULL_LABEL = 10  # the learned "no condition" context used for classifier-free guidance
CONDITIONINGS = ("label", "text")


@dataclass
class UNetConfig:
    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (1, 2)  # levels (0 = full resolution) that get Transformer blocks
    head_dim: int = 16
    context_tokens: int = 4
    context_dim: int = 64
    num_classes: int = 10
    groups: int = 8
    dropout: float = 0.0
    conditioning: str = "label"  # "label": learned label context tokens | "text": a text encoder's states

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Types and ranges of every field, so a config.json from elsewhere (a string channel count,
        ``groups`` 0, ``head_dim`` 0) is one UserError here, not a traceback deep inside torch. The upper
        bounds are far above any MNIST-sized model and keep a hostile config from allocating terabytes."""
        for name in ("channel_mults", "attn_levels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise UserError(f"UNet config {name} must be a list of integers, got {shown(value)}")
            setattr(self, name, tuple(value))
        integer(len(self.channel_mults), "UNet config: number of channel_mults levels", 1, 8)
        for m in self.channel_mults:
            integer(m, "UNet config channel_mults entry", 1, 64)
        for level in self.attn_levels:
            integer(level, "UNet config attn_levels entry", 0, len(self.channel_mults) - 1)
        integer(self.image_size, "UNet config image_size", -(2**63), 2**63)  # the type; the range below
        integer(self.in_channels, "UNet config in_channels", 1, 64)
        integer(self.base_channels, "UNet config base_channels", 1, 2048)
        integer(self.num_res_blocks, "UNet config num_res_blocks", 1, 32)
        integer(self.head_dim, "UNet config head_dim", 1, 4096)
        integer(self.context_tokens, "UNet config context_tokens", 1, 1024)
        integer(self.context_dim, "UNet config context_dim", 1, 4096)
        integer(self.num_classes, "UNet config num_classes", 1, 100_000)
        integer(self.groups, "UNet config groups", 1, 2048)
        number(self.dropout, "UNet config dropout", 0.0, 1.0)
        factor = 2 ** (len(self.channel_mults) - 1)
        if not 8 <= self.image_size <= 2048:
            raise UserError(f"image size {self.image_size} must be 8..2048 pixels and divisible by {factor}")
        if self.image_size % factor:
            raise UserError(
                f"image size {self.image_size} is not divisible by {factor}, the UNet's total downsampling"
            )
        if self.context_tokens < 2:
            raise UserError("context_tokens must be >= 2 (one key makes softmax constant: q/k learn nothing)")
        if self.conditioning not in CONDITIONINGS:
            raise UserError(
                f"UNet conditioning {self.conditioning!r} is not one of {', '.join(CONDITIONINGS)}"
            )
        for ch in {self.base_channels * m for m in self.channel_mults}:
            if ch % self.groups:
                raise UserError(f"UNet config: groups {self.groups} does not divide the channel count {ch}")
        # Transformer blocks sit at attn_levels and in the middle (the last level): heads must split them
        for ch in {self.base_channels * self.channel_mults[lv] for lv in (*self.attn_levels, -1)}:
            heads = max(1, ch // self.head_dim)
            if ch % heads:
                raise UserError(f"UNet config: head_dim {self.head_dim} splits {ch} channels unevenly")

    def to_dict(self) -> dict:
        # "label" is the implicit default: left out, so every label model's config.json and base fingerprint
        # (which hashes this dict; adapters record it) stay exactly what they were before text mode existed.
        d = asdict(self)
        if d["conditioning"] == "label":
            del d["conditioning"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown UNet config keys: {shown(sorted(unknown), 80)}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer) timesteps, as in the Transformer / DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep(+pooled context) embedding added in between."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None, else cross-attention to the context."""

    def __init__(self, dim: int, context_dim: int | None, head_dim: int):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        h = self.heads
        q, k, v = (z.reshape(b, -1, h, d // h).transpose(1, 2) for z in (q, k, v))
        # Plain matmul-softmax: on this CPU its backward is faster than F.scaled_dot_product_attention's
        # (benchmarks/RESULTS.md). Softmax in fp32 keeps bf16 autocast from saturating.
        w = (q @ k.transpose(-1, -2)) * (d // h) ** -0.5
        w = w.float().softmax(dim=-1).to(v.dtype)
        out = (w @ v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    """SD's spatial transformer with one BasicTransformerBlock: self-attn, cross-attn, feed-forward."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, groups: int):
        super().__init__()
        # eps 1e-6, as SD's SpatialTransformer and diffusers' Transformer2DModel (which hard-codes it), so the
        # diffusers export computes the same function without patching (docs/INTEROP.md); ResBlocks keep 1e-5.
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(GEGLU(dim, 4 * dim), nn.Linear(4 * dim, dim))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C] tokens
        h = self.proj_in(h)
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        h = self.proj_out(h).transpose(1, 2).reshape(b, c, hh, ww)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One ResBlock, optionally followed by a Transformer block."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, emb_dim: int, attn: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, cfg.groups, cfg.dropout)
        self.attn = TransformerBlock(cout, cfg.context_dim, cfg.head_dim, cfg.groups) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x, context) if self.attn is not None else x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig()
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.conditioning == "label":
            # One row per label (+ the null label); each row is `context_tokens` tokens of `context_dim`.
            self.label_context = nn.Embedding(cfg.num_classes + 1, cfg.context_tokens * cfg.context_dim)
            nn.init.normal_(self.label_context.weight, std=1.0)
            self.context_pool = nn.Linear(cfg.context_dim, emb_dim)
        # "text": no label table and no pooled projection (SD 1.x); the context comes from the text encoder.
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        chans = [ch * m for m in cfg.channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, cout in enumerate(chans):
            stages = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stages.append(Stage(cur, cout, cfg, emb_dim, level in cfg.attn_levels))
                cur = cout
                skips.append(cur)
            self.down.append(stages)
            last = level == len(chans) - 1
            self.downsample.append(nn.Identity() if last else Downsample(cur))
            if not last:
                skips.append(cur)

        self.mid_res1 = ResBlock(cur, cur, emb_dim, cfg.groups, cfg.dropout)
        self.mid_attn = TransformerBlock(cur, cfg.context_dim, cfg.head_dim, cfg.groups)
        self.mid_res2 = ResBlock(cur, cur, emb_dim, cfg.groups, cfg.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(chans))):
            stages = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stages.append(Stage(cur + skips.pop(), chans[level], cfg, emb_dim, level in cfg.attn_levels))
                cur = chans[level]
            self.up.append(stages)
            self.upsample.append(Upsample(cur) if level > 0 else nn.Identity())

        self.norm_out = nn.GroupNorm(cfg.groups, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        # Zero-init the output so training starts from eps_pred = 0 (as diffusers/ADM do).
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """Label ids (NULL_LABEL for unconditional) -> context tokens [B, context_tokens, context_dim]."""
        if self.cfg.conditioning != "label":
            raise UserError("this UNet is prompt-conditioned: it takes a text context, not digit labels")
        return self.label_context(labels).view(-1, self.cfg.context_tokens, self.cfg.context_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps prediction. ``cond``: label ids [B] ("label" mode) or a text context [B, L, context_dim]."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        if self.cfg.conditioning == "label":
            context = self.context(cond)
            emb = emb + self.context_pool(context.mean(dim=1))
        else:
            if cond.dim() != 3 or cond.shape[-1] != self.cfg.context_dim or not cond.is_floating_point():
                raise UserError(
                    f"a prompt-conditioned UNet takes a text context [batch, tokens, {self.cfg.context_dim}],"
                    f" got {tuple(cond.shape)} {cond.dtype} (digit labels are for label models)"
                )
            context = cond

        h = self.conv_in(x)
        hs = [h]
        for stages, down in zip(self.down, self.downsample, strict=True):
            for stage in stages:
                h = stage(h, emb, context)
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context), emb)

        for stages, up in zip(self.up, self.upsample, strict=True):
            for stage in stages:
                h = stage(torch.cat([h, hs.pop()], dim=1), emb, context)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["CONDITIONINGS", "NULL_LABEL", "UNetConfig", "UNet", "count_parameters", "timestep_embedding"]
