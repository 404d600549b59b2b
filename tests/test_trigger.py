"""Trigger-word LoRA on a prompt model (DreamBooth's rare identifier, prior preservation, text-encoder
LoRA) and <lora:...> tags in prompts.

One tiny VAE and one tiny prompt model per module (seconds); adapters trained for a handful of steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora4diffusion.captions import TRIGGER_WORDS, all_captions
from lora4diffusion.checkpoint import load_tensors, read_metadata
from lora4diffusion.cli import main
from lora4diffusion.diffusion import NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.limits import MAX_LORA_WEIGHT
from lora4diffusion.lora.adapters import read_adapter
from lora4diffusion.lora.layers import base_state_dict, inject_lora, lora_layers
from lora4diffusion.lora.loha import LoHa
from lora4diffusion.lora.prompt_lora import TE_TARGETS, prompt_fingerprint
from lora4diffusion.models.prompt_unet import TextConditionedUNet
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.prompt_syntax import NAME, call_loras, parse_prompt
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.lora import (
    LoRAConfig,
    TriggerTask,
    default_lora_config,
    default_lora_train_config,
    default_trigger_train_config,
    train_lora,
)
from lora4diffusion.training.prompt_base import train_prompt_base
from lora4diffusion.training.run import TrainConfig

FAST = dict(steps=6, batch_size=16, progress=False, device="cpu", sample_every=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("trigger")
    assert main(["-q", "train-vae", "--preset", "tiny", "--out", str(root / "vae"), "--device", "cpu"]) == 0
    train_prompt_base("tiny", root / "base", vae=root / "vae", progress=False, device="cpu", steps=10,
                      sample_every=0)
    return root / "base"


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A trigger LoRA with prior preservation and text-encoder LoRA (what the shipped adapters use)."""
    out = tmp_path_factory.mktemp("lora") / "bold"
    train_lora("bold", out, base=base, trigger="sks", prior=True, text_encoder=True, text_encoder_lr=1e-3,
               **FAST)
    return out


