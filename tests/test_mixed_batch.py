"""Different adapters per prompt in one batch (peft's ``adapter_names=``): per-row multipliers in each adapter
layer (lora/layers.py ``row_multipliers_while``), set for one ``Pipeline.generate`` call from its prompts'
``<lora:...>`` tags.

Why the per-row comparisons are bit for bit (fp32, CPU): a row's output depends only on that row's input with
the same operations in the same order as in a batch of the same size (convolutions, matmuls, GroupNorm and
attention act per sample, and their blocking depends on shapes, not values); the row path computes
(h scale) m_b where the scalar path computes h (m scale), equal when m is a power of two (0.25, 0.5, 1); a row
with m_b = 0 adds (h scale) 0 = +0, so it keeps the base's bits.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lora4diffusion.cli import main
from lora4diffusion.errors import UserError
from lora4diffusion.lora.layers import LoRALayer, inject_lora, lora_layers, row_multipliers_while
from lora4diffusion.lora.lora import LoRA
from lora4diffusion.lora.prompt_lora import TE_TARGETS, adapter_from_prompt_model, prompt_fingerprint
from lora4diffusion.models.prompt_unet import TextConditionedUNet
from lora4diffusion.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a handwritten seven", "a handwritten one", "a handwritten two", "a handwritten three"]
GEN = dict(steps=3, guidance=3.0, seed=5, batch_size=3)  # 4 prompts: batches of 3 and 1 (rows sliced)


@pytest.fixture(scope="module")
def adapters(tiny_prompt_model, tmp_path_factory):
    """Two random rank-2 adapters ``a`` and ``b`` on the tiny prompt model, UNet and text encoder."""
    root = tmp_path_factory.mktemp("mixed")
    for seed, name in enumerate(("a", "b")):
        pipe = Pipeline.load(tiny_prompt_model)
        fingerprint = prompt_fingerprint(pipe.unet, pipe.text_encoder)
        inject_lora(pipe.unet, "all-linear", rank=2, alpha=2.0)
        inject_lora(pipe.text_encoder, TE_TARGETS, rank=2, alpha=2.0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for part in (pipe.unet, pipe.text_encoder):
                for layer in lora_layers(part).values():
                    w = layer.lora_up["default"].weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        adapter_from_prompt_model(TextConditionedUNet(pipe.unet, pipe.text_encoder), fingerprint).save(
            root / name)
    return root


def _tags(root) -> list[str]:
    a, b = root / "a", root / "b"
    return [f"<lora:{a}:0.5>", f"<lora:{b}>", "", f"<lora:{a}:1:0.5> <lora:{b}:0.25>"]  # row 3: TE 1, UNet .5


def test_each_row_equals_its_tags_on_every_row(tiny_prompt_model, adapters):
    """The mixed call's row i equals row i of a call whose every prompt carries row i's tags (same seed, so
    the same starting latents; other texts in the other rows), bit for bit; the untagged row equals the
    plain base. One pipeline throughout: each call's per-row weights are cleared after it."""
    tags = _tags(adapters)
    pipe = Pipeline.load(tiny_prompt_model)
    mixed = pipe.generate([f"{t} {text}" for t, text in zip(tags, TEXTS, strict=True)], **GEN)[0]
    assert all(not layer.row_multipliers for part in (pipe.unet, pipe.text_encoder)
               for layer in lora_layers(part).values())
    for i, tag in enumerate(tags):
        alone = pipe.generate([f"{tag} {text}" for text in TEXTS], **GEN)[0]
        assert torch.equal(mixed[i], alone[i]), (i, (mixed[i] - alone[i]).abs().max())
    base = Pipeline.load(tiny_prompt_model).generate(TEXTS, **GEN)[0]
    assert torch.equal(mixed[2], base[2])
    assert all((mixed[i] - base[i]).abs().max() > 1e-3 for i in (0, 1, 3))  # the adapters do act
    # merged sampling folds only adapters uniform over the call; the per-row ones stay per row
    again = pipe.generate([f"{t} {text}" for t, text in zip(tags, TEXTS, strict=True)], merged=True, **GEN)[0]
    assert torch.equal(again, mixed)


def test_any_weight_matches_to_rounding(tiny_prompt_model, adapters):
    """A weight that is not a power of two (0.7): the same image to fp32 rounding, and guidance 1 (no
    doubled batch) too."""
    a = adapters / "a"
    pipe = Pipeline.load(tiny_prompt_model)
    for guidance in (1.0, 3.0):
        kw = {**GEN, "guidance": guidance}
        mixed = pipe.generate([f"<lora:{a}:0.7> {TEXTS[0]}", TEXTS[1], TEXTS[2]], **kw)[0]
        alone = pipe.generate([f"<lora:{a}:0.7> {t}" for t in TEXTS[:3]], **kw)[0]
        torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=0)
        assert (mixed[0] - pipe.generate(TEXTS[:3], **kw)[0][0]).abs().max() > 1e-3  # the adapter acts


