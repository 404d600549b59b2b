"""The training objective in one place: what the network predicts, the target it is trained on, the
per-example weight and the loss function, as functions of abar_t (the schedule's ``alphas_cumprod`` at t).

    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                       (DDPM, Ho et al. 2020, eq. 4)
    SNR  = abar_t / (1 - abar_t)                                        (Kingma et al. 2021, eq. 1)
    v    = sqrt(abar_t) eps - sqrt(1 - abar_t) x0                       (Salimans & Ho 2022, sec. 4)

Prediction types (diffusers' ``prediction_type``): an ``epsilon`` model predicts eps, a ``v_prediction`` model
predicts v. Either output gives back the clean image and the noise, which is all a sampler needs:

    epsilon:       x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)     (DDPM eq. 15)
    v_prediction:  x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,   eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t

Min-SNR-gamma weighting (Hang et al. 2023): each example's loss on x0 is weighted by min(SNR, gamma), so
the easy low-noise timesteps stop dominating the gradient. A loss on eps is SNR x the loss on x0 and a loss
on v is (SNR + 1) x it (from the two lines above), hence the weight of an example's eps or v loss:

    epsilon:       w_t = min(SNR, gamma) / SNR
    v_prediction:  w_t = min(SNR, gamma) / (SNR + 1)

(diffusers' train_text_to_image.py ``--snr_gamma`` and kohya's ``--min_snr_gamma``; gamma 5 in the paper.)

Loss functions on d = prediction - target, elementwise, then averaged (kohya-ss/sd-scripts
library/train_util.py ``conditional_loss``):

    mse          d^2                                  (DDPM's L_simple)
    l1           |d|
    huber        2 c (sqrt(d^2 + c^2) - c)            pseudo-Huber: ~ d^2 for |d| << c, ~ 2 c |d| for |d| >> c
    smooth_l1    2 (sqrt(d^2 + c^2) - c)              the same / c: ~ d^2 / c near 0, ~ 2 |d| far

c is ``huber_c`` for every timestep (``constant``), or kohya's schedules over t, both ~1 at t = 0 (little
noise: near quadratic) and falling towards ``huber_c`` at high noise: ``snr`` (kohya's default),
c_t = (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - abar_t) / abar_t); ``exponential``,
c_t = c^(t / T).

Offset noise (Guttenberg 2023; kohya's and diffusers' ``--noise_offset``): the training noise gets one extra
Gaussian value per image and channel, eps' = eps + S n with n ~ N(0, 1) of shape [B, C, 1, 1], so the model
also learns to change an image's mean brightness. The target is eps' itself (for v: v computed from eps').
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSSES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def _column(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] in ``like``'s dtype and device, to broadcast over each example."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def snr(abar: Tensor) -> Tensor:
    """SNR(t) = abar_t / (1 - abar_t), elementwise."""
    return abar / (1 - abar)


def velocity(x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022); ``abar``: one value per example."""
    a = _column(abar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def training_target(prediction_type: str, x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """What the network is trained to output: the noise, or v."""
    return noise if prediction_type == "epsilon" else velocity(x0, noise, abar)


def x0_and_eps(prediction_type: str, output: Tensor, x: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    """The model's output at x_t as (predicted x0, predicted eps); ``abar``: a scalar tensor (a sampler's
    step) or one value per example. The arithmetic is diffusers' (DDIMScheduler.step), to float rounding."""
    a = abar if abar.dim() == 0 else _column(abar, x)
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * output) / a.sqrt(), output
    return a.sqrt() * x - (1 - a).sqrt() * output, a.sqrt() * output + (1 - a).sqrt() * x


def min_snr_weights(abar: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v_prediction), one per example."""
    s = snr(abar.float())
    clipped = s.clamp(max=gamma)
    return clipped / s if prediction_type == "epsilon" else clipped / (s + 1)


def huber_threshold(schedule: str, c: float, t: Tensor, abar: Tensor, timesteps: int) -> Tensor:
    """The Huber / smooth-L1 threshold c_t at each example's timestep (kohya's schedules, module doc)."""
    if schedule == "constant":
        return torch.full(t.shape, c, dtype=torch.float32, device=t.device)
    if schedule == "snr":
        sigma = ((1 - abar.float()) / abar.float()).sqrt()
        return (1 - c) / (1 + sigma) ** 2 + c
    return torch.exp(math.log(c) / timesteps * t.float())  # c^(t / T), as kohya writes it


def elementwise_loss(loss: str, output: Tensor, target: Tensor, c: Tensor | None = None) -> Tensor:
    """The loss of every element (no reduction); ``c``: huber / smooth_l1's threshold, one per example."""
    if loss == "mse":
        return F.mse_loss(output, target, reduction="none")
    if loss == "l1":
        return F.l1_loss(output, target, reduction="none")
    c = _column(c, output)
    root = ((output - target) ** 2 + c**2).sqrt() - c
    return 2 * c * root if loss == "huber" else 2 * root


def row_losses(output: Tensor, x0: Tensor, noise: Tensor, t: Tensor, abar: Tensor, *, prediction_type: str,
               loss: str, huber_c: float, huber_schedule: str, min_snr_gamma: float,
               timesteps: int) -> Tensor:
    """Each example's mean loss against its target, min-SNR-weighted when ``min_snr_gamma`` > 0: [B].

    ``output``: the network's output at x_t; ``x0``, ``noise``: what x_t was made of; ``abar``: abar_t per
    example. Everything is float32 (the output may come from bf16 autocast).
    """
    target = training_target(prediction_type, x0.float(), noise.float(), abar)
    huber = loss in ("huber", "smooth_l1")
    c = huber_threshold(huber_schedule, huber_c, t, abar, timesteps) if huber else None
    rows = elementwise_loss(loss, output.float(), target, c).flatten(1).mean(1)
    if min_snr_gamma > 0:
        rows = rows * min_snr_weights(abar, min_snr_gamma, prediction_type).to(rows.device)
    return rows


def mean_loss(output: Tensor, x0: Tensor, noise: Tensor, t: Tensor, abar: Tensor, **objective) -> Tensor:
    """The batch's loss: the mean of ``row_losses``. DDPM's own objective (epsilon, mse or l1, no weights) is
    computed as it always was, one mean over every element, so default runs train bit for bit as before."""
    plain = (objective["prediction_type"] == "epsilon" and objective["loss"] in ("mse", "l1")
             and objective["min_snr_gamma"] == 0)
    if plain:
        loss_fn = F.mse_loss if objective["loss"] == "mse" else F.l1_loss
        return loss_fn(output.float(), noise.float())
    return row_losses(output, x0, noise, t, abar, **objective).mean()


def offset_noise(noise: Tensor, strength: float, generator: torch.Generator | None) -> Tensor:
    """eps + S n, n ~ N(0, 1) of shape [B, C, 1, 1] (drawn from ``generator``, on its device)."""
    gen_device = generator.device if generator is not None else noise.device
    n = torch.randn((*noise.shape[:2], *([1] * (noise.dim() - 2))), generator=generator, device=gen_device)
    return noise + strength * n.to(noise.device, noise.dtype)


__all__ = [
    "HUBER_SCHEDULES", "LOSSES", "PREDICTION_TYPES", "elementwise_loss", "huber_threshold", "mean_loss",
    "min_snr_weights", "offset_noise", "row_losses", "snr", "training_target", "velocity", "x0_and_eps",
]
