"""Merged-speed sampling (``Pipeline.generate(merged=True)``, ``sample --merged``): the adapters folded into
the weights for one call, then every weight put back bit for bit (fused adapters included); the images agree
with unmerged sampling to fp32 rounding (not bit for bit: W0 + m ΔW is rounded once; docs/RELIABILITY.md),
weight 0 stays the base bit for bit, and a record made with --merged redraws the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora4diffusion.cli import main
from lora4diffusion.lora.layers import lora_layers
from lora4diffusion.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a handwritten sks ohwx seven", "the digit 3"] * 2


def weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part, model in (("unet", pipe.unet), ("te", pipe.text_encoder))
            for k, v in model.state_dict().items()}


def gen(pipe: Pipeline, merged: bool) -> np.ndarray:
    return pipe.generate(PROMPTS, steps=5, seed=4, merged=merged)[0].numpy()


def test_merged_sampling_restores_every_weight_and_agrees_to_rounding():
    pipe = Pipeline.load()
    pipe.add_lora("bold", 0.8)
    pipe.add_lora("italic", 0.5)
    pipe.fuse_lora(adapter_names=["italic"])  # one adapter already fused: it must stay fused, same bits
    before = weights(pipe)
    unmerged = gen(pipe, merged=False)
    merged = gen(pipe, merged=True)
    after = weights(pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pipe.fused_loras == {"italic"}
    assert all(set(layer.merged_adapters) <= {"italic"} for layer in lora_layers(pipe.unet).values())
    gap = np.abs(merged - unmerged).max()
    assert 0 < gap <= 1e-4, gap  # fp32 rounding (measured ~1e-5), not equal: the rounding differs
    assert np.array_equal(gen(pipe, merged=False), unmerged)  # and unmerged again is as before


def test_weight_zero_is_still_the_base_bit_for_bit():
    base = gen(Pipeline.load(), merged=False)
    pipe = Pipeline.load()
    pipe.add_lora("bold", 0.0)
    assert np.array_equal(gen(pipe, merged=True), base)


def test_sample_merged_is_recorded_and_replayed(tmp_path):
    argv = ["-q", "sample", "--prompt", PROMPTS[0], "--num", "2", "--steps", "3", "--no-bf16", "--lora",
            "bold:0.7"]
    assert main([*argv, "--merged", "--out", str(tmp_path / "m")]) == 0
    record = str(tmp_path / "m" / "samples.png")
    assert main(["-q", "sample", "--from", record, "--out", str(tmp_path / "r")]) == 0
    m, r = (np.load(tmp_path / d / "samples.npz") for d in ("m", "r"))
    assert np.array_equal(m["images"], r["images"])
    assert main([*argv, "--out", str(tmp_path / "u")]) == 0
    gap = np.abs(np.load(tmp_path / "u" / "samples.npz")["images"] - m["images"]).max()
    assert 0 < gap <= 1e-4  # unmerged differs by rounding only: so the replay above did merge
