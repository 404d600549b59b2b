"""The adapter methods beyond LoRA (DoRA, LoHa, LoKr), each against its reference: PEFT's layer
(``LoraConfig(use_dora=True)``, ``LoHaConfig``, ``LoKrConfig``) and LyCORIS's module, given the same
tensors, compute the same forward and the same merged weight (fp32); and what the wrapper gives every method
(multiplier 0 = the base bit for bit, exact unmerge, mixing methods) holds for each.

peft and lycoris-lora are test-only dependencies (pyproject [test]), imported only in tests.
"""

import copy
import json

import peft
import pytest
import torch
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from lora4diffusion.checkpoint import load_tensors, read_metadata, save_tensors
from lora4diffusion.errors import UserError
from lora4diffusion.lora.adapters import adapter_from_model, load_adapter, read_adapter, save_adapter
from lora4diffusion.lora.dora import DoRA
from lora4diffusion.lora.extract import convert_to_lora
from lora4diffusion.lora.layers import METHODS, LoRALayer, inject_lora, lora_layers, set_adapter_weight
from lora4diffusion.lora.loha import LoHa
from lora4diffusion.lora.lokr import LoKr, factorization, layout
from lora4diffusion.lora.lora import LoRA
from lora4diffusion.lora.oft import OFT, cayley
from lora4diffusion.models.unet import UNet, UNetConfig

RANK, ALPHA = 4, 6.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


