import pytest
import torch
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import NULL_LABEL, Attention, UNet, UNetConfig, timestep_embedding


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, NULL_LABEL + 1, (b,), generator=g)
    return x, t, y


@pytest.mark.parametrize("size", [28, 32, 48])
def test_output_shape_for_supported_sizes(size):
    cfg = UNetConfig(image_size=size, base_channels=16, context_dim=32)
    x, t, y = _batch(cfg, b=2)
    assert UNet(cfg)(x, t, y).shape == x.shape


def test_every_to_q_and_to_k_gets_nonzero_gradient(small_cfg):
    """The reference's single-key cross-attention gave q/k exactly zero gradient; ours must not."""
    torch.manual_seed(0)
    model = UNet(small_cfg)
    nn.init.normal_(model.conv_out.weight, std=0.02)  # zero-init output would block all gradients at step 0
    x, t, y = _batch(small_cfg, b=8)
    loss = (model(x, t, y) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    names = [n for n, _ in model.named_parameters() if n.endswith(("to_q.weight", "to_k.weight"))]
    assert any(".attn2." in n for n in names) and any(".attn1." in n for n in names)
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None and (p.grad != 0).sum() > 0.9 * p.numel(), n


def test_single_context_token_is_refused():
    with pytest.raises(UserError, match="context_tokens"):
        UNetConfig(context_tokens=1)


def test_single_key_attention_really_has_zero_qk_gradient():
    """Documents the failure mode the context-token rule prevents."""
    attn = Attention(8, 8, head_dim=4)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    attn(x, ctx).sum().backward()
    assert attn.to_q.weight.grad.abs().max() == 0 and attn.to_k.weight.grad.abs().max() == 0


@pytest.mark.parametrize("size", [30, 26, 0])
def test_image_size_must_divide_downsampling(size):
    with pytest.raises(UserError, match="divisible"):
        UNetConfig(image_size=size)


def test_no_batchnorm_and_train_eval_equal(small_cfg):
    model = UNet(small_cfg)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    nn.init.normal_(model.conv_out.weight, std=0.02)
    x, t, y = _batch(small_cfg)
    with torch.no_grad():
        a = model.train()(x, t, y)
        b = model.eval()(x, t, y)
        c = model.eval()(x[:1], t[:1], y[:1])
    assert torch.equal(a, b)
    torch.testing.assert_close(c, b[:1], atol=1e-5, rtol=1e-5)  # no batch dependence


def test_labels_change_output(small_cfg):
    torch.manual_seed(0)
    model = UNet(small_cfg)
    nn.init.normal_(model.conv_out.weight, std=0.02)
    x, t, _ = _batch(small_cfg, b=2)
    with torch.no_grad():
        a = model(x, t, torch.tensor([3, 3]))
        b = model(x, t, torch.tensor([7, 7]))
    assert (a - b).abs().max() > 1e-4


def test_timestep_embedding_closed_form():
    e = timestep_embedding(torch.tensor([0, 5]), 8)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]))


def test_attention_names_match_sd():
    model = UNet(UNetConfig(base_channels=16, context_dim=32))
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attn" in n
    }
    assert {"to_q", "to_k", "to_v", "to_out"} <= names


def test_config_round_trip(small_cfg):
    d = small_cfg.to_dict()
    assert UNetConfig.from_dict(d) == small_cfg
    with pytest.raises(UserError, match="unknown"):
        UNetConfig.from_dict({**d, "bogus": 1})
