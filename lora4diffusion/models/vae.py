"""Stable Diffusion's KL autoencoder (Rombach et al. 2022, sec. 3 and app. G), miniaturised and from scratch.

Shape of the network (diffusers' ``AutoencoderKL``, whose module names are used here one for one, so a state
dict converts to diffusers by name: see ``formats/diffusers_vae.py``):

    encoder: conv_in -> down_blocks[i]: ResNet blocks x layers_per_block (+ a stride-2 downsampler but in the
             last) -> mid_block: ResNet, self-attention, ResNet -> GroupNorm, SiLU -> conv_out (2 x latent
             channels: the mean and log-variance of q(z | x))
    quant_conv (1x1) on the moments; post_quant_conv (1x1) on z
    decoder: conv_in -> mid_block -> up_blocks[i]: ResNet blocks x (layers_per_block + 1) (+ nearest 2x
             upsample and conv but in the last) -> GroupNorm, SiLU -> conv_out

Every GroupNorm uses eps = 1e-6, as SD's autoencoder (the UNet's 1e-5 would not match diffusers' VAE).
The mid-block attention has one head over all channels (diffusers: ``attention_head_dim = channels``).

The posterior is a diagonal Gaussian N(mean, exp(logvar)) (``DiagonalGaussian``): training decodes a sample
z = mean + std * eps (the reparameterisation trick, Kingma & Welling 2014), caching latents for the diffusion
model takes the mean (``mode()``). The KL term is KL(q(z|x) || N(0, I)) in closed form.

Latent shape. MNIST digits are 28x28 in [-1, 1]; the default pads them with background to 32x32 and halves
twice (three blocks) to a 4 x 8 x 8 latent, SD's 4 channels at f = 4:
* 8x8 is a power of two, so the latent UNet can still halve twice (8 -> 4 -> 2) as the pixel UNet halves
  28 -> 14 -> 7; 28 -> 7x7 (f = 4 without padding) would be odd and leave it one level.
* 64 positions instead of 784: attention and convolution in the UNet run on 12x fewer positions, the point
  of latent diffusion. f = 8 (4x4) leaves a UNet nothing to downsample; f = 2 (16x16) saves only 3x.
* 256 numbers for 784 pixels (3x compression; SD's f = 8, c = 4 is 48x on RGB images, whose pixels are far
  more redundant than a digit's strokes).
``VAEConfig`` can express other choices (``image_size``, the number of blocks, ``latent_channels``); the
measured reconstruction quality is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lora4diffusion.errors import UserError

GN_EPS = 1e-6  # diffusers' AutoencoderKL (and the original LDM autoencoder) use 1e-6 in every GroupNorm


@dataclass
class VAEConfig:
    in_channels: int = 1
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one entry per resolution; len - 1 downsamplers
    layers_per_block: int = 1  # ResNet blocks per encoder block (the decoder has one more, as diffusers)
    norm_num_groups: int = 16
    image_size: int = 32  # inputs are padded with background to this size (28 -> 32: 2 px each side)
    mid_block_add_attention: bool = True
    # z_model = scaling_factor * z: makes the cached latents unit-variance for the diffusion model, as SD's
    # 0.18215. 1.0 until measured by ``measure_scaling_factor`` (train-vae stores it at each checkpoint).
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.validate()

    # Upper bounds far above any MNIST-sized VAE: a config from elsewhere asking for 2**70 ResNet blocks or
    # channels would otherwise build (and allocate) that network before its weights file is looked at.
    LIMITS = {"in_channels": 64, "latent_channels": 64, "layers_per_block": 32, "norm_num_groups": 2048,
              "image_size": 4096, "block_out_channels": 4096}

    def validate(self) -> None:
        for name in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "image_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= self.LIMITS[name]:
                raise UserError(f"VAE config: {name} must be an integer in 1..{self.LIMITS[name]}, got"
                                f" {str(v)[:40]}")
        chans, most = self.block_out_channels, self.LIMITS["block_out_channels"]
        if not 0 < len(chans) <= 8 or any(isinstance(c, bool) or not isinstance(c, int) or not 0 < c <= most
                                          for c in chans):
            raise UserError(f"VAE config: block_out_channels must be 1 to 8 integers in 1..{most}, got"
                            f" {str(chans)[:60]}")
        bad = [c for c in chans if c % self.norm_num_groups]
        if bad:
            raise UserError(
                f"VAE config: channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}"
            )
        if self.image_size % self.factor:
            raise UserError(
                f"VAE config: image_size {self.image_size} is not divisible by {self.factor},"
                " the total downsampling"
            )
        s = self.scaling_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise UserError(f"VAE config: scaling_factor must be a finite number > 0, got {s!r}")
        self.scaling_factor = float(s)

    @property
    def factor(self) -> int:
        """Total downsampling f: image_size / latent_size."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        if not isinstance(d, dict):
            raise UserError(f"VAE config: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"VAE config: unknown field(s) {', '.join(unknown)}")
        if not isinstance(d.get("block_out_channels", []), (list, tuple)):
            raise UserError("VAE config: block_out_channels must be a list of integers")
        return cls(**d)


# ----------------------------------------------------------------------------------------------- blocks


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, plus a (1x1-projected) skip: diffusers' ResnetBlock2D
    without a time embedding (temb_channels=None) and output_scale_factor 1."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=GN_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=GN_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, pre-GroupNorm, with a residual (the VAE's
    mid-block attention; diffusers' Attention with group_norm and residual_connection)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GN_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # to_out.0: diffusers' name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.to_q(seq), self.to_k(seq), self.to_v(seq)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel right and bottom only (diffusers' Downsample2D, padding=0,
    as the LDM autoencoder): 32 -> 16 exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv (diffusers' Upsample2D with use_conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < len(ch) - 1)
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < len(ch) - 1)
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2C moment channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # diffusers' and LDM's clamp: keeps exp() finite early in training
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(
        self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn on the CPU from ``generator`` (or given as ``noise``)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(mean, var) || N(0, I)) per sample, over the latent: 1/2 sum(mu^2 + var - 1 - logvar)."""
        return kl_divergence(self.mean, self.logvar)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample [N]: 1/2 sum over C, H, W of mu^2 + var - 1 - logvar
    (Kingma & Welling 2014, app. B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------- model


class VAE(nn.Module):
    """The KL autoencoder. ``encode`` -> DiagonalGaussian, ``decode`` -> images in [-1, 1] (unclamped)."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or VAEConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        self.quant_conv = nn.Conv2d(2 * self.cfg.latent_channels, 2 * self.cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(self.cfg.latent_channels, self.cfg.latent_channels, 1)

    def _check(self, x: torch.Tensor, channels: int, multiple: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
            raise UserError(
                f"VAE {what}: expected [N, {channels}, H, W] with H, W multiples of {multiple},"
                f" got shape {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x, self.cfg.in_channels, self.cfg.factor, "encode")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.cfg.latent_channels, 1, "decode")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass -> (reconstruction, mean, logvar); decodes mean + std * ``noise`` (the mean if None).

        One forward that returns everything, so DistributedDataParallel sees every parameter used.
        """
        post = self.encode(x)
        z = post.mode() if noise is None else post.sample(noise=noise)
        return self.decode(z), post.mean, post.logvar


# ----------------------------------------------------------------------------------------------- latents


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, h, w] in [-1, 1] -> [N, C, size, size], centred, padded with background (-1)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise UserError(f"images of {h}x{w} are larger than the VAE's {size}x{size} input")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)


def crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pad_to``: the centred h x w window."""
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


@torch.no_grad()
def encode_dataset(vae: VAE, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images [N, C, S, S] in [-1, 1] (S = the VAE's image_size) -> posterior means [N, *latent_shape],
    unscaled, float32 on the CPU. Eval mode, no gradients, in batches of ``batch_size``."""
    want = (vae.cfg.in_channels, vae.cfg.image_size, vae.cfg.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise UserError(f"encode_dataset: expected [N, {want}], got {tuple(images.shape)}")
    was_training, device = vae.training, next(vae.parameters()).device
    vae.eval()
    out = [
        vae.encode(images[i : i + batch_size].to(device)).mode().float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    vae.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, *vae.cfg.latent_shape)


def measure_scaling_factor(latent_means: torch.Tensor) -> float:
    """1 / std of the training latents' means, over every element (Rombach et al. app. G: SD's 0.18215 is
    this number for its autoencoder on its data). Scaled latents have unit variance, which the noise schedule
    assumes of x_0."""
    std = float(latent_means.double().std())
    if not math.isfinite(std) or std <= 0:
        raise UserError(f"cannot measure a scaling factor: latent std is {std}")
    return 1.0 / std
