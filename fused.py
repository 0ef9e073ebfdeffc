"""Faster versions of the model's layers: the same parameters, the same state_dict keys, the same function.

unet.py, model.py, controlnet.py and reward.py are written with plain `nn` layers. `install(*modules)` swaps the
class of each layer it has a faster version of, in place, so the weights, the optimizer and the checkpoints never
notice. The entry points (train.py, sample.py, eval.py, shapes.py, bench.py) call it on the models they run;
INNERCONTROL_PLAIN=1 in the environment turns it off. Every path here is tested against the plain layer,
forward and gradient (tests/test_fused.py); the README's Speed section gives what each one measured.

- LeanConv2d: a convolution whose weight is frozen keeps only the weight for the backward, not its input.
  Training back-propagates through frozen networks (the UNet, to reach the ControlNet's residuals; the VAE decoder
  and the reward model, for ControlNet++'s reward), so this drops the saved input of every one of their convs.
  On the CPU its input gradient is a forward convolution with the flipped kernel (stride 1).
- FastConv2d: on the CPU, wide 3x3 convs on small maps run as im2col + one GEMM with the batch folded in, forward
  and backward, where oneDNN's direct convolution reuses each weight at too few positions.
- FastUpsample: on the CPU, 2x nearest upsampling + 3x3 conv as four 2x2 convs on the small map.
- TokenSpatialTransformer: the 1x1 proj_in / proj_out run as linear layers on the (B, h*w, C) tokens, so the map
  is turned into tokens once instead of twice.
- FastAttention: on the CPU, heads laid out contiguously before scaled_dot_product_attention.
- ChannelsLastSequential: the ControlNet's hint encoder in NHWC on the CPU (few channels, image-sized maps).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

import controlnet
import reward
import unet

# -----------------------------------------------------------------------------
# frozen convolutions: keep only the weight for the backward


class FrozenConv2dFn(torch.autograd.Function):
    """conv2d for a weight that needs no gradient: the input's gradient needs only the weight, so only the
    weight is saved (autograd's own conv keeps the input too, for a weight gradient nobody asks for)."""

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
            # with stride 1 the input's gradient is a plain convolution of the output's gradient with the kernel
            # flipped and its in/out channels swapped, which oneDNN's forward kernels run faster than its
            # backward-data kernels (measured on the CPU only)
            gx = F.conv2d(grad, w.transpose(0, 1).flip(2, 3), None, 1, (k[0] - 1 - p[0], k[1] - 1 - p[1]))
        else:
            gx = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return gx.to(dtype), None, None, None, None, None, None


def frozen_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d that keeps only the weight for the backward when the weight and bias are frozen."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if frozen and x.requires_grad and torch.is_grad_enabled() and not isinstance(padding, str):
        return FrozenConv2dFn.apply(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class LeanConv2d(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        return frozen_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class LeanStdConv2d(LeanConv2d, reward.StdConv2d):
    """DPT-Hybrid's weight-standardised conv, through the same frozen-weight convolution."""


# -----------------------------------------------------------------------------
# wide 3x3 convs on small maps as im2col + one GEMM (CPU)

def im2col3x3(x, stride):
    """The 3x3 patches (padding 1) of a (B, C, H, W) map as a (C * 9, B * H' * W') matrix: one column per output
    position of every image, rows in the weight's (C, 3, 3) order. A strided view of the padded map, then one
    copy; this order reads the map in long runs."""
    C = x.shape[1]
    cols = F.pad(x, (1, 1, 1, 1)).unfold(2, 3, stride).unfold(3, 3, stride)  # (B, C, H', W', 3, 3)
    return cols.permute(1, 4, 5, 0, 2, 3).reshape(C * 9, -1), cols.shape[2], cols.shape[3]


class GemmConv3x3Fn(torch.autograd.Function):
    """A 3x3 conv (padding 1) as out = W @ cols, with the batch folded into the columns; the backward is two more
    GEMMs, grad_W = grad @ cols^T and grad_cols = W^T @ grad, then F.fold (col2im). Folding the batch in gives the
    GEMMs more columns on small maps, and the weight's gradient comes out of one GEMM instead of a batched one and
    a sum. Only the weight is kept for the backward when it is frozen, as in FrozenConv2dFn."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        B = x.shape[0]
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


class FastConv2d(LeanConv2d):
    """LeanConv2d that runs wide 3x3 convs on small maps as im2col + one GEMM on the CPU. On narrow layers oneDNN
    is faster, hence the two thresholds (README, Speed)."""
    gemm_max_positions = 256  # output positions per image at or below which the GEMM path is used...
    gemm_min_channels = 256   # ...for convs with at least this many input channels

    def uses_gemm(self, device, out_positions):
        return device.type == "cpu" and self.kernel_size == (3, 3) and self.padding == (1, 1) and self.groups == 1 \
            and self.dilation == (1, 1) and self.stride[0] == self.stride[1] and self.padding_mode == "zeros" \
            and self.in_channels >= self.gemm_min_channels and out_positions <= self.gemm_max_positions

    def forward(self, x):
        H, W = ((n - 1) // self.stride[0] + 1 for n in x.shape[2:])  # the output's size
        if self.uses_gemm(x.device, H * W):
            return GemmConv3x3Fn.apply(x, self.weight, self.bias, self.stride[0])
        return super().forward(x)


# -----------------------------------------------------------------------------
# nearest 2x upsampling + 3x3 conv as four 2x2 convs (CPU)

# Which input row each tap of a 3x3 kernel reads after a 2x nearest upsampling, per output phase: an even output
# row 2i reads rows 2i-1, 2i, 2i+1 of the upsampled map, i.e. rows i-1, i, i of the input (taps 0 | 1+2); an odd
# row 2i+1 reads input rows i, i, i+1 (taps 0+1 | 2). Likewise for columns. As one matrix: the 9 taps of the 3x3
# kernel -> for each phase (a, b), the 4 taps (u, v) of its 2x2 kernel.
PHASE_TAPS = torch.tensor([[[1., 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])  # (phase, 2x2 tap, 3x3 tap)
PHASE_MATRIX = torch.einsum("auk,bvl->klabuv", PHASE_TAPS, PHASE_TAPS).reshape(9, 2, 2, 4)  # (3x3 tap, a, b, uv)


def upsample_conv3x3(x, weight, bias):
    """conv3x3(upsample_nearest_2x(x)) with padding 1, without the upsampled map: each of the 4 output phases
    (even/odd row x even/odd column) is a 2x2 conv of x with summed taps, 4 multiply-adds per output instead of 9.
    Each phase's kernel is one small GEMM over the weight's 9 taps, written straight into conv layout."""
    B, _, H, W = x.shape
    O, I = weight.shape[:2]
    taps, m = weight.reshape(O * I, 9), PHASE_MATRIX.to(weight)
    xp = F.pad(x, (1, 1, 1, 1))
    phases = [frozen_conv2d(xp[:, :, a:a + H + 1, b:b + W + 1], (taps @ m[:, a, b]).view(O, I, 2, 2), bias)
              for a in (0, 1) for b in (0, 1)]
    out = torch.stack(phases, 2).view(B, -1, 2, 2, H, W)  # (B, C_out, a, b, H, W)
    return out.permute(0, 1, 4, 2, 5, 3).reshape(B, -1, 2 * H, 2 * W)


class FastUpsample(unet.Upsample):
    def forward(self, x, size=None):
        H, W = x.shape[2:]
        double = size is None or tuple(size) == (2 * H, 2 * W)
        # on small maps the GEMM path on the upsampled map is faster than the phases
        gemm = isinstance(self.conv, FastConv2d) and self.conv.uses_gemm(x.device, 4 * H * W)
        if x.device.type == "cpu" and double and not gemm:
            return upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        return super().forward(x, size)


# -----------------------------------------------------------------------------
# transformers: tokens made once, heads contiguous

class TokenSpatialTransformer(unet.SpatialTransformer):
    def forward(self, x, context):
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C) once; the 1x1 convs are linear layers on the tokens
        h = F.linear(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C), self.proj_in.weight.view(C, C),
                     self.proj_in.bias)
        features = []
        for block in self.transformer_blocks:
            h, a = block(h, context)
            features.append(a)
        h = F.linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias)
        as_map = lambda tokens: tokens.view(B, H, W, C).permute(0, 3, 1, 2)  # noqa: E731 (a channels_last view)
        return x + as_map(h), as_map(features[0])


class FastAttention(unet.Attention):
    def forward(self, x, context=None):
        if x.device.type != "cpu":
            return super().forward(x, context)
        context = x if context is None else context
        B, N, C = x.shape
        # the CPU's flash-attention kernel runs faster on contiguous heads than on strided views, more than
        # paying for the copy
        q, k, v = (p(z).view(B, -1, self.heads, C // self.heads).transpose(1, 2).contiguous()
                   for p, z in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class ChannelsLastSequential(nn.Sequential):
    def forward(self, x):
        if x.device.type == "cpu":  # few channels on image-sized maps: oneDNN's NHWC kernels are faster there
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


# -----------------------------------------------------------------------------
# the switch

SWAPS = {nn.Conv2d: FastConv2d, reward.StdConv2d: LeanStdConv2d, unet.Upsample: FastUpsample,
         unet.SpatialTransformer: TokenSpatialTransformer, unet.Attention: FastAttention}


def install(*modules):
    """Swap the faster layers into `modules` (None entries are skipped), in place; returns the first module.
    Parameters, buffers and state_dict keys stay as they are. INNERCONTROL_PLAIN=1 leaves the plain layers."""
    if os.environ.get("INNERCONTROL_PLAIN", "") not in ("", "0"):
        return modules[0] if modules else None
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            if type(m) in SWAPS:
                m.__class__ = SWAPS[type(m)]
            if type(m) is controlnet.ControlNet and type(m.input_hint_block) is nn.Sequential:
                m.input_hint_block.__class__ = ChannelsLastSequential
    return modules[0] if modules else None
