"""DoRA, LoHa and LoKr in other tools' files, against the tools themselves (offline oracles):

- the kohya / LyCORIS layout (``export-lora --format kohya``): lycoris-lora builds its own modules from our
  file (``lycoris.wrapper.create_lycoris_from_weights``: ``get_module`` + ``make_module_from_state_dict``,
  the loader its kohya entry uses) on diffusers' UNet2DConditionModel, and draws what ours draws; files made
  by LyCORIS's own networks (no ``lora4diffusion`` entry) read back to the same outputs;
- PEFT's folders (``export-peft``): ``PeftModel.from_pretrained`` loads our export of each method onto the
  same UNet and computes the same forward, every adapted layer within 1e-6 of its output's size (fp32);
  folders PEFT made itself import to the same outputs;
- diffusers 0.42 loads none of these methods from an SD UNet's kohya file (it drops dora_scale, refuses
  hada_/lokr_ keys): asserted here, so the diffusers refusal and docs/INTEROP.md stay true;
- ours -> each layout -> ours is bit for bit (tensors, method, options, alpha, metadata), with text-encoder
  modules too; bad and hostile files are one-line UserErrors naming the file, nothing written.

peft, diffusers and lycoris-lora are test-only dependencies (pyproject [test]), imported only in tests.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from importlib.metadata import version
from pathlib import Path

import peft
import pytest
import torch
from lycoris import create_lycoris
from lycoris.modules.locon import LoConModule
from lycoris.wrapper import create_lycoris_from_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora4diffusion.cli import main
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import save_model
from lora4diffusion.formats import detect, read_any, write_lora
from lora4diffusion.formats.diffusers import export_diffusers
from lora4diffusion.formats.names import to_diffusers
from lora4diffusion.lora.adapters import (
    Adapter,
    adapter_from_model,
    base_state_dict,
    export_peft,
    import_peft,
    load_adapter,
)
from lora4diffusion.lora.layers import METHODS, inject_lora, lora_layers
from lora4diffusion.lora.prompt_lora import TE_TARGETS
from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.models.unet import NULL_LABEL, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

CFG = UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
                 attn_levels=(0, 2), head_dim=8, context_tokens=2, context_dim=16, groups=4)
TARGETS = "re:(?!conv_out).*"  # every Linear and Conv2d but conv_out, whose rank (1) is below the adapters'
RANK, ALPHA = 2, 3.0
CASES = [("dora", {}), ("dora", {"norm_axis": "in"}), ("loha", {}), ("lokr", {}),
         ("lokr", {"factor": 2, "decompose_both": True}), ("lokr", {"full_matrix": True})]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items()) or 'default'}" for k, o in CASES]
INPUTS = (torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7)), torch.tensor([0, 1, 500, 999]),
          torch.tensor([0, 3, 9, NULL_LABEL]))
FORWARD_REL = 1e-6  # per adapted layer: max |ours - theirs| / max |theirs| (fp32), as tests/test_methods.py
UNET_ABS = 1e-5  # the whole UNet's output, as tests/test_formats.py compares diffusers' UNet with ours


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def make_unet() -> UNet:
    """A tiny UNet with every weight perturbed (conv_out starts at zero: outputs would all be 0)."""
    torch.manual_seed(0)
    model = UNet(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def randomize(model: nn.Module, name: str = "default", seed: int = 1, std: float = 0.05) -> None:
    """Every tensor of adapter ``name`` moved off its init (as after training: no factor left at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


def adapted(kind: str, options: dict, targets: str = TARGETS) -> UNet:
    model = make_unet()
    inject_lora(model, targets, RANK, ALPHA, method=METHODS[kind], options=options)
    randomize(model)
    return model


def ours_eps(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*INPUTS)


def theirs_eps(dunet: nn.Module, model: UNet) -> torch.Tensor:
    """diffusers' UNet, same inputs: context tokens = encoder_hidden_states, their mean = class_labels."""
    x, t, y = INPUTS
    with torch.no_grad():
        ctx = model.context(y)
        return dunet(x, t, encoder_hidden_states=ctx, class_labels=ctx.mean(1)).sample


def layer_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input each adapted layer sees in one forward pass of ``model``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, p=path: seen.setdefault(p, args[0].detach()))
             for path, layer in lora_layers(model).items()]
    ours_eps(model)
    for h in hooks:
        h.remove()
    return seen


