"""The Stable Diffusion 1.x UNet (the eps-predictor of latent diffusion), in plain PyTorch.

Built from the LDM/CompVis `openaimodel.py` architecture (Rombach et al. 2022, arXiv 2112.10752):
ResBlocks with a time-embedding shift, SpatialTransformers (self-attention, cross-attention on the
text context, GEGLU feed-forward) on the first three levels and in the middle, skip connections
from every encoder block to the decoder. Module attribute names mirror the original checkpoint keys
(`input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight`, ...; self-attention keeps q, k and v in one
fused weight that the state_dict shows under the original three names), so an original single file
loads with a plain `load_state_dict` once its `model.diffusion_model.` prefix is stripped;
diffusers-layout weights go through the explicit name map `unet_key_map`.

Two extras that the rest of the project builds on, both explicit arguments of `UNet.forward`:
- `control`: the 12 + 1 residuals of a ControlNet (Zhang et al. 2023, arXiv 2302.05543), added to the
  skip connections and to the middle block's output.
- `return_features`: the decoder features that InnerControl's probe reads (arXiv 2507.02321, sec. 3):
  the self-attention output of the first transformer block of every decoder SpatialTransformer,
  taken from the same forward pass that predicts eps.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer (SD1.5: all but the last)
    num_heads: int = 8                   # SD1.x: 8 heads everywhere (head dim = channels / 8)
    context_dim: int = 768
    norm_groups: int = 32

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps, cos half first (the LDM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# -----------------------------------------------------------------------------
# building blocks

def expand_rows(x, n):
    """x's rows repeated to n: [x; x; ...]. Latents shared by several prompts (guidance) branch here."""
    return x if x.shape[0] == n else x.repeat(n // x.shape[0], *[1] * (x.ndim - 1))


def add_rows(a, b):
    n = max(a.shape[0], b.shape[0])
    return expand_rows(a, n) + expand_rows(b, n)


class FrozenConv2dFn(torch.autograd.Function):
    """conv2d for a weight that needs no gradient. Autograd's own conv keeps its input for the weight's
    gradient even when the weight is frozen; the input's gradient needs only the weight, so this keeps just
    that. Training back-propagates through frozen modules (the UNet to reach the ControlNet's residuals;
    the VAE decoder and the reward model for ControlNet++'s reward, sec. 3.2), so this drops the saved
    input of every one of their convs."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight.to(out.dtype))  # under autocast: the weight as the conv used it
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conf
        grad = grad.to(w.dtype)
        k, p = w.shape[2:], _pair(padding)
        if grad.device.type == "cpu" and _pair(stride) == (1, 1) and _pair(dilation) == (1, 1) and groups == 1 \
                and p[0] < k[0] and p[1] < k[1]:
            # with stride 1 the input's gradient is a plain convolution of the output's gradient with the
            # kernel flipped and its in/out channels swapped; oneDNN's forward kernels run it 1.2-1.6x faster
            # than its backward-data kernels at the VAE's and UNet's shapes (measured on the CPU only)
            gx = F.conv2d(grad, w.transpose(0, 1).flip(2, 3), None, 1, (k[0] - 1 - p[0], k[1] - 1 - p[1]))
        else:
            gx = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return gx.to(dtype), None, None, None, None, None, None


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d that keeps only the weight for the backward when the weight and bias are frozen."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if frozen and x.requires_grad and torch.is_grad_enabled() and not isinstance(padding, str):
        return FrozenConv2dFn.apply(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class LeanConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and keys) through `conv2d`: when frozen, it keeps only its weight for the backward."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def im2col3x3(x, stride):
    """The 3x3 patches (padding 1) of a (B, C, H, W) map as a (C * 9, B * H' * W') matrix: one column per output
    position of every image, rows in the weight's (C, 3, 3) order. A strided view of the padded map, then one
    copy; this order reads the map in long runs (3-4x faster than positions as rows, 2x faster than F.unfold)."""
    C = x.shape[1]
    cols = F.pad(x, (1, 1, 1, 1)).unfold(2, 3, stride).unfold(3, 3, stride)  # (B, C, H', W', 3, 3)
    return cols.permute(1, 4, 5, 0, 2, 3).reshape(C * 9, -1), cols.shape[2], cols.shape[3]


class GemmConv3x3Fn(torch.autograd.Function):
    """A 3x3 conv (padding 1) as im2col + one GEMM with the batch folded into the columns:
    out = W @ cols, and the backward as two more GEMMs, grad_W = grad @ cols^T and grad_cols = W^T @ grad,
    then F.fold (col2im). Folding the batch in matters on small maps: at 4x4 a batch of 2 gives the GEMMs
    32 columns instead of 16 per image, and the weight's gradient comes out of one GEMM instead of a batched
    one and a sum over the batch (2x faster for a ControlNet's trainable 1280-channel convs at 4x4 and 8x8,
    forward + backward). Only the weight is kept for the backward when it is frozen, as in FrozenConv2dFn."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        B, C, H, W = x.shape
        cols, Ho, Wo = im2col3x3(x, stride)
        w = weight.flatten(1)
        out = w @ cols if bias is None else torch.addmm(bias[:, None], w, cols)  # (C_out, B * H' * W')
        # under autocast the GEMM ran in a lower precision: keep what the backward needs in that dtype
        ctx.save_for_backward(weight.to(out.dtype), cols.to(out.dtype) if weight.requires_grad else None)
        ctx.conf = (x.shape, x.dtype, stride, bias is not None and bias.requires_grad)
        return out.view(-1, B, Ho, Wo).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        weight, cols = ctx.saved_tensors
        (B, C, H, W), dtype, stride, bias_grad = ctx.conf
        g = grad.to(weight.dtype).transpose(0, 1).reshape(weight.shape[0], -1)  # (C_out, B * H' * W')
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gcols = (weight.flatten(1).t() @ g).view(C * 9, B, -1).transpose(0, 1)  # (B, C * 9, H' * W')
            gx = F.fold(gcols, (H, W), 3, padding=1, stride=stride).to(dtype)
        if ctx.needs_input_grad[1]:
            gw = (g @ cols.t()).view_as(weight)
        if bias_grad:
            gb = g.sum(1)
        return gx, gw, gb, None  # autograd casts gw, gb to the parameters' dtype


class Conv2d(LeanConv2d):
    """LeanConv2d that runs 3x3 convs on small maps as im2col + one GEMM when on the CPU.

    oneDNN's direct convolution reaches 130-150 GFLOP/s per core on the UNet's 32x32 and 64x64 maps
    but only 35-80 on the wide (1280-2560 channel) layers at 16x16 and 8x8, where each loaded weight
    is reused at too few positions; a plain matmul over the unfolded patches keeps 100-130 there
    (measured on an AVX-512 Xeon; `python bench.py unet` shows the effect on the whole UNet). On narrow
    layers it is the other way round: at the shapes world's 32-128 channels a ControlNet + UNet training
    step takes 1.36 s through the GEMM and 0.71 s through oneDNN, so the GEMM is kept for wide layers.
    """
    gemm_max_positions = 256  # output positions per image at or below which the GEMM path is used...
    gemm_min_channels = 256   # ...for convs with at least this many input channels

    def uses_gemm(self, device, out_positions):
        return device.type == "cpu" and self.kernel_size == (3, 3) and self.padding == (1, 1) and self.groups == 1 \
            and self.dilation == (1, 1) and self.stride[0] == self.stride[1] \
            and self.in_channels >= self.gemm_min_channels and out_positions <= self.gemm_max_positions

    def forward(self, x):
        H, W = ((n - 1) // self.stride[0] + 1 for n in x.shape[2:])  # output size
        if self.uses_gemm(x.device, H * W):
            return GemmConv3x3Fn.apply(x, self.weight, self.bias, self.stride[0])
        return super().forward(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, a 1x1 skip if widths differ."""

    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        # index 2 is the original's dropout (p=0 in SD); kept as a slot so out_layers.3 matches the checkpoint
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Identity(),
                                        Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = add_rows(self.in_layers(x), self.emb_layers(emb)[:, :, None, None])
        return add_rows(self.skip_connection(x), self.out_layers(h))


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention; self-attention when context_dim is None.

    Self-attention holds q, k and v as one (3C, C) weight, so a single matmul projects all three (x is
    read once, the GEMM is 3x wider). The state_dict still shows the checkpoint's separate
    to_q/to_k/to_v: the fused weight is split on save and joined on load.
    """

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.register_state_dict_post_hook(split_qkv)
            self.register_load_state_dict_pre_hook(join_qkv)
        else:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_k = nn.Linear(context_dim, dim, bias=False)
            self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None):
        B, N, C = x.shape
        H = self.heads
        if context is None:
            # heads laid out contiguously: the CPU flash-attention kernel runs ~15% faster on the
            # 4096-token maps than on strided views, more than paying for the copy
            q, k, v = self.to_qkv(x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).contiguous()
        else:
            q = self.to_q(x).view(B, N, H, C // H).transpose(1, 2)
            k = self.to_k(context).view(B, -1, H, C // H).transpose(1, 2)
            v = self.to_v(context).view(B, -1, H, C // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


def split_qkv(module, state_dict, prefix, local_metadata):
    """state_dict hook: the fused weight leaves as the checkpoint's to_q, to_k, to_v."""
    qkv = state_dict.pop(prefix + "to_qkv.weight")
    for name, w in zip("qkv", qkv.chunk(3)):
        state_dict[f"{prefix}to_{name}.weight"] = w.clone()  # own storage, or safetensors refuses to save


def join_qkv(module, state_dict, prefix, *args):
    """load_state_dict hook: the checkpoint's to_q, to_k, to_v come in as the fused weight."""
    keys = [f"{prefix}to_{name}.weight" for name in "qkv"]
    if all(k in state_dict for k in keys):  # otherwise the strict check reports what is missing
        state_dict[prefix + "to_qkv.weight"] = torch.cat([state_dict.pop(k) for k in keys])


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): one matmul gives value and gate."""

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
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x, context):
        a = self.attn1(self.norm1(x))
        x = expand_rows(x + a, context.shape[0])  # the first step that differs between prompts (see UNet.forward)
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff.net(self.norm3(x))
        return x, a


class SpatialTransformer(nn.Module):
    """A transformer over the h*w positions of a feature map, wrapped in 1x1 convs and a residual."""

    def __init__(self, ch, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim)])
        self.proj_out = Conv2d(ch, ch, 1)

    def forward(self, x, context, features=None):
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C) tokens, contiguous (the reshape copies unless x is channels_last), or every
        # LayerNorm and residual add below would work on a transposed layout; the 1x1 convs proj_in and
        # proj_out run as linear layers on the tokens, so no other NCHW <-> token copy is needed
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = F.linear(h, self.proj_in.weight.view(C, C), self.proj_in.bias)
        for i, block in enumerate(self.transformer_blocks):
            h, a = block(h, context)
            if features is not None and i == 0:
                features.append(a.reshape(-1, H, W, C).permute(0, 3, 1, 2))
        h = F.linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias)
        return add_rows(x, h.reshape(-1, H, W, C).permute(0, 3, 1, 2))  # a channels_last view; x first keeps x's layout


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


# Which input row each tap of a 3x3 kernel reads after a 2x nearest upsampling, per output phase: an even
# output row 2i reads rows 2i-1, 2i, 2i+1 of the upsampled map, i.e. rows i-1, i, i of the input (taps 0 | 1+2);
# an odd row 2i+1 reads input rows i, i, i+1 (taps 0+1 | 2). Likewise for columns.
PHASE_TAPS = torch.tensor([[[1., 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])  # (phase, 2x2 tap, 3x3 tap)


def upsample_conv3x3(x, weight, bias):
    """conv3x3(upsample_nearest_2x(x)) with padding 1, without the upsampled map: each of the 4 output phases
    (even/odd row x even/odd column) is a 2x2 conv of x with summed taps, 4 multiply-adds per output instead
    of 9. Exact up to float rounding; 1.5-2x faster than upsample + conv at the VAE decoder's shapes."""
    B, _, H, W = x.shape
    taps = PHASE_TAPS.to(weight)
    k = torch.einsum("auk,oikl,bvl->aboiuv", taps, weight, taps)  # (2, 2, C_out, C_in, 2, 2)
    xp = F.pad(x, (1, 1, 1, 1))
    phases = [conv2d(xp[:, :, a:a + H + 1, b:b + W + 1], k[a, b], bias) for a in (0, 1) for b in (0, 1)]
    out = torch.stack(phases, 2).view(B, -1, 2, 2, H, W)  # (B, C_out, a, b, H, W)
    return out.permute(0, 1, 4, 2, 5, 3).reshape(B, -1, 2 * H, 2 * W)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        H, W = x.shape[2:]
        # CPU: the four phases, except on small maps, where the GEMM path on the upsampled map is faster
        # (the phases were measured on the CPU only)
        if x.device.type == "cpu" and not self.conv.uses_gemm(x.device, 4 * H * W):
            return upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """One UNet block: passes the time embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x, emb, context, features=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, features)
            else:
                x = layer(x)
        return x


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

    `python unet.py` prints it for any config.
    """
    mc, levels = cfg.model_channels, len(cfg.channel_mult)
    inputs, skips, ch = [[("conv", cfg.in_channels, mc)]], [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            block = [("res", ch, mult * mc)]
            ch = mult * mc
            if level in cfg.attention_levels:
                block.append(("attn", ch))
            inputs.append(block)
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
            if level in cfg.attention_levels:
                block.append(("attn", ch))
            if level > 0 and i == cfg.num_res_blocks:
                block.append(("up", ch))
            outputs.append(block)
    return inputs, middle, outputs


def make_layer(spec, cfg):
    kind, *ch = spec
    if kind == "conv":
        return Conv2d(ch[0], ch[1], 3, padding=1)
    if kind == "res":
        return ResBlock(ch[0], ch[1], cfg.time_embed_dim, cfg.norm_groups)
    if kind == "attn":
        return SpatialTransformer(ch[0], cfg.num_heads, cfg.context_dim, cfg.norm_groups)
    if kind == "down":
        return Downsample(ch[0])
    if kind == "up":
        return Upsample(ch[0])
    raise ValueError(f"unknown layer kind {kind!r}")


def make_block(specs, cfg):
    return TimestepSequential(*[make_layer(s, cfg) for s in specs])


def format_layout(cfg):
    def fmt(block):
        return ", ".join(f"{kind} {ch[0]} -> {ch[1]}" if kind in ("conv", "res") else
                         f"down {ch[0]}" if kind == "down" else kind for kind, *ch in block)
    inputs, middle, outputs = unet_layout(cfg)
    lines = [f"{'input_blocks':36s}output_blocks"]
    for i in range(max(len(inputs), len(outputs))):
        a = f"{i:2d}  {fmt(inputs[i])}" if i < len(inputs) else ""
        b = f"{i:2d}  {fmt(outputs[i])}" if i < len(outputs) else ""
        lines.append(f"{a:36s}{b}")
    lines.append(f"middle_block: {fmt(middle)}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the UNet

class DecoderFeatures(NamedTuple):
    time_emb: torch.Tensor  # (B, time_embed_dim), the UNet's own time embedding (the probe is conditioned on it)
    maps: list              # attn1 outputs of each decoder SpatialTransformer's first block, (B, C, h, w), in order


def as_timesteps(t, batch, device):
    """A python number or a one-element tensor -> (batch,); a tensor of timesteps per row stays as it is."""
    t = torch.as_tensor(t, device=device).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def run_block(block, h, emb, context, features=None, checkpoint=False):
    """One TimestepSequential; with checkpoint, its activations are recomputed in backward instead of kept."""
    if not checkpoint:
        return block(h, emb, context, features)

    def fn(h, emb, context):  # decoder features leave as outputs, so the recomputation can't add them twice
        local = [] if features is not None else None
        return block(h, emb, context, local), local
    h, local = torch.utils.checkpoint.checkpoint(fn, h, emb, context, use_reentrant=False)
    if features is not None:
        features.extend(local)
    return h


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
                                 Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.grad_checkpointing = False  # recompute block activations in backward (training memory)

    def time_embedding(self, t):
        t = torch.as_tensor(t, device=self.time_embed[0].weight.device).reshape(-1)
        emb = timestep_embedding(t, self.config.model_channels)
        return self.time_embed(emb.to(self.time_embed[0].weight.dtype))

    def forward(self, x, t, context, control=None, return_features=False):
        """eps for latents x (B, C, h, w) at timesteps t under the text context (B', L, context_dim).

        control: a ControlNet's 13 residuals (12 skips, then the middle block), or None.
        context may hold several prompts per latent, B' = k*B rows stacked as [prompts 1; prompts 2; ...],
        as classifier-free guidance does with [uncond; cond]. Latents and timestep are then the same
        for all k, and so is everything before the first cross-attention (conv_in, the first ResBlock,
        the first self-attention): it runs on B rows, and the rows are repeated where the text first
        enters. The result has B' rows either way.
        """
        emb = self.time_embedding(as_timesteps(t, x.shape[0], x.device))
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        h, skips = x, []
        for block in self.input_blocks:
            h = run_block(block, h, emb, context, checkpoint=ckpt)
            skips.append(h)
        h = run_block(self.middle_block, h, emb, context, checkpoint=ckpt)
        if control is not None:  # ControlNet (Zhang et al. 2023, fig. 3): added to the skips and the middle
            h = add_rows(h, control[-1])
            skips = [add_rows(s, c) for s, c in zip(skips, control[:-1])]
        features = [] if return_features else None
        for block in self.output_blocks:
            h = torch.cat([h, expand_rows(skips.pop(), h.shape[0])], dim=1)
            h = run_block(block, h, emb, context, features, checkpoint=ckpt)
        eps = expand_rows(self.out(h), context.shape[0])
        if return_features:
            return eps, DecoderFeatures(expand_rows(emb, eps.shape[0]), features)
        return eps


# -----------------------------------------------------------------------------
# configs and names: LDM checkpoints and diffusers UNet2DConditionModel

RES_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def map_block_key(rest, kind, prefix):
    """Inside one layer: ResBlock names differ, transformer names are shared, down/up convs are `.conv`."""
    if kind == "res":
        head, _, tail = rest.rpartition(".")  # e.g. in_layers.0 . weight
        return f"{prefix}.{RES_NAMES[head]}.{tail}"
    if kind in ("down", "up"):
        return f"{prefix}.{rest.replace('op.', 'conv.')}"
    return f"{prefix}.{rest}"


def encoder_key_map(cfg, names):
    """Names of the time embedding, input blocks and middle block (shared by UNet and ControlNet)."""
    inputs, middle, _ = unet_layout(cfg)
    per = cfg.num_res_blocks + 1
    out = {}
    for k in names:
        parts = k.split(".")
        if parts[0] == "time_embed":
            out[k] = f"time_embedding.linear_{1 if parts[1] == '0' else 2}.{parts[2]}"
        elif parts[0] == "input_blocks":
            n, j, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            if n == 0:
                out[k] = f"conv_in.{rest}"
                continue
            level, i = (n - 1) // per, (n - 1) % per
            kind = inputs[n][j][0]
            prefix = {"res": f"down_blocks.{level}.resnets.{i}", "attn": f"down_blocks.{level}.attentions.{i}",
                      "down": f"down_blocks.{level}.downsamplers.0"}[kind]
            out[k] = map_block_key(rest, kind, prefix)
        elif parts[0] == "middle_block":
            j, rest = int(parts[1]), ".".join(parts[2:])
            kind = middle[j][0]
            prefix = "mid_block.attentions.0" if kind == "attn" else f"mid_block.resnets.{j // 2}"
            out[k] = map_block_key(rest, kind, prefix)
    return out


def meta_state_dict_keys(module_cls, *args):
    with torch.device("meta"):
        return list(module_cls(*args).state_dict().keys())


def unet_key_map(cfg):
    """ours (LDM name) -> diffusers UNet2DConditionModel name, for every state_dict key."""
    _, _, outputs = unet_layout(cfg)
    per = cfg.num_res_blocks + 1
    names = meta_state_dict_keys(UNet, cfg)
    out = encoder_key_map(cfg, names)
    for k in names:
        parts = k.split(".")
        if parts[0] == "output_blocks":
            n, j, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            level, i = n // per, n % per
            kind = outputs[n][j][0]
            prefix = {"res": f"up_blocks.{level}.resnets.{i}", "attn": f"up_blocks.{level}.attentions.{i}",
                      "up": f"up_blocks.{level}.upsamplers.0"}[kind]
            out[k] = map_block_key(rest, kind, prefix)
        elif parts[0] == "out":
            out[k] = f"{'conv_norm_out' if parts[1] == '0' else 'conv_out'}.{parts[2]}"
    assert len(out) == len(names) and len(set(out.values())) == len(out)
    return out


def unet_config_from_state_dict(sd):
    """Read the architecture from LDM-layout tensor shapes (keys without the model.diffusion_model. prefix).

    Head count and norm groups leave no trace in the shapes; they keep the SD1.x values (8, 32).
    """
    w = sd["input_blocks.0.0.weight"]
    mc = w.shape[0]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    downs = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in sd]
    num_res_blocks = downs[0] - 1 if downs else len(blocks) - 1
    per = num_res_blocks + 1
    mults, attention_levels = [], []
    for level in range(len(downs) + 1):
        first = 1 + level * per
        mults.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
        if f"input_blocks.{first}.1.proj_in.weight" in sd:
            attention_levels.append(level)
    ctx = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    out_w = sd.get("out.2.weight")
    return UNetConfig(in_channels=w.shape[1], out_channels=out_w.shape[0] if out_w is not None else 4,
                      model_channels=mc, channel_mult=tuple(mults), num_res_blocks=num_res_blocks,
                      attention_levels=tuple(attention_levels), context_dim=ctx)


def unet_config_from_diffusers(c):
    """UNetConfig from a diffusers UNet2DConditionModel (or ControlNetModel) config.json dict."""
    problems = ["use_linear_projection=True"] if c.get("use_linear_projection") else []
    problems += [f"{k}={c[k]!r}" for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim",
                                          "time_cond_proj_dim") if c.get(k) is not None]
    tlpb = c.get("transformer_layers_per_block", 1)
    if set([tlpb] if isinstance(tlpb, int) else tlpb) != {1}:
        problems.append(f"transformer_layers_per_block={tlpb!r}")
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type={c['mid_block_type']!r}")
    if problems:
        raise ValueError(f"unsupported UNet config ({', '.join(problems)}): this code implements the SD1.x UNet")
    boc = list(c.get("block_out_channels", (320, 640, 1280, 1280)))
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    if not isinstance(heads, int):
        if len(set(heads)) != 1:
            raise ValueError(f"unsupported UNet config: different head counts per level {heads}")
        heads = heads[0]
    down = c.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    lpb = c.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise ValueError(f"unsupported UNet config: layers_per_block {lpb}")
    return UNetConfig(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
                      model_channels=boc[0], channel_mult=tuple(b // boc[0] for b in boc), num_res_blocks=lpb,
                      attention_levels=tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn")),
                      num_heads=heads, context_dim=c.get("cross_attention_dim", 768),
                      norm_groups=c.get("norm_num_groups", 32))


def unet_config_to_diffusers(cfg):
    """kwargs for diffusers' UNet2DConditionModel (also what its config.json holds)."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    up = ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)]
    return dict(sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
                block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads,  # diffusers' historical name for the head count
                norm_num_groups=cfg.norm_groups, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True,
                freq_shift=0, downsample_padding=1, center_input_sample=False, use_linear_projection=False)


if __name__ == "__main__":
    print(format_layout(UNetConfig()))
