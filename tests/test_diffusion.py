"""Tests for lora4diffusion.diffusion: closed forms, diffusers as an oracle, analytic samplers, CFG, errors.

diffusers is a declared test dependency (pyproject [test]); it is imported only here, never by the package.
"""

import ast
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

import lora4diffusion
from lora4diffusion.diffusion import (
    NULL_LABEL,
    DDIMSampler,
    DDPMSampler,
    DiffusionConfig,
    NoiseSchedule,
    guided_eps,
    sample,
)
from lora4diffusion.errors import UserError

LINEAR = NoiseSchedule(DiffusionConfig())
COSINE = NoiseSchedule(DiffusionConfig(schedule="cosine"))


def _step_inputs(sched: NoiseSchedule, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A realistic (eps, x_t) pair: x_t really is q(x_t | x0), eps is the true noise plus a model error."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 1, 6, 6, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    x = sched.q_sample(x0, torch.full((3,), t), noise)
    return noise + 0.3 * torch.randn(x0.shape, generator=g), x


def _oracle(cls, sched: NoiseSchedule, exact_alphas: bool, **kw):
    """The diffusers scheduler for our config. With ``exact_alphas`` it is given our float64-accurate
    alphas_cumprod (its own float32 cumprod differs by ~4e-7 relative, amplified up to ~150x by
    1/sqrt(abar_t) near t = T), so that only the step formulas are compared."""
    name = "linear" if sched.cfg.schedule == "linear" else "squaredcos_cap_v2"
    oracle = cls(num_train_timesteps=sched.T, beta_schedule=name, **kw)
    if exact_alphas:
        oracle.alphas_cumprod = sched.alphas_cumprod.clone()
    return oracle


# --- closed forms --------------------------------------------------------------------------------------


def test_linear_schedule_closed_forms():
    s = LINEAR
    assert s.betas.dtype == torch.float32 and s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    torch.testing.assert_close(s.alphas, (1 - b).float())
    torch.testing.assert_close(s.alphas_cumprod, abar.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.alphas_cumprod_prev[0].item() == 1.0
    # DDPM eq. 7: beta tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t, zero at t = 0.
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta_tilde = (1 - abar_prev) / (1 - abar) * b
    torch.testing.assert_close(s.posterior_variance, beta_tilde.float(), rtol=1e-6, atol=0)
    assert s.posterior_variance[0].item() == 0.0


def test_cosine_schedule_matches_formula_and_is_monotone():
    s = COSINE

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor([f((i + 1) / 1000) / f(0) for i in range(1000)], dtype=torch.float64)
    unclipped = s.betas < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the singular last beta is capped
    got = s.alphas_cumprod[unclipped].double()
    torch.testing.assert_close(got, expected[unclipped], rtol=1e-5, atol=1e-9)
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    assert s.betas.max().item() == pytest.approx(0.999)


def test_q_sample_closed_form_and_statistics():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 300)
    noise = torch.randn(x0.shape, generator=g)
    xt = LINEAR.q_sample(x0, t, noise)
    abar = LINEAR.alphas_cumprod[300].item()
    torch.testing.assert_close(xt, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise)
    assert xt.mean().item() == pytest.approx(0.5 * math.sqrt(abar), abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.03)
    # Per-sample timesteps broadcast over the image.
    t_mixed = torch.tensor([0, 999])
    x2 = LINEAR.q_sample(torch.ones(2, 1, 2, 2), t_mixed, torch.zeros(2, 1, 2, 2))
    torch.testing.assert_close(x2[:, 0, 0, 0], LINEAR.alphas_cumprod[t_mixed].sqrt())


def test_training_loss_is_algorithm_1_and_reproducible():
    seen = {}

    def model(x, t, labels):
        seen.update(x=x, t=t, labels=labels)
        return torch.zeros_like(x)

    x0 = torch.rand(4, 1, 5, 5) * 2 - 1
    labels = torch.tensor([0, 3, 7, 9])
    loss = LINEAR.training_loss(model, x0, labels, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the documented draw order: t, then eps
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(seen["t"], t) and torch.equal(seen["labels"], labels)
    torch.testing.assert_close(seen["x"], LINEAR.q_sample(x0, t, noise))
    torch.testing.assert_close(loss, (noise**2).mean())
    again = LINEAR.training_loss(model, x0, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(loss, again)
    l1 = NoiseSchedule(DiffusionConfig(loss="l1"))
    loss_l1 = l1.training_loss(model, x0, labels, torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss_l1, noise.abs().mean())
    LINEAR.training_loss(model, x0, labels, p_uncond=1.0)
    assert (seen["labels"] == NULL_LABEL).all()


def test_training_loss_backpropagates():
    net = nn.Conv2d(1, 1, 3, padding=1)
    loss = LINEAR.training_loss(lambda x, t, y: net(x), torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]))
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


# --- diffusers as the oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_schedule_equals_diffusers(sched):
    oracle = _oracle(DDPMScheduler, sched, exact_alphas=False)
    torch.testing.assert_close(sched.betas, oracle.betas, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sched.alphas_cumprod, oracle.alphas_cumprod, rtol=1e-5, atol=1e-8)
    abar = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    noise = torch.randn_like(abar)
    torch.testing.assert_close(sched.q_sample(abar, t, noise), oracle.add_noise(abar, noise, t))


@pytest.mark.parametrize("num_steps", [None, 50, 7])
def test_ddpm_step_equals_diffusers(num_steps):
    ours, oracle = DDPMSampler(LINEAR), _oracle(DDPMScheduler, LINEAR, exact_alphas=True)
    raw = _oracle(DDPMScheduler, LINEAR, exact_alphas=False)
    if num_steps is not None:
        ours.set_timesteps(num_steps)
        oracle.set_timesteps(num_steps)
        raw.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, oracle.timesteps)
    for t in ours.timesteps.tolist():
        eps, x = _step_inputs(LINEAR, t, seed=t)
        # The same generator seed gives the same variance noise (both draw it after the mean, in float32).
        got = ours.step(eps, t, x, generator=torch.Generator().manual_seed(t))
        want = oracle.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        want_raw = raw.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(got, want_raw, rtol=0, atol=3e-5)
        # (diffusers clamps the variance at 1e-20 where it is 0, i.e. at the last step)
        torch.testing.assert_close(ours.variance(t), oracle._get_variance(t), rtol=1e-6, atol=1e-19)
    if num_steps is None:  # all T steps: Algorithm 2's sigma_t^2 = beta tilde_t (up to float32 ratios)
        variances = torch.stack([ours.variance(t) for t in range(1000)])
        torch.testing.assert_close(variances, LINEAR.posterior_variance, rtol=1e-3, atol=1e-12)