def layer_diffs(model: nn.Module, theirs_of) -> dict[str, tuple[float, float]]:
    """Per layer type (Linear, Conv2d): the max |ours - theirs| over adapted layers given the same input,
    and the largest of it relative to the layer's output size; ``theirs_of(path)`` is the oracle's layer."""
    out: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for path, x in layer_inputs(model).items():
            layer = model.get_submodule(path)
            mine, theirs = layer(x), theirs_of(path)(x)
            diff = (mine - theirs).abs().max().item()
            rel = diff / theirs.abs().max().item()
            assert (mine - layer.base_layer(x)).abs().max() > 1e-4, path  # the adapter does something here
            kind = type(layer.base_layer).__name__
            old = out.get(kind, (0.0, 0.0))
            out[kind] = (max(old[0], diff), max(old[1], rel))
    return out


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """Our tiny base as a diffusers folder (unet/), for the LyCORIS oracle on UNet2DConditionModel."""
    folder = tmp_path_factory.mktemp("diffusers")
    export_diffusers(make_unet(), DiffusionConfig(), folder)
    return folder


def dunet_of(folder: Path) -> nn.Module:
    return UNet2DConditionModel.from_pretrained(folder / "unet").eval()


def lycoris_network(file: Path, module: nn.Module, prefix: str = "lora_unet_"):
    """LyCORIS's own modules built from our kohya-layout file on ``module`` (diffusers' UNet), applied.

    ``create_lycoris_from_weights`` runs the loader of lycoris/kohya.py's ``create_network_from_weights``
    (``get_module`` picks LoConModule / LohaModule / LokrModule by the tensor names,
    ``make_module_from_state_dict`` builds it) with its generic prefix ``lycoris_`` for ``lora_unet_``:
    lycoris-lora 4.1.3's kohya entry itself cannot be built on a diffusers UNet (its default targets list
    both TimestepEmbedding and time_embedding.linear_1: "duplicated lora name")."""
    weights = {k.replace(prefix, "lycoris_", 1): v for k, v in load_file(str(file)).items()
               if k.startswith(prefix)}
    network, _ = create_lycoris_from_weights(1.0, "", module, weights_sd=weights)
    network.apply_to()
    return network


