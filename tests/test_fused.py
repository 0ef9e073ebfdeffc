"""fused.py: every faster layer computes what the plain layer computes, forward and gradient; install() swaps
them in without touching parameters or keys."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import controlnet
import fused
import model
import unet
from util import max_rel_err, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

def gemm_from(monkeypatch, pairs):
    """FastConv2d's GEMM path for convs of at least `pairs` (in, out) channel pairs: at test widths (SD1.5's
    threshold, 2**20, would leave every small test conv on the direct path)."""
    monkeypatch.setattr(fused.FastConv2d, "gemm_min_weight", pairs)


@pytest.mark.parametrize("cin,stride,hw,gemm", [(256, 1, 6, True), (256, 2, 12, True), (256, 2, 13, True),
                                                (64, 1, 6, False), (256, 1, 8, False), (256, 1, 32, False)])
@pytest.mark.parametrize("trainable", [True, False])
def test_gemm_conv_matches_conv2d(cin, stride, hw, gemm, trainable, monkeypatch):
    gemm_from(monkeypatch, 256 * 32)  # wide layers (256 -> 32 here) on maps of at most 64 output positions
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 32, 3, stride=stride, padding=1).requires_grad_(trainable)
    used, im2col = [], fused.im2col3x3
    monkeypatch.setattr(fused, "im2col3x3", lambda *a: used.append(1) or im2col(*a))
    x = torch.randn(2, cin, hw, hw + 2)
    same_function(swapped(conv), conv, x)
    assert bool(used) == gemm  # wide layers on small maps only


def test_gemm_rule():
    """The GEMM path where oneDNN's direct convolution slows down: SD1.5's 1280-wide convs on maps of at most 8x8
    (16x16 in bf16/fp16); everything narrower, or on larger maps, stays direct."""
    def gemm(cin, cout, hw, dtype=torch.float32, autocast=False):
        conv = nn.Conv2d(cin, cout, 3, padding=1, device="meta")
        conv.__class__ = fused.FastConv2d
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return conv.uses_gemm(torch.empty(1, cin, hw, hw, dtype=dtype), hw * hw)
    assert gemm(1280, 1280, 8) and gemm(2560, 1280, 4) and gemm(1920, 640, 8)
    assert not gemm(1280, 1280, 16) and not gemm(640, 1280, 8) and not gemm(320, 320, 4)
    assert gemm(1280, 1280, 16, torch.bfloat16) and gemm(1280, 1280, 16, autocast=True)
    assert not gemm(1280, 1280, 32, torch.bfloat16) and not gemm(640, 640, 8, autocast=True)


def test_gemm_conv_under_bf16_autocast(monkeypatch):
    gemm_from(monkeypatch, 256 * 32)
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 32, 3, padding=1)
    fast = swapped(conv)
    used, im2col = [], fused.im2col3x3
    monkeypatch.setattr(fused, "im2col3x3", lambda *a: used.append(1) or im2col(*a))
    x = torch.randn(2, 256, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = fast(x), conv(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y.float().square().sum(), [x, fast.weight])
    gx_ref, gw_ref = torch.autograd.grad(ref.float().square().sum(), [x, conv.weight])
    assert gx.dtype == x.dtype and gw.dtype == conv.weight.dtype
    for g, g_ref in ((y, ref), (gx, gx_ref), (gw, gw_ref)):
        assert (g.float() - g_ref.float()).norm() <= 0.02 * g_ref.float().norm()
    assert used


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


@pytest.mark.parametrize("cin,hw,gemm", [(8, (5, 7), False), (256, (3, 4), True), (256, (4, 6), False)])
@pytest.mark.parametrize("trainable", [True, False])
def test_upsample_as_four_convs(cin, hw, gemm, trainable, monkeypatch):
    gemm_from(monkeypatch, 256 * 256)
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


def test_vae_encoder_in_channels_last():
    vae = randomize_(model.VAE(model.VAEConfig(ch=32, ch_mult=(1, 2), norm_groups=8)))
    fast = swapped(vae)
    assert type(fast.encoder) is fused.ChannelsLastEncoder
    seen = []
    fast.encoder.conv_in.register_forward_hook(lambda m, a, y: seen.append(a[0].is_contiguous(
        memory_format=torch.channels_last)))
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    same_function(fast.encoder, vae.encoder, x)  # the output and the gradients of the input and the weights
    assert seen and all(seen)  # it ran in NHWC
    assert fast.encoder(x).is_contiguous()  # the latents come back in NCHW


# -- the whole UNet, and the switch ------------------------------------------------------------------

WIDE = unet.UNetConfig(model_channels=64, context_dim=32)  # 256 channels at levels 2-3 (4x4, 2x2 maps)


@pytest.mark.parametrize("frozen", [False, True])
def test_unet_installed_computes_the_same(frozen, monkeypatch):
    gemm_from(monkeypatch, 256 * 256)  # the GEMM path runs at levels 2-3
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


# -- memory-lean paths on any device -------------------------------------------------------------------

def saved_storage_bytes(fn, module=None):
    """Bytes of the distinct storages autograd keeps for the backward while fn() runs (views of one tensor count
    once; `module`'s weights not at all), and fn()'s result."""
    seen, weights = {}, {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_frozen_linear_keeps_only_the_weight():
    """No lean path is needed for linear layers: autograd itself keeps only the weight when the weight is frozen
    (its codegen saves what the gradients asked for need), on any device."""
    lin = nn.Linear(16, 32).requires_grad_(False)
    x = torch.randn(2, 10, 16, requires_grad=True)
    n, _ = saved_storage_bytes(lambda: lin(x), lin)
    assert n == 0
    lin.requires_grad_(True)
    assert saved_storage_bytes(lambda: lin(x), lin)[0] >= x.numel() * 4


@pytest.mark.parametrize("shape,onednn", [((2, 40, 48), True), ((70, 48), True), ((2, 20, 48), False)])
@pytest.mark.parametrize("trainable,bias", [(True, True), (False, True), (False, False)])
def test_linear_through_onednn(shape, onednn, trainable, bias, monkeypatch):
    """fp32 linear layers on the CPU with at least 64 rows go through oneDNN's 1x1 convolution, forward and input
    gradient, with the same result; with the weight frozen only the weight is kept for the backward, as autograd
    does for a plain linear layer."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 24, bias=bias).requires_grad_(trainable)
    used, gemm = [], fused.onednn_gemm
    monkeypatch.setattr(fused, "onednn_gemm", lambda *a: used.append(1) or gemm(*a))
    fast = swapped(lin)
    assert type(fast) is fused.FastLinear
    same_function(fast, lin, torch.randn(*shape))
    same_function(fast, lin, torch.randn(shape[-1], *shape[:-1]).movedim(0, -1))  # rows not contiguous
    assert bool(used) == onednn
    x = torch.randn(*shape, requires_grad=True)
    n, _ = saved_storage_bytes(lambda: fast(x), fast)
    assert (n == 0) != trainable
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls already run in oneDNN: the plain path
        used.clear()
        assert fast(x).dtype == torch.bfloat16 and not used


@pytest.mark.parametrize("need_x,need_w", [(True, True), (True, False), (False, True)])
def test_gemm_grads_through_onednn(need_x, need_w):
    """onednn_gemm's two gradients from oneDNN's convolution backward, for rows that are not contiguous too."""
    torch.manual_seed(0)
    M, N, K = 300, 24, 18
    g, x, weight = torch.randn(M, N), torch.randn(K, M).t(), torch.randn(N, K)
    gx, gw = fused.onednn_gemm_grads(g, x, weight, need_x, need_w)
    for out, ref, need in ((gx, g.double() @ weight.double(), need_x), (gw, g.double().t() @ x.double(), need_w)):
        assert out is None if not need else (out.shape == ref.shape and (out - ref).abs().max() < 1e-5 * ref.abs().max())


@pytest.fixture
def recompute(monkeypatch):
    """The recomputing paths switched on here, as on CUDA."""
    monkeypatch.setattr(fused, "recompute_pays", lambda x: True)


@pytest.mark.parametrize("trainable", [True, False])
def test_group_norm_silu_sequential(trainable, recompute):
    """ResBlock's in_layers (GroupNorm, SiLU, conv) with the norm and SiLU as one function (on CUDA): same values
    and gradients, and the normalised map is no longer kept (only the norm's input)."""
    seq = randomize_(nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(16, 8, 3, padding=1)))
    seq.requires_grad_(trainable)
    fast = swapped(seq)
    assert type(fast) is fused.NormActSequential and type(fast[0]) is fused.FastGroupNorm
    x = torch.randn(2, 16, 9, 7)
    same_function(fast, seq, x)
    if not trainable:
        n = [saved_storage_bytes(lambda: m(x.clone().requires_grad_()), seq)[0] for m in (seq, fast)]
        assert n[1] <= n[0] - 2 * x.numel() * 4  # the norm's output and the conv's input, both x-sized
    with torch.no_grad():
        torch.testing.assert_close(fast(x), seq(x), rtol=1e-5, atol=1e-6)


