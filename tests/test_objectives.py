"""Training objectives (lora4diffusion/objectives.py): v-prediction, min-SNR-gamma, Huber / smooth-L1,
offset noise and caption dropout, against diffusers (``compute_snr``, ``get_velocity``, DDIM/DDPM with
``prediction_type="v_prediction"``, a StableDiffusionPipeline export) and closed forms; then tiny training
runs that record, use, export and resume them.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr

from lora4diffusion.checkpoint import read_json, read_metadata
from lora4diffusion.cli import main
from lora4diffusion.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DiffusionConfig,
    NoiseSchedule,
    sample,
)
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model
from lora4diffusion.formats.diffusers_unet import diffusion_from_scheduler, scheduler_config
from lora4diffusion.models.vae import crop_to
from lora4diffusion.objectives import elementwise_loss, huber_threshold, min_snr_weights, snr, x0_and_eps
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.lora import TriggerTask, adapter_diffusion
from lora4diffusion.training.run import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

V_LINEAR = NoiseSchedule(DiffusionConfig(prediction_type="v_prediction"))
V_COSINE = NoiseSchedule(DiffusionConfig(schedule="cosine", prediction_type="v_prediction"))


def _oracle(cls, sched: NoiseSchedule, **kw):
    """The diffusers scheduler for ``sched`` with our alphas_cumprod (as tests/test_diffusion.py: only the
    formulas are compared, not diffusers' own float32 cumprod)."""
    name = "linear" if sched.cfg.schedule == "linear" else "squaredcos_cap_v2"
    oracle = cls(num_train_timesteps=sched.T, beta_schedule=name, prediction_type=sched.cfg.prediction_type,
                 **kw)
    oracle.alphas_cumprod = sched.alphas_cumprod.clone()
    return oracle


def _data(t: int | torch.Tensor, seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 6, 6, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, g


# --- SNR, min-SNR weights and v: diffusers' training_utils and DDPMScheduler -----------------------------


@pytest.mark.parametrize("sched", [V_LINEAR, V_COSINE], ids=["linear", "cosine"])
def test_snr_and_min_snr_weights_equal_diffusers(sched):
    t = torch.arange(sched.T)
    want = compute_snr(_oracle(DDPMScheduler, sched), t)
    abar = sched.alphas_cumprod[t]
    torch.testing.assert_close(snr(abar), want, rtol=2e-6, atol=0)
    # diffusers' examples/text_to_image/train_text_to_image.py, --snr_gamma 5
    gamma = 5.0
    clipped = torch.stack([want, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(min_snr_weights(abar, gamma, "epsilon"), clipped / want, rtol=2e-6, atol=0)
    torch.testing.assert_close(min_snr_weights(abar, gamma, "v_prediction"), clipped / (want + 1), rtol=2e-6,
                               atol=0)
    w = min_snr_weights(abar, gamma, "epsilon")
    assert w[0] < 0.01 and w[-1] == 1.0  # noisy timesteps keep weight 1, clean ones are damped


@pytest.mark.parametrize("sched", [V_LINEAR, V_COSINE], ids=["linear", "cosine"])
def test_velocity_equals_diffusers_get_velocity(sched):
    x0, noise, g = _data(0, n=8)
    t = torch.randint(0, sched.T, (8,), generator=g)
    want = _oracle(DDPMScheduler, sched).get_velocity(x0, noise, t)
    torch.testing.assert_close(sched.velocity(x0, noise, t), want, rtol=0, atol=1e-6)
    # and v really is what turns x_t back into (x0, eps): Salimans & Ho's identities
    x_t = sched.q_sample(x0, t, noise)
    x0_back, eps_back = x0_and_eps("v_prediction", want, x_t, sched.alphas_cumprod[t])
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_back, noise, rtol=0, atol=1e-5)


# --- samplers of a v model: diffusers' DDIM and DDPM with prediction_type="v_prediction" ------------------


@pytest.mark.parametrize("sched", [V_LINEAR, V_COSINE], ids=["linear", "cosine"])
@pytest.mark.parametrize(("clip", "steps"), [(True, 50), (False, 7)])
def test_ddim_v_step_equals_diffusers_every_timestep(sched, clip, steps):
    ours = DDIMSampler(sched, clip_sample=clip)
    oracle = _oracle(DDIMScheduler, sched, clip_sample=clip)
    ours.set_timesteps(steps)
    oracle.set_timesteps(steps)
    for t in ours.timesteps.tolist():
        x0, noise, g = _data(t, seed=t)
        x = sched.q_sample(x0, torch.full((3,), t), noise)
        v = sched.velocity(x0, noise, torch.full((3,), t)) + 0.3 * torch.randn(x.shape, generator=g)
        want = oracle.step(v, t, x).prev_sample
        torch.testing.assert_close(ours.step(v, t, x), want, rtol=0, atol=2e-6)
        torch.testing.assert_close(ours.predict_x0(v, t, x), oracle.step(v, t, x).pred_original_sample,
                                   rtol=0, atol=2e-6)


def test_ddim_eta1_and_ddpm_v_steps_equal_diffusers():
    ddim, ddpm = DDIMSampler(V_LINEAR, eta=1.0), DDPMSampler(V_LINEAR)
    o_ddim, o_ddpm = _oracle(DDIMScheduler, V_LINEAR), _oracle(DDPMScheduler, V_LINEAR)
    for ours, oracle, kw in ((ddim, o_ddim, {"eta": 1.0}), (ddpm, o_ddpm, {})):
        ours.set_timesteps(20)
        oracle.set_timesteps(20)
        for t in ours.timesteps.tolist():
            x0, noise, g = _data(t, seed=t)
            x = V_LINEAR.q_sample(x0, torch.full((3,), t), noise)
            v = torch.randn(x.shape, generator=g)
            got = ours.step(v, t, x, generator=torch.Generator().manual_seed(t))
            want = oracle.step(v, t, x, generator=torch.Generator().manual_seed(t), **kw).prev_sample
            torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


X0_STAR = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)


@pytest.mark.parametrize("make", [lambda s: DDIMSampler(s), lambda s: DDPMSampler(s)], ids=["ddim", "ddpm"])
def test_v_sampling_with_guidance_recovers_single_point_data(make):
    """The exact v model of data = the single point x0*: v = sqrt(abar) eps - sqrt(1 - abar) x0* with
    eps = (x_t - sqrt(abar) x0*) / sqrt(1 - abar); sampling (guided: w mixes equal outputs) lands on x0*."""
    sampler = make(V_LINEAR)
    sampler.set_timesteps(7 if isinstance(sampler, DDIMSampler) else 25)

    def model(x, t, labels):
        abar = V_LINEAR.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * X0_STAR) / (1 - abar).sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * X0_STAR

    x, _ = sample(model, sampler, torch.tensor([1, 2]), (1, 4, 4), guidance=3.0,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, X0_STAR.expand(2, -1, -1, -1), rtol=0, atol=1e-4)


# --- losses: closed forms ------------------------------------------------------------------------------


def test_huber_and_smooth_l1_closed_forms():
    """kohya's conditional_loss: huber = 2c(sqrt(d^2 + c^2) - c), smooth_l1 = 2(sqrt(d^2 + c^2) - c); with
    3-4-5 triangles: d = 0.3, c = 0.4 -> sqrt = 0.5; d = 3, c = 4 -> sqrt = 5."""
    out, target = torch.tensor([[0.3], [3.0]]), torch.zeros(2, 1)
    c = torch.tensor([0.4, 4.0])
    torch.testing.assert_close(elementwise_loss("huber", out, target, c), torch.tensor([[0.08], [8.0]]))
    torch.testing.assert_close(elementwise_loss("smooth_l1", out, target, c), torch.tensor([[0.2], [2.0]]))
    torch.testing.assert_close(elementwise_loss("mse", out, target), torch.tensor([[0.09], [9.0]]))
    torch.testing.assert_close(elementwise_loss("l1", out, target), torch.tensor([[0.3], [3.0]]))
    # pseudo-Huber's two regimes: ~d^2 well inside c, ~2c|d| - 2c^2 far outside
    small, big, zero = (torch.tensor([[v]], dtype=torch.float64) for v in (1e-3, 100.0, 0.0))
    c1 = torch.tensor([0.1], dtype=torch.float64)
    assert elementwise_loss("huber", small, zero, c1).item() == pytest.approx(1e-6, rel=1e-4)
    assert elementwise_loss("huber", big, zero, c1).item() == pytest.approx(20 - 0.02, rel=1e-4)
    assert elementwise_loss("smooth_l1", small, zero, c1).item() == pytest.approx(1e-5, rel=1e-4)


def test_huber_thresholds_follow_kohyas_schedules():
    t = torch.tensor([0, 250, 999])
    abar = V_LINEAR.alphas_cumprod[t]
    assert torch.equal(huber_threshold("constant", 0.1, t, abar, 1000), torch.full((3,), 0.1))
    torch.testing.assert_close(huber_threshold("exponential", 0.1, t, abar, 1000),
                               torch.tensor([1.0, 0.1**0.25, 0.1**0.999]))
    sigma = ((1 - abar.double()) / abar.double()).sqrt()
    want = (0.9 / (1 + sigma) ** 2 + 0.1).float()
    torch.testing.assert_close(huber_threshold("snr", 0.1, t, abar, 1000), want)
    c = huber_threshold("snr", 0.1, torch.arange(1000), V_LINEAR.alphas_cumprod, 1000)
    assert (c[1:] <= c[:-1]).all() and c[0] > 0.98 and c[-1] < 0.11  # ~1 at little noise, -> c at much


def _zero(x, t, labels):
    return torch.zeros_like(x)


def test_loss_targets_weights_and_the_default_path():
    x0, noise, g = _data(0, n=6)
    t = torch.randint(0, 1000, (6,), generator=g)
    labels = torch.arange(6)
    eps = NoiseSchedule(DiffusionConfig())
    # DDPM's objective is computed as it always was: one F.mse_loss over everything, bit for bit
    out = torch.randn(x0.shape, generator=g)
    assert torch.equal(eps.loss(lambda x, tt, y: out, x0, labels, t, noise), F.mse_loss(out, noise))
    # a v model is trained on v: the zero network's loss is mean(v^2), the exact v's is 0
    v = V_LINEAR.velocity(x0, noise, t)
    torch.testing.assert_close(V_LINEAR.loss(_zero, x0, labels, t, noise), (v**2).mean())
    assert V_LINEAR.loss(lambda x, tt, y: v, x0, labels, t, noise).item() == pytest.approx(0, abs=1e-10)
    # min-SNR-5 weights per example, the mean of the weighted per-example means
    snr = V_LINEAR.alphas_cumprod[t] / (1 - V_LINEAR.alphas_cumprod[t])
    for pred, target, w in (("epsilon", noise, snr.clamp(max=5) / snr),
                            ("v_prediction", v, snr.clamp(max=5) / (snr + 1))):
        s = NoiseSchedule(DiffusionConfig(prediction_type=pred, min_snr_gamma=5.0))
        want = ((target**2).flatten(1).mean(1) * w).mean()
        torch.testing.assert_close(s.loss(_zero, x0, labels, t, noise), want)
        rows = s.row_losses(_zero, x0, labels, t, noise)
        torch.testing.assert_close(rows, (target**2).flatten(1).mean(1) * w)
    # huber with a constant c
    s = NoiseSchedule(DiffusionConfig(loss="huber", huber_c=0.5, huber_schedule="constant"))
    want = (2 * 0.5 * ((noise**2 + 0.25).sqrt() - 0.5)).mean()
    torch.testing.assert_close(s.loss(_zero, x0, labels, t, noise), want)


def test_offset_noise_statistics_and_draw_order():
    """eps' = eps + S n with n ~ N(0, 1) per (image, channel), drawn after (t, eps, mask): the offset is flat
    over each image's pixels, N(0, S^2) across images and channels, and runs without it draw as before."""
    shape, s = (2000, 2, 4, 4), 0.1
    plain = NoiseSchedule(DiffusionConfig())
    offset = NoiseSchedule(DiffusionConfig(noise_offset=s))
    t0, n0, d0 = plain.draw_training_inputs(shape, torch.Generator().manual_seed(3), 0.5)
    t1, n1, d1 = offset.draw_training_inputs(shape, torch.Generator().manual_seed(3), 0.5)
    assert torch.equal(t0, t1) and torch.equal(d0, d1)
    extra = n1 - n0
    flat = extra[:, :, :1, :1].expand_as(extra)
    torch.testing.assert_close(extra, flat, rtol=0, atol=1e-6)  # one value per image and channel
    per = extra[:, :, 0, 0].flatten()
    assert abs(per.mean().item()) < 4 * s / math.sqrt(per.numel())  # mean 0 within 4 standard errors
    assert per.std().item() == pytest.approx(s, rel=0.05)  # 4,000 values: std of the std ~1.1 %
    # the offset shifts each image's mean: per-image channel means of eps' have variance S^2 + 1/16
    means = n1.mean(dim=(2, 3)).flatten()
    assert means.var().item() == pytest.approx(s**2 + 1 / 16, rel=0.1)
    g = torch.Generator().manual_seed(3)
    plain.draw_training_inputs(shape, g, 0.5)
    assert torch.equal(g.get_state(), _state_after_plain_draws(shape))  # S = 0: no extra draw


def _state_after_plain_draws(shape):
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 1000, (shape[0],), generator=g)
    torch.randn(shape, generator=g)
    torch.rand(shape[0], generator=g)
    return g.get_state()