class Net(nn.Module):
    """One Linear and one strided Conv2d with biases: the two layer types every method adapts."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(24, 40)
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"fc": torch.randn(5, 24, generator=g), "c1": torch.randn(2, 8, 9, 9, generator=g)}


def randomize(layer: LoRALayer, name: str, seed: int = 1, std: float = 0.2) -> None:
    """Every tensor of adapter ``name`` random (a trained adapter: no factor left at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# ----- the oracles: PEFT's layers, given our tensors -----
def peft_config(kind: str, **options):
    common = {"target_modules": ["fc", "c1"], "r": RANK}
    if kind == "dora":
        return peft.LoraConfig(lora_alpha=ALPHA, use_dora=True, **common)
    if kind == "loha":
        return peft.LoHaConfig(alpha=ALPHA, **common)
    if kind == "oft":  # our rank is OFT's block size; Cayley's transform exact, as ours
        return peft.OFTConfig(r=0, oft_block_size=RANK, use_cayley_neumann=False,
                              target_modules=common["target_modules"])
    # LyCORIS's scale is 1 when W1 and W2 are both full; PEFT's is always alpha / r
    return peft.LoKrConfig(alpha=options.pop("peft_alpha", ALPHA), decompose_factor=options.get("factor", -1),
                           decompose_both=options.get("decompose_both", False), **common)


def peft_tensor(layer: nn.Module, key: str) -> torch.Tensor:
    """PEFT's parameter for our key (``lora_down.weight`` -> ``lora_A.default.weight``, ...)."""
    child = key.removesuffix(".weight")
    if child in ("lora_down", "lora_up"):
        return getattr(layer, {"lora_down": "lora_A", "lora_up": "lora_B"}[child])["default"].weight
    if child == "dora_magnitude":
        return layer.lora_magnitude_vector["default"].weight
    if child == "oft_r":
        return layer.oft_R["default"].weight
    return getattr(layer, child)["default"]


@pytest.mark.parametrize("kind,options", [
    ("dora", {}), ("loha", {}), ("lokr", {}), ("lokr", {"decompose_both": True}), ("lokr", {"factor": 2}),
    ("oft", {}),
])
def test_each_method_equals_peft_forward_and_merged_weight(kind, options):
    """Our adapter with PEFT's layer's tensors: the same output (fp32, <= 1e-6 of the output's size) and
    the same merged weight, on a Linear and on a strided Conv2d."""
    method = METHODS[kind]
    ours_net, theirs_net = Net(), Net()
    config = peft_config(kind, **dict(options))
    inject_lora(ours_net, ["fc", "c1"], RANK, ALPHA, name="a", method=method, init="kaiming", options=options)
    peft_model = peft.get_peft_model(theirs_net, config)
    x = inputs()
    for path in ("fc", "c1"):
        layer = ours_net.get_submodule(path)
        if kind == "lokr" and layer.adapters["a"].full:  # both factors full: LyCORIS's scale 1
            peft_model = peft.get_peft_model(Net(), peft_config(kind, peft_alpha=float(RANK), **options))
        theirs = peft_model.base_model.model.get_submodule(path)
        randomize(layer, "a")
        with torch.no_grad():
            for key, t in layer.adapters["a"].state_dict().items():
                target = peft_tensor(theirs, key)  # DoRA on a conv: PEFT's m is [1, out, 1, 1]
                target.copy_(t.view(target.shape))
        ours_out, theirs_out = layer(x[path]), theirs(x[path])
        size = theirs_out.abs().max()
        assert (ours_out - theirs_out).abs().max() <= 1e-6 * size, (kind, path)
        # the same gradients too (DoRA: the norm a constant in the backward pass, as PEFT)
        ours_out.square().sum().backward()
        theirs_out.square().sum().backward()
        for key, t in layer.adapters["a"].named_parameters():
            want = peft_tensor(theirs, key).grad.view(t.shape)
            assert (t.grad - want).abs().max() <= 1e-5 * want.abs().max(), (kind, path, key)
        assert (ours_out - layer.base_layer(x[path])).abs().max() > 1e-2 * size  # the adapter does something
        w0 = layer.base_layer.weight.detach().clone()
        layer.merge()
        theirs.merge()
        diff = (layer.base_layer.weight - theirs.get_base_layer().weight).abs().max()
        assert diff <= 1e-6 * w0.abs().max(), (kind, path)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_each_method_equals_lycoris(kind):
    """LyCORIS's module (lycoris-lora), built from our tensors in its layout, gives the same output; and,
    for DoRA and LoKr, the same merged weight. DoRA's magnitude is LyCORIS's ``dora_scale`` reshaped to
    [out, 1, ...] (``wd_on_out``). lycoris-lora 4.1.3's ``LohaModule.get_merged_weight`` multiplies by
    alpha / r twice (``get_weight`` has already scaled), while its forward scales once, as A1111 and ComfyUI
    do: the forward is the one compared for LoHa."""
    net = Net()
    inject_lora(net, ["fc", "c1"], RANK, ALPHA, name="a", method=METHODS[kind])
    x = inputs()
    for path in ("fc", "c1"):
        layer = net.get_submodule(path)
        randomize(layer, "a")
        t = {k.removesuffix(".weight"): v.detach() for k, v in layer.adapters["a"].state_dict().items()}
        with torch.no_grad():
            module = lycoris_module(kind, copy.deepcopy(layer.base_layer), t, torch.tensor(ALPHA))
            theirs_out, ours_out = module(x[path]), layer(x[path])
        assert (ours_out - theirs_out).abs().max() <= 1e-6 * theirs_out.abs().max(), (kind, path)
        if kind != "loha":
            theirs, _ = module.get_merged_weight(multiplier=1.0)
            ours = layer.base_layer.weight + layer.delta_weight("a")
            assert (ours - theirs.view(ours.shape)).abs().max() <= 1e-6 * ours.abs().max(), (kind, path)


def lycoris_module(kind: str, base: nn.Module, t: dict[str, torch.Tensor], alpha: torch.Tensor) -> nn.Module:
    if kind == "dora":
        scale = t["dora_magnitude"].view(-1, *[1] * (base.weight.dim() - 1))
        module = LoConModule.make_module_from_state_dict(
            "x", base, t["lora_up"], t["lora_down"], None, alpha, scale)
    elif kind == "loha":
        module = LohaModule.make_module_from_state_dict(
            "x", base, t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], None, None, alpha,
            None)
    else:
        module = LokrModule.make_module_from_state_dict(
            "x", base, t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
            t.get("lokr_w2_a"), t.get("lokr_w2_b"), None, None, alpha, None)
    return module


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr", "oft"])
def test_every_method_starts_as_the_base_and_gets_the_wrapper_for_free(kind):
    """ΔW = 0 at start; multiplier 0 = the base bit for bit; merge then unmerge restores W0 exactly; output
    linear in the multiplier (DoRA: along the line W0 -> W'); mixed with a LoRA on the same layers."""
    net, base = Net(), Net()
    x = inputs()
    inject_lora(net, ["fc", "c1"], RANK, ALPHA, name="m", method=METHODS[kind])
    for path in ("fc", "c1"):
        assert torch.equal(net.get_submodule(path)(x[path]), base.get_submodule(path)(x[path]))
    inject_lora(net, ["fc", "c1"], 2, 2.0, name="l")
    for path in ("fc", "c1"):
        layer = net.get_submodule(path)
        randomize(layer, "m", seed=2)
        randomize(layer, "l", seed=3)
        y0 = base.get_submodule(path)(x[path])
        layer.set_multiplier("l", 0.0)
        layer.set_multiplier("m", 0.0)
        assert torch.equal(layer(x[path]), y0)
        full = (layer.set_multiplier("m", 1.0), layer(x[path]))[1]
        half = (layer.set_multiplier("m", 0.5), layer(x[path]))[1]
        assert torch.allclose(half, (y0 + full) / 2, atol=1e-5, rtol=0)
        layer.set_multiplier("l", 1.0)
        both = layer(x[path])
        w0 = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert torch.allclose(layer(x[path]), both, atol=1e-5, rtol=0)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0)
        layer.merge(["l"])  # DoRA's ΔW is relative to W0 without the merged LoRA
        assert torch.allclose(layer(x[path]), both, atol=1e-5, rtol=0)
        layer.unmerge()
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".l." in k for k in trainable)  # the last injected adapter is the trainable one
    set_adapter_weight(net, "m", 0.0)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr", "oft"])
