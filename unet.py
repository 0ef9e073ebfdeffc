"""The Stable Diffusion 1.x UNet (the noise predictor of latent diffusion), in plain PyTorch.

Built from the LDM/CompVis `openaimodel.py` architecture (Rombach et al. 2022, arXiv 2112.10752): ResBlocks with a
time-embedding shift, SpatialTransformers (self-attention, cross-attention on the text, GEGLU feed-forward) on the
first three levels and in the middle, and a skip connection from every encoder block to the decoder. Attribute
names mirror the original checkpoint's keys (`input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight`, ...), so an
original single file loads with a plain load_state_dict (formats.py reads every layout; fused.py swaps faster
versions of these layers in). Two arguments of `UNet.forward` serve the rest of the project:
- `control`: a ControlNet's 12 + 1 residuals (Zhang et al. 2023), added to the skips and the middle block's output.
- `return_features`: what InnerControl's probe reads (arXiv 2507.02321, sec. 3): the self-attention output of the
  first transformer block of every decoder SpatialTransformer, from the same forward pass that predicts the noise.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer (SD1.5: all but the last)
    num_heads: int = 8                   # SD1.x: 8 heads everywhere (head width = channels / 8)
    context_dim: int = 768
    norm_groups: int = 32

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps, cosine half first (the LDM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# -----------------------------------------------------------------------------
# building blocks

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, a 1x1 skip if the widths differ."""

    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        # index 2 is the original's dropout (p = 0 in SD), kept so that out_layers.3 matches the checkpoint
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; self-attention when context_dim is None, else cross-attention on the text."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = (p(z).view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, tokens, C / heads)
                   for p, z in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one matmul gives the value and its gate."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU MLP. Also returns attn1's output."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x, context):
        a = self.attn1(self.norm1(x))
        x = x + a
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x)), a


class SpatialTransformer(nn.Module):
    """A transformer over the h*w positions of a feature map, between 1x1 convs, added to its input.
    Returns the output and the first block's self-attention output as a map (B, C, h, w): the probe's feature."""

    def __init__(self, ch, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, C) tokens
        features = []
        for block in self.transformer_blocks:
            h, a = block(h, context)
            features.append(a)
        h = self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))
        return x + h, features[0].transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling, then a 3x3 conv. Twice the size, or `size`: the skip connection's, which
    an odd-sized map's stride-2 conv left one larger than half (as diffusers does for any latent size)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class TimestepBlock(nn.Sequential):
    """One UNet block: ResBlocks get the time embedding, SpatialTransformers the text, Upsamples the target
    size. Returns the output and the SpatialTransformer's probe feature (None in a block without one)."""

    def forward(self, x, emb, context, size=None):
        feature = None
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x, feature = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x, feature


