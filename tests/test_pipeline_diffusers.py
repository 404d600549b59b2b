"""Pipeline's diffusers-shaped face (lora4diffusion/pipeline_diffusers.py) against diffusers itself.

The oracle: the shipped base exported by `export-diffusers` (conftest's shipped_sd_export) in diffusers'
StableDiffusionPipeline (DDIM), and the shipped bold / italic adapters written as diffusers LoRA files, loaded
by both sides' `load_lora_weights`. The same call -- prompt, negative_prompt, num_inference_steps,
guidance_scale, num_images_per_prompt, eta, generator=torch.Generator().manual_seed(0), output_type="np" --
gives the same digits (diffusers' 32 x 32 canvas cropped to our 28 x 28), and after each adapter operation
both sides name the same active and loaded adapters.

Tolerance: the generator semantics match exactly (the same draw of the initial latents, then DDIM's eta noise
from the same generator; a mismatch would differ by O(1), as another seed does). What remains is fp32
rounding: each stage agrees to ~1e-6 (text encoder 5e-7, UNet 1e-6, VAE decoder 1e-6, a DDIM step 2e-7 on the
shipped base), and guidance (1 + w) and the first step's x0 prediction (1 / sqrt(abar_801) ~ 25) amplify that
to 0.3-2e-5 on [0, 1] pixels (printed with pytest -s). So the promise is 5e-5, not 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora4diffusion.classifier import accuracy, load_classifier
from lora4diffusion.errors import UserError
from lora4diffusion.formats import read_any, write_lora
from lora4diffusion.lora.adapters import resolve_adapter
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.pipeline_diffusers import PipelineOutput

diffusers = pytest.importorskip("diffusers")  # installed as a test oracle (pyproject [test])
from diffusers import StableDiffusionPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 5e-5
PROMPTS = ["a handwritten seven", "the digit 3"]
NEGATIVE = "the digit 1"
STEPS = 5
SEED = 0


def load_sd(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(shipped_sd_export):
    return load_sd(shipped_sd_export)


@pytest.fixture(scope="module")
def ours():
    """The shipped base; tests that load adapters take their own (``Pipeline.from_pretrained()``)."""
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """The shipped bold / italic adapters (UNet + text encoder) as diffusers' pytorch_lora_weights files."""
    root = tmp_path_factory.mktemp("diffusers_loras")
    return {n: write_lora(read_any(resolve_adapter(n)), "diffusers", root / n) for n in ("bold", "italic")}


def draw(pipe, seed: int = SEED, generators: int = 0, **kw) -> np.ndarray:
    """One call with diffusers' argument names, output_type "np"; diffusers' canvas cropped to the digit."""
    kw.setdefault("prompt", PROMPTS)
    kw.setdefault("num_inference_steps", STEPS)
    if generators:
        kw["generator"] = [torch.Generator().manual_seed(seed + i) for i in range(generators)]
    else:
        kw.setdefault("generator", torch.Generator().manual_seed(seed))
    images = pipe(output_type="np", **kw).images
    return images if isinstance(pipe, Pipeline) else images[:, 2:30, 2:30]


