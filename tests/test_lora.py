"""Tests for lora4diffusion.lora: LoRA layers, injection, merging, the adapter-method contract (a second
method plugs in), adapter files, fingerprints, PEFT interop (the real ``peft`` package as the oracle),
extraction and resizing.

peft is a declared test dependency (pyproject [test]); it is imported only here, never by the package.
"""

import copy
import json
import subprocess
import sys

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora4diffusion.checkpoint import read_metadata, save_tensors
from lora4diffusion.cli.args import parse_lora_arg
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model, save_model
from lora4diffusion.formats import LORA_FORMATS, write_lora
from lora4diffusion.lora.adapters import (
    ADAPTER_FILE,
    FORMAT,
    Adapter,
    base_fingerprint,
    export_peft,
    import_peft,
    load_adapter,
    load_peft,
    read_adapter,
    save_adapter,
)
from lora4diffusion.lora.extract import extract_lora, resize_adapter
from lora4diffusion.lora.layers import (
    METHODS,
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    base_state_dict,
    delete_adapter,
    enable_lora,
    inject_lora,
    lora_layers,
    lora_parameter_count,
    lora_summary,
    merge_lora,
    set_adapter_weight,
    unload_lora,
    unmerge_lora,
)
from lora4diffusion.lora.lora import LoRA
from lora4diffusion.lora.method import AdapterMethod
from lora4diffusion.lora.targets import resolve_targets
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import TrainConfig

CFG = UNetConfig(
    image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), context_dim=32
)
X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
T = torch.tensor([3, 500])
Y = torch.tensor([1, 10])  # a digit and the null label


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def make_base(seed: int = 0) -> UNet:
    """A small UNet standing for a trained base: conv_out is non-zero, so gradients reach every layer."""
    torch.manual_seed(seed)
    model = UNet(CFG)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return model.eval()


