"""File formats against the real libraries (offline oracles): our UNet <-> diffusers' UNet2DConditionModel and
DDIMScheduler, our adapters <-> diffusers / kohya / PEFT LoRA files, loaded by diffusers and peft themselves.

Tiny UNets (a level without attention, attention at full resolution, a 1x1 skip conv) for the numerics; the
shipped bases only where the shipped adapters are checked.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora4diffusion.cli import main
from lora4diffusion.diffusion import DDIMSampler, DiffusionConfig, NoiseSchedule, sample
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model, save_model
from lora4diffusion.formats import detect, read_any, write_lora
from lora4diffusion.formats.diffusers import export_diffusers, read_diffusers
from lora4diffusion.formats.names import from_diffusers, from_kohya, to_diffusers, to_kohya
from lora4diffusion.lora.adapters import (
    adapter_from_model,
    base_fingerprint,
    load_adapter,
    read_adapter,
    shipped_adapters,
)
from lora4diffusion.lora.layers import inject_lora, lora_layers, merge_lora, set_adapter_weight
from lora4diffusion.lora.targets import adaptable_modules
from lora4diffusion.models.unet import NULL_LABEL, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")  # installed as a test oracle (pyproject [test])
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

CFG = UNetConfig(
    image_size=8,
    base_channels=16,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    attn_levels=(0, 2),
    head_dim=8,
    context_tokens=2,
    context_dim=16,
    groups=4,
)


def make_unet(seed: int = 0, cfg: UNetConfig = CFG) -> UNet:
    """A tiny UNet with every weight perturbed (conv_out is zero-initialised: outputs would all be 0)."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_adapter(
    model: UNet,
    targets: str = "all-linear+conv",
    rank: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    seed: int = 1,
) -> None:
    """Inject adapter 'default' with random A and B (as after training)."""
    inject_lora(model, targets, rank=rank, alpha=alpha, rslora=rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (*layer.lora_down.parameters(), *layer.lora_up.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


INPUTS = (
    torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7)),
    torch.tensor([0, 1, 500, 999]),
    torch.tensor([0, 3, 9, NULL_LABEL]),
)


def ours_eps(model: UNet) -> torch.Tensor:
    with torch.no_grad():
        return model(*INPUTS)


def theirs_eps(dunet: nn.Module, model: UNet) -> torch.Tensor:
    """diffusers' UNet, same inputs: context tokens = encoder_hidden_states, their mean = class_labels."""
    x, t, y = INPUTS
    with torch.no_grad():
        ctx = model.context(y)
        return dunet(x, t, encoder_hidden_states=ctx, class_labels=ctx.mean(1)).sample


@pytest.fixture
def exported(tmp_path):
    model = make_unet()
    export_diffusers(model, DiffusionConfig(), tmp_path / "d")
    return model, tmp_path / "d"


# ----- names -----
def test_every_weight_has_a_diffusers_name_and_back():
    ours = UNet(CFG).state_dict()
    theirs = UNet2DConditionModel.from_config(_config(CFG)).state_dict()
    mapped = {to_diffusers(k): v.shape for k, v in ours.items() if not k.startswith("label_context")}
    assert mapped == {
        k: v.shape for k, v in theirs.items()
    }  # a bijection onto diffusers' weights, same shapes
    for k in ours:
        if not k.startswith("label_context"):
            assert from_diffusers(to_diffusers(k)) == k
    for path in adaptable_modules(UNet(CFG)):
        assert from_kohya(to_kohya(path)) == path
    assert (
        to_kohya("down.0.0.attn.attn1.to_out")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    )
    with pytest.raises(UserError, match="label_context"):
        to_diffusers("label_context")
    with pytest.raises(UserError, match="lora_unet_foo_bar"):
        from_kohya("lora_unet_foo_bar")


def _config(cfg: UNetConfig) -> dict:
    from lora4diffusion.formats.diffusers_unet import unet_config_to_diffusers

    return unet_config_to_diffusers(cfg)