def test_every_method_trains_every_tensor(kind):
    """Once trained a little (no factor left at zero), one backward pass reaches each of the method's
    tensors."""
    net = Net()
    inject_lora(net, ["fc", "c1"], RANK, ALPHA, name="m", method=METHODS[kind])
    for path in ("fc", "c1"):
        randomize(net.get_submodule(path), "m")
    x = inputs()
    loss = net.fc(x["fc"]).square().mean() + net.c1(x["c1"]).square().mean()
    loss.backward()
    for path in ("fc", "c1"):
        for key, p in net.get_submodule(path).adapters["m"].named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, (kind, path, key)


def test_dora_norm_axis_in_is_a1111s():
    """norm_axis "in": m per input channel ([in]); W' = m (W0 + ΔW) / ||W0 + ΔW|| with the norm over the
    output rows (and kernel), the closed form A1111 applies to a ``dora_scale`` of shape [1, in, ...]."""
    for base in (nn.Linear(24, 40), nn.Conv2d(8, 16, 3)):
        dora = DoRA(base, RANK, ALPHA, norm_axis="in")
        assert dora.dora_magnitude.weight.shape == (base.weight.shape[1],)
        with torch.no_grad():
            dora.lora_up.weight.normal_()
        w0 = base.weight.detach()
        v = w0 + LoRA.delta_weight(dora)
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
        shape = [1, -1] + [1] * (v.dim() - 2)
        want = v * (dora.dora_magnitude.weight / norm).view(shape) - w0
        assert torch.allclose(dora.delta_weight(1.0, w0), want, atol=1e-6, rtol=0)
        assert dora.metadata()["options"] == {"norm_axis": "in"}
    with pytest.raises(UserError, match="norm_axis must be 'out' or 'in'"):
        DoRA(nn.Linear(4, 4), 1, 1.0, norm_axis="rows")
    with pytest.raises(UserError, match="loha has no option 'factor'"):
        LoHa(nn.Linear(4, 4), 1, 1.0, factor=2)


def test_lokr_layout_follows_lycoris_rules():
    """Full vs low-rank W1/W2 and the factor split as LyCORIS's LokrModule builds them, on every Linear and
    Conv2d shape of our UNet and a few more; and its scale is 1 exactly when both are full."""
    shapes = [(32, 32), (64, 32), (40, 24), (128, 64), (96, 96)]
    for out, inn in shapes:
        for rank in (1, 2, 4, 8, 16):
            for options in ({}, {"decompose_both": True}, {"factor": 4}, {"full_matrix": True}):
                for base in (nn.Linear(inn, out), nn.Conv2d(inn, out, 3)):
                    ours = layout(base, rank, **LoKr.check_options(options))
                    lyco = LokrModule("x", base, 1.0, rank, 2.0 * rank, **options)
                    theirs = {f"{k}.weight": tuple(v.shape) for k, v in lyco.state_dict().items()
                              if k.startswith("lokr_")}
                    assert ours == theirs, (out, inn, rank, options)
                    method = LoKr(base, rank, 2.0 * rank, **options)
                    assert method.scale == pytest.approx(lyco.scale), (out, inn, rank, options)
    assert factorization(128) == (8, 16) and factorization(127) == (1, 127) and factorization(32, 8) == (4, 8)


