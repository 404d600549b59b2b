"""The prompt-conditioned latent base (training/prompt_base.py, models/prompt_unet.py): UNet text mode,
joint training, guidance with the empty / negative prompt, `sample --prompt`, and the label mode left
exactly as it was."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora4diffusion.captions import EMPTY_PROMPT, HELD_OUT, digit_of, digit_prompts, family_templates
from lora4diffusion.catalog import pretrained_dir
from lora4diffusion.checkpoint import load_tensors, read_json
from lora4diffusion.cli import main
from lora4diffusion.diffusion import DDIMSampler, DiffusionConfig, NoiseSchedule, guided_eps, sample
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import base_fingerprint, read_adapter, shipped_adapters
from lora4diffusion.models.prompt_unet import TextConditionedUNet
from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.prompt_base import PromptTask, train_prompt_base

REPO = Path(__file__).resolve().parent.parent
# The last commit before the text mode existed: the label-mode reference implementation.
BEFORE_TEXT_MODE = "713e13e"
TEXT_CFG = dict(image_size=8, in_channels=4, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                attn_levels=(0, 1), context_dim=32, conditioning="text")


def _old_unet_module():
    source = subprocess.run(["git", "show", f"{BEFORE_TEXT_MODE}:lora4diffusion/models/unet.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("unet_before_text_mode", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    exec(compile(source, "unet_before_text_mode.py", "exec"), module.__dict__)
    return module


# ------------------------------------------------------------------------------------------ label mode


def test_label_mode_is_bit_identical_to_the_code_before_text_mode(small_cfg):
    old = _old_unet_module()
    kw = {k: v for k, v in small_cfg.to_dict().items()}
    torch.manual_seed(3)
    before = old.UNet(old.UNetConfig(**kw))
    torch.manual_seed(3)
    now = UNet(UNetConfig(**kw))
    # same parameters, same initial values (same RNG consumption), same config dict
    assert list(before.state_dict()) == list(now.state_dict())
    for k, v in before.state_dict().items():
        assert torch.equal(v, now.state_dict()[k]), k
    assert old.UNetConfig(**kw).to_dict() == now.cfg.to_dict()
    with torch.no_grad():  # non-zero output layer, so the comparison covers every block
        for m in (before, now):
            torch.manual_seed(5)
            m.conv_out.weight.normal_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    labels = torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        assert torch.equal(before(x, t, labels), now(x, t, labels))


def test_shipped_label_base_keeps_its_config_and_fingerprint():
    config = read_json(pretrained_dir("pixel-base") / "config.json")
    cfg = UNetConfig.from_dict(config["unet"])
    assert cfg.conditioning == "label" and "conditioning" not in cfg.to_dict()
    # the dict the fingerprint hashes is the stored one (JSON turns tuples into lists)
    assert json.loads(json.dumps(cfg.to_dict())) == config["unet"]
    base = Pipeline.load("pixel-base").unet
    assert base.__class__ is UNet and hasattr(base, "label_context")
    fingerprint = base_fingerprint(base)
    for name in ("bold-pixel", "italic-pixel"):
        assert read_adapter(shipped_adapters()[name]).fingerprint == fingerprint


# ------------------------------------------------------------------------------------------ text mode


def _text_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(**TEXT_CFG))
    with torch.no_grad():
        unet.conv_out.weight.normal_(std=0.5)  # zero-initialised otherwise: eps would be 0 everywhere
    return unet.eval()


def test_text_mode_has_no_label_table_and_no_pooled_embedding():
    label = UNet(UNetConfig(**{**TEXT_CFG, "conditioning": "label"}))
    text = _text_unet()
    extra = set(label.state_dict()) - set(text.state_dict())
    assert {k.split(".")[0] for k in extra} == {"label_context", "context_pool"}
    assert set(text.state_dict()) < set(label.state_dict())
    assert text.cfg.to_dict()["conditioning"] == "text"
    # The timestep embedding is the only input of every ResBlock's emb_proj: record it for two contexts.
    seen = []
    hook = text.mid_res1.emb_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        out_a = text(x, t, torch.randn(2, 16, 32))
        out_b = text(x, t, torch.randn(2, 16, 32))
    hook.remove()
    assert torch.equal(seen[0], seen[1])  # nothing of the context reaches the timestep embedding
    assert not torch.equal(out_a, out_b)  # ... yet the output depends on it (cross-attention)
    with pytest.raises(UserError, match="text context"):
        text(x, t, torch.tensor([1, 2]))
    with pytest.raises(UserError, match="conditioning"):
        UNetConfig(conditioning="pooled")


def test_guidance_with_empty_and_negative_prompt_matches_the_formula():
    unet = _text_unet()
    tok = Tokenizer.load()
    torch.manual_seed(1)
    te = TextEncoder(TextEncoderConfig.for_tokenizer(tok, width=32, layers=1, heads=2)).eval()
    with torch.no_grad():
        cond = te(tok.encode(["the digit 7", "a handwritten three"]))[0]
        empty = te(tok.encode([EMPTY_PROMPT] * 2))[0]
        negative = te(tok.encode(["the digit 1"] * 2))[0]
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 300])
        eps_c, eps_u, eps_n = unet(x, t, cond), unet(x, t, empty), unet(x, t, negative)
        for w in (0.0, 1.0, 2.5):
            got = guided_eps(unet, x, t, cond, w, uncond=empty)
            # one batch of 2B vs two of B: float rounding only
            torch.testing.assert_close(got, eps_u + w * (eps_c - eps_u), rtol=1e-5, atol=1e-4)
            got_n = guided_eps(unet, x, t, cond, w, uncond=negative)
            torch.testing.assert_close(got_n, eps_n + w * (eps_c - eps_n), rtol=1e-5, atol=1e-4)
        assert not torch.allclose(eps_u, eps_n)


def test_training_captions_are_finite_and_tokenized_once():
    tok = Tokenizer.load()
    task = PromptTask(NoiseSchedule(DiffusionConfig()), tok)
    assert task.ids.shape == (1 + 10 * len(family_templates(None)), tok.context_length)
    assert torch.equal(task.ids[task.row[EMPTY_PROMPT]], tok.encode(EMPTY_PROMPT)[0])
    g = torch.Generator().manual_seed(0)
    drop = torch.tensor([True, False, False, True])
    texts = task.captions(torch.tensor([1, 2, 3, 4]), g, drop)
    assert texts[0] == texts[3] == EMPTY_PROMPT
    assert [digit_of(c) for c in texts[1:3]] == [2, 3]
    assert all(c in task.row for c in texts)


def test_digit_prompts_cycle_a_family():
    prompts = digit_prompts([7, 7, 7, 7, 2], family=HELD_OUT)
    assert prompts[:4] == [t.format(n="7", w="seven") for t in family_templates(HELD_OUT)]
    assert [digit_of(p) for p in prompts] == [7, 7, 7, 7, 2]


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_text_model(tiny_prompt_model):
    """`train --conditioning text --preset tiny --vae TINY_VAE --device cpu` (conftest's tiny_vae and
    tiny_prompt_model, shared with the other tests that need one)."""
    return tiny_prompt_model


def test_prompt_model_folder_layout_and_loss_decreases(tiny_text_model):
    run = tiny_text_model
    for name in ("config.json", "model.safetensors", "text_encoder.safetensors", "tokenizer/vocab.txt",
                 "tokenizer/config.json", "vae/config.json", "vae/model.safetensors",
                 "train_state.safetensors"):
        assert (run / name).is_file(), name
    config = read_json(run / "config.json")
    assert config["unet"]["conditioning"] == "text"
    assert config["text_encoder"]["weights"] == "text_encoder.safetensors"
    losses = [float(r.split(",")[1]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) >= 4 and losses[-1] < 0.8 * losses[0]
    state = load_tensors(run / "train_state.safetensors")
    # the text encoder trains jointly: in the optimizer and in the EMA
    assert "optim.text_encoder.token_embedding.weight.exp_avg" in state
    assert "ema.text_encoder.token_embedding.weight" in state
    pipe = Pipeline.load(run)
    assert pipe.is_prompt_model and pipe.vae is not None
    exported = load_tensors(run / "text_encoder.safetensors")["token_embedding.weight"]
    assert torch.equal(exported, state["ema.text_encoder.token_embedding.weight"])  # EMA weights exported


def test_resume_is_bit_exact(tiny_vae, tmp_path):
    kw = dict(preset="tiny", vae=tiny_vae, progress=False, device="cpu", sample_every=0)
    train_prompt_base(out=tmp_path / "full", steps=8, **kw)
    train_prompt_base(out=tmp_path / "split", steps=4, **kw)
    train_prompt_base(out=tmp_path / "split", steps=8, resume=True, **kw)
    for name in ("model.safetensors", "text_encoder.safetensors", "train_state.safetensors"):
        a, b = load_tensors(tmp_path / "full" / name), load_tensors(tmp_path / "split" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_negative_prompt_replaces_the_empty_one(tiny_text_model):
    pipe = Pipeline.load(tiny_text_model)
    prompts = ["the digit 7", "a handwritten three"]
    kw = dict(steps=3, guidance=2.0, seed=4)
    plain = pipe.generate(prompts, **kw)[0]
    assert torch.equal(plain, pipe.generate(prompts, negative=EMPTY_PROMPT, **kw)[0])  # "" is the default
    neg = pipe.generate(prompts, negative="the digit 1", **kw)[0]
    assert not torch.equal(plain, neg)
    # by hand: the same x_T, guidance with the negative prompt's context as the unconditional branch
    s = pipe.sampler("ddim", 3)
    with torch.no_grad():
        cond = pipe.text_encoder(pipe.tokenizer.encode(prompts))[0]
        uncond = pipe.text_encoder(pipe.tokenizer.encode(["the digit 1"] * 2))[0]
        z, _ = sample(pipe.unet, s, cond, (4, 8, 8), 2.0, torch.Generator().manual_seed(4 * 1_000_003),
                      clip=False, uncond=uncond)
    from lora4diffusion.latents import decode_latents

    assert torch.equal(neg, decode_latents(pipe.vae, z))
    # at guidance 1 the unconditional branch is not used at all
    one = dict(steps=3, guidance=1.0, seed=4)
    with_negative = pipe.generate(prompts, negative="the digit 1", **one)[0]
    assert torch.equal(pipe.generate(prompts, **one)[0], with_negative)
    assert isinstance(s, DDIMSampler)


def test_sample_prompt_cli_writes_prompts_and_labels(tiny_text_model, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["-q", "sample", "--checkpoint", str(tiny_text_model), "--prompt", "a handwritten seven",
            "--prompt", "the digit 3", "--prompt", "a drawing of a", "--num", "2",
            "--negative", "the digit 1",
            "--steps", "2", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert f["prompts"].dtype.kind == "U"
        expected = ["a handwritten seven"] * 2 + ["the digit 3"] * 2 + ["a drawing of a"] * 2
        assert f["prompts"].tolist() == expected
        assert f["labels"].tolist() == [7, 7, 3, 3, -1, -1]
        assert f["images"].shape == (6, 28, 28) and f["images"].dtype == np.float32
    assert (out / "samples.png").is_file()
    # --digits is a shorthand that builds prompts of the "digit" family
    out2 = tmp_path / "d"
    assert main(["-q", "sample", "--checkpoint", str(tiny_text_model), "--digits", "4,5", "--per-digit", "2",
                 "--steps", "2", "--out", str(out2), "--device", "cpu"]) == 0
    with np.load(out2 / "samples.npz", allow_pickle=False) as f:
        assert f["prompts"].tolist() == digit_prompts([4, 4, 5, 5])
        assert f["labels"].tolist() == [4, 4, 5, 5]


def test_evaluate_checkpoint_on_a_prompt_model_with_a_family(tiny_text_model, capsys):
    argv = ["-q", "evaluate", "--checkpoint", str(tiny_text_model), "--digits", "1,2", "--per-digit", "2",
            "--steps", "2", "--family", HELD_OUT, "--json"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert '"family": "held_out"' in report and '"n": 4' in report


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "a handwriten seven"], "unknown word 'handwriten'.*nearest: handwritten"),
    (["--prompt", " ".join(["seven"] * 15)], "15 tokens; the limit is 14"),
    (["--prompt", "seven", "--negative", "blurry"], "unknown word 'blurry'"),
    (["--prompt", "seven", "--digits", "7"], "give one of them"),
    (["--num", "2"], "--num goes with --prompt"),
])
def test_bad_prompts_exit_2_and_write_nothing(tiny_text_model, tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "never"
    code = main(["-q", "sample", "--checkpoint", str(tiny_text_model), *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_label_models_refuse_prompts(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["-q", "sample", "--checkpoint", "pixel-base", "--prompt", "seven", "--out", str(out)]) == 2
    assert "label model" in capsys.readouterr().err and not out.exists()
    with pytest.raises(UserError, match="label model"):
        Pipeline.load("pixel-base").generate(["seven"], steps=1)


def test_text_conditioned_unet_checks_widths():
    tok = Tokenizer.load()
    te = TextEncoder(TextEncoderConfig.for_tokenizer(tok, width=64, layers=1, heads=4))
    with pytest.raises(UserError, match="context_dim"):
        TextConditionedUNet(UNet(UNetConfig(**TEXT_CFG)), te)


def test_default_sampling_batch_follows_the_kind_of_model(tiny_text_model, monkeypatch):
    """A latent model samples 250 digits per batch by default, a pixel model 50 (the fastest measured for
    each); the batch is part of the seeding, so the default must give what an explicit batch of that size
    gives."""
    from lora4diffusion import pipeline as pipeline_module

    pipe = Pipeline.load(tiny_text_model)
    assert pipe.batch_size == pipeline_module.LATENT_BATCH == 250
    assert Pipeline.load("pixel-base").batch_size == pipeline_module.PIXEL_BATCH == 50
    monkeypatch.setattr(pipeline_module, "LATENT_BATCH", 2)  # small, so 3 prompts make two batches
    prompts, one = ["0", "1", "2"], dict(steps=2, seed=3)
    default = pipe.generate(prompts, **one)[0]
    assert torch.equal(default, pipe.generate(prompts, batch_size=2, **one)[0])
    assert not torch.equal(default, pipe.generate(prompts, batch_size=3, **one)[0])