def test_bad_mixed_input_is_one_line(tiny_prompt_model, adapters, tmp_path, capsys):
    a = adapters / "a"
    pipe = Pipeline.load(tiny_prompt_model)
    with pytest.raises(UserError, match="no adapter of that name or path"):
        pipe.generate([f"<lora:{a}> {TEXTS[0]}", f"<lora:{tmp_path / 'nosuch'}> {TEXTS[1]}"], steps=1)
    pipe.add_lora(a, 0.5)  # --lora acts on every row at its one weight; a row's tag may not say another
    with pytest.raises(UserError, match="give its weight in one place"):
        pipe.generate([f"<lora:{a}:0.5> {TEXTS[0]}", f"<lora:{a}:0.8> {TEXTS[1]}"], steps=1)
    out = tmp_path / "out"
    argv = ["-q", "sample", "--checkpoint", str(tiny_prompt_model), "--num", "1", "--steps", "1", "--out",
            str(out), "--prompt", f"<lora:{a}> {TEXTS[0]}", "--prompt", f"<lora:{a}:x> {TEXTS[1]}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a number" in err[0], err
    assert not out.exists()


def test_cli_samples_a_mixed_batch(tiny_prompt_model, adapters, tmp_path, capsys):
    a, b = adapters / "a", adapters / "b"
    argv = ["-q", "sample", "--checkpoint", str(tiny_prompt_model), "--num", "2", "--steps", "2", "--out",
            str(tmp_path / "s"), "--prompt", f"<lora:{a}:0.5> {TEXTS[0]}", "--prompt",
            f"<lora:{b}> {TEXTS[1]}", "--prompt", TEXTS[2]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{a}:0.5" in out and f"{b}:1" in out  # the summary names every row's adapters


@pytest.mark.parametrize("conv", [False, True])
def test_rows_match_peft_adapter_names(conv):
    """peft's forward with ``adapter_names`` (tuners/lora/layer.py ``_mixed_batch_forward``: each adapter on
    its rows' sub-batch) equals ours row by row, on a Linear and a Conv2d with two LoRAs."""
    g = torch.Generator().manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1) if conv else nn.Linear(8, 6)
    x = torch.randn((5, 4, 5, 5) if conv else (5, 3, 8), generator=g)
    config = dict(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(**config), adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(**config))
    model.eval()
    names = ["first", "second", "__base__", "first", "second"]
    want = model(x, adapter_names=names)
    peft_layer = model.base_model.model[0]
    ours = LoRALayer(peft_layer.base_layer)
    for name in ("first", "second"):
        lora = LoRA(ours.base_layer, 2, 4.0)
        with torch.no_grad():
            lora.lora_down.weight.copy_(peft_layer.lora_A[name].weight)
            lora.lora_up.weight.copy_(peft_layer.lora_B[name].weight)
        ours.add_adapter(name, lora)
    rows = {n: [float(r == n) for r in names] for n in ("first", "second")}
    with torch.no_grad(), row_multipliers_while([nn.Sequential(ours)], lambda m, p, n: rows[n]):
        got = ours(x)
    assert not ours.row_multipliers  # cleared afterwards
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[2], ours.base_layer(x)[2])  # the "__base__" row: + 0 from each adapter
    assert (got[0] - got[1]).abs().max() > 1e-3  # the adapters differ


def test_diffusers_call_takes_a_mixed_batch(tiny_prompt_model, adapters):
    """``__call__`` (diffusers' names): the same per-row result from the same latents, and its
    ``cross_attention_kwargs`` scale scales each row's weights (scale 0.5 on weight 1 = weight 0.5)."""
    a, b = adapters / "a", adapters / "b"
    pipe = Pipeline.load(tiny_prompt_model)
    latents = torch.randn(3, pipe.unet.cfg.in_channels, pipe.image_size, pipe.image_size,
                          generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="latent")
    mixed = pipe([f"<lora:{a}> {TEXTS[0]}", f"<lora:{b}:0.5> {TEXTS[1]}", TEXTS[2]], **kw).images
    for i, tag in enumerate([f"<lora:{a}>", f"<lora:{b}:0.5>", ""]):
        alone = pipe([f"{tag} {t}" for t in TEXTS[:3]], **kw).images
        assert torch.equal(mixed[i], alone[i]), i
    half = pipe([f"<lora:{a}:2> {TEXTS[0]}", f"<lora:{b}> {TEXTS[1]}", TEXTS[2]],
                cross_attention_kwargs={"scale": 0.5}, **kw).images
    assert all(torch.equal(half[i], mixed[i]) for i in range(3))
    assert pipe.row_weights is not None and pipe.row_weights[1][next(iter(pipe.row_weights[1]))].unet == 1.0