def test_loha_and_lokr_shapes_and_problems():
    base = nn.Conv2d(8, 16, 3)
    assert LoHa.shapes(base, 3) == {"hada_w1_a.weight": (16, 3), "hada_w1_b.weight": (3, 72),
                                    "hada_w2_a.weight": (16, 3), "hada_w2_b.weight": (3, 72)}
    good = {k: torch.zeros(s) for k, s in LoHa.shapes(base, 3).items()}
    assert LoHa.problem(good, 3) is None
    assert "lacks hada_w2_b" in LoHa.problem({k: v for k, v in good.items() if "w2_b" not in k}, 3)
    assert "not rank-2 LoHa factors" in LoHa.problem(good, 2)
    lokr = {k: torch.zeros(s) for k, s in LoKr.shapes(nn.Linear(64, 64), 1).items()}
    assert set(lokr) == {"lokr_w1.weight", "lokr_w2_a.weight", "lokr_w2_b.weight"}
    assert LoKr.problem(lokr, 1) is None
    assert "either lokr_w2 or both" in LoKr.problem({**lokr, "lokr_w2.weight": torch.zeros(8, 8)}, 1)
    assert "either lokr_w1 or both" in LoKr.problem({"lokr_w2.weight": torch.zeros(8, 8)}, 1)
    with pytest.raises(UserError, match="factor must be -1"):
        LoKr.check_options({"factor": 0})
    with pytest.raises(UserError, match="option decompose_both must be bool"):
        LoKr.check_options({"decompose_both": 1})


# ----- adapter files: every method, with its options, in our format -----
CFG = UNetConfig(
    image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), context_dim=32
)
X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
T, Y = torch.tensor([3, 500]), torch.tensor([1, 10])
CASES = [("dora", {}), ("dora", {"norm_axis": "in"}), ("loha", {}), ("lokr", {}),
         ("lokr", {"factor": 2, "decompose_both": True}), ("oft", {})]


def make_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(CFG)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return model.eval()


def unet_out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X, T, Y)


@pytest.mark.parametrize("kind,options", CASES)
def test_every_method_round_trips_through_our_adapter_file(tmp_path, kind, options):
    """save -> read -> load into a fresh base: the method, its options and every tensor come back, and the
    loaded model draws the same outputs (bit for bit) at any weight."""
    model = make_unet()
    inject_lora(model, "attention+conv", 2, 3.0, name="s", method=METHODS[kind], options=options)
    for layer in lora_layers(model).values():
        randomize(layer, "s", std=0.05)
    path = save_adapter(model, tmp_path / kind, name="s", metadata={"style": "bold"})
    meta = read_metadata(path)
    assert meta["method"] == kind and json.loads(meta.get("options", "{}")) == options
    adapter = read_adapter(path)
    assert (adapter.method, adapter.options, adapter.extra) == (kind, options, {"style": "bold"})
    assert sorted(adapter.modules) == sorted(lora_layers(model))
    fresh = make_unet()
    name = load_adapter(fresh, path, weight=0.5)
    set_adapter_weight(model, "s", 0.5)
    assert torch.equal(unet_out(fresh), unet_out(model))
    assert all(layer.adapters[name].opts == {**METHODS[kind].options, **options}
               for layer in lora_layers(fresh).values())
    set_adapter_weight(fresh, name, 0.0)
    assert torch.equal(unet_out(fresh), unet_out(make_unet()))


def test_an_adapter_file_with_bad_options_is_refused(tmp_path):
    model = make_unet()
    inject_lora(model, "attention", 2, 2.0, name="s", method=LoKr)
    path = save_adapter(model, tmp_path / "k", name="s")
    tensors, meta = load_tensors(path), read_metadata(path)
    for options, message in (("[1]", "options must be a JSON object"),
                             ('{"factr": 2}', "lokr has no option 'factr'"),
                             ('{"factor": "2"}', "option factor must be int"),
                             ("{", "options must be a JSON")):
        save_tensors(tmp_path / "bad.safetensors", tensors, {**meta, "options": options})
        with pytest.raises(UserError, match=message):
            read_adapter(tmp_path / "bad.safetensors")
    # a LoKr file whose layout is not what its options give on this model: refused before any change
    save_tensors(tmp_path / "bad.safetensors", tensors, {**meta, "options": '{"factor": 2}'})
    fresh = make_unet()
    with pytest.raises(UserError, match="adapter shapes .* this model needs"):
        load_adapter(fresh, tmp_path / "bad.safetensors")
    assert not lora_layers(fresh)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr", "oft"])