def test_ddpm_all_steps_is_algorithm_2():
    """Unclipped, a full-schedule step is Algorithm 2 line 4, here evaluated in float64 from the betas."""
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    ours = DDPMSampler(LINEAR, clip_sample=False)
    for t in [999, 500, 100, 10, 2, 1, 0]:
        eps, x = _step_inputs(LINEAR, t, seed=t)
        got = ours.step(eps, t, x, generator=torch.Generator().manual_seed(t))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t)).double() if t > 0 else 0.0
        sigma = LINEAR.posterior_variance[t].double().sqrt()
        want = (x.double() - b[t] / (1 - abar[t]).sqrt() * eps.double()) / (1 - b[t]).sqrt() + sigma * z
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4)


def test_ddpm_last_step_adds_no_noise():
    eps, x = _step_inputs(LINEAR, 0)
    a = DDPMSampler(LINEAR).step(eps, 0, x, generator=torch.Generator().manual_seed(1))
    b = DDPMSampler(LINEAR).step(eps, 0, x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 3, 7, 50, 999, 1000])
def test_ddim_timesteps_equal_diffusers(spacing, num_steps):
    ours = DDIMSampler(LINEAR, spacing=spacing)
    oracle = DDIMScheduler(timestep_spacing=spacing)
    ours.set_timesteps(num_steps)
    oracle.set_timesteps(num_steps)
    assert ours.timesteps.dtype == torch.int64 and torch.equal(ours.timesteps, oracle.timesteps)
    # The step after t is the next listed timestep, like DDPMScheduler.previous_timestep (diffusers'
    # DDIMScheduler instead uses t - T // S, which is wrong for "trailing" when S does not divide T:
    # huggingface/diffusers#9261, #12633).
    ddpm = DDPMScheduler(timestep_spacing=spacing)
    ddpm.set_timesteps(num_steps)
    want = [int(ddpm.previous_timestep(t)) for t in ddpm.timesteps]
    assert [ours._prev[t] for t in ours.timesteps.tolist()] == want