# ----- the UNet and the scheduler -----
def test_diffusers_unet_matches_ours(exported):
    model, folder = exported
    dunet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    diff = (ours_eps(model) - theirs_eps(dunet, model)).abs().max().item()
    assert diff <= 1e-5, diff
    assert not (folder / "model_index.json").exists()  # no diffusers pipeline class fits a label model
    assert "class_labels=ctx.mean(1)" in (folder / "README.md").read_text()
    dunet.save_pretrained(folder / "unet")  # as diffusers' own scripts write it (their config keys)
    back, _ = read_diffusers(folder)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_loop_with_diffusers_scheduler_reproduces_our_sample(tmp_path, schedule):
    model, diffusion = make_unet(), DiffusionConfig(schedule=schedule)
    export_diffusers(model, diffusion, tmp_path)
    dunet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    sched = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    labels, w, steps = torch.tensor([2, 7]), 1.25, 5
    ours_sampler = DDIMSampler(NoiseSchedule(diffusion))
    ours_sampler.set_timesteps(steps)
    ours, _ = sample(
        model, ours_sampler, labels, (1, 8, 8), guidance=w, generator=torch.Generator().manual_seed(3)
    )

    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == ours_sampler.timesteps.tolist()
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    ctx = model.context(torch.cat([labels, torch.full_like(labels, NULL_LABEL)])).detach()
    for t in sched.timesteps:
        with torch.no_grad():
            eps_c, eps_u = dunet(
                torch.cat([x, x]), t, encoder_hidden_states=ctx, class_labels=ctx.mean(1)
            ).sample.chunk(2)
        x = sched.step(eps_u + w * (eps_c - eps_u), t, x).prev_sample
    diff = (ours - x).abs().max().item()
    assert diff <= 1e-4, diff