class _Recorder(torch.nn.Module):
    """A stand-in network: returns zeros and records what the task fed it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, ids):
        self.seen.append((x.detach(), t, ids))
        return torch.zeros_like(x) + 0 * self.w


class _FakeTrainer:
    """What TriggerTask reads from the Trainer (training.loop.Trainer's attributes of the same names)."""

    def __init__(self, images, labels, batch=8, seed=0):
        self.cfg = TrainConfig(batch_size=batch, seed=seed, label_dropout=0.0)
        self.images, self.labels = images, labels
        self.rank, self.world, self.device, self.use_bf16 = 0, 1, torch.device("cpu"), False
        self._net = _Recorder()

    def batch_indices(self, step):
        b = self.cfg.batch_size
        return torch.arange(step * b, (step + 1) * b) % self.images.shape[0]

    def net(self):
        return self._net


def _task_setup(base):
    pipe = Pipeline.load(base)
    g = torch.Generator().manual_seed(1)
    styled = torch.randn(40, 4, 8, 8, generator=g)
    plain = torch.randn(30, 4, 8, 8, generator=g) + 100.0  # far from the styled ones: rows are traceable
    labels, plain_labels = torch.arange(40) % 10, torch.arange(30) % 10
    return pipe, NoiseSchedule(pipe.diffusion), styled, labels, plain, plain_labels


def test_trigger_captions_and_prior_batch_split(base):
    pipe, schedule, styled, labels, plain, plain_labels = _task_setup(base)
    tok = pipe.tokenizer
    with_prior = TriggerTask(schedule, tok, "sks", plain, plain_labels, prior_weight=1.0)
    without = TriggerTask(schedule, tok, "sks")
    t1, t2 = _FakeTrainer(styled, labels), _FakeTrainer(styled, labels)
    with_prior.loss(t1, 3)
    without.loss(t2, 3)
    (x_p, t_p, ids_p), (x_n, t_n, ids_n) = t1.net().seen[0], t2.net().seen[0]
    assert x_p.shape[0] == 16 and x_n.shape[0] == 8  # B styled + B prior rows
    # the styled half is exactly the batch of the run without --prior (same t, noise, captions)
    assert torch.equal(x_p[:8], x_n) and torch.equal(t_p[:8], t_n) and torch.equal(ids_p[:8], ids_n)
    styled_caps, prior_caps = ([c.replace(" ,", ",") for c in tok.decode(ids)]  # decode spaces commas
                               for ids in (ids_p[:8], ids_p[8:]))
    idx = t1.batch_indices(3)
    for c, d in zip(styled_caps, labels[idx].tolist(), strict=True):
        assert "sks" in c.split() and c in all_captions(d, "sks"), c
    for c in prior_caps:
        assert "sks" not in c.split() and any(c in all_captions(d) for d in range(10)), c
    # prior rows come from the plain pool (x_t = sqrt(a) x0 + sqrt(1-a) eps: shifted by the +100)
    assert (x_p[8:].mean(dim=(1, 2, 3)) > x_p[:8].mean(dim=(1, 2, 3)).max()).all()


def test_prior_weight_scales_the_prior_half_linearly(base):
    """loss = styled mean + W * prior mean (DreamBooth eq. 2): with a zero network, loss(W) is affine in W."""
    pipe, schedule, styled, labels, plain, plain_labels = _task_setup(base)
    losses = {}
    for w in (0.0, 1.0, 2.5):
        task = TriggerTask(schedule, pipe.tokenizer, "sks", plain, plain_labels, prior_weight=w)
        losses[w] = task.loss(_FakeTrainer(styled, labels), 5).item()
    styled_only = TriggerTask(schedule, pipe.tokenizer, "sks").loss(_FakeTrainer(styled, labels), 5).item()
    assert losses[0.0] == pytest.approx(styled_only, rel=1e-6)
    prior_mean = losses[1.0] - losses[0.0]
    assert prior_mean > 0.5  # E[eps^2] = 1 for the zero network
    assert losses[2.5] == pytest.approx(losses[0.0] + 2.5 * prior_mean, rel=1e-5)


def test_text_encoder_lora_trains_and_the_base_stays_bit_identical(base, tmp_path):
    pipe, schedule = Pipeline.load(base), None
    model = TextConditionedUNet(pipe.unet, pipe.text_encoder)
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    fp = prompt_fingerprint(pipe.unet, pipe.text_encoder)
    inject_lora(pipe.unet, "all-linear", 4, 4.0)
    inject_lora(pipe.text_encoder, TE_TARGETS, 4, 4.0)
    for k, p in model.named_parameters():
        p.requires_grad_(".lora_" in k)
    schedule = NoiseSchedule(pipe.diffusion)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 4, 8, 8, generator=g), torch.arange(32) % 10
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup=1, ema_decay=0.0, label_dropout=0.0, log_every=1,
                      checkpoint_every=3, sample_every=0, bf16=False)
    trainer = Trainer(model, TriggerTask(schedule, pipe.tokenizer, "sks", images + 1, labels), images, labels,
                      cfg, tmp_path, lambda m, d: None, device="cpu", lr_scale=lambda k: 0.5
                      if k.startswith("text_encoder.") else 1.0)
    trainer.fit(progress=False)
    te_layers = lora_layers(pipe.text_encoder)
    assert {p.split(".")[-1] for p in te_layers} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    for m in te_layers.values():  # B starts at 0: a non-zero B got gradients
        assert m.lora_up["default"].weight.abs().sum() > 0
    groups = {g.get("lr_scale"): len(g["params"]) for g in trainer.opt.param_groups if g["params"]}
    assert groups[0.5] == 2 * len(te_layers) and trainer.opt.param_groups[0]["lr"] in (1e-2, 5e-3)
    after = base_state_dict(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert prompt_fingerprint(pipe.unet, pipe.text_encoder) == fp


def test_adapter_file_metadata_names_and_fingerprint(base, adapter):
    meta = read_metadata(adapter / "adapter.safetensors")
    assert json.loads(meta["trigger_words"]) == ["sks"] and meta["style"] == "bold"
    assert json.loads(meta["text_encoder"]) is True and json.loads(meta["prior"]) is True
    assert json.loads(meta["text_encoder_lr"]) == 1e-3 and json.loads(meta["prior_weight"]) == 1.0
    a = read_adapter(adapter)
    te = [m for m in a.modules if m.startswith("text_encoder.")]
    assert "text_encoder.layers.0.self_attn.q_proj" in te and "text_encoder.layers.0.mlp.fc2" in te
    unet_mods = [m for m in a.modules if not m.startswith("text_encoder.")]
    assert "down.1.0.attn.attn2.to_q" in unet_mods  # UNet names exactly as in a label model's adapter
    pipe = Pipeline.load(base)
    assert a.fingerprint == prompt_fingerprint(pipe.unet, pipe.text_encoder)
    # the fingerprint covers the text encoder: a changed text encoder refuses the adapter
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.weight.add_(1e-3)
    with pytest.raises(UserError, match="different base"):
        pipe.add_lora(adapter)


def test_resume_is_bit_exact(base, tmp_path):
    kw = dict(base=base, trigger="zwx", prior=True, prior_weight=0.5, text_encoder=True,
              **{k: v for k, v in FAST.items() if k != "steps"})
    train_lora("italic", tmp_path / "full", steps=6, **kw)
    train_lora("italic", tmp_path / "split", steps=3, **kw)
    train_lora("italic", tmp_path / "split", steps=6, resume=True, **kw)
    for name in ("adapter.safetensors", "train_state.safetensors"):
        a, b = load_tensors(tmp_path / "full" / name), load_tensors(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------------------ <lora:...> tags
_names = st.from_regex(NAME, fullmatch=True)
_weights = st.floats(-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT, allow_nan=False)
_words = st.lists(st.sampled_from(["a", "sks", "seven", "the", "digit", "7"]), max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_words, st.one_of(st.none(), st.tuples(_names, st.one_of(st.none(), _weights)))),
                max_size=5))