@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
@pytest.mark.parametrize(("spacing", "num_steps"), [("leading", 50), ("leading", 7), ("trailing", 50)])
def test_ddim_eta0_step_equals_diffusers_every_timestep(sched, spacing, num_steps):
    ours = DDIMSampler(sched, eta=0.0, spacing=spacing)
    oracle = _oracle(DDIMScheduler, sched, exact_alphas=True, timestep_spacing=spacing)
    ours.set_timesteps(num_steps)
    oracle.set_timesteps(num_steps)
    for t in ours.timesteps.tolist():
        eps, x = _step_inputs(sched, t, seed=t)
        want = oracle.step(eps, t, x).prev_sample
        torch.testing.assert_close(ours.step(eps, t, x), want, rtol=0, atol=1e-6)
    if sched is LINEAR:  # against diffusers' own float32 schedule too (see _oracle for the tolerance)
        raw = _oracle(DDIMScheduler, sched, exact_alphas=False, timestep_spacing=spacing)
        raw.set_timesteps(num_steps)
        for t in ours.timesteps.tolist():
            eps, x = _step_inputs(sched, t, seed=t)
            want = raw.step(eps, t, x).prev_sample
            torch.testing.assert_close(ours.step(eps, t, x), want, rtol=0, atol=2e-5)


def test_ddim_eta1_variance_and_step_equal_diffusers():
    ours = DDIMSampler(LINEAR, eta=1.0)
    oracle = _oracle(DDIMScheduler, LINEAR, exact_alphas=True)
    ours.set_timesteps(20)
    oracle.set_timesteps(20)
    for t in ours.timesteps.tolist():
        prev = t - 1000 // 20
        torch.testing.assert_close(ours.variance(t), oracle._get_variance(t, prev), rtol=1e-6, atol=0)
        eps, x = _step_inputs(LINEAR, t, seed=t)
        got = ours.step(eps, t, x, generator=torch.Generator().manual_seed(t))
        want = oracle.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --- full sampling -------------------------------------------------------------------------------------

X0_STAR = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)


def _analytic_model(sched: NoiseSchedule):
    """The exact eps when the data is the single point x0*: (x_t - sqrt(abar) x0*) / sqrt(1 - abar)."""

    def model(x, t, labels):
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * X0_STAR) / (1 - abar).sqrt()

    return model


