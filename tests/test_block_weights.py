"""Text-encoder / UNet and per-block adapter weights (lora/block_weights.py): diffusers' set_adapters dict,
A1111's <lora:NAME:TE:UNET>, the LoRA Block Weight extension's lbw=, and the CLI's --lora / --lora-blocks.

The oracle: diffusers' ``StableDiffusionPipeline.set_adapters`` with the same {"text_encoder", "unet":
{"down", "mid", "up"}} dict, on the shipped base exported by `export-diffusers` and the shipped bold adapter
restricted to the modules diffusers scales per block (its attention blocks, and the text encoder), as a
diffusers LoRA file: the same images. The rest is checked against the rule each form states: the multiplier
every adapted module ends with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora4diffusion.cli import main
from lora4diffusion.errors import UserError
from lora4diffusion.formats import read_any, write_lora
from lora4diffusion.lora.adapters import Adapter, resolve_adapter
from lora4diffusion.lora.block_weights import (
    BLOCKID26,
    AdapterWeight,
    block_of,
    from_diffusers,
    from_lbw,
    lbw_factors,
    slot_table,
)
from lora4diffusion.lora.layers import lora_layers
from lora4diffusion.models.unet import UNetConfig
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.prompt_syntax import TagWeight, parse_prompt

diffusers = pytest.importorskip("diffusers")  # installed as a test oracle (pyproject [test])
from diffusers import StableDiffusionPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a handwritten sks seven"
DICT = {"text_encoder": 0.5, "unet": {"down": {"block_1": 0.3, "block_2": [1.4]}, "mid": 1.6,
                                      "up": {"block_0": [0.0, 1.2], "block_1": 0.6}}}


def multipliers(pipe: Pipeline, name: str) -> dict[str, float]:
    out = {p: m.multipliers[name] for p, m in lora_layers(pipe.unet).items() if name in m.multipliers}
    out.update({f"text_encoder.{p}": m.multipliers[name] for p, m in lora_layers(pipe.text_encoder).items()
                if name in m.multipliers})
    return out


def draw(pipe, **kw) -> np.ndarray:
    images = pipe(PROMPT, num_inference_steps=4, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(1), output_type="np", **kw).images
    return images if isinstance(pipe, Pipeline) else images[:, 2:30, 2:30]


@pytest.fixture(scope="module")
def attention_lora(tmp_path_factory):
    """bold without the modules outside attention blocks (diffusers' block dict reads only those), as a
    diffusers LoRA file."""
    bold = read_any(resolve_adapter("bold"))
    keep = [m for m in bold.modules if ".attn." in m or m.startswith(("mid_attn.", "text_encoder."))]
    tensors = {f"{m}.{k}": t for m in keep for k, t in bold.module_tensors(m).items()}
    adapter = Adapter(tensors, bold.rank, bold.alpha, fingerprint=bold.fingerprint, extra=dict(bold.extra))
    return write_lora(adapter, "diffusers", tmp_path_factory.mktemp("attn_lora"))


def test_diffusers_set_adapters_with_a_block_dict_draws_the_same(shipped_sd_export, attention_lora):
    sd = StableDiffusionPipeline.from_pretrained(str(shipped_sd_export), safety_checker=None,
                                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained()
    for pipe in (sd, ours):
        pipe.load_lora_weights(str(attention_lora.parent), weight_name=attention_lora.name, adapter_name="b")
    plain = draw(ours)
    for pipe in (sd, ours):
        pipe.set_adapters("b", DICT)
    mine, theirs = draw(ours), draw(sd)
    assert np.abs(mine - theirs).max() <= 5e-5  # fp32 rounding, as tests/test_pipeline_diffusers.py
    assert np.abs(mine - plain).max() > 0.05  # the dict changes the digits: the comparison can fail
    # and through our own name: set_lora_weight takes the same dict, bit for bit
    again = Pipeline.from_pretrained()
    again.load_lora_weights(str(attention_lora.parent), weight_name=attention_lora.name, adapter_name="b")
    again.set_lora_weight("b", DICT)
    assert np.array_equal(draw(again), mine)


def test_the_dict_sets_each_module_as_diffusers_reads_it():
    pipe = Pipeline.from_pretrained()
    pipe.add_lora("bold")
    pipe.set_lora_weight("bold", DICT)
    got = multipliers(pipe, "bold")
    want = {"down.0.0": 1.0, "down.1.0": 0.3, "down.2.0": 1.4, "mid": 1.6, "up.0.0": 0.0, "up.0.1": 1.2,
            "up.1.0": 0.6, "up.1.1": 0.6, "up.2.0": 1.0, "up.2.1": 1.0}
    for path, m in got.items():
        expect = 0.5 if path.startswith("text_encoder.") else want.get(block_of(path), 1.0)
        assert m == expect, (path, m, expect)
    assert got["time_mlp.0"] == 1.0 and got["up.0.0.attn.attn2.to_k"] == 0.0
    assert pipe.lora_weights["bold"].text_encoder == 0.5 and pipe.loras == {"bold": 1.0}


def test_slot_table_of_the_shipped_base():
    """SD's slots on our 3-level, 1-ResBlock UNet (docs/API.md prints this table)."""
    table = {k: v for k, v in slot_table(Pipeline.load().unet.cfg).items() if v}
    assert table == {
        "BASE": ["text encoder"], "IN00": ["conv_in"], "IN01": ["down.0.0"], "IN03": ["downsample.0"],
        "IN04": ["down.1.0"], "IN06": ["downsample.1"], "IN07": ["down.2.0"], "M00": ["mid"],
        "OUT03": ["up.0.0"], "OUT04": ["up.0.1"], "OUT05": ["upsample.0"], "OUT06": ["up.1.0"],
        "OUT07": ["up.1.1"], "OUT08": ["upsample.1"], "OUT09": ["up.2.0"], "OUT10": ["up.2.1"]}
    # SD's own layout (4 levels of 2) fills every slot once, as kohya's get_lbw_block_index numbers them
    sd = slot_table(UNetConfig(image_size=32, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
                               attn_levels=(0, 1, 2)))
    assert all(sd[s] for s in BLOCKID26) and sd["OUT02"] == ["up.0.2", "upsample.0"]
    with pytest.raises(UserError, match="3 levels of 3: its blocks have no SD slot"):
        slot_table(UNetConfig(image_size=32, num_res_blocks=3))


def test_lbw_presets_and_lists_follow_the_extension():
    cfg = Pipeline.load().unet.cfg
    outs = from_lbw(0.8, 0.5, "OUTS", cfg)  # 1,0,...,0,1,1,1,1,1: BASE and OUT07-OUT11
    assert outs.text_encoder == 0.8 and outs.module("up.1.1.attn.attn1.to_q") == 0.5
    assert outs.module("up.1.0.res.emb_proj") == 0.0 and outs.module("mid_attn.attn1.to_q") == 0.0
    assert outs.module("time_mlp.0") == 0.5  # outside every block: the UNet weight (the extension's 1)
    assert lbw_factors("ALL") == {**dict.fromkeys(BLOCKID26, 1.0), "IN00": 0.0, "IN03": 0.0, "IN06": 0.0,
                                  "IN09": 0.0, "IN10": 0.0, "IN11": 0.0, "OUT00": 0.0, "OUT01": 0.0,
                                  "OUT02": 0.0}  # a 17-list's missing slots are 0 (its to26)
    numbers = ",".join(["0"] * 13 + ["1"] * 13)  # 26 slots: BASE, IN00-IN11 off; M00, OUT00-OUT11 on
    w = from_lbw(1.0, 1.0, numbers, cfg)
    assert w.text_encoder == 0.0 and w.module("conv_in") == 0.0 and w.module("mid_res1.emb_proj") == 1.0
    for bad, needle in (("1,2", "2 numbers; block weights take 17 or 26"), ("OUTX", "not a preset"),
                        (",".join(["1"] * 12), "(12 and 20 are SDXL's layouts)"),
                        (",".join(["1"] * 16 + ["x"]), "'x' is not a number"),
                        (",".join(["0"] + ["3"] * 16), "UNet block down.0.0: the weight must be")):
        with pytest.raises(UserError, match=".*") as e:
            from_lbw(1.0, 1.0, bad, cfg)
        assert needle in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))