# ----- the kohya / LyCORIS layout, against lycoris-lora -----
@pytest.mark.parametrize("kind,options", CASES, ids=IDS)
def test_lycoris_loads_our_kohya_export_and_draws_the_same(base_folder, tmp_path, kind, options):
    model = adapted(kind, options)
    path = write_lora(adapter_from_model(model), "kohya", tmp_path, title="a")
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert args["algo"] == {"dora": "lora", "loha": "loha", "lokr": "lokr"}[kind]
    assert args["conv_dim"] == str(RANK) and float(args["conv_alpha"]) == ALPHA
    if kind == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == str(options.get("norm_axis") != "in")
    if kind == "lokr":
        assert {k: args[k] for k in ("factor", "decompose_both", "full_matrix")} == {
            k: str(options.get(k, d)) for k, d in (("factor", -1), ("decompose_both", False),
                                                   ("full_matrix", False))}
    assert not any(k.endswith((".hada_w1_a.weight", ".lokr_w1.weight", ".dora_scale.weight")) for k in keys)
    dunet = dunet_of(base_folder)
    if kind == "dora" and options:  # LyCORIS's loader builds wd_on_out modules only: copy_ of [1, in] fails
        modules = in_axis_modules(path, dunet)
    else:
        modules = lycoris_network(path, dunet).loras
    assert len(modules) == len(lora_layers(model))
    want = {"dora": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule"}[kind]
    assert {type(m).__name__ for m in modules} == {want}
    diffs = layer_diffs(model, lambda p: dunet.get_submodule(to_diffusers(p)))
    assert set(diffs) == {"Linear", "Conv2d"} and all(rel <= FORWARD_REL for _, rel in diffs.values()), diffs
    mine, theirs = ours_eps(model), theirs_eps(dunet, model)
    assert (mine - theirs).abs().max() <= UNET_ABS
    assert (mine - ours_eps(make_unet())).abs().max() > 1e-2  # the adapter changes what the UNet draws


def in_axis_modules(path: Path, dunet: nn.Module) -> list[nn.Module]:
    """LyCORIS's LoConModule with ``wd_on_out=False`` (its A1111-style input axis) per module, given the
    file's tensors as they are: its dora_scale shape [1, in, ...] must be LyCORIS's own."""
    tensors = load_file(str(path))
    modules = []
    for name in sorted({k.split(".")[0] for k in tensors}):
        base = dunet.get_submodule(next(p for p, _ in dunet.named_modules()
                                        if "lora_unet_" + p.replace(".", "_") == name))
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        module = LoConModule(name, base, 1.0, down.shape[0], float(tensors[f"{name}.alpha"]),
                             weight_decompose=True, wd_on_out=False)
        assert module.dora_scale.shape == tensors[f"{name}.dora_scale"].shape
        with torch.no_grad():
            module.lora_down.weight.copy_(down)
            module.lora_up.weight.copy_(up)
            module.dora_scale.copy_(tensors[f"{name}.dora_scale"])
        module.apply_to()
        modules.append(module)
    return modules


def test_lokr_full_modules_get_alpha_r_so_every_reader_scales_them_by_1(tmp_path):
    """LyCORIS writes alpha = r for a LoKr module whose W1 and W2 are both full (scale 1); ours too, so a
    reader computing alpha / r gets our scale whichever way it reads the module."""
    model = adapted("lokr", {})
    path = write_lora(adapter_from_model(model), "kohya", tmp_path, title="a")
    tensors = load_file(str(path))
    full = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lokr_w2")} & {
        k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lokr_w1")}
    low = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lokr_w2_a")}
    assert full and low  # this UNet has both kinds at rank 2
    assert {float(tensors[f"{m}.alpha"]) for m in full} == {float(RANK)}
    assert {float(tensors[f"{m}.alpha"]) for m in low} == {ALPHA}


@pytest.mark.parametrize("algo,kwargs,method,options", [
    ("lokr", {}, "lokr", {}),
    ("lokr", {"factor": 4, "decompose_both": True}, "lokr", {"factor": 4}),
    ("loha", {}, "loha", {}),
    ("lora", {"dora_wd": True}, "dora", {}),
    ("lora", {"dora_wd": True, "wd_on_output": False}, "dora", {"norm_axis": "in"}),
], ids=["lokr", "lokr-factor4", "loha", "dora", "dora-in"])
def test_files_lycoris_made_read_to_its_outputs(base_folder, tmp_path, algo, kwargs, method, options):
    """A file LyCORIS's own network wrote (its keys, its alpha = r on full LoKr modules; no settings entry
    of ours) reads as the method, rank, alpha and options LyCORIS built, and draws what LyCORIS draws."""
    dunet = dunet_of(base_folder)
    network = create_lycoris(dunet, 1.0, linear_dim=RANK, linear_alpha=1.0, conv_dim=RANK, conv_alpha=1.0,
                             algo=algo, **kwargs)
    network.apply_to()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    for module in network.loras:  # conv_out: its rank 1 is below 2 (ours refuses that rank)
        if module.lora_name == "lycoris_conv_out":
            module.restore()
    state = {k.replace("lycoris_", "lora_unet_", 1): v for k, v in network.state_dict().items()
             if not k.startswith("lycoris_conv_out.")}
    path = tmp_path / "made_by_lycoris.safetensors"
    save_file(state, str(path), {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(RANK)})
    adapter = read_any(path)
    assert (adapter.method, adapter.rank, adapter.alpha, adapter.options) == (method, RANK, 1.0, options)
    assert adapter.extra["source"] == "lycoris" and detect(path)[0] == "kohya"
    model = make_unet()
    load_adapter(model, adapter)
    assert (ours_eps(model) - theirs_eps(dunet, model)).abs().max() <= UNET_ABS
    assert (ours_eps(model) - ours_eps(make_unet())).abs().max() > 1e-2


def test_lycoris_merged_weight_quirk_loha_and_lokr(base_folder, tmp_path):
    """lycoris-lora 4.1.3's LohaModule and LokrModule ``get_merged_weight`` scale ΔW by alpha / r twice (the
    ``get_weight`` they call has scaled it already); their forward scales once, as ours, A1111 and ComfyUI.
    So the oracle tests compare forwards. Asserted for 4.1.3 so docs/INTEROP.md's note stays true; another
    version may have fixed it (merged = ours) or not."""
    fixed_ok, scales = version("lycoris-lora") != "4.1.3", set()
    for kind in ("loha", "lokr"):
        model = adapted(kind, {}, targets="attention")
        path = write_lora(adapter_from_model(model), "kohya", tmp_path / kind, title="a")
        network = lycoris_network(path, dunet_of(base_folder))
        layers = lora_layers(model)
        for module in network.loras:
            name = module.lora_name.removeprefix("lycoris_")
            path_ = next(p for p in layers if to_diffusers(p).replace(".", "_") == name)
            layer = layers[path_]
            mine = layer.delta_weight("default")
            theirs = module.get_merged_weight(multiplier=1.0)[0].view(mine.shape) - layer.base_layer.weight
            scale = layer.adapters["default"].scale
            twice = torch.allclose(theirs, mine * scale, atol=1e-6, rtol=1e-4)
            assert twice or (fixed_ok and torch.allclose(theirs, mine, atol=1e-6, rtol=1e-4)), (kind, path_)
            scales.add(scale)
    assert scales >= {1.0, ALPHA / RANK}  # modules of scale 1 (full LoKr factors) and of alpha / r


# ----- PEFT's folders, against peft -----
@pytest.mark.parametrize("kind,options", [c for c in CASES if c[1] != {"norm_axis": "in"}],
                         ids=[i for i, c in zip(IDS, CASES, strict=True) if c[1] != {"norm_axis": "in"}])
def test_peft_loads_our_peft_export_and_computes_the_same(tmp_path, kind, options):
    model = adapted(kind, options)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == {"dora": "LORA", "loha": "LOHA", "lokr": "LOKR"}[kind]
    assert config.get("use_dora", False) == (kind == "dora")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if kind == "dora":  # PEFT's names: lora_magnitude_vector without .weight, [1, out, 1, 1] on a conv
        assert "base_model.model.down.0.0.res.conv1.lora_magnitude_vector" in keys
    plain = UNet(CFG)
    plain.load_state_dict(base_state_dict(model))
    theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    inner = theirs.base_model.model
    tuned = [p for p, m in inner.named_modules() if hasattr(m, "get_base_layer") and hasattr(m, "scaling")]
    assert sorted(tuned) == sorted(lora_layers(model))
    diffs = layer_diffs(model, inner.get_submodule)
    assert set(diffs) == {"Linear", "Conv2d"} and all(rel <= FORWARD_REL for _, rel in diffs.values()), diffs
    with torch.no_grad():
        assert (ours_eps(model) - ours_eps(theirs)).abs().max() <= UNET_ABS


def test_peft_refusals_name_the_reason_and_write_nothing(tmp_path, capsys):
    """DoRA's input norm axis (PEFT normalises per output channel) and a LoKr factor PEFT would split
    unsorted (factor 8 on a 16-wide layer: PEFT (8, 2), ours and LyCORIS's (2, 8)) are refused, one line."""
    for kind, options, needle in (("dora", {"norm_axis": "in"}, "norm_axis is 'in'"),
                                  ("lokr", {"factor": 8}, "PEFT's LoKr would split it differently")):
        adapter = adapter_from_model(adapted(kind, options, targets="attention"))
        with pytest.raises(UserError) as e:
            export_peft(adapter, tmp_path / kind)
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / kind).exists()