def test_group_norm_silu_under_bf16_autocast(recompute):
    seq = randomize_(nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 8, 3, padding=1)))
    fast = swapped(seq)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = fast(x), seq(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y.float().square().sum(), [x, fast[0].weight])
    gx_ref, gw_ref = torch.autograd.grad(ref.float().square().sum(), [x, seq[0].weight])
    assert gw.dtype == torch.float32
    for g, g_ref in ((y, ref), (gx, gx_ref), (gw, gw_ref)):
        assert (g.float() - g_ref.float()).norm() <= 0.02 * g_ref.float().norm()


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_nhwc_group_norm(act, dtype, tol):
    """The CUDA NHWC GroupNorm (statistics from sums over the channels_last view, the backward of Wu & He 2018 in
    closed form), run here on the CPU: the same values and gradients as F.group_norm (+ SiLU) in float64."""
    g = torch.Generator().manual_seed(0)
    C, G = 32, 8
    w, b = 1 + 0.3 * torch.randn(C, generator=g), 0.2 * torch.randn(C, generator=g)
    x0 = (3 + 2 * torch.randn(2, C, 6, 5, generator=g)).to(dtype).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(x0.shape, generator=g)
    outs = []
    for nhwc in (dtype, None):
        x, wt, bt = (v.detach().clone().requires_grad_() for v in (x0, w, b))
        if nhwc is None:  # the reference, in float64
            y = F.group_norm(x.double(), G, wt.double(), bt.double(), 1e-5)
            y = F.silu(y) if act else y
        else:
            y = fused.GroupNormActFn.apply(x, wt, bt, G, 1e-5, act, nhwc)
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        outs.append((y, *torch.autograd.grad((y * gy.to(y.dtype)).sum(), [x, wt, bt])))
    for ours, ref in zip(*outs):
        assert (ours.double() - ref.double()).norm() <= tol * ref.double().norm()