def test_tags_cli_and_api_agree_bit_for_bit(tmp_path):
    """<lora:bold:TE:UNET:lbw=...>, --lora bold:TE:UNET --lora-blocks bold=..., and set_lora_weight with the
    same AdapterWeight draw the same digits; TE 0 and UNet 0 is the base bit for bit; lbw=ALL on an
    all-linear adapter (no conv_in or downsampler module) is the plain weight."""
    cfg = Pipeline.load().unet.cfg

    def gen(prompt, *loras):
        pipe = Pipeline.load()
        for path, w in loras:
            pipe.add_lora(path, w)
        return pipe.generate([prompt] * 2, steps=4, seed=2, batch_size=2)[0].numpy()

    tagged = gen(f"<lora:bold:0.4:1.2:lbw=OUTALL> {PROMPT}")
    api = gen(PROMPT, ("bold", from_lbw(0.4, 1.2, "OUTALL", cfg)))
    assert np.array_equal(tagged, api)
    assert main(["-q", "sample", "--prompt", PROMPT, "--num", "2", "--steps", "4", "--seed", "2", "--no-bf16",
                 "--lora", "bold:0.4:1.2", "--lora-blocks", "bold=OUTALL", "--out", str(tmp_path / "c")]) == 0
    cli = np.load(tmp_path / "c" / "samples.npz")["images"]
    assert np.abs(cli - tagged).max() <= 1 / 255  # the PNG's bytes vs floats: the same draw, quantised
    record = str(tmp_path / "c" / "samples.png")
    assert main(["-q", "sample", "--from", record, "--out", str(tmp_path / "r")]) == 0
    assert np.array_equal(np.load(tmp_path / "r" / "samples.npz")["images"], cli)  # the record replays it
    assert np.array_equal(gen(f"<lora:bold:0:0> {PROMPT}"), gen(PROMPT))
    assert np.array_equal(gen(f"<lora:bold:te=0.7:lbw=ALL> {PROMPT}"), gen(f"<lora:bold:0.7> {PROMPT}"))
    te_only = gen(f"<lora:bold:1:0> {PROMPT}")
    assert np.abs(te_only - gen(PROMPT)).max() > 0.01  # the text encoder's part alone acts
    assert np.abs(te_only - gen(f"<lora:bold> {PROMPT}")).max() > 0.01