def test_tags_parse_strip_and_last_wins(parts):
    text, words, expected = [], [], {}
    for ws, tag in parts:
        text += ws
        words += ws
        if tag is not None:
            name, w = tag
            text.append(f"<lora:{name}>" if w is None else f"<LoRA:{name}:{w!r}>")
            expected.pop(name, None)
            expected[name] = 1.0 if w is None else w
    p = parse_prompt(" ".join(text))
    assert p.text == " ".join(words)
    assert p.loras == expected and list(p.loras) == list(expected)


@pytest.mark.parametrize("bad", ["<lora:bold:abc> a seven", "<lora:bold a seven", "<lora::1> seven",
                                 "<lora:bold:1:1:1> seven", "<lora:bold:inf> 7", "a seven <lora",
                                 "<lora:bold:1:dyn=4> seven", "<lora:bold:1:start=3> seven"])
def test_malformed_tags_are_refused(bad):
    with pytest.raises(UserError):
        parse_prompt(bad, paths=True)


@pytest.mark.parametrize("prompt, quoted", [
    ("<lora:<lora:bold>> seven", "<lora:<lora:bold>"),  # was '<lora: > seven': text not in the prompt
    ("a <lora:x:1 <lora:y> seven", "<lora:x:1 <lora:y>"),
    ("<LoRA bold> seven <lora:italic>", "<LoRA bold>"),
    ("seven <lora:bold", "<lora:bold"),
])
def test_a_malformed_tag_is_quoted_as_it_is_written(prompt, quoted):
    with pytest.raises(UserError) as e:
        parse_prompt(prompt, paths=True)
    msg = str(e.value)
    assert msg.startswith(f"malformed tag {quoted!r} in prompt ") and quoted in prompt, msg


@pytest.mark.parametrize("weight", [2.5, -2.01, 4.0, 1e30, float("inf"), float("nan")])
def test_a_tag_weight_has_the_one_limit(weight):
    with pytest.raises(UserError, match=r"the weight must be a finite number in \[-2, 2\]"):
        parse_prompt(f"<lora:bold:{weight!r}> seven")
    assert parse_prompt("<lora:bold:2> <lora:italic:-2> seven").loras == {"bold": 2.0, "italic": -2.0}