def peft_made(tmp_path: Path, config) -> tuple[nn.Module, Path]:
    """A PEFT model on our UNet with ``config``, every adapter tensor random, saved by PEFT itself."""
    theirs = peft.get_peft_model(make_unet(), config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(str(tmp_path))
    return theirs.eval(), tmp_path


PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out", "conv1", "conv2"]  # "skip" is an nn.Identity in some blocks


@pytest.mark.parametrize("config,method,options", [
    (peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=PEFT_TARGETS), "dora", {}),
    (peft.LoHaConfig(r=2, alpha=3, target_modules=PEFT_TARGETS), "loha", {}),
    (peft.LoKrConfig(r=2, alpha=2, target_modules=PEFT_TARGETS), "lokr", {}),
    (peft.LoKrConfig(r=1, alpha=1, decompose_both=True, decompose_factor=2, target_modules=PEFT_TARGETS),
     "lokr", {"factor": 2, "decompose_both": True}),
], ids=["dora", "loha", "lokr", "lokr-factor2"])
def test_folders_peft_made_import_to_its_outputs(tmp_path, config, method, options):
    theirs, folder = peft_made(tmp_path, config)
    for reader in (import_peft, read_any):
        adapter = reader(folder)
        assert (adapter.method, adapter.options, adapter.extra["source"]) == (method, options, "peft")
        model = make_unet()
        load_adapter(model, adapter)
        with torch.no_grad():
            assert (ours_eps(model) - ours_eps(theirs)).abs().max() <= UNET_ABS
    assert (ours_eps(model) - ours_eps(make_unet())).abs().max() > 1e-2


def test_peft_lokr_we_cannot_represent_is_refused_naming_the_module(tmp_path):
    """PEFT scales a LoKr module with both factors full by alpha / r (ours and LyCORIS by 1); and splits
    (factor, n / factor) unsorted: such folders are refused, one line naming the module."""
    _, folder = peft_made(tmp_path / "a", peft.LoKrConfig(r=2, alpha=3, target_modules=["to_q"]))
    with pytest.raises(UserError) as e:
        import_peft(folder)
    assert re.search(r"adapter_config.json: module \S+to_q: PEFT scales its full Kronecker factors by alpha /"
                     r" r = 1.5", str(e.value)) and "\n" not in str(e.value)
    _, folder = peft_made(tmp_path / "b", peft.LoKrConfig(r=1, alpha=1, decompose_factor=8,
                                                          target_modules=["to_q"]))
    with pytest.raises(UserError, match=r"module \S+to_q: its LoKr factors are not our \(LyCORIS's\) layout"):
        import_peft(folder)


