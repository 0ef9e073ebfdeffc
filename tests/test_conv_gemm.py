"""unet's conv fast paths against F.conv2d: the im2col + GEMM path (wide 3x3 convs on small maps, CPU), the
frozen conv's backward and the upsample + conv done as four 2x2 convs."""
import pytest
import torch
import torch.nn.functional as F

import unet


@pytest.mark.parametrize("cin,stride,hw,gemm", [(256, 1, 8, True), (256, 2, 16, True), (256, 2, 15, True),
                                                (64, 1, 8, False), (256, 1, 32, False)])
@pytest.mark.parametrize("trainable", [True, False])
def test_gemm_path_matches_conv2d(cin, stride, hw, gemm, trainable, monkeypatch):
    torch.manual_seed(0)
    conv = unet.Conv2d(cin, 32, 3, stride=stride, padding=1).requires_grad_(trainable)
    x = torch.randn(2, cin, hw, hw + 2, requires_grad=True)
    used, im2col = [], unet.im2col3x3
    monkeypatch.setattr(unet, "im2col3x3", lambda *a: used.append(1) or im2col(*a))
    y = conv(x)
    assert bool(used) == gemm  # wide layers on small maps only
    ref = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(ref)  # a loss whose gradient differs at every position
    params = [x, conv.weight, conv.bias] if trainable else [x]
    grads = torch.autograd.grad((y * w).sum(), params)
    grads_ref = torch.autograd.grad((ref * w).sum(), params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (1, 1, 0), (2, 1, 0), (3, 1, 0), (7, 2, 3), (3, 2, 1)])
def test_frozen_conv_input_gradient(k, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 13, requires_grad=True)
    w, b = torch.randn(16, 8, k, k), torch.randn(16)
    y = unet.conv2d(x, w, b, stride, padding)
    ref = F.conv2d(x, w, b, stride, padding)
    assert y.grad_fn.name().startswith("FrozenConv2dFn")
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin,hw,gemm", [(8, (5, 7), False), (256, (4, 6), True)])
def test_upsample_conv_matches_interpolate_then_conv(cin, hw, gemm, monkeypatch):
    torch.manual_seed(0)
    up = unet.Upsample(cin).requires_grad_(False)
    with torch.no_grad():
        up.conv.bias.normal_()
    x = torch.randn(2, cin, *hw, requires_grad=True)
    used, phased = [], unet.upsample_conv3x3
    monkeypatch.setattr(unet, "upsample_conv3x3", lambda *a: used.append(1) or phased(*a))
    y = up(x)
    assert bool(used) != gemm  # the GEMM path on small maps, the four phases elsewhere
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    assert y.shape == ref.shape == (2, cin, 2 * hw[0], 2 * hw[1])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-4, atol=1e-4)


def test_gemm_path_under_bf16_autocast():
    torch.manual_seed(0)
    conv = unet.Conv2d(256, 32, 3, padding=1)
    x = torch.randn(2, 256, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert y.dtype == ref.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y.float().square().sum(), [x, conv.weight])
    gx_ref, gw_ref = torch.autograd.grad(ref.float().square().sum(), [x, conv.weight])
    assert gx.dtype == x.dtype and gw.dtype == conv.weight.dtype
    for g, g_ref in ((y, ref), (gx, gx_ref), (gw, gw_ref)):
        assert (g.float() - g_ref.float()).norm() <= 0.02 * g_ref.float().norm()