# --- the config: recorded, defaults unchanged, validated; export and import ------------------------------


def test_config_defaults_read_and_write_as_before():
    old = {"timesteps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "loss": "l1"}
    cfg = DiffusionConfig.from_dict(old)  # a config.json from before these options
    assert (cfg.prediction_type, cfg.min_snr_gamma, cfg.noise_offset) == ("epsilon", 0.0, 0.0)
    assert cfg.to_dict() == old  # and written back unchanged
    v = DiffusionConfig(prediction_type="v_prediction", min_snr_gamma=5.0)
    assert v.to_dict() == {**DiffusionConfig().to_dict(), "prediction_type": "v_prediction",
                           "min_snr_gamma": 5.0}
    assert DiffusionConfig.from_dict(v.to_dict()) == v
    for bad, match in (({"prediction_type": "sample"}, "prediction_type"), ({"min_snr_gamma": -1}, "gamma"),
                       ({"noise_offset": 2.0}, "noise_offset"), ({"loss": "huberr"}, "loss"),
                       ({"huber_c": 0.0}, "huber_c"), ({"huber_schedule": "cosine"}, "huber_schedule")):
        with pytest.raises(UserError, match=match):
            DiffusionConfig(**bad)


def test_scheduler_config_carries_the_prediction_type():
    v = DiffusionConfig(prediction_type="v_prediction")
    d = scheduler_config(v)
    assert d["prediction_type"] == "v_prediction"
    assert DDIMScheduler.from_config(d).config.prediction_type == "v_prediction"
    assert diffusion_from_scheduler(d).prediction_type == "v_prediction"
    assert diffusion_from_scheduler(scheduler_config(DiffusionConfig())).prediction_type == "epsilon"
    with pytest.raises(UserError, match="prediction_type 'sample' is not supported"):
        diffusion_from_scheduler({**d, "prediction_type": "sample"})


def test_an_adapter_keeps_its_bases_prediction_type():
    v = DiffusionConfig(prediction_type="v_prediction", schedule="cosine")
    mine = adapter_diffusion(v, {"min_snr_gamma": 5.0, "loss": "huber", "prediction_type": "v_prediction"})
    assert (mine.prediction_type, mine.schedule, mine.min_snr_gamma, mine.loss) == (
        "v_prediction", "cosine", 5.0, "huber")
    assert adapter_diffusion(v, None) == v
    with pytest.raises(UserError, match="the base predicts v_prediction"):
        adapter_diffusion(v, {"prediction_type": "epsilon"})


# --- tiny runs: a v base trains, samples, takes a LoRA, resumes by the rules; a v prompt model exports ----


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv, match, out=None):
    before = _snapshot(out) if out is not None else None
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    if out is not None:
        assert _snapshot(out) == before
    return err


