"""The CLIP-style text encoder: against transformers' CLIPTextModel, its causal/padding behaviour, its
converter, and a smoke test that its output feeds the UNet's cross-attention."""

import os

import pytest
import torch

from lora4diffusion.errors import UserError
from lora4diffusion.formats import transformers_clip as tc
from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig, quick_gelu
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.models.unet import UNet, UNetConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a handwritten sks seven", "", "the digit 7 in ohwx bold style", "3",
           "a picture of the number nine"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


def randomized(cfg: TextEncoderConfig, seed: int = 0) -> TextEncoder:
    """An encoder whose every weight (LayerNorm gains and biases too) is random and O(1) in effect, so a
    wrong name, transpose or norm cannot hide behind the near-identity initialisation."""
    torch.manual_seed(seed)
    model = TextEncoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "embedding" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.5 * p.shape[-1] ** -0.5 if p.dim() == 2 else 0.2)
    return model


def test_config_validation(tok):
    cfg = TextEncoderConfig.for_tokenizer(tok)
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.context_length) == (tok.vocab_size, tok.eos_id, 16)
    assert TextEncoderConfig.from_dict(cfg.to_dict()) == cfg
    bad = [
        ({"width": 66}, "divisible"), ({"eos_token_id": 99}, "outside"), ({"layers": 0}, ">= 1"),
        ({"heads": 2.0}, "integer"), ({"layer_norm_eps": 0.0}, "positive"),
        ({"context_length": True}, "integer"),
    ]
    for change, match in bad:
        with pytest.raises(UserError, match=match):
            TextEncoderConfig.from_dict({**cfg.to_dict(), **change})
    with pytest.raises(UserError, match="unknown text encoder config keys"):
        TextEncoderConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(UserError, match="eos_token_id"):
        TextEncoderConfig.from_dict({"vocab_size": 10})


def test_default_size_and_module_names(tok):
    model = TextEncoder(TextEncoderConfig.for_tokenizer(tok))
    n = sum(p.numel() for p in model.parameters())
    d, h = 64, 256
    per_layer = 4 * (d * d + d) + (d * h + h) + (h * d + d) + 4 * d
    assert n == tok.vocab_size * d + 16 * d + 2 * per_layer + 2 * d
    names = {name for name, _ in model.named_modules()}
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2", "layer_norm1", "layer_norm2"):
        assert f"layers.1.{part}" in names
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))


def test_outputs_causality_and_padding(tok):
    model = randomized(TextEncoderConfig.for_tokenizer(tok))
    ids = tok.encode(PROMPTS)
    with torch.no_grad():
        hidden, pooled = model(ids)
        assert hidden.shape == (len(PROMPTS), tok.context_length, 64) and pooled.shape == (len(PROMPTS), 64)
        first_eos = (ids == tok.eos_id).int().argmax(-1)
        assert torch.equal(pooled, hidden[torch.arange(len(PROMPTS)), first_eos])
        # what comes after the first eos (padding) cannot change anything up to it: causal attention
        other = ids.clone()
        for i, e in enumerate(first_eos.tolist()):
            other[i, e + 1:] = torch.randint(0, tok.eos_id, (tok.context_length - e - 1,))
        h2, p2 = model(other)
        assert torch.equal(p2, pooled)
        for i, e in enumerate(first_eos.tolist()):
            assert torch.equal(h2[i, : e + 1], hidden[i, : e + 1])
            assert not torch.allclose(h2[i, e + 1:], hidden[i, e + 1:])
        # ... while an earlier word changes the pooled state (the eos position sees the whole prompt)
        _, p3 = model(tok.encode(["a handwritten sks eight"]))
        assert not torch.allclose(p3[0], pooled[0])
        # a batch row does not depend on the other rows
        h4, _ = model(ids[2:3])
        assert torch.allclose(h4[0], hidden[2], atol=1e-6)
    with pytest.raises(UserError, match="text encoder input"):
        model(torch.zeros(2, 17, dtype=torch.long))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_transformers_clip_text_model(tok, tmp_path, attn):
    from transformers import CLIPTextModel

    model = randomized(TextEncoderConfig.for_tokenizer(tok))
    tc.export_text_encoder(model, tok, tmp_path)
    theirs, info = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", attn_implementation=attn,
                                                 output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    theirs.eval()
    assert theirs.config.eos_token_id == tok.eos_id != 2  # first-eos pooling, not the legacy argmax branch
    ids = tok.encode(PROMPTS)  # different lengths: padding after eos in every row
    with torch.no_grad():
        hidden, pooled = model(ids)
        out = theirs(input_ids=ids)
    assert (out.last_hidden_state - hidden).abs().max() <= 1e-5
    assert (out.pooler_output - pooled).abs().max() <= 1e-5
    assert hidden.abs().mean() > 0.1 and pooled.std(0).mean() > 0.1  # non-trivial numbers were compared
    # argmax-of-ids pooling (original CLIP, open_clip) picks the same states
    assert torch.equal(hidden[torch.arange(len(PROMPTS)), ids.argmax(-1)], pooled)