# ----- ours -> layout -> ours, bit for bit; text-encoder modules too -----
def prompt_adapter(kind: str, options: dict) -> tuple[Adapter, nn.Module, nn.Module]:
    """A prompt model's adapter as train-lora --text-encoder writes it (UNet modules bare, text-encoder
    modules prefixed ``text_encoder.``; one method throughout), its text encoder with the adapter and the
    same text encoder without it."""
    unet = adapted(kind, options, targets="attention+conv")
    torch.manual_seed(3)
    te = TextEncoder(TextEncoderConfig.for_tokenizer(Tokenizer.load(), width=16, layers=2, heads=2))
    plain = copy.deepcopy(te).eval()
    inject_lora(te, TE_TARGETS, RANK, ALPHA, method=METHODS[kind], options=options)
    randomize(te, seed=5, std=0.2)
    unet_part, te_part = adapter_from_model(unet), adapter_from_model(te)
    tensors = {**unet_part.tensors, **{f"text_encoder.{k}": v for k, v in te_part.tensors.items()}}
    adapter = Adapter(tensors, RANK, ALPHA, fingerprint=unet_part.fingerprint, method=kind, options=options,
                      extra={"style": "bold", "trigger_words": json.dumps(["sks"]), "text_encoder": "true"})
    return adapter, te.eval(), plain


