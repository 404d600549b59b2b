"""Noise schedule, training loss, DDPM/DDIM samplers and classifier-free guidance, written from the papers.

DDPM = Ho et al. 2020 (eq. 4, 7, 15, Algorithms 1 and 2); DDIM = Song et al. 2021 (eq. 12, 16);
cosine schedule = Nichol & Dhariwal 2021 (eq. 17); CFG = Ho & Salimans 2022 (eq. 6). The training
objective's equations (eps or v targets, min-SNR weights, loss functions, offset noise) are objectives.py's.

As in diffusers, the schedule and the samplers are small objects apart from the network: a sampler is told
its timesteps (``set_timesteps``) and turns (output, t, x_t) into x_prev (``step``). The model convention is
``model(x, t, labels) -> eps`` (or v, for a model whose DiffusionConfig says ``prediction_type``
"v_prediction"); ``labels == NULL_LABEL`` is the learned "no condition" context for CFG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import NULL_LABEL
from lora4diffusion.objectives import (
    HUBER_SCHEDULES,
    LOSSES,
    PREDICTION_TYPES,
    mean_loss,
    offset_noise,
    row_losses,
    velocity,
    x0_and_eps,
)
from lora4diffusion.schema import integer, number, shown, string

# Prompt models sample with SD's "leading" timesteps shifted by steps_offset 1 ((n-1) r + 1, ..., 1):
# diffusers' StableDiffusionPipeline rewrites any other steps_offset to 1 when it loads, so this is what
# makes the exported pipeline (formats/stable_diffusion.py) draw the same images. Pipeline.sampler uses it.
STEPS_OFFSET = 1
# The cheapest DDIM step count that keeps >= 99 % accuracy on both shipped bases and draws clean digits
# (benchmarks/RESULTS.md, "Sampling steps", 1,000 samples, bf16): at 5 the latent prompt base scores 99.6 %
# (FID 0.24; 0.19 at 10 for twice the time) and the pixel base 99.5 %; 3 and 4 still score >= 99 % but the
# pixel base's digits go fuzzy at 3 and keep a faint background grain at 4 (FID 1.1 and 0.52 against 0.40 at
# 5), and 2 breaks both.
# Guidance above ~1.5 over-saturates the pixel model's strokes (its label also enters the timestep embedding).
DEFAULT_STEPS = 5
DEFAULT_GUIDANCE = 1.25

MAX_TIMESTEPS = 100_000  # DDPM uses 1,000; the schedule holds a few float64 tensors of this length

EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class DiffusionConfig:
    """The forward process and the training objective (objectives.py): saved in every model's config.json.

    The fields after ``loss`` are left out of ``to_dict`` while they hold their defaults (DDPM's objective),
    so models and runs from before they existed read and resume unchanged.
    """

    timesteps: int = 1000
    schedule: str = "linear"  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal, s=0.008, betas <= 0.999)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss: str = "mse"  # mse (DDPM's L_simple) | l1 (the reference implementation's) | huber | smooth_l1
    prediction_type: str = "epsilon"  # what the network outputs: "epsilon" or "v_prediction" (Salimans & Ho)
    min_snr_gamma: float = 0.0  # min-SNR-gamma weighting (Hang et al. 2023); 0 = off
    noise_offset: float = 0.0  # offset noise strength S: eps + S * N(0, 1) per image and channel; 0 = off
    huber_c: float = 0.1  # huber / smooth_l1 threshold c (kohya's default)
    huber_schedule: str = "snr"  # c over t: snr (kohya's default) | exponential | constant

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Types and ranges (a config.json from elsewhere may say 1e12 or 999.5 timesteps)."""
        integer(self.timesteps, "diffusion config timesteps", 1, MAX_TIMESTEPS)
        string(self.schedule, "diffusion config schedule", ("linear", "cosine"))
        number(self.beta_start, "diffusion config beta_start", 0.0, 1.0)
        number(self.beta_end, "diffusion config beta_end", 0.0, 1.0)
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise UserError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        string(self.loss, "diffusion config loss", LOSSES)
        string(self.prediction_type, "diffusion config prediction_type", PREDICTION_TYPES)
        number(self.min_snr_gamma, "diffusion config min_snr_gamma", 0.0, 1e6)
        number(self.noise_offset, "diffusion config noise_offset", 0.0, 1.0)
        number(self.huber_c, "diffusion config huber_c", 0.0, 1e3, lo_open=True)
        string(self.huber_schedule, "diffusion config huber_schedule", HUBER_SCHEDULES)

    def to_dict(self) -> dict:
        """The fields, without the objective options added after ``loss`` while they are at their defaults."""
        out = asdict(self)
        for f in fields(self)[OBJECTIVE_SINCE:]:
            if out[f.name] == f.default:
                del out[f.name]
        return out

    def objective(self) -> dict:
        """The training objective's fields (``OBJECTIVE_FIELDS``), what an adapter records of it."""
        return {k: getattr(self, k) for k in OBJECTIVE_FIELDS}

    def loss_options(self) -> dict:
        """The keyword arguments of objectives.row_losses / mean_loss."""
        return {"prediction_type": self.prediction_type, "loss": self.loss, "huber_c": self.huber_c,
                "huber_schedule": self.huber_schedule, "min_snr_gamma": self.min_snr_gamma,
                "timesteps": self.timesteps}

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown diffusion config keys: {shown(sorted(unknown), 80)}")
        return cls(**d)


OBJECTIVE_SINCE = 5  # DiffusionConfig's fields from prediction_type on: written only when not the default
# The training objective's fields of DiffusionConfig (the rest is the forward process).
OBJECTIVE_FIELDS = ("loss", "prediction_type", "min_snr_gamma", "noise_offset", "huber_c", "huber_schedule")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), like diffusers.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


