"""A prompt model as a diffusers StableDiffusionPipeline (UNet, text encoder, tokenizer, VAE, scheduler),
against diffusers itself.

One tiny VAE and one tiny prompt model, trained for a few steps once per session (conftest.py), exported
once with the CLI; diffusers' StableDiffusionPipeline loads the folder and, from the same initial latents,
draws the images our Pipeline.generate and `lora4diffusion sample` draw. The measured maxima are printed
(pytest -s) and recorded in docs/INTEROP.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora4diffusion.checkpoint import read_json
from lora4diffusion.cli import main
from lora4diffusion.formats import read_any, write_lora
from lora4diffusion.lora.adapters import base_fingerprint, load_adapter, save_adapter
from lora4diffusion.lora.layers import inject_lora, lora_layers, merge_lora, set_adapter_weight
from lora4diffusion.lora.prompt_lora import prompt_fingerprint
from lora4diffusion.models.vae import crop_to
from lora4diffusion.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")  # installed as a test oracle (pyproject [test])
from diffusers import StableDiffusionPipeline  # noqa: E402

TOL = 1e-3  # the promise: <= 1e-3 on [0, 1] pixels, fp32 (measured: ~1e-6)
PROMPTS = ["the digit 7", "a bold digit three"]
NEGATIVE = "the digit 1"
SEED, STEPS = 3, 5


@pytest.fixture(scope="module")
def model(tiny_prompt_model, tmp_path_factory):
    """(prompt model folder, its StableDiffusionPipeline export). The model: `train-vae --preset tiny`, then
    `train --conditioning text --preset tiny` on it (conftest's tiny_prompt_model, shared)."""
    run, out = tiny_prompt_model, tmp_path_factory.mktemp("sd") / "sd"
    assert main(["export-diffusers", "--checkpoint", str(run), "--out", str(out)]) == 0
    return run, out


@pytest.fixture(scope="module")
def sd(model):
    return StableDiffusionPipeline.from_pretrained(
        str(model[1]), safety_checker=None, requires_safety_checker=False
    ).to(torch.float32)


def initial_latents(n: int, seed: int = SEED) -> torch.Tensor:
    """The x_T of Pipeline.generate's first batch (seeded (seed, batch 0), drawn on the CPU)."""
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed * 1_000_003))


def diffusers_images(sd, prompts: list[str], negative: str | None, guidance: float, steps: int = STEPS,
                     seed: int = SEED) -> torch.Tensor:
    out = sd(prompts, negative_prompt=None if negative is None else [negative] * len(prompts),
             num_inference_steps=steps, guidance_scale=guidance, latents=initial_latents(len(prompts), seed),
             output_type="pt")
    return crop_to(out.images, 28, 28)[:, 0]  # the 28 x 28 digit at the centre of the VAE's 32 x 32 canvas


def test_folder_is_a_stable_diffusion_pipeline(model, sd):
    _, out = model
    index = read_json(out / "model_index.json")
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for part, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"),
                      ("text_encoder", "CLIPTextModel"), ("scheduler", "DDIMScheduler")):
        assert type(getattr(sd, part)).__name__ == cls
    for f in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (out / f).is_file(), f
    # the pipeline rewrites steps_offset != 1 and clip_sample True on load: the file already says so
    sched = read_json(out / "scheduler" / "scheduler_config.json")
    assert sched["steps_offset"] == 1 and sched["clip_sample"] is False
    assert dict(sd.scheduler.config)["steps_offset"] == 1
    assert sd.unet.config.class_embed_type is None  # SD 1.x: nothing added to the timestep embedding
    # loads without the arguments too: model_index.json has no safety checker to look for
    assert StableDiffusionPipeline.from_pretrained(str(out)).safety_checker is None