def gap(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ----- __call__ against StableDiffusionPipeline.__call__ -----
@pytest.mark.parametrize("kw", [
    {"negative_prompt": [NEGATIVE] * 2, "guidance_scale": 2.0},
    {"guidance_scale": 0.5, "num_images_per_prompt": 2},  # no guidance at w <= 1
    {"prompt": "a bold seven", "guidance_scale": 3.0, "eta": 1.0},  # DDIM's noise from the same generator
    {"guidance_scale": 1.25, "generators": 2},  # one generator per image
], ids=["negative", "w-below-1-x2", "eta-1", "generator-list"])
def test_call_draws_what_diffusers_draws(ours, sd, kw):
    mine, theirs = draw(ours, **kw), draw(sd, **kw)
    diff = gap(mine, theirs)
    print(f"__call__ vs StableDiffusionPipeline {kw}: {diff:.2e}")
    n = 1 if isinstance(kw.get("prompt"), str) else 2
    assert mine.shape == (n * kw.get("num_images_per_prompt", 1), 28, 28, 1) and mine.dtype == np.float32
    assert diff <= TOL and mine.std() > 0.1
    assert gap(draw(sd, seed=SEED + 7, **kw), mine) > 100 * TOL  # the comparison can fail: another seed


def test_latents_passed_explicitly(ours, sd):
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    mine = draw(ours, latents=x, guidance_scale=2.0, negative_prompt=[NEGATIVE] * 2)
    assert gap(mine, draw(sd, latents=x, guidance_scale=2.0, negative_prompt=[NEGATIVE] * 2)) <= TOL
    # the latents a generator seeded 5 draws are the latents given: the same images, bit for bit
    assert np.array_equal(mine, draw(ours, seed=5, guidance_scale=2.0, negative_prompt=[NEGATIVE] * 2))


@pytest.mark.filterwarnings("ignore::UserWarning:peft")  # PEFT's notes on several adapters in one model
def test_adapter_calls_match_diffusers_step_by_step(shipped_sd_export, lora_files):
    """The same sequence of LoRA-loader calls on both pipelines: after each, the same active and loaded
    adapters (names included: default_1 for an unnamed second load) and the same images (2 DDIM steps:
    the adapters' arithmetic, not the sampler, is under test here)."""
    sd, ours = load_sd(shipped_sd_export), Pipeline.from_pretrained()
    one = {"prompt": PROMPTS[0], "guidance_scale": 2.0, "num_inference_steps": 2}
    base = draw(ours, **one)
    folder = {n: (str(p.parent), p.name) for n, p in lora_files.items()}

    def load(name, adapter_name):
        return lambda p: p.load_lora_weights(folder[name][0], weight_name=folder[name][1],
                                             adapter_name=adapter_name)

    steps = [  # (what, the call on both pipelines, whether to compare images after it, call arguments)
        ("load bold", load("bold", "bold"), True, {}),
        ("load italic unnamed: it alone is active", load("italic", None), True, {}),
        ("both, weighted", lambda p: p.set_adapters(["bold", "default_1"], [0.7, 0.4]), True, {}),
        ("bold at 0.5, italic off", lambda p: p.set_adapters("bold", 0.5), False, {}),
        ("fuse at lora_scale 0.5", lambda p: p.fuse_lora(lora_scale=0.5), True, {}),
        ("unfuse: the scale stays", lambda p: p.unfuse_lora(), True, {}),
        ("a third adapter", load("italic", "a_italic"), False, {}),
        ("only default_1", lambda p: p.set_adapters(["default_1"]), False, {}),
        ("delete it: a_italic (sorted first) takes over", lambda p: p.delete_adapters("default_1"), True, {}),
        ("disable", lambda p: p.disable_lora(), False, {}),
        ("load while disabled", load("bold", "late"), True, {}),
        ("enable", lambda p: p.enable_lora(), False, {}),
        # after the last load: diffusers keeps a call's scale for the text encoder of adapters loaded later
        ("a per-call LoRA scale", lambda p: None, True, {"cross_attention_kwargs": {"scale": 0.5}}),
        ("fuse late", lambda p: p.fuse_lora(), False, {}),
        ("unload: the fused weights stay", lambda p: p.unload_lora_weights(), True, {}),
    ]
    diffs, moved = {}, {}
    for what, call, compare, kw in steps:
        call(sd)
        call(ours)
        assert ours.get_active_adapters() == sd.get_active_adapters(), what
        assert ours.get_list_adapters() == sd.get_list_adapters(), what
        if what.startswith("fuse"):
            assert ours.fused_loras == sd.fused_loras, what
        if compare:
            mine = draw(ours, **one, **kw)
            diffs[what] = gap(mine, draw(sd, **one, **kw))
            moved[what] = gap(mine, base)
    print(f"adapter calls, ours vs diffusers: {diffs}\n  and how far from the base: {moved}")
    assert max(diffs.values()) <= TOL, diffs
    assert moved["load while disabled"] == 0.0  # the base's images exactly
    assert min(v for k, v in moved.items() if "disable" not in k) > 100 * TOL  # the adapters act


# ----- our own face and the diffusers one -----
def test_call_with_generates_seed_is_generate(ours):
    """generate(seed=S) draws its first batch from torch.Generator().manual_seed(S * 1_000_003), on the CPU:
    __call__ with that generator draws the same images, bit for bit (prompt model and label model)."""
    g = torch.Generator().manual_seed(3 * 1_000_003)
    out = ours(PROMPTS, negative_prompt=NEGATIVE, guidance_scale=2.0, generator=g, output_type="pt").images
    ref, _ = ours.generate(PROMPTS, seed=3, guidance=2.0, negative=NEGATIVE)
    assert out.shape == (2, 1, 28, 28) and torch.equal(out[:, 0], ref)
    pixel = Pipeline.from_pretrained("pixel-base")
    out = pixel([3, 7], guidance_scale=1.25, generator=torch.Generator().manual_seed(3 * 1_000_003),
                output_type="pt", num_inference_steps=3).images
    ref, _ = pixel.generate([3, 7], seed=3, guidance=1.25, steps=3)
    assert torch.equal(out[:, 0], ref) and ref.std() > 0.1


def test_guidance_at_or_below_1_is_the_conditional_model(ours):
    """diffusers runs no guidance at w <= 1; generate's eps_u + w (eps_c - eps_u) mixes in the negative
    branch below 1, so __call__(guidance_scale=0.5) is generate(guidance=1), not generate(guidance=0.5)."""
    out = ours(PROMPTS, guidance_scale=0.5, generator=torch.Generator().manual_seed(0), output_type="pt")
    at1, _ = ours.generate(PROMPTS, seed=0, guidance=1.0)
    at_half, _ = ours.generate(PROMPTS, seed=0, guidance=0.5)
    assert torch.equal(out.images[:, 0], at1)
    assert (out.images[:, 0] - at_half).abs().max() > 0.01


def test_output_types(ours):
    def call(output_type, **kw):
        return ours("a seven", generator=torch.Generator().manual_seed(1), output_type=output_type, **kw)

    array = call("np").images
    pil = call("pil")
    assert isinstance(pil, PipelineOutput) and pil.nsfw_content_detected is None and pil[0] is pil.images
    image = pil.images[0]
    assert image.mode == "L" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image), (array[0, ..., 0] * 255).round().astype(np.uint8))
    images, nsfw = call("pt", return_dict=False)
    assert nsfw is None and torch.equal(images[:, 0, :, :, None], torch.from_numpy(array))
    assert call("latent").images.shape == (1, 4, 8, 8)  # the shipped base's VAE latents