TINY_V = ["-q", "train", "--preset", "tiny", "--batch-size", "16", "--prediction-type", "v_prediction",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def v_base(tmp_path_factory):
    run = tmp_path_factory.mktemp("v_base") / "run"
    assert main([*TINY_V, "--max-train-steps", "15", "--out", str(run)]) == 0
    return run


def test_a_v_base_trains_records_and_samples(v_base):
    _, diffusion, config = load_model(v_base)
    assert diffusion.prediction_type == config["diffusion"]["prediction_type"] == "v_prediction"
    rows = (v_base / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses  # the v loss goes down
    pipe = Pipeline.load(v_base)
    assert pipe.sampler("ddim", 5).prediction_type == "v_prediction"
    images, _ = pipe.generate([3, 7], steps=5, seed=0)
    assert images.shape == (2, 28, 28) and torch.isfinite(images).all() and images.std() > 0.05


def test_base_resume_refuses_a_changed_objective(v_base, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY_V, "--max-train-steps", "1", "--min-snr-gamma", "5", "--out", str(run)]) == 0
    resume = ["--max-train-steps", "2", "--resume", "--out", str(run)]
    _refused(capsys, [*TINY_V, *resume, "--min-snr-gamma", "1"], "min_snr_gamma 5.0 -> 1.0", run)
    err = _refused(capsys, ["-q", "train", "--preset", "tiny", "--batch-size", "16", "--min-snr-gamma", "5",
                            *resume], "diffusion config", run)
    assert "prediction_type 'v_prediction' -> (default)" in err
    assert main([*TINY_V, *resume, "--min-snr-gamma", "5"]) == 0


def test_lora_on_a_v_base_trains_with_v_and_resumes_by_the_rules(v_base, tmp_path, capsys):
    run = tmp_path / "lora"
    t = ["-q", "train-lora", "--checkpoint", str(v_base), "--style", "bold", "--batch-size", "4", "--rank",
         "2", "--device", "cpu", "--out", str(run)]
    _refused(capsys, [*t, "--max-train-steps", "1", "--prediction-type", "epsilon"],
             "the base predicts v_prediction")
    _refused(capsys, [*t, "--max-train-steps", "1", "--caption-dropout-rate", "0.2"], "label model")
    _refused(capsys, [*t, "--max-train-steps", "1", "--huber-c", "0.2"], "--huber-c go with --loss huber")
    assert main([*t, "--max-train-steps", "1", "--min-snr-gamma", "5", "--noise-offset", "0.05"]) == 0
    meta = read_metadata(run / "adapter.safetensors")
    objective = json.loads(meta["objective"])
    assert objective["prediction_type"] == "v_prediction"  # the base's
    assert (objective["min_snr_gamma"], objective["noise_offset"], objective["loss"]) == (5.0, 0.05, "mse")
    _refused(capsys, [*t, "--max-train-steps", "2", "--min-snr-gamma", "5", "--resume"], "objective", run)
    same = ["--min-snr-gamma", "5", "--noise-offset", "0.05"]
    assert main([*t, "--max-train-steps", "2", *same, "--resume"]) == 0
    assert main([*t, "--max-train-steps", "3", *same[2:], "--min-snr-gamma", "1", "--resume",
                 "--allow-changes"]) == 0
    assert json.loads(read_metadata(run / "adapter.safetensors")["objective"])["min_snr_gamma"] == 1.0


def test_cli_refuses_options_that_do_not_apply(tmp_path, capsys):
    out = tmp_path / "x"
    _refused(capsys, ["train", "--preset", "tiny", "--huber-c", "0.3", "--out", str(out)],
             "--huber-c go with --loss huber or --loss smooth_l1 (got --loss mse)")
    _refused(capsys, ["train", "--preset", "tiny", "--caption-dropout-rate", "0.2", "--out", str(out)],
             "--caption-dropout-rate goes with --conditioning text")
    assert not out.exists()


@pytest.fixture(scope="module")
def v_prompt(tiny_vae, tmp_path_factory):
    """A tiny v-prediction prompt model (4 steps) and its StableDiffusionPipeline export."""
    root = tmp_path_factory.mktemp("v_prompt")
    base, sd = root / "base", root / "sd"
    assert main(["-q", "train", "--conditioning", "text", "--preset", "tiny", "--vae", str(tiny_vae),
                 "--prediction-type", "v_prediction", "--max-train-steps", "4", "--batch-size", "8",
                 "--validate-every", "2", "--device", "cpu", "--out", str(base)]) == 0
    assert main(["-q", "export-diffusers", "--checkpoint", str(base), "--out", str(sd)]) == 0
    return base, sd


def test_an_exported_v_pipeline_draws_what_generate_draws(v_prompt, tmp_path):
    base, sd_dir = v_prompt
    assert read_json(sd_dir / "scheduler" / "scheduler_config.json")["prediction_type"] == "v_prediction"
    assert [r.split(",")[0] for r in (base / "validation.csv").read_text().splitlines()[1:]] == ["2", "4"]
    sd = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None,
                                                 requires_safety_checker=False).to(torch.float32)
    assert sd.scheduler.config.prediction_type == "v_prediction"
    prompts = ["the digit 7", "a handwritten three"]
    mine, _ = Pipeline.load(base).generate(prompts, steps=5, guidance=2.0, seed=3)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3 * 1_000_003))
    out = sd(prompts, num_inference_steps=5, guidance_scale=2.0, latents=latents, output_type="pt")
    theirs = crop_to(out.images, 28, 28)[:, 0]
    assert (theirs - mine).abs().max().item() <= 1e-5  # fp32: measured 7.7e-7
    # the same pipeline read as epsilon draws other digits: the prediction type is what makes them agree
    sd.scheduler = DDIMScheduler.from_config({**sd.scheduler.config, "prediction_type": "epsilon"})
    wrong = crop_to(sd(prompts, num_inference_steps=5, guidance_scale=2.0, latents=latents,
                       output_type="pt").images, 28, 28)[:, 0]
    assert (wrong - mine).abs().max().item() > 0.05
    back = tmp_path / "back"
    assert main(["-q", "import-diffusers", str(sd_dir), "--out", str(back)]) == 0
    assert load_model(back)[1].prediction_type == "v_prediction"