def test_tag_fields_in_a1111s_order():
    tags = {"<lora:b:0.5>": 0.5, "<lora:b:0.5:1>": TagWeight(0.5, 1.0),
            "<lora:b:te=0.2>": TagWeight(0.2, 0.2), "<lora:b:1:unet=0>": TagWeight(1.0, 0.0),
            "<lora:b:0.3:lbw=OUTS>": TagWeight(0.3, 0.3, "OUTS")}
    for tag, want in tags.items():
        assert parse_prompt(f"{tag} a seven", paths=True).loras == {"b": want}, tag
    with pytest.raises(UserError, match="only <lora:NAME\\[:WEIGHT\\]> is understood here"):
        parse_prompt("<lora:b:te=0.2> a seven")  # the web page: one weight


def test_a_dict_is_checked_before_any_weight_changes():
    cfg = Pipeline.load().unet.cfg
    for bad, needle in (({"unet": {"side": 1}}, "unknown part 'side'"),
                        ({"unet": {"up": {"block_0": [1, 1, 1]}}},
                         "up.block_0 has 3 weights; its block has 2"),
                        ({"unet": {"mid": [1, 2]}}, "mid takes one weight"),
                        ({"text_encoder": "1"}, "text_encoder weight must be a finite number"),
                        ({"unet": {"down": 2.5}}, "[-2, 2]")):
        with pytest.raises(UserError) as e:
            from_diffusers(bad, cfg)
        assert needle in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))
    pipe = Pipeline.load()
    pipe.add_lora("bold", 0.5)
    before = multipliers(pipe, "bold")
    with pytest.raises(UserError):
        pipe.set_lora_weight("bold", {"unet": {"down": 0.5, "up": 9}})
    assert multipliers(pipe, "bold") == before and pipe.lora_weights["bold"] == AdapterWeight(0.5, 0.5)