def test_adapter_management_remembers_weights_as_diffusers(lora_files):
    """What the active/inactive bookkeeping does to our weights (Pipeline.loras: what acts)."""
    pipe = Pipeline.from_pretrained()
    pipe.load_lora_weights("bold")  # a shipped adapter's name works too
    assert pipe.get_active_adapters() == ["default_0"] and pipe.loras == {"default_0": 1.0}
    pipe.set_adapters("default_0", 0.6)
    pipe.load_lora_weights(lora_files["italic"], adapter_name="it")  # the file itself
    assert pipe.loras == {"default_0": 0.0, "it": 1.0}  # the first is off, its 0.6 remembered
    pipe.set_adapters(["default_0", "it"])  # weights None: 1.0 each, as diffusers
    assert pipe.loras == {"default_0": 1.0, "it": 1.0}
    pipe.set_adapters(["it"], [0.3])
    pipe.delete_adapters("it")  # the last active one: the one left comes back at its remembered weight
    assert pipe.get_active_adapters() == ["default_0"] and pipe.loras == {"default_0": 1.0}
    # our own API and diffusers' meet: a weight set our way makes a switched-off adapter active again
    name = pipe.add_lora("italic", weight=0.5)
    pipe.set_adapters("default_0")
    assert pipe.get_active_adapters() == ["default_0"]
    pipe.set_lora_weight(name, 0.25)
    assert pipe.get_active_adapters() == ["default_0", name] and pipe.loras[name] == 0.25
    pipe.unload_lora_weights()
    assert pipe.loras == {} and pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []


def test_bad_input_is_one_line_naming_what_is_known(ours):
    pipe = Pipeline.from_pretrained()
    pipe.load_lora_weights("bold", adapter_name="bold")
    pipe.load_lora_weights("italic", adapter_name="italic")
    for call in (lambda: pipe.set_adapters(["bold", "bolt"]), lambda: pipe.delete_adapters("bolt"),
                 lambda: pipe.fuse_lora(adapter_names=["bolt"])):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "'bolt'" in msg and "bold, italic" in msg, msg
    # nothing changed by the refused calls
    assert pipe.get_active_adapters() == ["italic"] and pipe.loras == {"bold": 0.0, "italic": 1.0}
    refused = {
        "already in use": lambda: pipe.load_lora_weights("bold", adapter_name="bold"),
        "3 weights for 2": lambda: pipe.set_adapters(["bold", "italic"], [1.0, 1.0, 1.0]),
        "[-2, 2]": lambda: pipe.set_adapters("bold", 5.0),
        "unknown component 'vae'": lambda: pipe.set_adapters("bold", {"vae": 1.0}),  # diffusers: warns
        "down has blocks block_0 ... block_2": lambda: pipe.set_adapters("bold",
                                                                          {"unet": {"down": {"b1": 1}}}),
        "unknown component": lambda: pipe.fuse_lora(components=["transformer"]),
        "output_type": lambda: ours("a seven", output_type="latents"),
        "shape (2, 4, 8, 8)": lambda: ours(PROMPTS, latents=torch.zeros(1, 4, 8, 8)),
        "one torch.Generator per image (2)": lambda: ours(PROMPTS, generator=[torch.Generator()] * 3),
        "guidance_scale": lambda: ours("a seven", guidance_scale=-1.0),
        "3 negative prompts for 2": lambda: ours(PROMPTS, negative_prompt=["a", "b", "c"]),
        "unknown word": lambda: ours("a sevn"),
        "cross_attention_kwargs": lambda: ours("a seven", cross_attention_kwargs={"scale": 1, "x": 2}),
    }
    for needle, call in refused.items():
        with pytest.raises(UserError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))
    with pytest.raises(TypeError):  # after the prompt, keywords only: diffusers' positions differ from ours
        ours("a seven", None, 5)


def test_label_model_takes_digits_not_text():
    pixel = Pipeline.from_pretrained("pixel-base")
    for bad in ({"prompt": "a seven"}, {"prompt": [3], "negative_prompt": "1"}, {"prompt": [3, 12]}):
        with pytest.raises(UserError, match="label model"):
            pixel(**bad)
    out = pixel(7, num_images_per_prompt=2, num_inference_steps=2, output_type="np")  # the global RNG
    assert out.images.shape == (2, 28, 28, 1)


def test_the_readme_python_block_runs_and_both_faces_draw_the_same_sevens(tmp_path, monkeypatch):
    """README.md's "Python API" block, run as it stands: ours and the diffusers-shaped call draw the same 3
    images (bit for bit, up to PIL's uint8), and the project's classifier reads each as the 7 asked for."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Python API"):]
    start = section.index("```python\n") + len("```python\n")
    block = section[start:section.index("\n```", start)]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, "README.md (Python API)", "exec"), ns)
    assert (tmp_path / "sevens.png").is_file() and (tmp_path / "seven.png").is_file()
    images, pil = ns["images"], ns["out"].images
    assert images.shape == (3, 28, 28) and len(pil) == 3
    quantized = (images.numpy() * 255).round().astype(np.uint8)
    assert all(np.array_equal(np.asarray(im), q) for im, q in zip(pil, quantized, strict=True))
    assert accuracy(load_classifier(), images, torch.full((3,), 7)) == 1.0
    assert ns["pipe"].get_list_adapters() == {} and ns["pipe"].tag_adapters == {}  # unload_lora_weights