def test_one_call_needs_the_same_tags_in_every_prompt():
    assert call_loras(["<lora:a:0.5> seven", "one <lora:a:0.5>"]) == (["seven", "one"], {"a": 0.5})
    with pytest.raises(UserError, match="separate calls"):
        call_loras(["<lora:a:0.5> seven", "<lora:a:0.8> one"])


def test_tag_loads_strips_and_matches_the_lora_flag(base, adapter, tmp_path, caplog, capsys):
    common = ["-q", "sample", "--checkpoint", str(base), "--num", "2", "--steps", "3"]
    tagged = f"<lora:{adapter}:0.8> a sks seven"
    assert main([*common, "--prompt", tagged, "--out", str(tmp_path / "tag")]) == 0
    # the summary line names the adapter a tag loaded, as it names --lora ones (not "loras none")
    assert f"loras {adapter}:0.8 (prompt tags)," in capsys.readouterr().out
    assert main([*common, "--prompt", "a sks seven", "--lora", f"{adapter}:0.8",
                 "--out", str(tmp_path / "flag")]) == 0
    tag, flag = np.load(tmp_path / "tag" / "samples.npz"), np.load(tmp_path / "flag" / "samples.npz")
    assert np.array_equal(tag["images"], flag["images"])
    assert list(tag["labels"]) == [7, 7]
    plain = Pipeline.load(base)
    base_images, _ = plain.generate(["a sks seven"] * 2, steps=3)
    assert not np.array_equal(tag["images"], base_images.numpy())  # the adapter acted
    pipe = Pipeline.load(base)
    assert pipe.apply_prompt_tags([f"<lora:{adapter}:0.8> a sks seven"]) == ["a sks seven"]
    (name,) = pipe.tag_adapters.values()
    for part in (pipe.unet, pipe.text_encoder):  # loaded into both, at the tag's weight
        assert {m.multipliers[name] for m in lora_layers(part).values()} == {0.8}
    pipe.apply_prompt_tags(["a seven"])  # a later call without the tag switches it off
    assert {m.multipliers[name] for m in lora_layers(pipe.unet).values()} == {0.0}