def run_block(block, h, emb, context, size=None, grad_checkpointing=False):
    """One TimestepBlock; with gradient checkpointing its activations are recomputed in the backward."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, h, emb, context, size, use_reentrant=False)
    return block(h, emb, context, size)


# -----------------------------------------------------------------------------
# the block list

def unet_layout(cfg):
    """The UNet as data: one entry per block, each a list of layers (kind, channels...).

    For SD1.5 (model_channels 320) this reads like the LDM figure:

        input_blocks                       output_blocks (each ResBlock also takes a skip)
         0  conv 4 -> 320                   0  res 2560 -> 1280
         1  res  320 -> 320,  attn          1  res 2560 -> 1280
         2  res  320 -> 320,  attn          2  res 2560 -> 1280,        up
         3  down 320                        3  res 2560 -> 1280, attn
         4  res  320 -> 640,  attn          4  res 2560 -> 1280, attn
         5  res  640 -> 640,  attn          5  res 1920 -> 1280, attn,  up
         6  down 640                        6  res 1920 -> 640,  attn
         7  res  640 -> 1280, attn          7  res 1280 -> 640,  attn
         8  res 1280 -> 1280, attn          8  res  960 -> 640,  attn,  up
         9  down 1280                       9  res  960 -> 320,  attn
        10  res 1280 -> 1280               10  res  640 -> 320,  attn
        11  res 1280 -> 1280               11  res  640 -> 320,  attn
        middle_block: res 1280 -> 1280, attn, res 1280 -> 1280
    """
    mc, levels = cfg.model_channels, len(cfg.channel_mult)
    inputs, skips, ch = [[("conv", cfg.in_channels, mc)]], [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            inputs.append([("res", ch, mult * mc)] + ([("attn", mult * mc)] if level in cfg.attention_levels else []))
            ch = mult * mc
            skips.append(ch)
        if level < levels - 1:
            inputs.append([("down", ch)])
            skips.append(ch)
    middle = [("res", ch, ch), ("attn", ch), ("res", ch, ch)]
    outputs = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            block = [("res", ch + skips.pop(), mult * mc)]
            ch = mult * mc
            block += [("attn", ch)] if level in cfg.attention_levels else []
            block += [("up", ch)] if level > 0 and i == cfg.num_res_blocks else []
            outputs.append(block)
    return inputs, middle, outputs


def make_layer(cfg, kind, *ch):
    if kind == "conv":
        return nn.Conv2d(ch[0], ch[1], 3, padding=1)
    if kind == "res":
        return ResBlock(ch[0], ch[1], cfg.time_embed_dim, cfg.norm_groups)
    if kind == "attn":
        return SpatialTransformer(ch[0], cfg.num_heads, cfg.context_dim, cfg.norm_groups)
    return Downsample(ch[0]) if kind == "down" else Upsample(ch[0])


def make_block(specs, cfg):
    return TimestepBlock(*[make_layer(cfg, *spec) for spec in specs])


# -----------------------------------------------------------------------------
# the UNet

class DecoderFeatures(NamedTuple):
    time_emb: torch.Tensor  # (B, time_embed_dim), the UNet's own time embedding (the probe is conditioned on it)
    maps: list              # attn1 outputs of each decoder SpatialTransformer's first block, (B, C, h, w), in order


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, ed = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ed), nn.SiLU(), nn.Linear(ed, ed))
        inputs, middle, outputs = unet_layout(cfg)
        self.input_blocks = nn.ModuleList([make_block(b, cfg) for b in inputs])
        self.middle_block = make_block(middle, cfg)
        self.output_blocks = nn.ModuleList([make_block(b, cfg) for b in outputs])
        ch = outputs[-1][0][2]
        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.grad_checkpointing = False  # recompute block activations in the backward (training memory)

    def time_embedding(self, t, batch):
        """t: a number, a one-element tensor or (batch,) timesteps -> (batch, time_embed_dim)."""
        t = torch.as_tensor(t, device=self.time_embed[0].weight.device).reshape(-1).expand(batch)
        return self.time_embed(timestep_embedding(t, self.config.model_channels).to(self.time_embed[0].weight.dtype))

    def forward(self, x, t, context, control=None, return_features=False):
        """eps for latents x (B, C, h, w) at timesteps t under the text context (B, L, context_dim).
        control: a ControlNet's 13 residuals (12 skips, then the middle block's), or None."""
        emb = self.time_embedding(t, x.shape[0])
        ckpt = self.grad_checkpointing
        h, skips = x, []
        for block in self.input_blocks:
            h, _ = run_block(block, h, emb, context, grad_checkpointing=ckpt)
            skips.append(h)
        h, _ = run_block(self.middle_block, h, emb, context, grad_checkpointing=ckpt)
        if control is not None:  # ControlNet (Zhang et al. 2023, fig. 3): added to the skips and the middle
            h = h + control[-1]
            skips = [s + c for s, c in zip(skips, control)]
        maps = []
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = skips[-1].shape[-2:] if skips else None  # where the next skip joins: the upsampling's target
            h, feature = run_block(block, h, emb, context, size, grad_checkpointing=ckpt)
            if feature is not None:
                maps.append(feature)
        eps = self.out(h)
        return (eps, DecoderFeatures(emb, maps)) if return_features else eps