@pytest.mark.parametrize("kind,options", CASES, ids=IDS)
def test_round_trips_are_exact_with_text_encoder_modules(tmp_path, kind, options):
    adapter, _, _ = prompt_adapter(kind, options)
    for fmt in ("kohya", "peft"):
        if fmt == "peft" and options.get("norm_axis") == "in":
            continue  # refused (above)
        back = read_any(write_lora(adapter, fmt, tmp_path / fmt, title="bold"))
        assert list(back.tensors) == list(adapter.tensors), fmt  # the model's order, too
        assert all(torch.equal(back.tensors[k], v) for k, v in adapter.tensors.items()), fmt
        assert back.metadata() == adapter.metadata(), fmt  # method, options, alpha, fingerprint, extra
    with safe_open(str(tmp_path / "kohya" / "bold.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    leaf = {"dora": "dora_scale", "loha": "hada_w1_a", "lokr": "lokr_w1"}[kind]
    assert f"lora_te_text_model_encoder_layers_1_mlp_fc2.{leaf}" in keys
    assert meta["modelspec.trigger_phrase"] == "sks"


@pytest.mark.parametrize("kind,options", [("dora", {}), ("loha", {}), ("lokr", {"decompose_both": True})],
                         ids=["dora", "loha", "lokr"])
def test_lycoris_loads_our_text_encoder_modules(tmp_path, kind, options):
    """The lora_te_* modules of our kohya file, built by LyCORIS on our text encoder (named as
    CLIPTextModel's text_model.encoder.*), give what our text encoder with the adapter gives."""
    adapter, te, plain = prompt_adapter(kind, options)
    path = write_lora(adapter, "kohya", tmp_path, title="bold")
    holder = nn.Module()
    holder.text_model = nn.Module()
    holder.text_model.encoder = plain
    network = lycoris_network(path, holder, prefix="lora_te_")
    assert len(network.loras) == 2 * 6  # 2 layers x q, k, v, out_proj, fc1, fc2
    ids = Tokenizer.load().encode(["a handwritten sks seven", "the digit 3", ""])
    with torch.no_grad():
        mine, theirs = te(ids)[0], plain(ids)[0]
    assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


# ----- diffusers: what it does with these files (so the refusal stays warranted) -----
def test_diffusers_loads_none_of_the_methods_from_a_kohya_file(base_folder, tmp_path, caplog):
    """diffusers 0.42 (StableDiffusionLoraLoaderMixin.lora_state_dict) drops a kohya file's dora_scale,
    leaving a plain LoRA that draws something else, and its kohya converter refuses hada_* / lokr_* keys.
    So ``export-lora --format diffusers`` refuses these methods (one line, nothing written)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    model = adapted("dora", {}, targets="re:(?!context_pool|conv_out).*")  # diffusers: no context_pool
    path = write_lora(adapter_from_model(model), "kohya", tmp_path / "dora", title="a")
    with caplog.at_level(logging.WARNING):
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    assert not any("magnitude" in k or "dora" in k for k in state)
    dunet = dunet_of(base_folder)
    dunet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="d")
    assert (ours_eps(model) - theirs_eps(dunet, model)).abs().max() > 1e-3  # DoRA lost: not our images
    for kind in ("loha", "lokr"):
        adapter = adapter_from_model(adapted(kind, {}, targets="attention"))
        path = write_lora(adapter, "kohya", tmp_path / kind, title="a")
        with pytest.raises(ValueError, match="have not been correctly renamed"):
            StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    for kind, options in CASES[:4]:
        with pytest.raises(UserError) as e:
            write_lora(adapter_from_model(adapted(kind, options, "attention")), "diffusers", tmp_path / "x")
        assert f"a {kind} adapter cannot be written as diffusers" in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "x").exists()


# ----- the command line: export, import, info, list, sample on such files -----
def test_cli_exports_imports_lists_and_samples_each_method(tmp_path, capsys):
    base = make_unet()
    save_model(tmp_path / "base", base, DiffusionConfig())
    for kind, options in (("dora", {}), ("loha", {}), ("lokr", {"factor": 2})):
        model = copy.deepcopy(base)
        inject_lora(model, "attention", RANK, ALPHA, method=METHODS[kind], options=options)
        randomize(model)
        adapter_from_model(model).save(tmp_path / kind / "ours")
        src = str(tmp_path / kind / "ours")
        for argv in (["export-lora", "--lora", src, "--format", "kohya", "--out", str(tmp_path / kind / "k")],
                     ["export-lora", "--lora", src, "--format", "peft", "--out", str(tmp_path / kind / "p")],
                     ["export-peft", "--lora", src, "--out", str(tmp_path / kind / "p2")],
                     ["import-peft", "--peft", str(tmp_path / kind / "p2"), "--checkpoint",
                      str(tmp_path / "base"), "--out", str(tmp_path / kind / "back")]):
            assert main(["-q", *argv]) == 0, argv
        kohya_file = tmp_path / kind / "k" / "ours.safetensors"
        stripped = tmp_path / kind / "stripped.safetensors"  # as LyCORIS would write it: none of our entries
        save_file(load_file(str(kohya_file)), str(stripped), {k: v for k, v in _meta(kohya_file).items()
                                                               if not k.startswith("lora4diffusion")})
        capsys.readouterr()
        assert main(["info", "--json", str(stripped)]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["method"], shown["rank"], shown["alpha"]) == (kind, RANK, ALPHA)
        assert shown["ss_network_module"] == "lycoris.kohya"
        assert main(["list", "--json", str(stripped), str(tmp_path / kind / "p")]) == 0
        listed = {r["path"]: r for r in json.loads(capsys.readouterr().out)}  # the shipped items come first
        rows = [listed[str(p)] for p in (stripped, tmp_path / kind / "p")]
        facts = [(r["format"], r["method"], r["rank"]) for r in rows]
        assert facts == [("kohya", kind, RANK), ("peft", kind, RANK)]
        assert main(["-q", "sample", "--checkpoint", str(tmp_path / "base"), "--lora", f"{stripped}:0.5",
                     "--digits", "3", "--per-digit", "1", "--steps", "2", "--out",
                     str(tmp_path / kind / "s")]) == 0
        back = load_file(str(tmp_path / kind / "back" / "adapter.safetensors"))
        mine = load_file(str(tmp_path / kind / "ours" / "adapter.safetensors"))
        assert back.keys() == mine.keys() and all(torch.equal(back[k], mine[k]) for k in mine)


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# ----- bad and hostile files: one line naming the file and the problem, nothing loaded -----
@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """A DoRA, a LoHa and a LoKr kohya-layout file as LyCORIS writes them (none of our entries), and PEFT
    folders of a LoHa and a LoKr (ours, with our entry)."""
    root = tmp_path_factory.mktemp("foreign_methods")
    out = {}
    for kind in ("dora", "loha", "lokr"):
        adapter = adapter_from_model(adapted(kind, {}, targets="attention+conv"))
        written = write_lora(adapter, "kohya", root / kind, title="a")
        save_file(load_file(str(written)), str(written), {k: v for k, v in _meta(written).items()
                                                          if not k.startswith("lora4diffusion")})
        out[kind] = written
        if kind != "dora":
            out[f"peft_{kind}"] = export_peft(adapter, root / f"peft_{kind}")
    return out


def _first(path: Path, suffix: str) -> str:
    """The first module of ``path`` that has tensor ``suffix`` (its kohya name)."""
    return next(k for k in sorted(load_file(str(path))) if k.endswith("." + suffix)).rsplit(".", 1)[0]


def _lokr_low(path: Path) -> str:
    return _first(path, "lokr_w2_a")


def _in_axis(path: Path) -> torch.Tensor:
    """A dora_scale of the input-axis shape [1, in] for the first DoRA module (a Linear) of ``path``."""
    return torch.ones(1, load_file(str(path))[f"{_first(path, 'dora_scale')}.lora_down.weight"].shape[1])


LYCORIS_CASES = [  # (file, tensor changes given the file, what the message names)
    ("loha", lambda p: {f"{_first(p, 'hada_w1_a')}.hada_t1": torch.ones(2, 2, 3, 3)},
     "Tucker factors (hada_t1)"),
    ("dora", lambda p: {f"{_first(p, 'dora_scale')}.lora_mid.weight": torch.ones(2, 2, 3, 3)},
     "Tucker factors (lora_mid.weight)"),
    ("lokr", lambda p: {f"{_lokr_low(p)}.dora_scale": torch.ones(32, 1)}, "dora_scale on lokr"),
    ("loha", lambda p: {f"{_first(p, 'hada_w1_a')}.{k}": None for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                                       "hada_w2_b")}
     | {f"{_first(p, 'hada_w1_a')}.lokr_w1": torch.ones(4, 4),
        f"{_first(p, 'hada_w1_a')}.lokr_w2": torch.ones(8, 8)}, "modules use different methods"),
    ("loha", lambda p: {f"{_first(p, 'hada_w1_a')}.{k}": torch.ones(s) for k, s in (
        ("hada_w1_a", (32, 3)), ("hada_w1_b", (3, 32)), ("hada_w2_a", (32, 3)), ("hada_w2_b", (3, 32)))},
     "modules have different ranks"),
    ("loha", lambda p: {f"{_first(p, 'hada_w1_a')}.hada_w2_b": None}, "it lacks hada_w2_b"),
    ("lokr", lambda p: {f"{_lokr_low(p)}.lokr_w1": torch.ones(3, 5)}, "fit no factor / decompose_both"),
    ("lokr", lambda p: {f"{_lokr_low(p)}.lokr_w1": torch.ones(2, 2, 2)}, "lokr_w1 must be a matrix"),
    ("lokr", lambda p: {f"{_lokr_low(p)}.lokr_w2_b": None}, "either lokr_w2 or both lokr_w2_a and lokr_w2_b"),
    ("dora", lambda p: {f"{_first(p, 'dora_scale')}.dora_scale": torch.ones(7)}, "is neither [out, 1, ...]"),
    ("dora", lambda p: {f"{_first(p, 'dora_scale')}.dora_scale": _in_axis(p)},
     "normalise DoRA on different axes"),
    ("loha", lambda p: {f"{_first(p, 'hada_w1_a')}.alpha": torch.tensor(5.0)},
     "modules have different alphas"),
    ("loha", lambda p: {f"{_first(p, 'hada_w1_a')}.alpha": torch.tensor([1.0, 2.0])}, "must hold one number"),
    ("loha", lambda p: {f"{_first(p, 'hada_w1_a')}.hada_w1_b": torch.ones(2, 32, dtype=torch.int64)},
     "dtype I64"),
    ("lokr", lambda p: {f"{_lokr_low(p)}.lokr_w2_a": torch.full((8, 2), float("nan"))},
     "holds NaN or infinite values"),
    ("loha", lambda p: {"lora_te2_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.ones(4, 2)},
     "'lora_te2_text_model_encoder_layers_0_mlp_fc1' is not supported"),
]


@pytest.mark.parametrize("kind,tensors,needle", LYCORIS_CASES,
                         ids=[f"{c[0]}-{c[2][:24]}" for c in LYCORIS_CASES])
def test_bad_lycoris_files_are_one_line(foreign, tmp_path, kind, tensors, needle):
    src = foreign[kind]
    t = load_file(str(src))
    for k, v in tensors(src).items():
        t.pop(k) if v is None else t.__setitem__(k, v)
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad), _meta(src))
    model = make_unet()
    with pytest.raises(UserError) as e:
        load_adapter(model, bad, reader=read_any)
    msg = str(e.value)
    assert str(bad) in msg and needle in msg and "\n" not in msg and "Traceback" not in msg, msg
    assert not lora_layers(model)


def test_our_entry_must_agree_with_a_lycoris_files_tensors(foreign, tmp_path):
    """Our settings entry on another method's tensors (or another rank) is refused, not believed."""
    loha = read_any(foreign["loha"])
    t = load_file(str(foreign["lokr"]))
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad), {**_meta(foreign["lokr"]), "lora4diffusion": json.dumps(loha.metadata())})
    with pytest.raises(UserError) as e:
        read_any(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    lokr = read_any(foreign["lokr"])
    meta = {**lokr.metadata(), "rank": "3"}
    save_file(t, str(bad), {**_meta(foreign["lokr"]), "lora4diffusion": json.dumps(meta)})
    with pytest.raises(UserError, match="rank"):
        read_any(bad)


def _edit_peft(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of PEFT folder ``src`` with config fields and tensors replaced (None: removed)."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    t = load_file(str(src / "adapter_model.safetensors"))
    for k, v in (tensors(t) if tensors else {}).items():
        t.pop(k) if v is None else t.__setitem__(k, v)
    save_file(t, str(dst / "adapter_model.safetensors"), _meta(src / "adapter_model.safetensors"))
    return dst


def _peft_first(t: dict, leaf: str) -> str:
    return next(k for k in sorted(t) if k.endswith("." + leaf)).rsplit(".", 1)[0]


PEFT_CASES = [  # (folder, config changes, tensor changes, what the message names)
    ("peft_loha", {"rank_pattern": {"^mid_attn\\.attn1\\.to_q": 4}}, None, "rank_pattern"),
    ("peft_loha", {"peft_type": "IA3"}, None, "peft_type 'IA3' is not supported"),
    ("peft_loha", {"layers_to_transform": [0]}, None, "layers_to_transform"),
    ("peft_loha", {"alpha": -1}, None, "alpha must be > 0"),
    ("peft_loha", {}, lambda t: {f"{_peft_first(t, 'hada_w1_a')}.lokr_w1": torch.ones(2, 2)},
     "unexpected tensor"),
    ("peft_loha", {}, lambda t: {f"{_peft_first(t, 'hada_w1_a')}.hada_t1": torch.ones(2, 2, 3, 3)},
     "Tucker factors (hada_t1"),
    ("peft_lokr", {"alpha_pattern": {".*": 2}}, None, "is not a module name"),
    ("peft_lokr", {"decompose_factor": "x"}, None, "decompose_factor must be an integer"),
    ("peft_lokr", {"decompose_factor": 0}, None, "decompose_factor must be -1 or >= 1"),
    ("peft_lokr", {"decompose_both": "yes"}, None, "decompose_both must be true or false"),
    ("peft_lokr", {"alpha_pattern": {}}, None, "PEFT scales its full Kronecker factors by alpha / r = 1.5"),
    ("peft_lokr", {}, lambda t: {f"{_peft_first(t, 'lokr_w1')}.lokr_t2": torch.ones(2, 2, 3, 3)}, "Tucker"),
]


@pytest.mark.parametrize("folder,config,tensors,needle", PEFT_CASES,
                         ids=[f"{c[0]}-{c[3][:24]}" for c in PEFT_CASES])
def test_bad_peft_folders_are_one_line(foreign, tmp_path, folder, config, tensors, needle):
    bad = _edit_peft(foreign[folder], tmp_path / "bad", config, tensors)
    with pytest.raises(UserError) as e:
        read_any(bad)
    msg = str(e.value)
    assert str(bad) in msg and needle in msg and "\n" not in msg, msg


def test_a_peft_config_edited_after_export_wins_over_our_entry(foreign, tmp_path, caplog):
    """adapter_config.json is what PEFT reads: where it no longer says what our entry says, the config is
    read (with a warning), not our entry; and an entry naming another base than the one given is refused."""
    edited = _edit_peft(foreign["peft_loha"], tmp_path / "edited", {"alpha": 7.0})
    with caplog.at_level(logging.WARNING):
        adapter = import_peft(edited)
    assert adapter.alpha == 7.0 and adapter.extra == {"source": "peft"} and "edited?" in caplog.text
    other = make_unet()
    with torch.no_grad():
        other.conv_in.weight.add_(1.0)
    with pytest.raises(UserError, match="trained on a different base model"):
        import_peft(foreign["peft_loha"], base_model=other)
    assert import_peft(foreign["peft_loha"], base_model=make_unet()).fingerprint == read_any(
        foreign["peft_loha"]).fingerprint


def test_bad_files_through_the_command_line(foreign, tmp_path, capsys):
    """info and sample --lora on a LoKr file with a stray Tucker factor, and export-peft of an input-axis
    DoRA: exit 2, one stderr line naming the problem, no --out left behind."""
    t = load_file(str(foreign["lokr"]))
    t[f"{_lokr_low(foreign['lokr'])}.lokr_t2"] = torch.ones(2, 2, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad), _meta(foreign["lokr"]))
    save_model(tmp_path / "base", make_unet(), DiffusionConfig())
    adapter_from_model(adapted("dora", {"norm_axis": "in"}, targets="attention")).save(tmp_path / "dora_in")
    for argv, needle in (
        (["info", str(bad)], "Tucker factors (lokr_t2)"),
        (["sample", "--checkpoint", str(tmp_path / "base"), "--lora", str(bad), "--steps", "2", "--per-digit",
          "1", "--out", str(tmp_path / "out")], "Tucker factors (lokr_t2)"),
        (["export-peft", "--lora", str(tmp_path / "dora_in"), "--out", str(tmp_path / "out")], "norm_axis"),
        (["export-lora", "--lora", str(tmp_path / "dora_in"), "--format", "diffusers", "--out",
          str(tmp_path / "out")], "cannot be written as diffusers"),
    ):
        capsys.readouterr()
        assert main(["-q", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "out").exists()