def test_converter_round_trip_and_refusals(tok):
    cfg = TextEncoderConfig.for_tokenizer(tok, layers=3, heads=2, width=32, mlp_ratio=2)
    model = randomized(cfg)
    full = tc.clip_vocab_size(tok)
    hf = tc.to_transformers(model.state_dict(), full)
    assert hf["text_model.embeddings.token_embedding.weight"].shape == (full, 32)
    assert hf["text_model.embeddings.token_embedding.weight"][tok.vocab_size:].abs().sum() == 0
    assert "text_model.encoder.layers.2.mlp.fc2.bias" in hf and "text_model.final_layer_norm.weight" in hf
    back = tc.from_transformers(hf, cfg)
    own = model.state_dict()
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)
    config = tc.transformers_config(cfg, tok)
    assert tc.config_from_transformers(config) == cfg
    name = tc.to_transformers_name("layers.0.self_attn.q_proj")
    assert name == "text_model.encoder.layers.0.self_attn.q_proj"
    assert tc.from_transformers_name("encoder.layers.0.mlp.fc1.weight") == "layers.0.mlp.fc1.weight"

    with pytest.raises(UserError, match="lack text_model.final_layer_norm.bias"):
        tc.from_transformers({k: v for k, v in hf.items() if not k.endswith("final_layer_norm.bias")}, cfg)
    with pytest.raises(UserError, match="has shape"):
        tc.from_transformers({**hf, "text_model.final_layer_norm.bias": torch.zeros(33)}, cfg)
    with pytest.raises(UserError, match="no counterpart"):
        tc.from_transformers({**hf, "text_projection.weight": torch.zeros(32, 32)}, cfg)
    with pytest.raises(UserError, match="does not fit"):
        tc.from_transformers({**hf, "text_model.encoder.layers.3.mlp.fc1.bias": torch.zeros(64)}, cfg)
    with pytest.raises(UserError, match="token rows"):
        tc.from_transformers({**hf, "text_model.embeddings.token_embedding.weight": torch.zeros(5, 32)}, cfg)
    with pytest.raises(UserError, match="quick-GELU"):
        tc.config_from_transformers({**config, "hidden_act": "gelu"})
    with pytest.raises(UserError, match="does not fit"):
        tc.transformers_config(TextEncoderConfig(vocab_size=10, eos_token_id=9), tok)


def test_text_context_feeds_unet_cross_attention(tok, monkeypatch):
    """Today's UNet builds its context from labels inside forward; a text context of the same width goes
    through the very same cross-attention (to_k/to_v take context_dim), any number of tokens L."""
    enc = TextEncoder(TextEncoderConfig.for_tokenizer(tok, width=32, heads=2))
    unet = UNet(UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                           attn_levels=(1,), context_dim=32))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # zero-init output would hide the context's effect
    ids = tok.encode(["a handwritten seven", "the digit 3"])
    context, pooled = enc(ids)
    assert context.shape == (2, tok.context_length, unet.cfg.context_dim)
    monkeypatch.setattr(unet, "context", lambda labels: context)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    eps = unet(x, t, torch.zeros(2, dtype=torch.long))
    assert eps.shape == x.shape
    eps.square().mean().backward()
    # gradients reach the embedding of every word used
    assert enc.token_embedding.weight.grad[ids.unique()].abs().sum(-1).gt(0).all()
    assert unet.mid_attn.attn2.to_k.weight.grad.abs().sum() > 0
    # the images' prediction depends on the prompt, through cross-attention
    with torch.no_grad():
        other, _ = enc(tok.encode(["a handwritten eight", "the digit 3"]))
        monkeypatch.setattr(unet, "context", lambda labels: other)
        eps2 = unet(x, t, torch.zeros(2, dtype=torch.long))
    assert not torch.allclose(eps2[0], eps[0]) and torch.allclose(eps2[1], eps[1], atol=1e-6)
