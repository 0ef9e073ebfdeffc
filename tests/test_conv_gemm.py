"""unet.Conv2d's im2col + GEMM path (wide 3x3 convs on small maps, CPU) against F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

import unet


@pytest.mark.parametrize("cin,stride,hw,gemm", [(256, 1, 8, True), (256, 2, 16, True), (64, 1, 8, False),
                                                (256, 1, 32, False)])
def test_gemm_path_matches_conv2d(cin, stride, hw, gemm, monkeypatch):
    torch.manual_seed(0)
    conv = unet.Conv2d(cin, 32, 3, stride=stride, padding=1)
    x = torch.randn(2, cin, hw, hw, requires_grad=True)
    used = []
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: used.append(1) or torch.Tensor.baddbmm(*a, **k))
    y = conv(x)
    assert bool(used) == gemm  # wide layers on small maps only
    ref = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g, = torch.autograd.grad(y.square().sum(), x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