@pytest.mark.parametrize("offset,tol", [(10, 2e-3), (100, 6e-3)])
def test_nhwc_group_norm_without_grad_and_large_offsets(offset, tol, monkeypatch):
    """The inference path (no autograd function), on maps whose mean is `offset` std away from zero. The statistics
    are sums of x and x^2 accumulated in fp32 as the fp16/bf16 input is read (as NVIDIA's NHWC GroupNorm kernels
    do); their cancellation costs ~1e-7 (mean / std)^2 of the variance: nothing at 10, 1e-3 at 100."""
    monkeypatch.setattr(fused, "nhwc_dtype", lambda x: x.dtype)  # as on CUDA in low precision
    norm = randomize_(nn.GroupNorm(4, 16))
    fast = swapped(norm)
    x = (offset + torch.randn(2, 16, 8, 8)).contiguous(memory_format=torch.channels_last)
    w, b = norm.weight.double(), norm.bias.double()
    with torch.no_grad():
        for dtype, rounding in ((torch.float32, 0), (torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7)):
            y = fast(x.to(dtype))
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            ref = F.group_norm(x.to(dtype).double(), 4, w, b, norm.eps)  # the norm of the very input it got
            assert (y.double() - ref).abs().max() <= (tol + rounding) * ref.abs().max()


def test_lean_resnet_block(recompute):
    block = randomize_(model.ResnetBlock(16, 32, 8)).requires_grad_(False)
    fast = swapped(block)
    assert type(fast) is fused.LeanResnetBlock
    same_function(fast, block, torch.randn(2, 16, 8, 6))


@pytest.mark.parametrize("trainable", [True, False])
def test_geglu_recomputes_the_gate(trainable, recompute):
    ff = randomize_(unet.GEGLU(16, 64)).requires_grad_(trainable)
    fast = swapped(ff)
    assert type(fast) is fused.LeanGEGLU
    x = torch.randn(2, 10, 16)
    same_function(fast, ff, x)
    n = [saved_storage_bytes(lambda: m(x.clone().requires_grad_()), ff)[0] for m in (ff, fast)]
    assert n[1] <= n[0] - 2 * 10 * 64 * 4  # gelu(gate) no longer kept


def test_vae_attention_as_tokens(monkeypatch):
    """The VAE's attention block with linear projections on the tokens: the same function, and the attention kernel
    gets q, k, v with a contiguous last dimension (what the fused CUDA kernels need) instead of strided ones."""
    block = randomize_(model.AttnBlock(32, 8))
    fast = swapped(block)
    assert type(fast) is fused.TokenAttnBlock
    same_function(fast, block, torch.randn(2, 32, 5, 6))
    strides, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: strides.append(q.stride(-1)) or sdpa(q, k, v))
    for m in (block, fast):
        m(torch.randn(2, 32, 5, 6))
    assert strides == [30, 1]


