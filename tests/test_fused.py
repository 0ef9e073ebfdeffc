"""fused.py: every faster layer computes what the plain layer computes, forward and gradient; install() swaps
them in without touching parameters or keys."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import controlnet
import fused
import unet
from util import max_rel_err, randomize_


def saved_bytes(fn, module=None):
    """Bytes autograd keeps for the backward while fn() runs (not counting `module`'s weights), and fn()'s result."""
    total, weights = [0], {p.data_ptr() for p in module.parameters()} if module is not None else set()

    def pack(t):
        total[0] += 0 if t.data_ptr() in weights else t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def same_function(fast, plain, *inputs, rtol=1e-5, grad_rtol=1e-4):
    """fast(*inputs) == plain(*inputs), and so are the gradients of the inputs and of the shared parameters."""
    params = [p for p in plain.parameters() if p.requires_grad] if isinstance(plain, nn.Module) else []
    outs = []
    for fn in (fast, plain):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        y = fn(*xs)
        ys = [v for v in (y if isinstance(y, (tuple, list)) else [y]) if isinstance(v, torch.Tensor)]
        w = [torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, v in enumerate(ys)]
        loss = sum((v * wi).sum() for v, wi in zip(ys, w))  # a loss whose gradient differs at every position
        grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad] + params, allow_unused=True)
        outs.append((ys, grads))
    (y1, g1), (y2, g2) = outs
    for a, b in zip(y1, y2):
        assert a.shape == b.shape and max_rel_err(a, b) <= rtol
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None) and (a is None or max_rel_err(a, b) <= grad_rtol)


def swapped(module):
    """The module with the fast layers installed, sharing the plain one's parameters."""
    return fused.install(copy.deepcopy(module, memo={id(p): p for p in module.parameters()}))


# -- convolutions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cin,stride,hw,gemm", [(256, 1, 8, True), (256, 2, 16, True), (256, 2, 15, True),
                                                (64, 1, 8, False), (256, 1, 32, False)])
@pytest.mark.parametrize("trainable", [True, False])
def test_gemm_conv_matches_conv2d(cin, stride, hw, gemm, trainable, monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 32, 3, stride=stride, padding=1).requires_grad_(trainable)
    used, im2col = [], fused.im2col3x3
    monkeypatch.setattr(fused, "im2col3x3", lambda *a: used.append(1) or im2col(*a))
    x = torch.randn(2, cin, hw, hw + 2)
    same_function(swapped(conv), conv, x)
    assert bool(used) == gemm  # wide layers on small maps only