@pytest.mark.parametrize(
    "make",
    [
        lambda s: DDIMSampler(s),
        lambda s: DDIMSampler(s, spacing="trailing", clip_sample=False),
        lambda s: DDIMSampler(s, eta=1.0),
        lambda s: DDPMSampler(s),
    ],
    ids=["ddim", "ddim-trailing-noclip", "ddim-eta1", "ddpm"],
)
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_sample_recovers_single_point_data(make, sched):
    sampler = make(sched)
    sampler.set_timesteps(7 if isinstance(sampler, DDIMSampler) else 25)
    labels = torch.tensor([1, 2, 3])
    x, traj = sample(
        _analytic_model(sched),
        sampler,
        labels,
        (1, 4, 4),
        guidance=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == (3, 1, 4, 4) and x.dtype == torch.float32 and traj == []
    torch.testing.assert_close(x, X0_STAR.expand(3, -1, -1, -1), rtol=0, atol=1e-4)


class TinyEps(nn.Module):
    """A label-dependent stand-in for the UNet, enough to exercise guidance and the RNG paths."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.emb = nn.Embedding(NULL_LABEL + 1, 1)

    def forward(self, x, t, labels):
        return 0.5 * self.conv(x) + self.emb(labels)[:, :, None, None] + 1e-4 * t[:, None, None, None]


@pytest.mark.parametrize("make", [DDPMSampler, lambda s: DDIMSampler(s, eta=0.5)], ids=["ddpm", "ddim"])
def test_sample_is_reproducible_and_traces(make):
    sampler = make(LINEAR)
    sampler.set_timesteps(10)
    model, labels = TinyEps(), torch.tensor([0, 5, NULL_LABEL])

    def run(seed, **kw):
        return sample(
            model,
            sampler,
            labels,
            (1, 6, 6),
            guidance=2.0,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )

    (a, _), (b, _), (c, _) = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0
    d, traj = run(0, trajectory_every=3, progress=True)
    assert torch.equal(a, d) and len(traj) == 4  # after steps 3, 6, 9 and the final one
    assert torch.equal(traj[-1], d) and all(x.shape == d.shape for x in traj)


# --- classifier-free guidance --------------------------------------------------------------------------


def test_guided_eps_formula_and_batching():
    calls = []

    def model(x, t, labels):  # eps = label value, so cond/uncond are easy to tell apart
        calls.append(labels.clone())
        return labels.double()[:, None, None, None].expand(-1, *x.shape[1:])

    x, t, labels = torch.zeros(2, 1, 3, 3), torch.tensor([10, 10]), torch.tensor([2, 7])
    for w in (0.0, 1.0, 3.0):
        calls.clear()
        eps = guided_eps(model, x, t, labels, w)
        expected = NULL_LABEL + w * (labels.float() - NULL_LABEL)
        assert eps.dtype == torch.float32
        torch.testing.assert_close(eps[:, 0, 0, 0], expected)
        assert len(calls) == 1
        batch = {0.0: [NULL_LABEL, NULL_LABEL], 1.0: [2, 7], 3.0: [2, 7, NULL_LABEL, NULL_LABEL]}[w]
        assert calls[0].tolist() == batch


# --- bad input and hygiene -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        lambda: DiffusionConfig(schedule="quadratic"),
        lambda: DiffusionConfig(loss="l2"),
        lambda: DiffusionConfig(timesteps=0),
        lambda: DiffusionConfig(beta_start=0.03, beta_end=0.02),
        lambda: DDPMSampler(LINEAR).set_timesteps(0),
        lambda: DDIMSampler(LINEAR).set_timesteps(1001),
        lambda: DDIMSampler(LINEAR, spacing="linspace"),
        lambda: DDIMSampler(LINEAR, eta=-0.1),
        lambda: DDIMSampler(LINEAR).step(torch.zeros(1), 1000, torch.zeros(1)),
        lambda: guided_eps(TinyEps(), torch.zeros(1, 1, 3, 3), torch.tensor([0]), torch.tensor([1]), -1.0),
        lambda: sample(TinyEps(), DDIMSampler(LINEAR), torch.tensor([1]), (1, 3, 3), guidance=-0.5),
        lambda: sample(TinyEps(), DDIMSampler(LINEAR), torch.tensor([1.0]), (1, 3, 3)),
        lambda: sample(TinyEps(), DDIMSampler(LINEAR), torch.tensor([1]), (1, 3, 3), trajectory_every=-1),
        lambda: LINEAR.training_loss(TinyEps(), torch.zeros(1, 1, 3, 3), torch.tensor([1]), p_uncond=1.5),
    ],
)
def test_bad_input_raises_user_error(bad):
    with pytest.raises(UserError) as err:
        bad()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("eta", [5, 1.0001, -0.1, float("nan"), float("inf"), True, "0.5"])
def test_eta_outside_0_1_is_named_by_the_sampler(eta):
    """eta 5 (a sampling record's, say) made NaN images, reported as "non-finite values ... at guidance
    1.25"; the sampler itself now says what eta may be, whoever asks (flag, record, Python API)."""
    words = r"eta \(DDIM's noise: 0 deterministic, 1 DDPM's variance\) must"
    with pytest.raises(UserError, match=words) as e:
        DDIMSampler(LINEAR, eta=eta)
    assert "\n" not in str(e.value)


def test_eta_through_the_pipeline(tmp_path):
    from lora4diffusion.pipeline import Pipeline

    pipe = Pipeline.load("pixel-base")
    with pytest.raises(UserError, match=r"must be >= 0 and <= 1, got 5"):
        pipe.generate([3], steps=2, eta=5)
    with pytest.raises(UserError, match="applies to the ddim sampler"):  # ddpm has no eta; not ignored
        pipe.generate([3], steps=2, sampler="ddpm", eta=0.5)
    assert pipe.generate([3], steps=2, eta=1.0)[0].isfinite().all()  # the bounds themselves sample


def test_package_never_imports_diffusers():
    """diffusers, transformers and peft are test oracles: no module of the package imports them."""
    oracle = {"diffusers", "transformers", "peft"}
    for path in Path(lora4diffusion.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # import statements, not text in docstrings
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not {n.split(".")[0] for n in names} & oracle, (path, names)