def test_a_trigger_lora_on_a_v_prompt_model_records_its_objective_and_caption_dropout(v_prompt, tmp_path):
    out = tmp_path / "sks"
    assert main(["-q", "train-lora", "--checkpoint", str(v_prompt[0]), "--style", "bold", "--trigger", "sks",
                 "--caption-dropout-rate", "0.5", "--noise-offset", "0.1", "--max-train-steps", "1",
                 "--validate-every", "1",
                 "--batch-size", "4", "--rank", "2", "--device", "cpu", "--out", str(out)]) == 0
    meta = read_metadata(out / "adapter.safetensors")
    assert json.loads(meta["train"])["label_dropout"] == 0.5
    assert json.loads(meta["objective"])["prediction_type"] == "v_prediction"
    assert json.loads(meta["objective"])["noise_offset"] == 0.1
    assert (out / "validation.csv").read_text().splitlines()[1].startswith("1,")  # triggered captions


class _Trainer:
    """What TriggerTask reads of the Trainer, with a network that records its inputs."""

    def __init__(self, images, labels, dropout):
        self.cfg = TrainConfig(batch_size=8, seed=0, label_dropout=dropout)
        self.images, self.labels = images, labels
        self.rank, self.world, self.device, self.use_bf16 = 0, 1, torch.device("cpu"), False
        self.seen = []

    def batch_indices(self, step):
        return torch.arange(8)

    def net(self):
        def record(x, t, ids):
            self.seen.append(ids)
            return torch.zeros_like(x)

        return record


def test_caption_dropout_replaces_captions_by_the_empty_prompt(v_prompt):
    pipe = Pipeline.load(v_prompt[0])
    schedule = NoiseSchedule(pipe.diffusion)
    images, labels = torch.randn(8, 4, 8, 8), torch.arange(8)
    empty = pipe.tokenizer.encode([""])[0]
    for rate, dropped in ((0.0, 0), (1.0, 8)):
        tr = _Trainer(images, labels, rate)
        TriggerTask(schedule, pipe.tokenizer, "sks").loss(tr, 0)
        assert sum(bool((ids == empty).all()) for ids in tr.seen[0]) == dropped