def test_export_import_round_trip_is_bit_identical(tmp_path):
    model = make_unet()
    save_model(tmp_path / "m", model, DiffusionConfig(schedule="cosine", beta_end=0.03))
    assert (
        main(["-q", "export-diffusers", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "d")])
        == 0
    )
    assert main(["-q", "import-diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "back")]) == 0
    back, diffusion, _ = load_model(tmp_path / "back")
    assert back.cfg == model.cfg and diffusion.schedule == "cosine" and diffusion.beta_end == 0.03
    mine, theirs = model.state_dict(), back.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert base_fingerprint(back) == base_fingerprint(model)  # so adapters trained on it still load


def test_import_refuses_what_our_unet_cannot_represent(tmp_path, capsys):
    export_diffusers(make_unet(), DiffusionConfig(), tmp_path / "d")
    cfg_file = tmp_path / "d" / "unet" / "config.json"
    good = json.loads(cfg_file.read_text())
    for key, value in [
        ("norm_eps", 1e-6),
        ("layers_per_block", [1, 2, 1]),
        ("upcast_attention", True),
        ("attention_head_dim", [4, 4, 4]),
        ("class_embed_type", None),
    ]:
        cfg_file.write_text(json.dumps({**good, key: value}))
        assert main(["-q", "import-diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert key in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists()
    cfg_file.write_text(json.dumps(good))
    state = load_file(str(tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors"))
    state["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match="down_blocks.0.resnets.0.extra"):
        read_diffusers(tmp_path / "d")
    assert main(["-q", "import-diffusers", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2


# ----- LoRA files -----
@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_round_trips_are_exact(tmp_path, fmt, rslora):
    model = make_unet()
    make_adapter(model, rslora=rslora)
    adapter = adapter_from_model(model)
    adapter.extra = {"style": "bold", "trigger_words": json.dumps(["bld"])}
    written = write_lora(adapter, fmt, tmp_path / fmt, title="bold")
    assert detect(written)[0] == fmt
    back = read_any(written)
    assert set(back.tensors) == set(adapter.tensors)
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    assert (back.rank, back.alpha, back.rslora) == (adapter.rank, adapter.alpha, adapter.rslora)
    if fmt != "peft":  # PEFT's config has no place for our fingerprint and metadata
        assert back.metadata() == adapter.metadata()
    fresh = make_unet()
    load_adapter(fresh, back)
    diff = (ours_eps(fresh) - ours_eps(model)).abs().max().item()
    assert diff == 0.0


def test_kohya_metadata(tmp_path):
    model = make_unet()
    make_adapter(model, rank=4, alpha=2.0)
    adapter = adapter_from_model(model)
    adapter.extra = {"trigger_words": json.dumps(["bold digit", "bld"])}
    path = write_lora(adapter, "kohya", tmp_path, title="bold")
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        alpha = f.get_tensor("lora_unet_time_embedding_linear_1.alpha")
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 2.0 and alpha.dim() == 0 and alpha.item() == 2.0
    assert meta["ss_base_model_version"] and meta["lora4diffusion.base_fingerprint"] == adapter.fingerprint
    assert json.loads(meta["ss_tag_frequency"]) == {"trigger": {"bold digit": 1, "bld": 1}}
    assert meta["modelspec.trigger_phrase"] == "bold digit, bld"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"  # ResBlock convs are adapted here
    assert all(k.startswith("lora_unet_") for k in keys)


def _strip(path, drop_alpha: bool = False) -> None:
    """Make a file as another tool writes it: no lora4diffusion metadata (and, for kohya, maybe no alphas)."""
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if not k.startswith("lora4diffusion")}
    tensors = {k: v for k, v in load_file(str(path)).items() if not (drop_alpha and k.endswith(".alpha"))}
    save_file(tensors, str(path), metadata=meta)


def test_foreign_files_without_our_metadata(tmp_path, caplog):
    model = make_unet()
    make_adapter(model, rank=4, alpha=8.0, rslora=True)
    adapter = adapter_from_model(model)
    adapter.extra = {"trigger_words": json.dumps(["bld", "bold digit"])}
    d = write_lora(adapter, "diffusers", tmp_path / "d")
    k = write_lora(adapter, "kohya", tmp_path / "k", title="a")
    _strip(d)
    _strip(k)
    for path in (d, k):  # alpha (and, in diffusers, rsLoRA) come from their own metadata: the same function
        fresh = make_unet()
        load_adapter(fresh, read_any(path))
        assert (ours_eps(fresh) - ours_eps(model)).abs().max().item() <= 1e-6
    assert json.loads(read_any(k).extra["trigger_words"]) == ["bld", "bold digit"]  # modelspec.trigger_phrase
    _strip(k, drop_alpha=True)
    with caplog.at_level(logging.WARNING, logger="lora4diffusion"):
        back = read_any(k)
    assert back.alpha == back.rank == 4 and "alpha = rank" in caplog.text


def test_bad_lora_files_are_refused_in_one_line(tmp_path):
    model = make_unet()
    make_adapter(model, targets="attention")
    adapter = adapter_from_model(model)
    d = write_lora(adapter, "diffusers", tmp_path / "d")
    k = write_lora(adapter, "kohya", tmp_path / "k", title="a")
    mixed = {**load_file(str(d)), **load_file(str(k))}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(UserError, match="mixed LoRA layouts"):
        read_any(tmp_path / "mixed.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(UserError, match="unknown LoRA layout"):
        read_any(tmp_path / "unknown.safetensors")
    te = dict(load_file(str(k)))
    te["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    save_file(te, str(tmp_path / "te.safetensors"))
    with pytest.raises(UserError, match="lora_te_text_model_encoder_layers_0_mlp_fc1"):
        read_any(tmp_path / "te.safetensors")
    other = UNet(UNetConfig(**{**CFG.to_dict(), "context_dim": 24}))  # to_k/to_v of attn2 take 24 inputs
    with pytest.raises(UserError, match=r"module down\.0\.0\.attn\.attn2\.to_k: adapter shapes"):
        load_adapter(other, read_any(k), force=True)  # force: past the fingerprint check, to the shapes


def test_cli_export_lora_and_sample_with_any_layout(tmp_path, capsys):
    model = make_unet()
    save_model(tmp_path / "base", model, DiffusionConfig())
    make_adapter(model, targets="all-linear")
    adapter_from_model(model).save(tmp_path / "ours")
    for fmt in ("diffusers", "kohya", "peft"):
        out = tmp_path / f"x_{fmt}"
        assert (
            main(["-q", "export-lora", "--lora", str(tmp_path / "ours"), "--format", fmt, "--out", str(out)])
            == 0
        )
        assert (
            main(["-q", "export-lora", "--lora", str(tmp_path / "ours"), "--format", fmt, "--out", str(out)])
            == 2
        )
        assert "--overwrite" in capsys.readouterr().err
        target = out if fmt == "peft" else next(out.glob("*.safetensors"))
        assert (
            main(
                [
                    "-q",
                    "sample",
                    "--checkpoint",
                    str(tmp_path / "base"),
                    "--lora",
                    f"{target}:0.5",
                    "--digits",
                    "3",
                    "--per-digit",
                    "1",
                    "--steps",
                    "2",
                    "--out",
                    str(tmp_path / f"s_{fmt}"),
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "-q",
                "export-lora",
                "--lora",
                str(tmp_path / "nothing"),
                "--format",
                "kohya",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "o").exists()


# ----- loaded by diffusers itself -----
def test_diffusers_loads_our_diffusers_lora_at_weights_1_and_half_and_fused(exported, tmp_path):
    model, folder = exported
    make_adapter(model, rank=4, alpha=8.0)  # alpha != rank: proves alpha arrives through the metadata
    path = write_lora(adapter_from_model(model), "diffusers", tmp_path / "lora")
    dunet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    dunet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name="a")
    diffs = {}
    for w in (1.0, 0.5):
        set_adapter_weight(model, "default", w)
        dunet.set_adapters(["a"], weights=[w])
        diffs[w] = (ours_eps(model) - theirs_eps(dunet, model)).abs().max().item()
    merge_lora(model)
    dunet.fuse_lora(lora_scale=1.0)
    diffs["fused"] = (ours_eps(model) - theirs_eps(dunet, model)).abs().max().item()
    assert max(diffs.values()) <= 1e-5, diffs
    assert (ours_eps(model) - ours_eps(make_unet())).abs().max() > 1e-3  # the adapter does change the output


def test_diffusers_kohya_converter_on_our_kohya_file(exported, tmp_path):
    """diffusers' own kohya converter maps every module of ours except class_embedding (our context_pool):
    its '_' -> '.' has no rule back for 'class.embedding': that LoRA lands on no module (docs/INTEROP.md)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    model, folder = exported
    # every Linear and Conv2d (conv_in, down/upsamplers too) but that one and conv_out (rank 1 < 4)
    make_adapter(model, targets="re:(?!context_pool|conv_out).*", rank=4, alpha=2.0)
    path = write_lora(adapter_from_model(model), "kohya", tmp_path, title="k")
    state, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(path)))
    dunet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    dunet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="k")
    diffs = {}
    for w in (1.0, 0.5):
        set_adapter_weight(model, "default", w)
        dunet.set_adapters(["k"], weights=[w])
        diffs[w] = (ours_eps(model) - theirs_eps(dunet, model)).abs().max().item()
    assert max(diffs.values()) <= 1e-5, diffs

    single = make_unet()
    make_adapter(single, targets="context_pool")
    path = write_lora(adapter_from_model(single), "kohya", tmp_path / "cp", title="cp")
    state, _ = _convert_non_diffusers_lora_to_diffusers(load_file(str(path)))
    assert sorted(state) == ["unet.class.embedding.lora.down.weight", "unet.class.embedding.lora.up.weight"]


def test_we_import_an_adapter_made_by_diffusers_and_peft(exported, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, folder = exported
    dunet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "time_emb_proj",
        "linear_1",
        "linear_2",
        "class_embedding",
        "conv1",
        "conv2",
        "conv_shortcut",
    ]
    dunet.add_adapter(
        LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights="gaussian", use_rslora=True)
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in dunet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "pipe",
        unet_lora_layers=get_peft_model_state_dict(dunet),
        unet_lora_adapter_metadata=dunet.peft_config["default"].to_dict(),
    )
    dunet.save_lora_adapter(tmp_path / "bare")  # a bare model's file: no "unet." prefix
    for folder_ in ("pipe", "bare"):
        ours = make_unet()
        load_adapter(ours, read_any(tmp_path / folder_))
        diff = (ours_eps(ours) - theirs_eps(dunet, ours)).abs().max().item()
        assert diff <= 1e-5, (folder_, diff)
        assert (ours_eps(ours) - ours_eps(model)).abs().max() > 1e-3


# ----- the shipped adapters -----
def test_shipped_adapters_have_a_name_in_every_format_and_round_trip(tmp_path):
    from lora4diffusion.formats.names import te_from_diffusers, te_from_kohya, te_to_diffusers, te_to_kohya
    from lora4diffusion.lora.prompt_lora import TE_PREFIX
    from lora4diffusion.pipeline import Pipeline

    pipes = {"base": Pipeline.load(), "pixel-base": Pipeline.load("pixel-base")}
    fits = {"bold": "base", "italic": "base", "bold-pixel": "pixel-base", "italic-pixel": "pixel-base"}
    assert set(fits) <= set(shipped_adapters())
    for name, folder in shipped_adapters().items():
        adapter = read_adapter(folder)
        for m in adapter.modules:  # all-linear: every module they adapt has a diffusers and a kohya name
            if m.startswith(TE_PREFIX):  # the prompt adapters' text-encoder LoRA (train-lora --text-encoder)
                assert te_from_diffusers(te_to_diffusers(m)) == m == te_from_kohya(te_to_kohya(m))
            else:
                assert from_diffusers(to_diffusers(m)) == m and from_kohya(to_kohya(m)) == m
        for fmt in ("diffusers", "kohya", "peft"):
            back = read_any(write_lora(adapter, fmt, tmp_path / name / fmt, title=name))
            assert set(back.tensors) == set(adapter.tensors)
            assert all(torch.equal(back.tensors[k], v) for k, v in adapter.tensors.items())
        # the kohya file carries the fingerprint: checked against the base it was trained on when loaded
        if name in fits:
            assert pipes[fits[name]].add_lora(tmp_path / name / "kohya" / f"{name}.safetensors", 0.0) == name


# ----- text-encoder LoRA (train-lora --text-encoder on a prompt model) -----
def _te_adapter(folder=None):
    """UNet + text-encoder LoRA as train-lora --text-encoder writes it: text-encoder modules prefixed.
    ``folder``: also export the text encoder (before LoRA) there as a CLIPTextModel; returns (adapter, te)."""
    from lora4diffusion.lora.adapters import Adapter
    from lora4diffusion.lora.prompt_lora import TE_TARGETS
    from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
    from lora4diffusion.models.tokenizer import Tokenizer

    model = make_unet()
    make_adapter(model, targets="attention", rank=4, alpha=2.0)
    torch.manual_seed(3)
    te = TextEncoder(TextEncoderConfig.for_tokenizer(Tokenizer.load(), width=16, layers=2, heads=2))
    if folder is not None:
        from lora4diffusion.formats.transformers_clip import export_text_encoder

        export_text_encoder(te, Tokenizer.load(), folder)
    inject_lora(te, TE_TARGETS, 4, 2.0)
    with torch.no_grad():
        for m in lora_layers(te).values():
            m.lora_up["default"].weight.normal_()
    unet_part, te_part = adapter_from_model(model), adapter_from_model(te)
    tensors = {**unet_part.tensors, **{f"text_encoder.{k}": v for k, v in te_part.tensors.items()}}
    adapter = Adapter(tensors, 4, 2.0, fingerprint=unet_part.fingerprint,
                      extra={"style": "bold", "trigger_words": json.dumps(["sks"]), "text_encoder": "true"})
    return (adapter, te) if folder is not None else adapter


def test_text_encoder_lora_names_in_every_format():
    from lora4diffusion.formats.names import te_from_diffusers, te_from_kohya, te_to_diffusers, te_to_kohya

    ours = "text_encoder.layers.0.self_attn.q_proj"
    assert te_to_diffusers(ours) == "text_model.encoder.layers.0.self_attn.q_proj"
    assert te_to_kohya(ours) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
              "mlp.fc2")
    for leaf in leaves:
        path = f"text_encoder.layers.11.{leaf}"
        assert te_from_kohya(te_to_kohya(path)) == path == te_from_diffusers(te_to_diffusers(path))
    for bad in ("text_encoder.token_embedding", "text_encoder.layers.0.layer_norm1", "layers.0.mlp.fc1"):
        with pytest.raises(UserError):
            te_to_kohya(bad)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_text_encoder_lora_round_trips_are_exact(tmp_path, fmt):
    adapter = _te_adapter()
    written = write_lora(adapter, fmt, tmp_path / fmt, title="bold")
    back = read_any(written)
    assert set(back.tensors) == set(adapter.tensors)
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    if fmt != "peft":
        assert back.metadata() == adapter.metadata()
    if fmt == "kohya":
        with safe_open(str(written), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
        assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
        assert json.loads(meta["ss_tag_frequency"]) == {"trigger": {"sks": 1}}
        assert meta["modelspec.trigger_phrase"] == "sks"
    if fmt == "diffusers":
        with safe_open(str(written), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
        config = json.loads(meta["lora_adapter_metadata"])
        assert config["text_encoder.r"] == 4 and config["text_encoder.lora_alpha"] == 2.0


def test_diffusers_kohya_converter_agrees_on_text_encoder_names(tmp_path):
    """diffusers' own kohya converter (+ its PEFT renaming, as load_lora_weights does) turns our kohya file's
    lora_te_* entries into exactly the text_encoder.* tensors of our diffusers file."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    adapter = _te_adapter()
    kohya_file = write_lora(adapter, "kohya", tmp_path / "k", title="k")
    state, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(kohya_file)))
    theirs = convert_state_dict_to_peft({k: v for k, v in state.items() if k.startswith("text_encoder.")})
    mine = {k: v for k, v in load_file(str(write_lora(adapter, "diffusers", tmp_path / "d"))).items()
            if k.startswith("text_encoder.")}
    assert set(theirs) == set(mine) and len(mine) == 24  # 2 layers x (q, k, v, out, fc1, fc2) x (A, B)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert {float(v) for k, v in alphas.items() if k.startswith("text_encoder.")} == {2.0}


def test_transformers_clip_with_peft_lora_from_our_diffusers_file_matches_ours(tmp_path):
    """Our diffusers file's text_encoder.* LoRA, loaded by peft into transformers' CLIPTextModel (the base
    exported by formats/transformers_clip.py), computes what our text encoder + LoRA computes."""
    from peft import LoraConfig
    from transformers import CLIPTextModel

    from lora4diffusion.models.tokenizer import Tokenizer

    adapter, te = _te_adapter(tmp_path / "clip")
    weights = load_file(str(write_lora(adapter, "diffusers", tmp_path / "d")))
    state = {k.removeprefix("text_encoder."): v for k, v in weights.items() if k.startswith("text_encoder.")}
    theirs = CLIPTextModel.from_pretrained(tmp_path / "clip" / "text_encoder").eval()
    config = LoraConfig(r=4, lora_alpha=2.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                              "fc2"])
    # what diffusers' _load_lora_into_text_encoder does: transformers' PEFT integration
    theirs.load_adapter(adapter_name="k", adapter_state_dict=state, peft_config=config)
    ids = Tokenizer.load().encode(["a handwritten sks seven", "the digit 3", ""])
    with torch.no_grad():
        ours, theirs_out = te.eval()(ids)[0], theirs(input_ids=ids).last_hidden_state
        for m in lora_layers(te).values():
            m.disable_adapters()
        plain = te(ids)[0]
    assert (ours - theirs_out).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the LoRA changed the output: the comparison is not vacuous