def test_unet_attention_hands_sdpa_views_of_the_projections(monkeypatch):
    """Off the CPU the UNet's attention is the plain layer's: heads as (B, heads, tokens, C / heads) views of the
    (B, tokens, C) projections, last dimension contiguous, no copy: the layout the flash and memory-efficient
    kernels read as it is."""
    attn = randomize_(unet.Attention(64, 4, 24))
    x, ctx = torch.randn(2, 30, 64), torch.randn(2, 7, 24)
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: seen.append(a) or sdpa(*a))
    unet.Attention.forward(attn, x, ctx)  # what FastAttention runs on CUDA
    for t, n in zip(seen[0], (30, 7, 7)):
        assert t.shape == (2, 4, n, 16) and t.stride() == (n * 64, 16, 64, 1) and t._base is not None


# -- the CUDA layout policy, run on the CPU ---------------------------------------------------------------

@pytest.mark.parametrize("trainable", [True, False])
def test_channels_last_conv(trainable, monkeypatch):
    """On CUDA in fp16/bf16 convs run in NHWC: a frozen weight is laid out once, in place (the same Parameter), a
    trainable one is cast per call and keeps its layout (its optimizer state must keep matching it)."""
    monkeypatch.setattr(fused, "nhwc_dtype", lambda x: torch.float32)
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(trainable)
    fast = swapped(conv)
    param = fast.weight
    x = torch.randn(2, 8, 7, 9)
    same_function(fast, conv, x)
    assert fast.weight is param and fast.weight.is_contiguous(memory_format=torch.channels_last) != trainable
    assert fast(x).is_contiguous(memory_format=torch.channels_last)


NHWC = unet.UNetConfig(model_channels=32, context_dim=32)


@pytest.mark.parametrize("frozen", [True, False])
def test_unet_and_vae_under_the_cuda_layout_policy(frozen, monkeypatch, recompute):
    """The UNet, a ControlNet and the VAE decoder with the CUDA paths switched on here (NHWC convs and norms, in
    fp32 so that the comparison is tight): the same function as the plain networks, forward and gradient."""
    monkeypatch.setattr(fused, "nhwc_dtype", lambda x: torch.float32)
    g = torch.Generator().manual_seed(0)
    net = randomize_(unet.UNet(NHWC)).requires_grad_(not frozen)
    cn = randomize_(controlnet.ControlNet(NHWC), 1)
    x, ctx, hint = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.rand(2, 3, 64, 64)
    fast, fast_cn = swapped(net), swapped(cn)
    same_function(lambda x, c: fast(x, torch.tensor([5, 900]), c, fast_cn(x, 3, c, hint), return_features=True),
                  lambda x, c: net(x, torch.tensor([5, 900]), c, cn(x, 3, c, hint), return_features=True), x, ctx,
                  rtol=1e-4, grad_rtol=1e-3)
    vae = randomize_(model.VAE(model.VAEConfig(ch=32, num_res_blocks=1)), 2).requires_grad_(not frozen)
    fast_vae = swapped(vae)
    same_function(fast_vae.decode, vae.decode, torch.randn(1, 4, 8, 8, generator=g), rtol=1e-4, grad_rtol=1e-3)


def test_unet_under_the_cuda_layout_policy_in_bf16(monkeypatch, recompute):
    """The same in bf16 autocast, the precision the policy is for: close to the plain bf16 network's output."""
    monkeypatch.setattr(fused, "nhwc_dtype", lambda x: torch.bfloat16)
    net = randomize_(unet.UNet(NHWC)).requires_grad_(False)
    fast = swapped(net)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = fast(x, 500, ctx), net(x, 500, ctx)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.float() - ref.float()).norm() <= 0.03 * ref.float().norm()


def test_group_norm_silu_with_a_channels_last_gradient(recompute):
    """An NCHW map whose gradient arrives channels_last (a cuDNN conv's, on CUDA): the native kernels' backward
    needs both in one layout."""
    seq = randomize_(nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU()))
    fast = swapped(seq)
    x, g = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    grads = [torch.autograd.grad(m(xi), [xi, m[0].weight], g)
             for m, xi in ((fast, x.clone().requires_grad_()), (seq, x.clone().requires_grad_()))]
    for a, b in zip(*grads):
        assert max_rel_err(a, b) < 1e-5