def test_tokenizer_and_text_encoder_give_our_context(model, sd):
    ours = Pipeline.load(model[0])
    prompts = [*PROMPTS, "", NEGATIVE, "Seven, in THE bold style"]
    ids = sd.tokenizer(prompts, padding="max_length", max_length=sd.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ours.tokenizer.encode(prompts))
    with torch.no_grad():
        theirs = sd.text_encoder(ids)[0]  # what encode_prompt uses: last hidden state, no mask, no clip_skip
        mine = ours.text_encoder(ids)[0]
    diff = (theirs - mine).abs().max().item()
    print(f"text encoder last hidden state: max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("guidance,negative", [(2.0, NEGATIVE), (1.25, None)])
def test_pipeline_draws_what_generate_draws(model, sd, guidance, negative):
    ours = Pipeline.load(model[0])
    mine, _ = ours.generate(PROMPTS, steps=STEPS, guidance=guidance, seed=SEED, negative=negative)
    theirs = diffusers_images(sd, PROMPTS, negative, guidance)
    diff = (theirs - mine).abs().max().item()
    print(f"StableDiffusionPipeline vs Pipeline.generate (w {guidance}, negative {negative!r}): {diff:.2e}")
    assert diff <= TOL
    assert mine.std() > 1e-3  # not a blank canvas
    other = diffusers_images(sd, PROMPTS, negative, guidance, seed=SEED + 1)
    assert (other - mine).abs().max() > 100 * TOL  # the comparison can fail: other latents, other images


def test_pipeline_draws_what_sample_writes(model, sd, tmp_path):
    """`lora4diffusion sample --prompt A --prompt B --num 2 --negative N --seed S` against the pipeline; the
    pipeline's own draw with a CPU generator seeded S * 1_000_003 (our first batch's seed) is our x_T, so
    no latents need passing; diffusers repeats each prompt num_images_per_prompt times in the same order."""
    run, _ = model
    argv = ["-q", "sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--num", "2", "--negative", NEGATIVE, "--steps", "8", "--guidance", "1.5", "--seed", "11",
            "--no-bf16", "--out", str(tmp_path / "s")]  # fp32, as the pipeline
    assert main(argv) == 0
    mine = torch.from_numpy(np.load(tmp_path / "s" / "samples.npz")["images"])
    out = sd(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_images_per_prompt=2, num_inference_steps=8,
             guidance_scale=1.5, generator=torch.Generator().manual_seed(11 * 1_000_003), output_type="np")
    theirs = torch.from_numpy(out.images)[:, 2:30, 2:30, 0]  # "np": [B, H, W, C]
    diff = (theirs - mine).abs().max().item()
    print(f"StableDiffusionPipeline vs `sample` (8 steps, w 1.5, 2 per prompt): {diff:.2e}")
    assert mine.shape == (4, 28, 28) and diff <= TOL


def test_prompt_models_sample_with_sd_steps_offset(model):
    ours = Pipeline.load(model[0])
    s = ours.sampler("ddim", 5)
    assert s.timesteps.tolist() == [801, 601, 401, 201, 1]  # diffusers' "leading" + steps_offset 1
    assert ours.sampler("ddpm", None).timesteps.tolist() == list(range(999, -1, -1))  # all T: unshifted


@pytest.mark.parametrize("steps", [1, 3, 20, 333, 999])
def test_steps_offset_timesteps_are_diffusers(steps):
    from diffusers import DDIMScheduler, DDPMScheduler

    from lora4diffusion.diffusion import DDIMSampler, DDPMSampler, DiffusionConfig, NoiseSchedule

    schedule = NoiseSchedule(DiffusionConfig())
    for ours, theirs in ((DDIMSampler(schedule, clip_sample=False, steps_offset=1), DDIMScheduler),
                         (DDPMSampler(schedule, clip_sample=False, steps_offset=1), DDPMScheduler)):
        ours.set_timesteps(steps)
        ref = theirs(steps_offset=1, timestep_spacing="leading")
        ref.set_timesteps(steps)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()


def test_export_import_round_trip_is_bit_identical(model, tmp_path):
    run, out = model
    back = tmp_path / "back"
    assert main(["import-diffusers", str(out), "--out", str(back)]) == 0
    for f in ("model.safetensors", "text_encoder.safetensors", "vae/model.safetensors"):
        a, b = load_file(str(run / f)), load_file(str(back / f))
        assert a.keys() == b.keys(), f
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert (run / "tokenizer" / "vocab.txt").read_text() == (back / "tokenizer" / "vocab.txt").read_text()
    c, d = read_json(run / "config.json"), read_json(back / "config.json")
    for key in ("unet", "diffusion", "text_encoder", "tokenizer", "vae"):  # vae: its fingerprint
        assert c[key] == d[key], key
    a, b = Pipeline.load(run), Pipeline.load(back)
    assert base_fingerprint(a.unet) == base_fingerprint(b.unet)
    # what prompt-model adapters record (UNet + text encoder): they load on the imported model
    assert prompt_fingerprint(a.unet, a.text_encoder) == prompt_fingerprint(b.unet, b.text_encoder)


def test_import_a_folder_diffusers_saved_after_changing_weights(model, sd, tmp_path):
    """As if trained further with diffusers' scripts: perturb every part in diffusers, save_pretrained,
    import; our pipeline then draws what diffusers draws from that folder."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for part in (sd.unet, sd.text_encoder, sd.vae):
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    try:
        sd.save_pretrained(str(tmp_path / "tuned"))
        theirs = diffusers_images(sd, PROMPTS, NEGATIVE, 2.0)
    finally:  # the module's pipeline goes back to the exported weights
        fresh = StableDiffusionPipeline.from_pretrained(str(model[1]), safety_checker=None,
                                                        requires_safety_checker=False)
        for part in ("unet", "text_encoder", "vae"):
            getattr(sd, part).load_state_dict(getattr(fresh, part).state_dict())
    assert main(["import-diffusers", str(tmp_path / "tuned"), "--out", str(tmp_path / "ours")]) == 0
    mine, _ = Pipeline.load(tmp_path / "ours").generate(PROMPTS, steps=STEPS, guidance=2.0, seed=SEED,
                                                        negative=NEGATIVE)
    diff = (theirs - mine).abs().max().item()
    print(f"diffusers-saved folder, imported: {diff:.2e}")
    assert diff <= TOL


def _broken(src, dst, path: str, edit) -> None:
    import shutil

    shutil.copytree(src, dst)
    f = dst / path
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("path,edit,named", [
    ("unet/config.json", lambda c: c.update(use_linear_projection=False), "use_linear_projection"),
    ("unet/config.json", lambda c: c.update(class_embed_type="projection"), "class_embed_type"),
    ("unet/config.json", lambda c: c.update(cross_attention_dim=48), "cross_attention_dim"),
    ("vae/config.json", lambda c: c.update(act_fn="gelu"), "vae/config.json: act_fn"),
    ("vae/config.json", lambda c: c.update(shift_factor=0.1), "vae/config.json: shift_factor"),
    ("text_encoder/config.json", lambda c: c.update(hidden_act="gelu"), "text encoder config"),
    ("text_encoder/config.json", lambda c: c.update(use_attention_mask=True), "use_attention_mask"),
    ("scheduler/scheduler_config.json", lambda c: c.update(timestep_spacing="trailing"), "timestep_spacing"),
    ("model_index.json", lambda c: c.update(safety_checker=["x", "Checker"]), "safety_checker"),
    ("model_index.json", lambda c: c.update(_class_name="StableDiffusionXLPipeline"), "_class_name"),
])
def test_import_refuses_what_our_model_cannot_represent(model, tmp_path, capsys, path, edit, named):
    _broken(model[1], tmp_path / "bad", path, edit)
    capsys.readouterr()
    assert main(["import-diffusers", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "o").exists()


def test_import_refuses_a_weight_that_does_not_fit(model, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(model[1], tmp_path / "bad")
    f = tmp_path / "bad" / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:4]
    save_file(state, str(f))
    capsys.readouterr()
    assert main(["import-diffusers", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoder.conv_in.weight" in err, err


# ----- LoRA: our diffusers / kohya exports through pipe.load_lora_weights -----
@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory):
    """A UNet-only all-linear adapter (rank 4, alpha 8 != rank) on the prompt model, A and B random (large
    effect, every module); the trained UNet + text-encoder adapter is `te_adapter` below."""
    root = tmp_path_factory.mktemp("lora")
    pipe = Pipeline.load(model[0])
    inject_lora(pipe.unet, "all-linear", rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(pipe.unet).values():
            for p in (*layer.lora_down.parameters(), *layer.lora_up.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(pipe.unet, root / "ours")
    adapter = read_any(root / "ours")
    return root / "ours", {
        "diffusers": write_lora(adapter, "diffusers", root / "diffusers"),
        "kohya": write_lora(adapter, "kohya", root / "kohya", title="style"),
    }


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_load_lora_weights_matches_our_adapted_pipeline(model, adapter, fmt):
    ours_dir, files = adapter
    path = files[fmt]
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in load_file(str(path)))
    sd = StableDiffusionPipeline.from_pretrained(str(model[1]), safety_checker=None,
                                                 requires_safety_checker=False)
    sd.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    # every adapted module of ours landed on a module of diffusers' UNet (none dropped as unexpected)
    landed = [n for n, m in sd.unet.named_modules() if "style" in getattr(m, "lora_A", {})]
    assert len(landed) == len(read_any(ours_dir).modules) > 0
    ours = Pipeline.load(model[0])
    base, _ = ours.generate(PROMPTS, steps=STEPS, guidance=2.0, seed=SEED, negative=NEGATIVE)
    # the UNet-level loader: this adapter is UNet-only and fingerprinted on the UNet (save_adapter above)
    name = load_adapter(ours.unet, ours_dir, weight=1.0)
    diffs = {}
    for w in (1.0, 0.5):
        set_adapter_weight(ours.unet, name, w)
        sd.set_adapters(["style"], adapter_weights=[w])
        mine, _ = ours.generate(PROMPTS, steps=STEPS, guidance=2.0, seed=SEED, negative=NEGATIVE)
        diffs[w] = (diffusers_images(sd, PROMPTS, NEGATIVE, 2.0) - mine).abs().max().item()
        if w == 1.0:
            assert (mine - base).abs().max() > 10 * TOL  # the adapter does change the images
    set_adapter_weight(ours.unet, name, 1.0)
    sd.set_adapters(["style"], adapter_weights=[1.0])
    merge_lora(ours.unet)
    sd.fuse_lora(lora_scale=1.0)
    mine, _ = ours.generate(PROMPTS, steps=STEPS, guidance=2.0, seed=SEED, negative=NEGATIVE)
    diffs["fused"] = (diffusers_images(sd, PROMPTS, NEGATIVE, 2.0) - mine).abs().max().item()
    print(f"{fmt} LoRA via load_lora_weights vs ours: {diffs}")
    assert max(diffs.values()) <= TOL, diffs
# ----- UNet + text-encoder LoRA trained by train-lora (branch trigger) -----
@pytest.fixture(scope="module")
def te_adapter(model, tmp_path_factory):
    """train-lora on the prompt model: trigger word, text-encoder LoRA; exported by export-lora."""
    root = tmp_path_factory.mktemp("te_lora")
    assert main(["-q", "train-lora", "--checkpoint", str(model[0]), "--style", "bold", "--trigger", "sks",
                 "--text-encoder", "--text-encoder-lr", "1e-2", "--lr", "1e-2", "--max-train-steps", "8",
                 "--batch-size", "16", "--device", "cpu", "--out", str(root / "ours")]) == 0
    files = {}
    for fmt in ("diffusers", "kohya"):
        assert main(["-q", "export-lora", "--lora", str(root / "ours"), "--format", fmt,
                     "--out", str(root / fmt)]) == 0
        files[fmt] = next(p for p in (root / fmt).iterdir() if p.suffix == ".safetensors")
    return root / "ours", files


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_load_lora_weights_with_text_encoder_modules(model, te_adapter, fmt):
    ours_dir, files = te_adapter
    path = files[fmt]
    keys = load_file(str(path)).keys()
    te_key = "lora_te_" if fmt == "kohya" else "text_encoder."
    assert any(k.startswith(te_key) for k in keys) and any("unet" in k for k in keys)
    sd = StableDiffusionPipeline.from_pretrained(str(model[1]), safety_checker=None,
                                                 requires_safety_checker=False)
    sd.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    landed = [n for part in (sd.unet, sd.text_encoder) for n, m in part.named_modules()
              if "style" in getattr(m, "lora_A", {})]
    assert len(landed) == len(read_any(ours_dir).modules) > 0
    assert any("style" in getattr(m, "lora_A", {}) for m in sd.text_encoder.modules())
    prompts = ["the digit 7 in sks style", "a handwritten sks three"]
    ours = Pipeline.load(model[0])
    base, _ = ours.generate(prompts, steps=STEPS, guidance=2.0, seed=SEED, negative=NEGATIVE)
    name = ours.add_lora(ours_dir, weight=1.0)
    diffs = {}
    for w in (1.0, 0.5):
        ours.set_lora_weight(name, w)
        sd.set_adapters(["style"], adapter_weights=[w])
        mine, _ = ours.generate(prompts, steps=STEPS, guidance=2.0, seed=SEED, negative=NEGATIVE)
        diffs[w] = (diffusers_images(sd, prompts, NEGATIVE, 2.0) - mine).abs().max().item()
        if w == 1.0:
            changed = (mine - base).abs().max().item()
    ours.set_lora_weight(name, 1.0)
    sd.set_adapters(["style"], adapter_weights=[1.0])
    merge_lora(ours.unet)
    merge_lora(ours.text_encoder)
    sd.fuse_lora(lora_scale=1.0)  # unet and text_encoder
    mine, _ = ours.generate(prompts, steps=STEPS, guidance=2.0, seed=SEED, negative=NEGATIVE)
    diffs["fused"] = (diffusers_images(sd, prompts, NEGATIVE, 2.0) - mine).abs().max().item()
    print(f"{fmt} UNet+TE LoRA via load_lora_weights vs ours: {diffs}; the adapter moves pixels by"
          f" {changed:.3f}")
    assert max(diffs.values()) <= TOL, diffs
    assert changed > 10 * max(diffs.values())  # the adapter's effect is far above the disagreement


def test_the_shipped_base_exports_and_diffusers_draws_what_we_draw(shipped_sd_export):
    """The shipped default base (by name) as a StableDiffusionPipeline: same images from the same x_T."""
    sd = StableDiffusionPipeline.from_pretrained(str(shipped_sd_export), safety_checker=None,
                                                 requires_safety_checker=False).to(torch.float32)
    ours = Pipeline.load()
    assert ours.is_prompt_model
    mine, _ = ours.generate(PROMPTS, steps=STEPS, guidance=2.0, seed=SEED, negative=NEGATIVE)
    theirs = diffusers_images(sd, PROMPTS, NEGATIVE, 2.0)
    diff = (theirs - mine).abs().max().item()
    print(f"shipped base: StableDiffusionPipeline vs Pipeline.generate: {diff:.2e}")
    assert diff <= TOL and mine.std() > 1e-3