def test_missing_trigger_warns_once(base, adapter, tmp_path, caplog):
    argv = ["-q", "sample", "--checkpoint", str(base), "--num", "1", "--steps", "2", "--prompt",
            f"<lora:{adapter}> a seven", "--prompt", f"<lora:{adapter}> the digit 3",
            "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    err = [r.getMessage() for r in caplog.records if "trigger" in r.getMessage()]
    assert len(err) == 1 and "sks" in err[0] and "absent" in err[0] and "\n" not in err[0]
    caplog.clear()
    argv[-3], argv[-5] = f"<lora:{adapter}> the digit sks 3", f"<lora:{adapter}> a sks seven"
    argv[-1] = str(tmp_path / "o2")
    assert main(argv) == 0
    assert not [r for r in caplog.records if "trigger" in r.getMessage()]


@pytest.mark.parametrize("prompt, message", [
    ("<lora:bolt:0.8> a sks seven", "nearest: bold"),
    ("<lora:ADAPTER:x1> a sks seven", "not a number"),
    ("<lora:ADAPTER a sks seven", "malformed tag"),
    ("<lora:ADAPTER:0.5:1:1> a seven", "at most two numbers, the text encoder's weight and the UNet's"),
    ("<lora:ADAPTER:0.5:OUTS> a seven", "is not a number (block weights: lbw=OUTS)"),
    ("<lora:ADAPTER:4> a sks seven", "the weight must be a finite number in [-2, 2]"),  # was the maximum
    ("<lora:<lora:ADAPTER>> a sks seven", "malformed tag '<lora:<lora:"),
])
def test_bad_sample_input_exits_2_and_writes_nothing(base, adapter, tmp_path, capsys, prompt, message):
    out = tmp_path / "out"
    prompt = prompt.replace("ADAPTER", str(adapter))
    code = main(["-q", "sample", "--checkpoint", str(base), "--prompt", prompt, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_tag_and_lora_naming_one_adapter_apply_it_once(base, adapter, tmp_path, capsys):
    """`--lora A:0.5` with `<lora:A:0.3>` in the prompt applied A twice (0.8 in all); now refused, naming A,
    as the web API refuses a tag and a `loras` entry that disagree. At the same weight it is one adapter."""
    common = ["-q", "sample", "--checkpoint", str(base), "--num", "1", "--steps", "2",
              "--lora", f"{adapter}:0.5"]
    out = tmp_path / "out"
    code = main([*common, "--prompt", f"<lora:{adapter}:0.3> a sks seven", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "adapter 'bold'" in err[0] and "says 0.3" in err[0], err
    assert "--lora (add_lora) says 0.5" in err[0] and not out.exists()
    assert main([*common, "--prompt", f"<lora:{adapter}:0.5> a sks seven", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--prompt", "a sks seven", "--out", str(tmp_path / "b")]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["images"] for d in "ab")
    assert np.array_equal(a, b)  # the tag at the --lora's weight is that adapter, not a second copy
    pipe = Pipeline.load(base)
    name = pipe.add_lora(adapter, 0.5)
    assert pipe.apply_prompt_tags([f"<lora:{adapter}:0.5> a sks seven"]) == ["a sks seven"]
    assert pipe.tag_adapters == {} and pipe.loras == {name: 0.5}
    with pytest.raises(UserError, match="says 0.3"):
        pipe.apply_prompt_tags([f"<lora:{adapter}:0.3> a sks seven"])


def test_pipeline_weights_have_the_one_limit(base, adapter):
    """add_lora, set_lora_weight and tags: |weight| <= limits.MAX_LORA_WEIGHT, checked before loading."""
    pipe = Pipeline.load(base)
    for bad in (2.5, -3.0, float("nan"), 1e30):
        with pytest.raises(UserError, match=r"\[-2, 2\]"):
            pipe.add_lora(adapter, bad)
    assert pipe.loras == {}  # nothing was loaded
    name = pipe.add_lora(adapter, 2.0)
    with pytest.raises(UserError, match=r"\[-2, 2\]"):
        pipe.set_lora_weight(name, -2.5)
    pipe.set_lora_weight(name, -2.0)
    assert pipe.loras == {name: -2.0}


def test_two_weights_of_one_adapter_in_one_call_are_each_rows_own(base, adapter, tmp_path, capsys):
    """Each prompt's rows take its own weight (tests/test_mixed_batch.py checks the images); the summary
    names both."""
    out = tmp_path / "out"
    code = main(["-q", "sample", "--checkpoint", str(base), "--prompt", f"<lora:{adapter}:0.5> a sks seven",
                 "--prompt", f"<lora:{adapter}:1> a sks one", "--num", "2", "--steps", "2", "--out",
                 str(out)])
    said = capsys.readouterr().out
    assert code == 0 and f"{adapter}:0.5, {adapter}:1 (prompt tags)" in said
    assert (out / "samples.npz").exists()


@pytest.mark.parametrize("argv, message", [
    (["--trigger", "seven"], "ordinary caption word"),
    (["--trigger", "bold"], "ordinary caption word"),
    (["--trigger", "blorp"], "not a reserved trigger"),
    (["--prior"], "--prior needs --trigger"),
    (["--trigger", "sks", "--text-encoder-lr", "1e-3"], "--text-encoder-lr goes with --text-encoder"),
])
def test_bad_train_lora_input_exits_2_and_writes_nothing(base, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code = main(["-q", "train-lora", "--checkpoint", str(base), "--style", "bold", *argv, "--out", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_trigger_not_in_the_vocabulary_is_refused(base, tmp_path):
    from lora4diffusion.lora.prompt_lora import check_trigger_in
    from lora4diffusion.models.tokenizer import Tokenizer

    small = Tokenizer([w for w in Pipeline.load(base).tokenizer.words if w != "ohwx"])
    assert "ohwx" in TRIGGER_WORDS
    with pytest.raises(UserError, match="not in the base model's vocabulary"):
        check_trigger_in("ohwx", small)


def test_label_bases_refuse_prompt_lora_flags(tmp_path, capsys):
    label = tmp_path / "label"
    argv = ["-q", "train", "--preset", "tiny", "--max-train-steps", "1", "--out", str(label), "--device",
            "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    code = main(["-q", "train-lora", "--checkpoint", str(label), "--style", "bold", "--trigger", "sks",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "label model" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_lora_config_defaults_unchanged():
    assert LoRAConfig() == LoRAConfig(rank=4, alpha=4.0, targets="all-linear")


def test_merge_folds_text_encoder_lora_too(base, adapter, tmp_path):
    assert main(["-q", "merge", "--checkpoint", str(base), "--lora", str(adapter), "--out",
                 str(tmp_path / "merged")]) == 0
    merged = Pipeline.load(tmp_path / "merged")
    assert not lora_layers(merged.text_encoder) and not lora_layers(merged.unet)
    live = Pipeline.load(base)
    live.add_lora(adapter)
    ids = live.tokenizer.encode(["a sks seven", "the digit 3"])
    plain = Pipeline.load(base).text_encoder(ids)[0]
    with torch.no_grad():
        a, b = live.text_encoder(ids)[0], merged.text_encoder(ids)[0]
    assert (a - b).abs().max() < 1e-5 and (a - plain).abs().max() > 1e-4  # TE LoRA merged, and it mattered


def test_prompt_base_lora_defaults_are_the_searched_recipe(base, adapter, tmp_path):
    """On a prompt base train-lora defaults to rank 16 (alpha 16), 750 steps (400 without --trigger) and EMA
    0.995 (the recipe search in benchmarks/RESULTS.md); --rank and --ema still win; a label base keeps rank 4,
    500 steps, no EMA."""
    a = read_adapter(adapter)
    assert (a.rank, a.alpha) == (16, 16.0) and json.loads(a.extra["train"])["ema_decay"] == 0.995
    assert default_trigger_train_config("sks").steps == 750 and default_lora_train_config().steps == 500
    assert default_trigger_train_config(None).steps == 400  # no trigger to separate: a plain style LoRA
    argv = ["-q", "train-lora", "--checkpoint", str(base), "--style", "bold", "--max-train-steps", "2",
            "--batch-size", "8", "--device", "cpu", "--rank", "2", "--ema", "0.5",
            "--out", str(tmp_path / "r2")]  # fmt: skip
    assert main(argv) == 0
    a = read_adapter(tmp_path / "r2")
    assert (a.rank, a.alpha) == (2, 2.0) and json.loads(a.extra["train"])["ema_decay"] == 0.5
    assert default_lora_config("pixel-base") == LoRAConfig()


def test_a_loha_with_text_encoder_and_loraplus_on_the_prompt_model(base, tmp_path):
    """Another method on a prompt base: the UNet's and the text encoder's LoHa both train (LoRA+ ratio 4),
    the file names its method, and it loads back into the pipeline with both parts."""
    out = tmp_path / "loha"
    lora = LoRAConfig(rank=2, alpha=2.0, method="loha", loraplus_lr_ratio=4.0)
    train_lora("bold", out, base=base, lora=lora, trigger="sks", text_encoder=True, **FAST)
    adapter = read_adapter(out)
    assert adapter.method == "loha" and adapter.extra["text_encoder"] == "true"
    te = [m for m in adapter.modules if m.startswith("text_encoder.")]
    assert te and len(te) < len(adapter.modules)
    for m in adapter.modules:  # W2a starts at 0 (LyCORIS's init): training moved it in both parts
        assert adapter.tensors[f"{m}.hada_w2_a.weight"].abs().max() > 0, m
    pipe = Pipeline.load(base)
    name = pipe.add_lora(out)
    for part in (pipe.unet, pipe.text_encoder):
        layers = [layer for layer in lora_layers(part).values() if name in layer.adapters]
        assert layers and all(isinstance(layer.adapters[name], LoHa) for layer in layers)
    flag = pipe.generate(["a sks seven"], seed=1, steps=2)[0]  # loaded by add_lora at weight 1
    tagged = Pipeline.load(base).generate([f"<lora:{out}:1> a sks seven"], seed=1, steps=2)[0]
    assert torch.equal(tagged, flag)  # a tag loads a LoHa as it loads a LoRA