def test_recomputing_paths_are_cuda_only():
    """On the CPU, GroupNorm + SiLU and GEGLU keep autograd's own backward (the recomputation measured slower)."""
    seq, ff = swapped(nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU())), swapped(unet.GEGLU(16, 32))
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    assert "GroupNormActFn" not in type(seq(x).grad_fn).__name__
    assert "GEGLUFn" not in type(ff(torch.randn(2, 3, 16, requires_grad=True)).grad_fn).__name__


# -- CUDA graphs, their bookkeeping run on the CPU ----------------------------------------------------------

def copy_into(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            copy_into(d, s)


@pytest.fixture
def cpu_graphs(monkeypatch):
    """fused.py's graph bookkeeping with the CPU standing in for CUDA: a 'graph' replays by rerunning the recorded
    function into the same output tensors, as a CUDA graph overwrites its static outputs."""
    captures = []

    def capture(run):
        out = run()
        captures.append(out)
        return (lambda: copy_into(out, run())), out
    monkeypatch.setattr(fused, "capture_graph", capture)
    monkeypatch.setattr(fused, "graphs_apply", lambda x: fused.GraphState.on and not torch.is_grad_enabled())
    return captures


def test_graphed_calls_copy_inputs_in_and_results_out(cpu_graphs):
    calls = fused.GraphedCalls()
    fn = lambda x, t: (x * t + 1, [x.sum() * t])  # noqa: E731
    x = torch.randn(3, 4)
    results = [calls(fn, [x + i, i], key=None) for i in range(4)]  # eager, recorded, replayed twice
    assert len(cpu_graphs) == 1
    for i, (y, (s,)) in enumerate(results):  # each result its own copy, with the timestep filled in each time
        torch.testing.assert_close(y, (x + i) * i + 1)
        torch.testing.assert_close(s, (x + i).sum() * i)
    calls(fn, [x[:2], 1.5], key=None)  # another signature: eager first, no new graph yet
    assert len(cpu_graphs) == 1


def test_graph_capture_failure_falls_back_to_eager(monkeypatch):
    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(fused, "capture_graph", broken)
    calls, x = fused.GraphedCalls(), torch.randn(3)
    calls(torch.sin, [x], key=None)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        torch.testing.assert_close(calls(torch.sin, [x], key=None), torch.sin(x))
    torch.testing.assert_close(calls(torch.sin, [x], key=None), torch.sin(x))  # and stays eager


def test_sampling_with_graphs_gives_the_same_image(cpu_graphs):
    """sample.generate inside cuda_graphs(): the ControlNet and the UNet are recorded once each (at their second
    step) and replayed; the image is the eager one's, with and without a callback reading decoder features."""
    import sample
    sd = model.StableDiffusion(model.tiny(), model.Tokenizer.word_level(["a", "red", "ball"]))
    randomize_(sd, 0)
    net = randomize_(controlnet.ControlNet(sd.unet.config), 1)
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = sample.generate(sd, "a red ball", cond, net, steps=4, seed=1)
    fused.install(sd, net)
    readings = []
    graphed = sample.generate(sd, "a red ball", cond, net, steps=4, seed=1,
                              callback=lambda i, t, x, f: readings.append(f.maps[0]))
    assert len(cpu_graphs) == 2 and len({r.data_ptr() for r in readings}) == 4  # features copied out, not aliased
    # the fused layers sum in another order than the plain ones: on some CPUs a pixel may round to the next level
    diff = np.abs(np.asarray(graphed[0], np.int16) - np.asarray(plain[0], np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


# -- the CPU allocator -------------------------------------------------------------------------------

KEEP_PROBE = """
import torch, fused
def rss():
    return next(int(r.split()[1]) for r in open("/proc/self/status") if r.startswith("VmRSS:")) * 1024
applied = fused.keep_freed_memory()
x = torch.ones(64 * 2 ** 20)  # 256 MB, past any mmap threshold
peak = rss()
del x
print(applied, (peak - rss()) / 2 ** 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
@pytest.mark.parametrize("keep", [True, False])
def test_keep_freed_memory(keep):
    """With keep_freed_memory() a freed 256 MB tensor stays in the process (the next step reuses its pages);
    without it glibc unmaps it at once."""
    env = dict(os.environ, INNERCONTROL_KEEP_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", KEEP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    applied, returned_mb = out[0] == "True", float(out[1])
    if keep and not applied:
        pytest.skip("not glibc")
    assert applied == keep
    assert (returned_mb < 16) if keep else (returned_mb > 200)
    assert not fused.keep_freed_memory("meta")  # only for CPU training (and this process stays as it was)