class NoiseSchedule:
    """The fixed forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 0..T-1."""

    def __init__(self, cfg: DiffusionConfig):
        cfg.validate()
        self.cfg, self.T = cfg, cfg.timesteps
        if cfg.schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, self.T, dtype=torch.float64)
        else:
            # abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2); beta_t = 1 - abar_t/abar_{t-1}
            # capped at 0.999 against the singularity at t = T (Nichol & Dhariwal eq. 17, sec. 3.2).
            u = torch.arange(self.T + 1, dtype=torch.float64) / self.T
            f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas = betas.float()
        self.alphas = alphas.float()
        self.alphas_cumprod = abar.float()
        self.alphas_cumprod_prev = abar_prev.float()
        # beta tilde of DDPM eq. 7: the variance of the true posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = (betas * (1 - abar_prev) / (1 - abar)).float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """DDPM eq. 4 in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0: a v_prediction model's target (Salimans & Ho 2022)."""
        return velocity(x0, noise, self.alphas_cumprod.to(x0.device)[t])

    def draw_training_inputs(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                             p_uncond: float = 0.0, device: torch.device | str = "cpu",
                             ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The random part of Algorithm 1 for a batch of ``shape``: (t, eps, label-dropout mask or None).

        Drawn in a fixed order (t, eps, mask, then the offset noise when ``noise_offset`` > 0) from
        ``generator``, so a run is reproducible and a distributed run can draw the whole global batch and
        keep its own rows. With ``noise_offset`` S the eps returned is eps + S n (objectives.offset_noise).
        """
        if not 0.0 <= p_uncond <= 1.0:
            raise UserError(f"p_uncond must be in [0, 1], got {p_uncond}")
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.T, (shape[0],), generator=generator, device=gen_device).to(device)
        noise = _randn(tuple(shape), generator, torch.device(device))
        drop = None
        if p_uncond > 0:
            drop = (torch.rand(shape[0], generator=generator, device=gen_device) < p_uncond).to(device)
        if self.cfg.noise_offset > 0:
            noise = offset_noise(noise, self.cfg.noise_offset, generator)
        return t, noise, drop

    def _output(self, model: EpsModel, x0: Tensor, labels: Tensor, t: Tensor, noise: Tensor,
                drop: Tensor | None) -> Tensor:
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
        return model(self.q_sample(x0, t, noise.to(x0.dtype)), t, labels)

    def loss(self, model: EpsModel, x0: Tensor, labels: Tensor, t: Tensor, noise: Tensor,
             drop: Tensor | None = None) -> Tensor:
        """The training objective (objectives.py: eps or v target, loss function, min-SNR weights) of
        model(x_t, t, label), averaged over the batch; dropped labels become NULL_LABEL so the same network
        also learns the unconditional output that classifier-free guidance needs (Ho & Salimans)."""
        out = self._output(model, x0, labels, t, noise, drop)
        return mean_loss(out, x0, noise, t, self.alphas_cumprod.to(x0.device)[t], **self.cfg.loss_options())

    def row_losses(self, model: EpsModel, x0: Tensor, labels: Tensor, t: Tensor, noise: Tensor,
                   drop: Tensor | None = None) -> Tensor:
        """``loss`` per example, [B] (weighted as ``loss`` weighs them): for batches whose parts are weighed
        differently (prior preservation)."""
        out = self._output(model, x0, labels, t, noise, drop)
        return row_losses(out, x0, noise, t, self.alphas_cumprod.to(x0.device)[t], **self.cfg.loss_options())

    def training_loss(self, model: EpsModel, x0: Tensor, labels: Tensor,
                      generator: torch.Generator | None = None, p_uncond: float = 0.0) -> Tensor:
        """DDPM Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), the loss of model(x_t, t) against its target."""
        t, noise, drop = self.draw_training_inputs(tuple(x0.shape), generator, p_uncond, x0.device)
        return self.loss(model, x0, labels, t, noise, drop)


class _Sampler:
    """Shared timestep bookkeeping: which timesteps to visit and, for each, the one that follows it."""

    def __init__(self, schedule: NoiseSchedule, clip_sample: bool, spacing: str, steps_offset: int = 0):
        if spacing not in ("leading", "trailing"):
            raise UserError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
        if steps_offset not in (0, 1):
            raise UserError(f"steps_offset must be 0 or 1, got {steps_offset!r}")
        self.schedule, self.clip_sample, self.spacing = schedule, clip_sample, spacing
        self.steps_offset = steps_offset
        self.prediction_type = schedule.cfg.prediction_type  # what the model's output is: eps or v
        self.alphas_cumprod = schedule.alphas_cumprod
        self.set_timesteps(schedule.T)

    def set_timesteps(self, num_steps: int | None = None) -> None:
        T = self.schedule.T
        n = T if num_steps is None else int(num_steps)
        if not 1 <= n <= T:
            raise UserError(f"number of sampling steps must be in 1..{T}, got {num_steps}")
        if self.spacing == "leading":  # (n-1) r, ..., r, 0 with r = T // n, plus steps_offset (diffusers')
            r = T // n
            # SD's schedulers use steps_offset 1 ((n-1) r + 1, ..., 1) and StableDiffusionPipeline forces it,
            # so prompt models sample with it. With all T steps there is no room to shift (t = T does not
            # exist; diffusers would index past its table): every timestep T-1..0 is visited, unshifted.
            offset = self.steps_offset if (n - 1) * r + self.steps_offset < T else 0
            self.timesteps = (torch.arange(n) * r).flip(0) + offset
        else:  # T-1, ...: always starts from the noisiest step (Lin et al. 2023, Table 2)
            self.timesteps = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round().long() - 1
        self.num_steps = n
        nxt = self.timesteps.tolist()[1:] + [-1]
        self._prev = dict(zip(self.timesteps.tolist(), nxt, strict=True))

    def _alphas(self, t: int) -> tuple[Tensor, Tensor]:
        """abar_t and abar_prev for the kept step after t; the last step goes to abar = 1 (clean data)."""
        if t not in self._prev:
            raise UserError(f"timestep {t} is not in this sampler's schedule; call set_timesteps first")
        prev = self._prev[t]
        return self.alphas_cumprod[t], self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)

    def predict_x0(self, output: Tensor, t: int, x: Tensor) -> Tensor:
        """The model's current guess of the clean image (DDPM eq. 15, or from v): a live preview shows it."""
        return self._x0_eps(output.float(), self._alphas(int(t))[0], x)[0]

    def variance(self, t: int) -> Tensor:
        """beta tilde (DDPM eq. 7) from t to the next kept step; posterior_variance[t] when all T are kept."""
        abar_t, abar_prev = self._alphas(int(t))
        return (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)

    def _x0_eps(self, output: Tensor, abar_t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        # The model's output (eps or v) as (x0, eps) (objectives.x0_and_eps); x0 clipped to the data range
        # [-1, 1] = diffusers' clip_sample=True default; eps is not recomputed from the clipped x0 (diffusers'
        # use_clipped_model_output=False).
        x0, eps = x0_and_eps(self.prediction_type, output, x, abar_t)
        return (x0.clamp(-1, 1) if self.clip_sample else x0), eps


class DDPMSampler(_Sampler):
    """Ancestral sampling, DDPM Algorithm 2; with fewer steps, the same posterior between the kept steps."""

    def __init__(self, schedule: NoiseSchedule, clip_sample: bool = True, spacing: str = "leading",
                 steps_offset: int = 0):
        super().__init__(schedule, clip_sample, spacing, steps_offset)

    def step(self, output: Tensor, t: int, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t -> x_prev from the model's output at (x_t, t): eps, or v for a v_prediction model."""
        t = int(t)
        abar_t, abar_prev = self._alphas(t)
        alpha_t = abar_t / abar_prev  # = alphas[t] for consecutive steps, the strided alpha otherwise
        x0, _ = self._x0_eps(output.float(), abar_t, x)
        # Posterior mean mu~(x_t, x0) of DDPM eq. 7; unclipped, it is algebraically Algorithm 2's mean. The
        # float32 ratios above are diffusers' arithmetic (matched to 1e-6); they cost ~1e-4 near t = 0.
        c0 = abar_prev.sqrt() * (1 - alpha_t) / (1 - abar_t)
        ct = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
        mean = c0 * x0 + ct * x
        if self._prev[t] < 0:  # Algorithm 2: z = 0 at the last step
            return mean
        var = self.variance(t).clamp(min=1e-20)
        return mean + var.sqrt() * _randn(tuple(x.shape), generator, x.device)


class DDIMSampler(_Sampler):
    """DDIM (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 has DDPM's posterior variance (eq. 16)."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0, clip_sample: bool = True,
                 spacing: str = "leading", steps_offset: int = 0):
        # Song et al. eq. 16: eta 0 is deterministic, 1 is DDPM's posterior variance; past 1 the
        # "direction to x_t" term takes the square root of a negative number (NaN images), so it is refused
        # here, whoever asks (a flag, a sampling record, the Python API).
        self.eta = number(eta, "eta (DDIM's noise: 0 deterministic, 1 DDPM's variance)", 0.0, 1.0)
        super().__init__(schedule, clip_sample, spacing, steps_offset)

    def step(self, output: Tensor, t: int, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t -> x_prev from the model's output at (x_t, t): eps, or v for a v_prediction model."""
        t = int(t)
        abar_t, abar_prev = self._alphas(t)
        x0, eps = self._x0_eps(output.float(), abar_t, x)
        sigma = self.eta * self.variance(t).sqrt()  # eq. 16
        # eq. 12: sqrt(abar_prev) * "predicted x0" + "direction pointing to x_t" + sigma * noise.
        x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps
        if self.eta > 0:  # draw even when sigma = 0 (last step) so the RNG stream matches diffusers
            x_prev = x_prev + sigma * _randn(tuple(x.shape), generator, x.device)
        return x_prev


def guided_eps(model: EpsModel, x: Tensor, t: Tensor, labels: Tensor, guidance: float,
               uncond: Tensor | None = None) -> Tensor:
    """Classifier-free guidance, eps_u + w (eps_c - eps_u), in float32 (Ho & Salimans eq. 6 with their w + 1).

    The same mix of a v model's outputs is the same mix of its eps (eps is affine in v at fixed x_t, t, and
    the weights sum to 1), so guidance applies to whatever the model outputs, as in diffusers.

    ``labels``: the condition, label ids [B] or (prompt models) text contexts [B, L, D]. ``uncond``: what
    eps_u is conditioned on; None = the null label (label models). A prompt model passes the empty prompt's
    context, or a negative prompt's, which then replaces the empty one, as in SD.
    w = 1 is the plain conditional model and w = 0 the unconditional one, one forward of size B each;
    any other w runs conditional and unconditional as one batch of size 2B.
    """
    if guidance < 0:
        raise UserError(f"guidance must be >= 0, got {guidance}")
    if guidance == 1.0:
        return model(x, t, labels).float()
    null = torch.full_like(labels, NULL_LABEL) if uncond is None else uncond
    if guidance == 0.0:
        return model(x, t, null).float()
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample(model: EpsModel, sampler: DDPMSampler | DDIMSampler, labels: Tensor, shape: tuple[int, int, int],
           guidance: float = 1.0, generator: torch.Generator | None = None, trajectory_every: int = 0,
           progress: bool = False, clip: bool = True, uncond: Tensor | None = None,
           callback: Callable[[int, int, Tensor], None] | None = None,
           x_T: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Run ``sampler.timesteps`` from x_T ~ N(0, I) (drawn from ``generator``, or the ``x_T`` [B, *shape]
    given); returns (x0 in [-1, 1], [B, *shape] float32, trajectory).

    ``clip`` False (latent models: latents have no [-1, 1] range) returns the last x unclamped.
    ``labels``: label ids [B]; or, with ``uncond`` (prompt models), the prompts' text contexts [B, L, D] and
    ``uncond`` the empty / negative prompts' contexts of the same shape (see ``guided_eps``).

    The trajectory holds x (on the CPU) after every ``trajectory_every``-th step, plus the final x0; [] if 0.
    ``callback(step, steps, x0_hat)`` is called after each step's model call with the predicted clean image
    (for live previews); it does not change the result.
    """
    if guidance < 0:
        raise UserError(f"guidance must be >= 0, got {guidance}")
    if trajectory_every < 0:
        raise UserError(f"trajectory_every must be >= 0, got {trajectory_every}")
    if uncond is not None:
        if labels.dim() != 3 or uncond.shape != labels.shape:
            raise UserError(f"text contexts must be [B, L, D] for both the prompts and the unconditional"
                            f" branch, got {tuple(labels.shape)} and {tuple(uncond.shape)}")
    elif labels.dim() != 1 or labels.dtype != torch.int64:
        raise UserError(f"labels must be a 1-D int64 tensor, got shape {tuple(labels.shape)} {labels.dtype}")
    device = labels.device
    if x_T is not None and tuple(x_T.shape) != (labels.shape[0], *shape):
        raise UserError(f"initial noise of shape {tuple(x_T.shape)}, expected {(labels.shape[0], *shape)}")
    x = _randn((labels.shape[0], *shape), generator, device) if x_T is None else x_T.to(device, torch.float32)
    trajectory: list[Tensor] = []
    steps = sampler.timesteps.tolist()
    for i, t in enumerate(tqdm(steps, disable=not progress, desc="sampling", leave=False), start=1):
        t_batch = torch.full((labels.shape[0],), t, dtype=torch.int64, device=device)
        eps = guided_eps(model, x, t_batch, labels, guidance, uncond)
        if callback is not None:
            callback(i, len(steps), sampler.predict_x0(eps, t, x))
        x = sampler.step(eps, t, x, generator)
        if i == len(steps) and clip:
            x = x.clamp(-1, 1)  # already in range with clip_sample; guarantees it without
        if trajectory_every and (i % trajectory_every == 0 or i == len(steps)):
            trajectory.append(x.cpu())
    return x, trajectory


__all__ = [
    "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "NULL_LABEL", "STEPS_OFFSET", "DiffusionConfig", "NoiseSchedule",
    "DDPMSampler", "DDIMSampler", "guided_eps", "sample",
]