def randomize(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    """A non-trivial adapter: random B (and A), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_down:
                for p in (layer.lora_down[name].weight, layer.lora_up[name].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X, T, Y)


# ----- layers and injection -----
def test_zero_init_is_bit_identical_and_q_k_get_gradients():
    model = make_base()
    ref = out(model)
    paths = inject_lora(model, "attention", rank=4, alpha=4.0)
    n_blocks = 4  # Transformer blocks: down level 1, the middle, 2 on up level 1
    assert len(paths) == 8 * n_blocks and all(isinstance(model.get_submodule(p), LoRALayer) for p in paths)
    assert torch.equal(out(model), ref)
    assert all(not p.requires_grad for k, p in model.named_parameters() if ".lora_" not in k)
    model(X, T, Y).square().mean().backward()
    for attn in ("attn1", "attn2"):  # several context tokens: q/k are not dead (the reference's bug)
        for proj in ("to_q", "to_k"):
            layer = model.get_submodule(f"mid_attn.{attn}.{proj}")
            assert layer.lora_up["default"].weight.grad.abs().sum() > 0, (attn, proj)
    assert all(p.grad is None for k, p in model.named_parameters() if ".lora_" not in k)


def test_presets_and_patterns():
    model = make_base()
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert resolve_targets(model, "all-linear") == linears
    ref = resolve_targets(model, "reference")
    assert len(ref) == 4 * 3 and all(
        p.split(".")[-2:][0] == "attn2" and p[-4:] in ("to_q", "to_k", "to_v") for p in ref
    )
    conv = resolve_targets(model, "conv")
    assert conv and all(p.rsplit(".", 1)[1] in ("conv1", "conv2", "skip") for p in conv)
    assert "conv_in" not in conv and "mid_res1.conv1" in conv
    both = resolve_targets(model, "attention+conv")
    assert set(both) == set(resolve_targets(model, "attention")) | set(conv)
    assert resolve_targets(model, ["to_q"]) == [p for p in linears if p.endswith(".to_q")]
    regex = "re:mid_attn\\.attn[12]\\.to_v"
    assert resolve_targets(model, regex) == ["mid_attn.attn1.to_v", "mid_attn.attn2.to_v"]
    assert resolve_targets(model, ["mid_attn.attn1.to_out"]) == ["mid_attn.attn1.to_out"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": "to_z"}, "'to_z'"),
        ({"targets": ["to_q", "nothing.here"]}, "'nothing.here'"),
        ({"targets": "re:to_(q"}, "not a valid regular expression"),
        ({"rank": 0}, "positive integer"),
        ({"rank": 33}, "mid_attn.attn1.to_q"),  # 32 channels: rank 33 cannot exist
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"init": "xavier"}, "init"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_injection_is_a_user_error_and_leaves_the_model_alone(kwargs, message):
    model = make_base()
    args = {"targets": ["mid_attn.attn1.to_q"], "rank": 4, "alpha": 4.0, **kwargs}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        inject_lora(model, **args)
    assert not lora_layers(model)


def test_duplicate_adapter_name_refused():
    model = make_base()
    inject_lora(model, "reference", 2, 2.0)
    with pytest.raises(UserError, match="already has an adapter named 'default'"):
        inject_lora(model, "reference", 2, 2.0)


def test_parameter_count():
    model = make_base()
    inject_lora(model, ["mid_attn.attn2.to_k"], rank=4, alpha=4.0)  # Linear(32 -> 32)
    assert lora_parameter_count(model) == 4 * 32 + 32 * 4
    s = lora_summary(model)
    assert s["base_params"] == sum(p.numel() for p in make_base().parameters())
    assert s["share"] == pytest.approx(256 / s["base_params"]) and s["modules"] == 1
    inject_lora(model, ["mid_attn.attn2.to_v"], rank=2, alpha=2.0, name="attn")  # also a path part
    assert lora_parameter_count(model, "attn") == 2 * 32 * 2 and lora_parameter_count(model, "default") == 256


def test_training_changes_only_lora_parameters():
    model = make_base()
    inject_lora(model, "attention+conv", rank=2, alpha=2.0, init="kaiming")
    before_base = {k: v.clone() for k, v in base_state_dict(model).items()}
    before_lora = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    assert before_lora and all(".lora_" in k for k in before_lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(X, T, Y).square().mean().backward()
        opt.step()
    after = base_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in before_base.items())
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[k], v) for k, v in before_lora.items())  # A and B both moved


def test_trainer_trains_and_exports_only_the_adapter(tmp_path):
    model = make_base()
    inject_lora(model, "reference", rank=2, alpha=2.0)
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    cfg = TrainConfig(
        steps=2,
        batch_size=4,
        lr=1e-2,
        warmup=1,
        ema_decay=0.0,
        checkpoint_every=2,
        sample_every=0,
        bf16=False,
        channels_last=False,
    )
    trainer = Trainer(
        model,
        NoiseSchedule(DiffusionConfig()),
        images,
        torch.arange(8) % 10,
        cfg,
        tmp_path,
        export=lambda m, d: save_adapter(m, d, metadata={"steps": trainer.step}),
    )
    assert all(".lora_" in k for k in trainer.params)
    trainer.fit(progress=False)
    assert all(torch.equal(base_state_dict(model)[k], v) for k, v in before.items())
    adapter = read_adapter(tmp_path)
    assert adapter.extra["steps"] == "2" and len(adapter.modules) == 12


def test_merge_unmerge_scale_zero_and_disable():
    model = make_base()
    base_out, w0 = out(model), {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, "attention+conv", rank=3, alpha=6.0)
    randomize(model)
    adapted = out(model)
    assert (adapted - base_out).abs().max() > 1e-2
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    assert torch.allclose(out(model), adapted, atol=1e-5, rtol=0)
    merged_w = base_state_dict(model)  # reads the unmerged copy: merging does not change the base's identity
    assert all(torch.equal(merged_w[k], w0[k]) for k in w0)
    assert not torch.equal(model.mid_attn.attn2.to_q.base_layer.weight, w0["mid_attn.attn2.to_q.weight"])
    unmerge_lora(model)
    for path, layer in lora_layers(model).items():
        assert (layer.base_layer.weight - w0[f"{path}.weight"]).abs().max() <= 1e-6
    assert torch.allclose(out(model), adapted, atol=1e-6, rtol=0)
    set_adapter_weight(model, "default", 0.0)
    assert torch.equal(out(model), base_out)
    set_adapter_weight(model, "default", 1.0)
    merge_lora(model)
    enable_lora(model, False)  # disabling unmerges: the base alone again
    assert torch.equal(out(model), base_out) and not any(m.merged for m in lora_layers(model).values())
    with pytest.raises(UserError, match="disabled"):
        merge_lora(model)
    enable_lora(model, True)
    assert torch.allclose(out(model), adapted, atol=1e-6, rtol=0)


def test_two_adapters_with_weights_equal_the_manual_sum():
    model = make_base()
    plain = make_base()
    inject_lora(model, "attention", rank=2, alpha=4.0, name="a")
    inject_lora(model, "reference+conv", rank=3, alpha=3.0, name="b", rslora=True)
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    set_adapter_weight(model, "a", 0.5)
    # the manual sum: W = W0 + 0.5 (4/2) B_a A_a + 1 (3/sqrt 3) B_b A_b, written into a plain model
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            w = plain.get_submodule(path).weight
            for name, (weight, scale) in {"a": (0.5, 2.0), "b": (1.0, 3 / 3**0.5)}.items():
                if name in layer.lora_down:
                    a, b = layer.lora_down[name].weight, layer.lora_up[name].weight
                    w += weight * scale * (b.flatten(1) @ a.flatten(1)).view(w.shape)
    assert torch.allclose(out(model), out(plain), atol=1e-5, rtol=0)
    # and at one layer, eq. 3 written out
    layer = model.mid_attn.attn2.to_q
    h = torch.randn(3, 5, 32)
    a, b = (
        (layer.lora_down["a"].weight, layer.lora_up["a"].weight),
        (layer.lora_down["b"].weight, layer.lora_up["b"].weight),
    )
    want = (
        F.linear(h, layer.base_layer.weight)
        + 0.5 * 2.0 * h @ a[0].T @ a[1].T
        + 3 / 3**0.5 * h @ b[0].T @ b[1].T
    )
    assert torch.allclose(layer(h), want, atol=1e-5, rtol=0)


def test_conv_wrapper_matches_its_merged_kernel():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = LoRAConv2d(conv, rank=2, alpha=2.0)
    nn.init.normal_(layer.lora_up["default"].weight)
    x = torch.randn(2, 4, 9, 9)
    want = F.conv2d(x, conv.weight + layer.delta_weight("default"), conv.bias, stride=2, padding=1)
    assert torch.allclose(layer(x), want, atol=1e-5, rtol=0)
    assert not conv.weight.requires_grad and not conv.bias.requires_grad


def test_lora_branch_stays_fp32_under_bf16_autocast():
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=4.0)
    nn.init.normal_(layer.lora_up["default"].weight)
    seen = []
    layer.lora_up["default"].register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == [(torch.float32, torch.float32)]
    assert layer.lora_down["default"].weight.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), layer(x), atol=0.1)


def test_unload_gives_a_plain_model():
    model = make_base()
    inject_lora(model, "attention+conv", rank=2, alpha=2.0)
    randomize(model)
    adapted = out(model)
    unload_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == set(make_base().state_dict())
    assert torch.allclose(out(model), adapted, atol=1e-5, rtol=0)


# ----- adapter files and fingerprints -----
def test_save_load_round_trip(tmp_path):
    model = make_base()
    inject_lora(model, "attention+conv", rank=2, alpha=3.0, rslora=True)
    randomize(model)
    adapted = out(model)
    path = save_adapter(model, tmp_path / "bold", metadata={"style": "bold", "steps": 100})
    assert path == tmp_path / "bold" / ADAPTER_FILE
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["version"] == "1" and meta["rank"] == "2"
    assert float(meta["alpha"]) == 3.0 and meta["scale_rule"] == "rslora" and meta["init"] == "normal"
    assert meta["style"] == "bold" and meta["steps"] == "100"
    assert meta["base_fingerprint"] == base_fingerprint(model)
    paths = json.loads(meta["targets"])
    keys = set(read_adapter(path).tensors)
    assert keys == {f"{p}.lora_{s}.weight" for p in paths for s in ("down", "up")}

    fresh = make_base()
    assert load_adapter(fresh, tmp_path / "bold") == "bold"  # directory name
    assert torch.equal(out(fresh), adapted)
    assert load_adapter(fresh, path, weight=0.0) == "bold_2"  # the file works too; names stay unique
    assert torch.equal(out(fresh), adapted)


def test_fingerprint_is_stable_and_tracks_the_weights(tmp_path):
    model = make_base()
    save_model(tmp_path / "m", model, DiffusionConfig())
    fp = base_fingerprint(model)
    assert base_fingerprint(load_model(tmp_path / "m")[0]) == fp
    assert base_fingerprint(load_model(tmp_path / "m")[0]) == fp  # loaded twice
    code = (
        "import torch; torch.set_num_threads(1); from lora4diffusion.folders.model import load_model;"
        "from lora4diffusion.lora.adapters import base_fingerprint;"
        f"print(base_fingerprint(load_model({str(tmp_path / 'm')!r})[0]))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == fp
    )
    inject_lora(model, "attention", rank=2, alpha=2.0)
    randomize(model)
    merge_lora(model)
    assert base_fingerprint(model) == fp  # LoRA tensors and merged deltas are not part of the base
    other = make_base()
    with torch.no_grad():
        other.conv_in.bias[0] += 1e-6
    assert base_fingerprint(other) != fp


def test_fingerprint_mismatch_refused_unless_forced(tmp_path):
    model = make_base(seed=0)
    inject_lora(model, "reference", rank=2, alpha=2.0)
    randomize(model)
    save_adapter(model, tmp_path)
    other = make_base(seed=1)
    with pytest.raises(
        UserError,
        match=r"different base model \(fingerprint [0-9a-f]{12}, this base"
        r" [0-9a-f]{12}\); use --force",
    ):
        load_adapter(other, tmp_path)
    assert not lora_layers(other)
    load_adapter(other, tmp_path, force=True)
    assert len(lora_layers(other)) == 12


def test_broken_files_are_user_errors(tmp_path):
    model = make_base()
    inject_lora(model, "reference", rank=2, alpha=2.0)
    path = save_adapter(model, tmp_path / "good")
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "zero-bytes": b"", "garbage": b"\x00" * 64}
    for name, content in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / ADAPTER_FILE).write_bytes(content)
        with pytest.raises(UserError, match=name):
            load_adapter(make_base(), tmp_path / name)
    empty = Adapter({}, 2, 2.0, fingerprint=base_fingerprint(model)).save(tmp_path / "empty")
    with pytest.raises(UserError, match="no LoRA tensors"):
        load_adapter(make_base(), empty)
    save_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)}, {"format": "something-else"})
    with pytest.raises(UserError, match="not a lora4diffusion adapter"):
        read_adapter(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_adapter(make_base(), tmp_path / "missing")


def test_shape_mismatch_names_the_module(tmp_path):
    model = make_base()
    inject_lora(model, "reference", rank=2, alpha=2.0)
    adapter = read_adapter(save_adapter(model, tmp_path / "a"))
    adapter.tensors["mid_attn.attn2.to_k.lora_down.weight"] = torch.zeros(2, 7)
    adapter.save(tmp_path / "b")
    with pytest.raises(UserError, match=r"module mid_attn\.attn2\.to_k: adapter shapes \(2, 7\)"):
        load_adapter(make_base(), tmp_path / "b")


def test_parse_lora_arg():
    assert parse_lora_arg("runs/a:0.5") == ("runs/a", 0.5)
    assert parse_lora_arg("runs/a") == ("runs/a", 1.0)
    assert parse_lora_arg("c:/x/a:-1") == ("c:/x/a", -1.0)
    with pytest.raises(UserError):
        parse_lora_arg("a:nan")


# ----- PEFT, the oracle -----
@pytest.mark.parametrize("init, rslora", [("normal", False), ("kaiming", True)])
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, init, rslora):
    model = make_base()
    inject_lora(model, "attention+conv", rank=3, alpha=5.0, init=init, rslora=rslora)
    randomize(model)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 5.0 and config["use_rslora"] is rslora
    plain = UNet(CFG)
    plain.load_state_dict(base_state_dict(model))
    peft_model = peft.PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    assert len([m for m in peft_model.modules() if hasattr(m, "lora_A")]) == len(lora_layers(model))
    assert torch.allclose(out(peft_model), out(model), atol=1e-5, rtol=0)


def test_peft_adapter_imports_with_the_same_outputs(tmp_path):
    base = make_base()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out", "conv1"],
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()
    assert load_peft(base, tmp_path / "peft") == "default"
    assert torch.allclose(out(base), out(peft_model), atol=1e-5, rtol=0)
    direct = make_base()
    assert load_adapter(direct, tmp_path / "peft") == "peft"  # load_adapter reads PEFT directories too
    assert torch.equal(out(direct), out(base))
    assert (out(base) - out(make_base())).abs().max() > 1e-2  # the adapter does something
    adapter = import_peft(tmp_path / "peft", base_model=make_base())
    adapter.save(tmp_path / "ours")
    fresh = make_base()
    load_adapter(fresh, tmp_path / "ours")  # fingerprint recorded at import: checked, and it matches
    assert torch.allclose(out(fresh), out(peft_model), atol=1e-5, rtol=0)


# ----- extraction and resizing -----
def test_extract_recovers_a_known_low_rank_delta():
    base = make_base()
    tuned = copy.deepcopy(base)
    targets = "attention+conv"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path in resolve_targets(base, targets):
            w = tuned.get_submodule(path).weight
            u, v = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w[0].numel(), generator=g)
            w += 0.1 * (u @ v).view(w.shape)
    adapter, errors = extract_lora(base, tuned, 2, targets)
    assert errors["overall"] < 1e-5 and adapter.scale == 1.0 and adapter.fingerprint == base_fingerprint(base)
    for path in adapter.modules:
        a, b = adapter.pair(path)
        delta = tuned.get_submodule(path).weight - base.get_submodule(path).weight
        assert (b.flatten(1) @ a.flatten(1)).view(delta.shape).sub(delta).abs().max() <= 1e-5
    load_adapter(base, adapter)
    assert torch.allclose(out(base), out(tuned), atol=1e-4, rtol=0)
    _, coarse = extract_lora(make_base(), tuned, 1, targets)  # rank 1 < 2: a real, known-size error
    assert 0.05 < coarse["overall"] < 1


def test_resize_error_is_the_svd_tail_energy(tmp_path):
    model = make_base()
    inject_lora(model, "attention+conv", rank=4, alpha=2.0)
    randomize(model)
    save_adapter(model, tmp_path)
    adapter = read_adapter(tmp_path)
    small, errors = resize_adapter(tmp_path, 2)
    assert small.rank == 2 and small.alpha == 2.0 and set(small.modules) == set(adapter.modules)
    tails, totals = [], []
    for path in adapter.modules:
        a, b = adapter.pair(path)
        delta = adapter.scale * (b.double().flatten(1) @ a.double().flatten(1))
        s = torch.linalg.svdvals(delta)
        tails.append(float((s[2:] ** 2).sum()))
        totals.append(float((s**2).sum()))
        assert errors[path] == pytest.approx((tails[-1] / totals[-1]) ** 0.5, rel=1e-6)
        a2, b2 = small.pair(path)
        approx = small.scale * (b2.double().flatten(1) @ a2.double().flatten(1))
        assert float((delta - approx).norm() / delta.norm()) == pytest.approx(errors[path], rel=1e-4)
    assert errors["overall"] == pytest.approx((sum(tails) / sum(totals)) ** 0.5, rel=1e-6)
    same, none = resize_adapter(adapter, 4)
    assert none["overall"] < 1e-6
    with pytest.raises(UserError, match="between 1 and the adapter's rank 4"):
        resize_adapter(adapter, 5)


# ----- the adapter-method contract: a second method gets the wrapper's features for free -----
class Dense(AdapterMethod):
    """A full-rank method, ΔW = (alpha/r) D with D shaped like W0 and zero at start: the least a method writes
    (its tensors, ``shapes`` and ``delta_weight``; ``forward`` is the default, ΔW applied as a weight)."""

    kind = "dense"
    keys = ("dense.weight",)

    def __init__(self, base, rank, alpha, init="normal", rslora=False, dropout=0.0, **options):
        super().__init__(base, rank, alpha, init, rslora, dropout, **options)
        zeros = torch.zeros(base.weight.shape, device=base.weight.device)
        self.dense = nn.ParameterDict({"weight": nn.Parameter(zeros)})

    @classmethod
    def shapes(cls, base, rank, **options):
        return {"dense.weight": tuple(base.weight.shape)}

    def delta_weight(self, multiplier=1.0, base_weight=None):
        return self.dense["weight"].float() * (multiplier * self.scale)


def randomize_dense(model: nn.Module, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.adapters:
                d = layer.dense[name]["weight"]  # the wrapper holds the method's child under its name
                d.copy_(torch.randn(d.shape, generator=g) * 0.05)


def test_a_new_method_gets_merging_multipliers_and_deletion_for_free():
    model, base = make_base(), make_base()
    base_out, fp = out(base), base_fingerprint(base)
    inject_lora(model, "attention", rank=2, alpha=2.0, name="a")
    randomize(model, "a")
    only_a = out(model)
    paths = inject_lora(model, "reference+conv", rank=2, alpha=4.0, name="d", method=Dense)
    assert torch.equal(out(model), only_a)  # D = 0: adding the method changes nothing
    randomize_dense(model, "d")
    keys = set(model.state_dict())
    assert {f"{p}.dense.d.weight" for p in paths} <= keys  # <path>.<child>.<name>.<param>
    assert {"mid_attn.attn2.to_q.lora_down.a.weight", "mid_attn.attn2.to_q.base_layer.weight"} <= keys
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.dense.d.weight" for p in paths}
    assert lora_parameter_count(model, "d") == sum(base.get_submodule(p).weight.numel() for p in paths)
    assert base_fingerprint(model) == fp  # the method's tensors are not part of the base

    # the forward (the default: ΔW applied as a weight, convs with the base's stride/padding) equals W0 + m ΔW
    set_adapter_weight(model, "d", 0.5)
    plain = make_base()
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            w = plain.get_submodule(path).weight
            for name in layer.adapters:
                w += layer.delta_weight(name)
            if "d" in layer.adapters:
                want = 0.5 * 2.0 * layer.dense["d"]["weight"]  # m (alpha/r) D
                assert torch.allclose(layer.delta_weight("d"), want, atol=1e-7, rtol=0)
    adapted = out(model)
    assert torch.allclose(adapted, out(plain), atol=1e-5, rtol=0)
    assert (adapted - only_a).abs().max() > 1e-3

    w0 = {k: v.clone() for k, v in base_state_dict(model).items()}
    merge_lora(model)
    assert torch.allclose(out(model), adapted, atol=1e-5, rtol=0)
    set_adapter_weight(model, "d", 0.25)  # merged: unmerged, re-weighted, merged again
    merged_quarter = out(model)
    unmerge_lora(model)
    assert all(torch.equal(v, w0[k]) for k, v in base_state_dict(model).items())
    for path, layer in lora_layers(model).items():  # W0 restored exactly
        assert torch.equal(layer.base_layer.weight, w0[f"{path}.weight"])
    assert torch.allclose(out(model), merged_quarter, atol=1e-5, rtol=0)
    set_adapter_weight(model, "a", 0.0)
    set_adapter_weight(model, "d", 0.0)
    assert torch.equal(out(model), base_out)  # every multiplier 0: the base, bit for bit
    set_adapter_weight(model, "a", 1.0)
    set_adapter_weight(model, "d", 1.0)
    enable_lora(model, False)
    assert torch.equal(out(model), base_out)
    enable_lora(model, True)

    model.train()
    assert all(a.training for layer in lora_layers(model).values() for a in layer.adapters.values())
    model.eval()
    assert not any(a.training for layer in lora_layers(model).values() for a in layer.adapters.values())

    delete_adapter(model, "d")
    assert torch.equal(out(model), only_a) and not any(".dense." in k for k in model.state_dict())
    delete_adapter(model, "a")
    assert not lora_layers(model) and set(model.state_dict()) == set(base.state_dict())
    assert torch.equal(out(model), base_out)


def test_a_new_method_round_trips_through_an_adapter_file(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, Dense.kind, Dense)  # a real method adds this line to layers.METHODS
    model = make_base()
    inject_lora(model, "attention+conv", rank=2, alpha=3.0, name="d", method=Dense)
    randomize_dense(model, "d")
    path = save_adapter(model, tmp_path / "dense", name="d")
    meta = read_metadata(path)
    assert meta["method"] == "dense" and meta["rank"] == "2"
    assert meta["base_fingerprint"] == base_fingerprint(model)
    adapter = read_adapter(path)
    assert adapter.method == "dense" and "method" not in adapter.extra
    assert set(adapter.tensors) == {f"{p}.dense.weight" for p in adapter.modules}
    fresh = make_base()
    assert load_adapter(fresh, path, weight=0.5) == "dense"
    assert all(isinstance(layer.adapters["dense"], Dense) for layer in lora_layers(fresh).values())
    set_adapter_weight(model, "d", 0.5)
    assert torch.equal(out(fresh), out(model))
    with pytest.raises(UserError, match="PEFT's folders hold LoRA, DoRA, LoHa and LoKr adapters, not dense"):
        export_peft(adapter, tmp_path / "peft")
    for fmt in LORA_FORMATS:  # every foreign layout names LoRA's A/B pairs: refused, nothing written
        with pytest.raises(UserError, match=f"a dense adapter cannot be written as {fmt}"):
            write_lora(adapter, fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()
    adapter.tensors["mid_attn.attn2.to_k.dense.weight"] = torch.zeros(32, 7)
    with pytest.raises(UserError, match=r"module mid_attn\.attn2\.to_k: adapter shapes \(32, 7\), this model"
                                        r" needs \(32, 32\)"):
        load_adapter(make_base(), adapter)
    inject_lora(model, "reference", rank=2, alpha=2.0)  # a LoRA file stays as it always was: no "method"
    assert "method" not in read_metadata(save_adapter(model, tmp_path / "lora"))


def test_the_default_forward_applies_delta_weight_with_the_base_geometry():
    """AdapterMethod.forward (ΔW as a weight) equals LoRA's factored B (A x); a strided, dilated conv too."""
    torch.manual_seed(0)
    for base, x in ((nn.Linear(12, 10), torch.randn(3, 5, 12)),
                    (nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), torch.randn(2, 4, 11, 11))):
        lora = LoRA(base, rank=3, alpha=6.0, rslora=True)
        nn.init.normal_(lora.lora_up.weight)
        assert lora.delta_weight(0.5).shape == base.weight.shape
        factored, dense = lora(x, 0.5), AdapterMethod.forward(lora, x, 0.5)
        assert factored.shape == base(x).shape and torch.allclose(dense, factored, atol=1e-5, rtol=0)
        assert lora.metadata() == {"rank": 3, "alpha": 6.0, "init": "normal", "rslora": True, "dropout": 0.0}
        assert {k: tuple(t.shape) for k, t in lora.state_dict().items()} == LoRA.shapes(base, 3)


def test_a_method_keeps_its_tensors_in_child_modules():
    class Bare(Dense):
        def __init__(self, base, *args, **kw):
            super().__init__(base, *args, **kw)
            self.extra = nn.Parameter(torch.zeros(1))  # not in a child: the wrapper could not file it

    with pytest.raises(TypeError, match="child modules"):
        inject_lora(make_base(), ["mid_attn.attn2.to_q"], rank=1, alpha=1.0, method=Bare)