def test_convert_to_lora_is_the_truncated_svd_of_each_delta(kind):
    """A DoRA / LoHa / LoKr adapter as a LoRA: at full rank it reproduces every module's ΔW (for DoRA,
    W' - W0 on this base); at rank k its error is Eckart-Young's sqrt(sum of the discarded s_i^2 / sum of
    all), per module and overall."""
    model = make_unet()
    inject_lora(model, "attention", 2, 3.0, name="s", method=METHODS[kind])
    for layer in lora_layers(model).values():
        randomize(layer, "s", std=0.05)
    source = adapter_from_model(model, "s")
    with torch.no_grad():
        deltas = {p: layer.delta_weight("s").double().flatten(1) for p, layer in lora_layers(model).items()}
    full = min(min(d.shape) for d in deltas.values())
    exact, errors = convert_to_lora({"": model}, "s", full, source)
    assert exact.method == "lora" and exact.alpha == full and errors["overall"] < 1e-6
    for p, d in deltas.items():
        a, b = exact.pair(p)
        assert torch.allclose((b.double().flatten(1) @ a.double().flatten(1)), d, atol=1e-6, rtol=0)
    small, errors = convert_to_lora({"": model}, "s", 1, source)
    tails = totals = 0.0
    for p, d in deltas.items():
        s = torch.linalg.svdvals(d)
        tail, total = float((s[1:] ** 2).sum()), float((s**2).sum())
        assert errors[p] == pytest.approx((tail / total) ** 0.5, rel=1e-6)
        tails, totals = tails + tail, totals + total
    assert errors["overall"] == pytest.approx((tails / totals) ** 0.5, rel=1e-6)
    assert small.extra["converted_from"] == kind and small.fingerprint == source.fingerprint


def test_four_methods_mixed_in_one_model_through_files(tmp_path):
    """A LoRA, a DoRA, a LoHa and a LoKr on overlapping layers of one UNet: each saved to its own file and
    loaded into a fresh base gives the same output at mixed weights; merging all of them keeps the output,
    unmerging restores every W0 bit for bit, and all weights 0 is the base."""
    model, plain = make_unet(), make_unet()
    base_out = unet_out(plain)
    targets = {"lora": "attention", "dora": "all-linear", "loha": "attention+conv", "lokr": "conv"}
    weights = {"lora": 0.7, "dora": 1.0, "loha": -0.5, "lokr": 1.3}
    fresh = make_unet()
    for i, (kind, target) in enumerate(targets.items()):
        inject_lora(model, target, 2, 2.0, name=kind, method=METHODS[kind])
        for layer in lora_layers(model).values():
            if kind in layer.adapters:
                randomize(layer, kind, seed=i, std=0.05)
        load_adapter(fresh, save_adapter(model, tmp_path / kind, name=kind), name=kind, weight=weights[kind])
        set_adapter_weight(model, kind, weights[kind])
    mixed = unet_out(model)
    assert torch.equal(unet_out(fresh), mixed)
    assert (mixed - base_out).abs().max() > 1e-3
    w0 = {p: layer.base_layer.weight.detach().clone() for p, layer in lora_layers(fresh).items()}
    for layer in lora_layers(fresh).values():
        layer.merge()
    assert torch.allclose(unet_out(fresh), mixed, atol=1e-5, rtol=0)
    for p, layer in lora_layers(fresh).items():
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0[p])
    for kind in targets:
        set_adapter_weight(fresh, kind, 0.0)
    assert torch.equal(unet_out(fresh), base_out)


def test_dora_on_a_channel_of_zeros_stays_finite():
    """A base row of zeros (norm 0): the adapter adds nothing there at the start and stays finite when
    trained, instead of 0/0."""
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[1] = 0
    layer = LoRALayer(base)
    layer.add_adapter("d", DoRA(base, 2, 2.0))
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))
    randomize(layer, "d")
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.adapters["d"].parameters())


def test_oft_turns_the_weight_by_an_orthogonal_matrix():
    """W' = W0 R^T with R block-diagonal and orthogonal (R R^T = I): every output row keeps its norm; a block
    size that does not divide the input size is refused before the model changes."""
    base = nn.Conv2d(8, 16, 3)
    oft = OFT(base, 4, 1.0)
    with torch.no_grad():
        oft.oft_r.weight.normal_(std=0.3)
    r = cayley(oft.oft_r.weight, 4)
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(4).expand_as(r), atol=1e-6)
    turned = base.weight + oft.delta_weight(1.0, base.weight)
    assert torch.allclose(turned.flatten(1).norm(dim=1), base.weight.flatten(1).norm(dim=1), rtol=1e-5)
    assert (turned - base.weight).abs().max() > 1e-3
    net = Net()
    with pytest.raises(UserError, match="OFT block size 5 must be >= 2 and divide the layer's input size 24"):
        inject_lora(net, ["fc"], 5, 1.0, method=OFT)
    assert not lora_layers(net)
