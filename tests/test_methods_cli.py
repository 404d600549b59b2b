"""The adapter methods through the CLI and the training loop: train-lora --method, resume bit for bit, LoRA+,
sample/merge/list/info/resize with a DoRA, LoHa or LoKr adapter, and the refusals."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora4diffusion.checkpoint import read_metadata
from lora4diffusion.cli import main
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.inventory import info
from lora4diffusion.lora.adapters import read_adapter
from lora4diffusion.lora.layers import METHODS, adapter_parameter_names, lora_layers
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.base import train_base
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.lora import LoRAConfig
from lora4diffusion.training.run import STATE_NAME, TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    train_base("tiny", root / "tiny", steps=2, progress=False)
    return root / "tiny"


def _train(tiny, out, *extra, steps=4):
    argv = ["-q", "train-lora", "--checkpoint", str(tiny), "--style", "bold", "--batch-size", "8",
            "--rank", "2", "--device", "cpu", "--no-bf16", "--max-train-steps", str(steps), "--out", str(out),
            *extra]
    return main(argv)


@pytest.mark.parametrize("extra", [["--method", "dora"], ["--method", "loha", "--loraplus-lr-ratio", "4"],
                                   ["--method", "lokr", "--factor", "4"]])
def test_train_lora_with_each_method_resumes_bit_for_bit(tiny, tmp_path, extra):
    """2 steps, then --resume to 4 = 4 steps at once (adapter and training state, every tensor); the file
    names its method and options; the adapter changed from its start."""
    assert _train(tiny, tmp_path / "a", *extra) == 0
    assert _train(tiny, tmp_path / "b", *extra, steps=2) == 0
    assert _train(tiny, tmp_path / "b", *extra, "--resume") == 0
    for name in ("adapter.safetensors", STATE_NAME):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a), name
    adapter = read_adapter(tmp_path / "a")
    assert adapter.method == extra[1]
    assert adapter.options == ({"factor": 4} if "--factor" in extra else {})
    keys = METHODS[adapter.method].keys
    assert all(k.endswith(keys) for k in adapter.tensors)
    pipe = Pipeline.load(tiny)
    name = pipe.add_lora(tmp_path / "a")
    deltas = [layer.delta_weight(name).abs().max() for layer in lora_layers(pipe.unet).values()]
    assert max(deltas) > 0  # trained: no longer ΔW = 0


def test_loraplus_puts_each_b_factor_in_a_group_at_ratio_times_lr(tmp_path):
    """LoRA+ (Hayou et al. 2024): the optimizer's groups hold the up factors (LoRA's B, LoHa's W1a/W2a) at
    ratio x lr and the rest at lr; DoRA's magnitude trains at lr."""
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-3, warmup=0, bf16=False, channels_last=False,
                      sample_every=0)
    unet_cfg = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                          attn_levels=(1,), context_dim=32)
    for method, ups in (("lora", ("lora_up",)), ("dora", ("lora_up",)), ("loha", ("hada_w1_a", "hada_w2_a"))):
        lora = LoRAConfig(rank=2, alpha=2.0, targets="attention", method=method, loraplus_lr_ratio=16.0)
        model = UNet(unet_cfg)
        lora.inject(model, lora.targets)
        images, labels = torch.zeros(4, 1, 16, 16), torch.arange(4)
        trainer = Trainer(model, NoiseSchedule(DiffusionConfig()), images, labels, cfg, tmp_path / method,
                          export=lambda m, d: None, lr_scale=lora.lr_scale())
        by_scale: dict[float, set[int]] = {}
        for group in trainer.opt.param_groups:
            by_scale.setdefault(group["lr_scale"], set()).update(id(p) for p in group["params"])
        named = dict(model.named_parameters())
        fast = {id(p) for k, p in named.items() if p.requires_grad and any(f".{u}." in k for u in ups)}
        assert set(by_scale) == {1.0, 16.0} and by_scale[16.0] == fast, method
        assert adapter_parameter_names(model, "default") == {k for k, p in named.items() if p.requires_grad}


def test_sample_merge_list_info_resize_with_each_method(tiny, tmp_path, capsys):
    """A trained DoRA / LoHa / LoKr adapter: sample --lora at weight 0 draws the base's images exactly,
    merge draws what the adapter draws, list and info name the method, resize turns it into a rank-2 LoRA
    (its error: tests/test_methods.py)."""
    sample = ["-q", "sample", "--no-bf16", "--checkpoint", str(tiny), "--digits", "1,7", "--per-digit", "1",
              "--steps", "3", "--device", "cpu"]
    base_images = None
    for method in ("dora", "loha", "lokr"):
        run = tmp_path / method
        assert _train(tiny, run, "--method", method, steps=3) == 0
        assert main([*sample, "--out", str(tmp_path / "s0"), "--overwrite"]) == 0
        base_images = np.load(tmp_path / "s0" / "samples.npz")["images"]
        assert main([*sample, "--lora", f"{run}:0", "--out", str(tmp_path / "z"), "--overwrite"]) == 0
        assert np.array_equal(np.load(tmp_path / "z" / "samples.npz")["images"], base_images)
        assert main([*sample, "--lora", str(run), "--out", str(tmp_path / "l"), "--overwrite"]) == 0
        adapted = np.load(tmp_path / "l" / "samples.npz")["images"]
        assert main(["-q", "merge", "--checkpoint", str(tiny), "--lora", str(run), "--out",
                     str(tmp_path / "m"), "--overwrite"]) == 0
        merged_sample = [*sample[:4], str(tmp_path / "m"), *sample[5:]]
        assert main([*merged_sample, "--out", str(tmp_path / "ms"), "--overwrite"]) == 0
        merged = np.load(tmp_path / "ms" / "samples.npz")["images"]
        assert np.abs(merged - adapted).max() < 1e-3
        facts = info(str(run))
        assert facts["method"] == method and facts["parameters"] > 0
        capsys.readouterr()
        assert main(["list", str(tmp_path)]) == 0
        assert f"method {method}" in capsys.readouterr().out
        assert main(["-q", "resize", "--lora", str(run), "--checkpoint", str(tiny), "--rank", "2", "--out",
                     str(tmp_path / f"r_{method}")]) == 0
        converted = read_adapter(tmp_path / f"r_{method}")
        assert converted.method == "lora" and converted.extra["converted_from"] == method
        assert read_metadata(tmp_path / f"r_{method}" / "adapter.safetensors")["rank"] == "2"


@pytest.mark.parametrize("argv,message", [
    (["--method", "lora", "--factor", "2"], "--factor goes with --method lokr"),
    (["--method", "lokr", "--factor", "0"], "factor must be -1"),
    (["--full", "--method", "dora"], "--full trains every weight"),
    (["--method", "boft"], "invalid choice"),
])
def test_bad_method_arguments_are_one_line_and_write_nothing(tiny, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    try:
        code = _train(tiny, out, *argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and not out.exists()