def test_gemm_conv_under_bf16_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 32, 3, padding=1)
    fast = swapped(conv)
    x = torch.randn(2, 256, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = fast(x), conv(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y.float().square().sum(), [x, fast.weight])
    gx_ref, gw_ref = torch.autograd.grad(ref.float().square().sum(), [x, conv.weight])
    assert gx.dtype == x.dtype and gw.dtype == conv.weight.dtype
    for g, g_ref in ((y, ref), (gx, gx_ref), (gw, gw_ref)):
        assert (g.float() - g_ref.float()).norm() <= 0.02 * g_ref.float().norm()


@pytest.mark.parametrize("k,stride,padding,groups", [(3, 1, 1, 1), (1, 1, 0, 1), (2, 1, 0, 1), (3, 1, 0, 1),
                                                     (7, 2, 3, 1), (3, 2, 1, 1), (1, 1, 0, 2)])
def test_frozen_conv_keeps_only_the_weight(k, stride, padding, groups):
    """A frozen conv's input gradient equals autograd's, and its input is not kept for the backward."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(16, 8 // groups, k, k, generator=g), torch.randn(16, generator=g)
    x0 = torch.randn(2, 8, 11, 13, generator=g)
    grads, saved = [], []
    for conv in (F.conv2d, fused.frozen_conv2d):
        x = x0.clone().requires_grad_()
        n, y = saved_bytes(lambda: conv(x, w, b, stride, padding, 1, groups))
        y.square().sum().backward()
        grads.append(x.grad)
        saved.append(n)
    assert max_rel_err(grads[1], grads[0]) < 1e-5
    assert saved[0] >= x0.numel() * 4 and saved[1] == w.numel() * 4  # autograd keeps x; ours only the weight
    wt = w.clone().requires_grad_()  # a trainable weight still gets its gradient (through plain autograd)
    fused.frozen_conv2d(x0.clone().requires_grad_(), wt, b, stride, padding, 1, groups).sum().backward()
    assert wt.grad is not None


def test_frozen_conv_under_bf16_autocast():
    conv = swapped(nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False))
    x = torch.randn(1, 4, 16, 16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert type(conv) is fused.FastConv2d and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cin,hw,gemm", [(8, (5, 7), False), (256, (4, 6), True)])
@pytest.mark.parametrize("trainable", [True, False])
def test_upsample_as_four_convs(cin, hw, gemm, trainable, monkeypatch):
    torch.manual_seed(0)
    up = unet.Upsample(cin).requires_grad_(trainable)
    with torch.no_grad():
        up.conv.bias.normal_()
    used, phased = [], fused.upsample_conv3x3
    monkeypatch.setattr(fused, "upsample_conv3x3", lambda *a: used.append(1) or phased(*a))
    x = torch.randn(2, cin, *hw)
    same_function(swapped(up), up, x)
    assert bool(used) != gemm  # the GEMM path on small maps, the four phases elsewhere
    used.clear()  # an upsampling to a size other than twice the input's (odd latent sides) takes the plain path
    same_function(lambda x: swapped(up)(x, (2 * hw[0] - 1, 2 * hw[1])), lambda x: up(x, (2 * hw[0] - 1, 2 * hw[1])), x)
    assert not used


# -- transformers and the hint encoder ---------------------------------------------------------------

@pytest.mark.parametrize("trainable", [True, False])
def test_token_spatial_transformer(trainable):
    st = randomize_(unet.SpatialTransformer(64, 4, 24, 8)).requires_grad_(trainable)
    x, ctx = torch.randn(2, 64, 6, 5), torch.randn(2, 7, 24)
    fast = swapped(st)
    assert type(fast) is fused.TokenSpatialTransformer and type(fast.transformer_blocks[0].attn1) is fused.FastAttention
    same_function(fast, st, x, ctx)  # the output and the probe's feature


@pytest.mark.parametrize("context_dim", [None, 24])
def test_fast_attention(context_dim):
    attn = randomize_(unet.Attention(64, 4, context_dim))
    x, ctx = torch.randn(2, 30, 64), torch.randn(2, 7, context_dim or 64)
    same_function(swapped(attn), attn, *((x,) if context_dim is None else (x, ctx)))


def test_controlnet_with_channels_last_hint_encoder():
    cfg = unet.UNetConfig(model_channels=32, context_dim=16)
    net = randomize_(controlnet.ControlNet(cfg))
    fast = swapped(net)
    assert type(fast.input_hint_block) is fused.ChannelsLastSequential
    x, t, ctx, hint = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16), torch.rand(2, 3, 64, 64)
    same_function(lambda *a: fast(*a), lambda *a: net(*a), x, t, ctx, hint)


# -- the whole UNet, and the switch ------------------------------------------------------------------

WIDE = unet.UNetConfig(model_channels=64, context_dim=32)  # 256 channels at levels 2-3: the GEMM path runs there


@pytest.mark.parametrize("frozen", [False, True])
def test_unet_installed_computes_the_same(frozen, monkeypatch):
    net = randomize_(unet.UNet(WIDE)).requires_grad_(not frozen)
    used, im2col = [], fused.im2col3x3
    monkeypatch.setattr(fused, "im2col3x3", lambda *a: used.append(1) or im2col(*a))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    fast = swapped(net)
    same_function(lambda x, c: fast(x, torch.tensor([5, 900]), c, return_features=True),
                  lambda x, c: net(x, torch.tensor([5, 900]), c, return_features=True), x, ctx, grad_rtol=2e-4)
    assert used
    if frozen:  # training back-propagates through the frozen UNet: the fast one keeps less for the backward
        n = [saved_bytes(lambda: m(x.clone().requires_grad_(), torch.tensor([5, 900]), ctx), net)[0]
             for m in (net, fast)]
        assert n[1] < 0.9 * n[0]  # the conv inputs it no longer keeps (0.83 measured)


def test_install_keeps_parameters_and_keys(monkeypatch):
    net = unet.UNet(WIDE)
    before = {k: v for k, v in net.state_dict().items()}
    params = list(net.parameters())
    assert fused.install(net, None) is net
    assert all(type(m) not in fused.SWAPS for m in net.modules())
    assert list(net.parameters()) == params and list(net.state_dict()) == list(before)
    plain = unet.UNet(WIDE)
    monkeypatch.setenv("INNERCONTROL_PLAIN", "1")
    fused.install(plain)
    assert type(plain.input_blocks[0][0]) is nn.Conv2d
