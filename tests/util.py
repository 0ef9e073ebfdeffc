"""Shared test helpers: random weights that keep activations O(1) at any width."""
import math

import torch


@torch.no_grad()
def randomize_(module, seed=0):
    """Fill every parameter (zero-initialised ones too) with seeded random values.

    Matrices get N(0, 1/fan_in) so deep stacks neither vanish nor explode; 1-d weights (norm scales)
    get 1 + N(0, 0.1); biases N(0, 0.05). A parity test with zero convs left at zero proves nothing.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.ndim >= 2:
            fan_in = p[0].numel()
            v = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith("weight") or name.endswith("scale"):
            v = 1 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            v = 0.05 * torch.randn(p.shape, generator=g)
        p.copy_(v.to(p.dtype))
    return module


def max_rel_err(ours, ref):
    """max |ours - ref| measured against the output's scale (max(1, max |ref|))."""
    ours, ref = ours.detach().float(), ref.detach().float()
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
