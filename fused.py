"""Faster versions of the model's layers: the same parameters, the same state_dict keys, the same function.

unet.py, model.py, controlnet.py and reward.py are written with plain `nn` layers. `install(*modules)` swaps the
class of each layer it has a faster version of, in place, so the weights, the optimizer and the checkpoints never
notice. The entry points (train.py, sample.py, eval.py, shapes.py, bench.py) call it on the models they run;
INNERCONTROL_PLAIN=1 in the environment turns it off. Every path here is tested against the plain layer,
forward and gradient (tests/test_fused.py); the README's Speed section gives what each one measured. Each layer
decides per call which path its input takes: some paths pay on the CPU, some on CUDA, some on both. None needs
Triton or torch.compile.

On any device:
- LeanConv2d: a convolution whose weight is frozen keeps only the weight for the backward, not its input.
  Training back-propagates through frozen networks (the UNet, to reach the ControlNet's residuals; the VAE decoder
  and the reward model, for ControlNet++'s reward), so this drops the saved input of every one of their convs.
  (A frozen linear layer needs no such path: autograd already keeps only its weight.)
- TokenSpatialTransformer, TokenAttnBlock: the 1x1 projections run as linear layers on the (B, h*w, C) tokens, so
  the map is turned into tokens once, and attention gets q, k, v with a contiguous last dimension, the layout
  scaled_dot_product_attention's fused kernels take (the UNet's heads are views of that layout, no copies).
On the CPU:
- FrozenConv2dFn's input gradient is a forward convolution with the flipped kernel (stride 1).
- FastConv2d: 3x3 convs with large weights (SD1.5's 1280-channel levels) on maps of at most 8x8 run as im2col +
  one GEMM with the batch folded in, forward and backward: there oneDNN's direct convolution slows down several
  times over (everywhere else it is the faster one).
- FastUpsample: 2x nearest upsampling + 3x3 conv as four 2x2 convs on the small map.
- FastAttention: heads laid out contiguously before scaled_dot_product_attention.
- FastLinear (and the token paths' projections): fp32 linear layers of 64 rows or more as oneDNN 1x1
  convolutions, forward and input gradient, instead of MKL's sgemm.
- ChannelsLastSequential, ChannelsLastEncoder: the ControlNet's hint encoder and the VAE encoder in NHWC
  (image-sized maps).
- keep_freed_memory(): not a layer but a process setting, which train.py makes on the CPU: glibc's malloc keeps
  what a training step frees for the next one, instead of the kernel faulting in fresh pages every step.
On CUDA:
- NormActSequential, LeanResnetBlock: GroupNorm + SiLU in one autograd function that keeps only the norm's input
  and recomputes the normalised map in the backward (autograd keeps both).
- LeanGEGLU: the gated feed-forward keeps only the projection's output and recomputes gelu(gate) in the backward.
- cuda_graphs(): within it, forward passes of the UNet and the ControlNet without gradients replay CUDA graphs, one
  per input signature (sample.generate uses it: a sampling loop has fixed shapes, and at batch 2 a GPU step is
  short enough for the launches of its ~2,000 kernels to matter).
On CUDA, in fp16/bf16 (autocast or half weights):
- convolutions in channels_last (NHWC), cuDNN's tensor-core layout; frozen weights are laid out once, in place.
- GroupNorm on NHWC maps without a round trip through NCHW (PyTorch's CUDA kernel takes NCHW only).
"""
import ctypes
import ctypes.util
import os
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from itertools import islice

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

import controlnet
import model
import reward
import unet

# INNERCONTROL_CHANNELS_LAST=0 / INNERCONTROL_CUDA_GRAPHS=0 turn those two CUDA paths off (for A/B measurements)
CHANNELS_LAST = os.environ.get("INNERCONTROL_CHANNELS_LAST", "1") != "0"
CUDA_GRAPHS = os.environ.get("INNERCONTROL_CUDA_GRAPHS", "1") != "0"


def nhwc_dtype(x):
    """The dtype an op on x computes in, if x is on CUDA and that dtype is fp16/bf16 (autocast's, else x's): where
    the NHWC paths apply. None elsewhere."""
    if not (CHANNELS_LAST and x.is_cuda):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


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


def nhwc_weight(conv, weight, dtype):
    """The conv's weight in `dtype` and channels_last. A frozen weight already in that dtype is laid out once, in
    place (no optimizer state has to keep matching its layout); any other is cast per call, which is the one copy
    autocast would make anyway."""
    if weight is conv.weight and not weight.requires_grad and weight.dtype == dtype:
        if not weight.is_contiguous(memory_format=torch.channels_last):
            conv.weight.data = weight.data.contiguous(memory_format=torch.channels_last)
        return conv.weight
    return weight.to(dtype, memory_format=torch.channels_last)


class LeanConv2d(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        dtype = nhwc_dtype(x)
        if dtype is not None:  # cuDNN's fp16/bf16 kernels work in NHWC: an NCHW conv pays two transposes
            x, weight = x.to(dtype, memory_format=torch.channels_last), nhwc_weight(self, weight, dtype)
            bias = None if bias is None else bias.to(dtype)
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
    """LeanConv2d that runs 3x3 convs with large weights on small maps as im2col + one GEMM on the CPU: there
    oneDNN's direct convolution slows down several times over; everywhere else it is the faster one, hence the
    thresholds (README, Speed)."""
    gemm_max_positions = 64  # output positions per image at or below which the GEMM path is used (fp32)...
    gemm_max_positions_half = 256  # ...(bf16/fp16: the direct convolution's slowdown starts on larger maps)...
    gemm_min_weight = 2 ** 20  # ...for convs with at least this many (input channel, output channel) pairs

    def uses_gemm(self, x, out_positions):
        autocast = torch.is_autocast_enabled("cpu")
        half = (torch.get_autocast_dtype("cpu") if autocast else x.dtype) in (torch.bfloat16, torch.float16)
        return x.device.type == "cpu" and self.kernel_size == (3, 3) and self.padding == (1, 1) \
            and self.groups == 1 and self.dilation == (1, 1) and self.stride[0] == self.stride[1] \
            and self.padding_mode == "zeros" and self.in_channels * self.out_channels >= self.gemm_min_weight \
            and out_positions <= (self.gemm_max_positions_half if half else self.gemm_max_positions)

    def forward(self, x):
        H, W = ((n - 1) // self.stride[0] + 1 for n in x.shape[2:])  # the output's size
        if self.uses_gemm(x, H * W):
            return GemmConv3x3Fn.apply(x, self.weight, self.bias, self.stride[0])
        return super().forward(x)


# -----------------------------------------------------------------------------
# fp32 linear layers through oneDNN (CPU)

def onednn_gemm(x, w, bias=None):
    """x (M, K) @ w (N, K)^T (+ bias) as a 1x1 convolution over M positions, x and the result viewed in NHWC without
    a copy. PyTorch sends fp32 matmuls to MKL's sgemm, which on AMD CPUs runs well below oneDNN's convolution
    kernels (README, Speed)."""
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    out = F.conv2d(x.view(1, M, 1, K).permute(0, 3, 1, 2), w.view(N, K, 1, 1), bias)  # (1, N, M, 1) channels_last
    return out.permute(0, 2, 3, 1).reshape(M, N)


def onednn_gemm_grads(g, x, weight, need_x, need_w):
    """The gradients of onednn_gemm(x, weight) for the output's gradient g (M, N): g @ weight (M, K) and
    g^T @ x (N, K), from oneDNN's 1x1-convolution backward, which at these shapes beats MKL's sgemm and needs no
    transposed copy of the weight (README, Speed). x is only read for the weight's gradient."""
    M, (N, K) = g.shape[0], weight.shape

    def as_map(a, C):  # (M, C) rows as a channels-last (1, C, M, 1) map, as in onednn_gemm
        return a.contiguous().view(1, M, 1, C).permute(0, 3, 1, 2)
    x = as_map(x, K) if need_w else g.new_empty(1, M, 1, K).permute(0, 3, 1, 2)  # only its shape is used
    gx, gw, _ = torch.ops.aten.convolution_backward(as_map(g, N), x, weight.reshape(N, K, 1, 1), None, [1, 1], [0, 0],
                                                    [1, 1], False, [0, 0], 1, [need_x, need_w, False])
    return gx.permute(0, 2, 3, 1).reshape(M, K) if need_x else None, gw.view(N, K) if need_w else None


class OneDNNLinearFn(torch.autograd.Function):
    """F.linear on the CPU in fp32 through oneDNN's 1x1 convolution: forward, input gradient and (only the
    trainable ControlNet needs one) weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2 if weight.requires_grad else None, weight)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return onednn_gemm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx, gw = onednn_gemm_grads(g, x2, weight, *ctx.needs_input_grad[:2])
        return gx if gx is None else gx.view(*grad.shape[:-1], -1), gw, g.sum(0) if ctx.bias_grad else None


def linear(x, weight, bias=None):
    """F.linear, through oneDNN for fp32 CPU inputs of enough rows (below ~64 rows MKL is as fast)."""
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() >= 64 * x.shape[-1] \
            and not torch.is_autocast_enabled("cpu"):
        return OneDNNLinearFn.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


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
        # where the conv takes the GEMM path (large weights, small maps), it beats the phases on the upsampled map
        gemm = isinstance(self.conv, FastConv2d) and self.conv.uses_gemm(x, 4 * H * W)
        if x.device.type == "cpu" and double and not gemm:
            return upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        return super().forward(x, size)


# -----------------------------------------------------------------------------
# transformers: tokens made once, heads contiguous

class TokenSpatialTransformer(unet.SpatialTransformer):
    def forward(self, x, context):
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, H*W, C) once; the 1x1 convs are linear layers on the tokens
        h = linear(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C), self.proj_in.weight.view(C, C),
                   self.proj_in.bias)
        features = []
        for block in self.transformer_blocks:
            h, a = block(h, context)
            features.append(a)
        h = linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias)
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


class TokenAttnBlock(model.AttnBlock):
    """The VAE's single-head attention with q, k, v, proj_out as linear layers on the tokens. The plain block hands
    scaled_dot_product_attention (B, 1, h*w, C) maps whose last dimension is strided, which its fused CUDA kernels
    refuse (the math fallback materialises the (h*w)^2 scores); here it is contiguous."""

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, 1, H * W, C)  # a view when the map is channels_last
        q, k, v = (linear(h, p.weight.view(C, C), p.bias) for p in (self.q, self.k, self.v))
        out = linear(F.scaled_dot_product_attention(q, k, v), self.proj_out.weight.view(C, C), self.proj_out.bias)
        return x + out.view(B, H, W, C).permute(0, 3, 1, 2)


class ChannelsLastSequential(nn.Sequential):
    def forward(self, x):
        if x.device.type == "cpu":  # few channels on image-sized maps: oneDNN's NHWC kernels are faster there
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class ChannelsLastEncoder(model.Encoder):
    """The VAE encoder in NHWC on the CPU, where oneDNN's convolutions on its image-sized maps are faster; the
    latents come back in NCHW. (The decoder stays in NCHW: its upsamplings lose in NHWC what its convs gain.)"""

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


# -----------------------------------------------------------------------------
# GroupNorm (+ SiLU): keep only the norm's input; on CUDA in fp16/bf16, work on NHWC maps in place


def per_channel(stat, channels):
    """(N, G) group statistics -> (N, C, 1, 1), each group's value repeated over its channels."""
    N, G = stat.shape
    return stat[:, :, None].expand(N, G, channels // G).reshape(N, channels, 1, 1)


def nhwc_group_stats(x, groups, eps):
    """Mean and 1/std per (sample, group), in fp32, of a channels_last map: sums of x and x^2 over its (N, H*W, G,
    C/G) view, which read the map where it lies (PyTorch's CUDA GroupNorm first copies it to NCHW), fp16/bf16 input
    accumulated in fp32 as it is read. E[x^2] - E[x]^2 cancels ~1e-7 (mean / std)^2 of the variance away: nothing
    at the offsets seen in SD's activations, 1e-3 at a mean 100 std from zero."""
    N, C = x.shape[:2]
    v = x.permute(0, 2, 3, 1).reshape(N, -1, groups, C // groups)
    n = v.shape[1] * v.shape[3]
    mean = v.sum((1, 3), dtype=torch.float32) / n
    var = torch.linalg.vector_norm(v, 2, (1, 3), dtype=torch.float32).square() / n - mean.square()
    return mean, (var.clamp_min(0) + eps).rsqrt()


def affine(x, scale, shift, dtype):
    """x * scale + shift, computed from the fp32 (N, C, 1, 1) coefficients and written in `dtype`, in x's layout:
    one pass, with no fp16 rounding of the coefficients (for a mean far from zero, shift nearly cancels x * scale)."""
    return torch.addcmul(shift, x, scale, out=torch.empty_like(x, dtype=dtype))


def normalized(x, mean, rstd, weight, bias, dtype):
    """(x - mean) * rstd * weight + bias in `dtype`."""
    C = x.shape[1]
    scale = per_channel(rstd, C) * weight.float().view(1, C, 1, 1)
    return affine(x, scale, bias.float().view(1, C, 1, 1) - per_channel(mean, C) * scale, dtype)


def norm_dtypes(x, nhwc):
    """(compute dtype, output dtype) of a GroupNorm on x. CUDA autocast runs group_norm in fp32: the native path
    does too; the NHWC path computes in fp16/bf16 from fp32 statistics. Under autocast the output is in autocast's
    dtype, which the conv or linear layer after it would cast to anyway."""
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    out = torch.get_autocast_dtype("cuda") if autocast else None
    compute = nhwc if nhwc else (torch.float32 if autocast else x.dtype)
    return compute, out or compute


class GroupNormActFn(torch.autograd.Function):
    """GroupNorm, then SiLU if `act`, saving only the norm's input and its (N, G) statistics: the normalised map,
    which autograd would keep for SiLU's backward, is recomputed from them in the backward (one multiply-add).
    nhwc: the dtype of the channels_last path (nhwc_group_stats), or None for PyTorch's native kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, act, nhwc):
        N, C = x.shape[:2]
        compute, out_dtype = norm_dtypes(x, nhwc)
        if nhwc:
            mean, rstd = nhwc_group_stats(x, groups, eps)
            y = normalized(x, mean, rstd, weight, bias, compute)
        else:
            w, b = (weight.to(compute), bias.to(compute)) if compute == torch.float32 else (weight, bias)
            y, mean, rstd = torch.native_group_norm(x.to(compute), w, b, N, C, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.conf = (groups, act, nhwc, compute)
        return (F.silu(y, inplace=True) if act else y).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        groups, act, nhwc, compute = ctx.conf
        N, C = x.shape[:2]
        grad = grad.to(compute)
        if act:  # SiLU's backward needs the normalised map: recompute it
            grad = torch.ops.aten.silu_backward(grad, normalized(x, mean, rstd, weight, bias, compute))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not nhwc:
            w = weight.to(compute) if compute == torch.float32 else weight
            # both in one layout: given a channels_last grad and an NCHW x, the CPU kernel returns wrong values
            # (torch 2.13; autograd's own GroupNorm backward makes them match first too)
            gx, gw, gb = torch.ops.aten.native_group_norm_backward(
                grad.contiguous(), x.to(compute).contiguous(), mean, rstd, w, N, C, x[0, 0].numel(), groups,
                [need_x, need_w, need_b])
            return gx if gx is None else gx.to(x.dtype), gw, gb, None, None, None, None
        # NHWC: with xhat = (x - mean) * rstd (O(1) values, so its products with the gradient stay in fp16 range),
        # A = sum_hw grad and B = sum_hw grad * xhat per (n, c) give both parameter gradients, and the input's is
        # rstd * (w * grad - mean_group(w * grad) - xhat * mean_group(w * grad * xhat)), Wu & He 2018's backward
        r, w = per_channel(rstd, C), weight.float().view(1, C, 1, 1)
        xhat = affine(x, r, -per_channel(mean, C) * r, compute)
        A = grad.sum((2, 3), dtype=torch.float32)
        B = (grad * xhat).sum((2, 3), dtype=torch.float32)
        gx = None
        if need_x:
            M = x[0, 0].numel() * C // groups
            s1, s2 = ((S * w.view(1, C)).view(N, groups, -1).sum(2) for S in (A, B))  # group sums of w*grad (*xhat)
            gx = affine(xhat, per_channel(-rstd * s2 / M, C), per_channel(-rstd * s1 / M, C), compute)
            gx = gx.addcmul_(grad, (r * w).to(compute)).to(x.dtype)
        return gx, B.sum(0) if need_w else None, A.sum(0) if need_b else None, None, None, None, None


def recompute_pays(x):
    """Recomputing a cheap elementwise half in the backward instead of saving it: on CUDA, where those passes run at
    memory bandwidth and the memory saved is what limits the batch. On the CPU they measured 5-30% slower."""
    return x.is_cuda


def group_norm_act(x, norm, act):
    """norm(x), then SiLU if act: on NHWC maps in fp16/bf16 on CUDA without leaving NHWC, and when a gradient is
    needed (on CUDA) without keeping the normalised map."""
    nhwc = nhwc_dtype(x) if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else None
    grad = torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad)
    if grad and ((act and recompute_pays(x)) or nhwc):
        return GroupNormActFn.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, act, nhwc)
    if nhwc:  # no gradient: the statistics and one pass
        y = normalized(x, *nhwc_group_stats(x, norm.num_groups, norm.eps), norm.weight, norm.bias, nhwc)
    else:
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y, inplace=not grad) if act else y


class FastGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return group_norm_act(x, self, act=False) if self.affine else super().forward(x)


class FastBitGroupNormAct(reward.GroupNormAct):
    """DPT-Hybrid's GroupNorm + ReLU, its norm on NHWC maps too."""

    def forward(self, x):
        x = group_norm_act(x, self, act=False)
        return F.relu(x) if self.act else x


class NormActSequential(nn.Sequential):
    """nn.Sequential(GroupNorm, SiLU, ...) with its first two layers run as one (ResBlock's in_layers, out_layers,
    the UNet's output head)."""

    def forward(self, x):
        x = group_norm_act(x, self[0], act=True)
        for layer in islice(self, 2, None):
            x = layer(x)
        return x


class LeanResnetBlock(model.ResnetBlock):
    def forward(self, x):
        h = self.conv1(group_norm_act(x, self.norm1, act=True))
        return self.nin_shortcut(x) + self.conv2(group_norm_act(h, self.norm2, act=True))


# -----------------------------------------------------------------------------
# GEGLU: recompute the gate's GELU in the backward

class GEGLUFn(torch.autograd.Function):
    """value * gelu(gate) of the projection's output h = [value, gate], saving only h: autograd would also keep
    gelu(gate), half as large again. The backward recomputes it."""

    @staticmethod
    def forward(ctx, h):
        value, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return value * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        value, gate = ctx.saved_tensors[0].chunk(2, dim=-1)
        return torch.cat([grad * F.gelu(gate), torch.ops.aten.gelu_backward(grad * value, gate)], dim=-1)


class LeanGEGLU(unet.GEGLU):
    def forward(self, x):
        h = self.proj(x)
        if torch.is_grad_enabled() and h.requires_grad and recompute_pays(h):
            return GEGLUFn.apply(h)
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)

# -----------------------------------------------------------------------------
# CUDA graphs for the sampling loop


class GraphState:
    on = False  # set by cuda_graphs()


def graphs_apply(x):
    """Replay from a graph: inside cuda_graphs(), on CUDA, without gradients and without autocast (whose weight
    casts a graph would freeze), and not while another capture runs."""
    return (GraphState.on and CUDA_GRAPHS and x.is_cuda and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cuda") and not torch.cuda.is_current_stream_capturing())


@contextmanager
def cuda_graphs():
    """Within this block, forward passes of the UNet and the ControlNet that graphs_apply() admits run from CUDA
    graphs: the first call with an input signature runs eagerly (layouts settle, kernels get chosen), the second
    records the graph, every later one copies its inputs in and replays it, one launch for the whole network."""
    before, GraphState.on = GraphState.on, True
    try:
        yield
    finally:
        GraphState.on = before


def capture_graph(run):
    """Record run() into a CUDA graph after one warm-up on a side stream (as torch.cuda.graphs asks); returns the
    replay function and run()'s output tensors, which each replay overwrites."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph.replay, out


def clone_outputs(v):
    """A copy of a graph's outputs (tensors in tuples, lists, named tuples), so the next replay cannot overwrite
    what the caller holds."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (tuple, list)):
        items = [clone_outputs(i) for i in v]
        return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
    return v


class GraphedCalls:
    """One module's graphs, keyed by input signature (at most `max_graphs`, least recently used dropped)."""
    max_graphs = 4

    def __init__(self):
        self.graphs, self.seen, self.broken = OrderedDict(), set(), False

    def __call__(self, fn, inputs, key):
        """fn(*inputs): tensors and numbers (a timestep), the numbers being graph inputs too. key: whatever else
        fn's result depends on."""
        key = (key, torch.is_inference_mode_enabled(),
               tuple((tuple(v.shape), v.dtype, v.device, v.stride()) if isinstance(v, torch.Tensor) else type(v)
                     for v in inputs))
        if self.broken or key not in self.seen:
            self.seen.add(key)
            return fn(*inputs)
        if key not in self.graphs:
            device = next(v.device for v in inputs if isinstance(v, torch.Tensor))
            static = [v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v, device=device) for v in inputs]
            try:
                replay, out = capture_graph(lambda: fn(*static))
            except Exception as e:  # noqa: BLE001 (any failure to record leaves the eager path, which works)
                warnings.warn(f"fused.py: CUDA graph capture failed, running eagerly ({type(e).__name__}: {e})")
                self.broken = True
                return fn(*inputs)
            self.graphs[key] = (static, replay, out)
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        static, replay, out = self.graphs[key]
        for s, v in zip(static, inputs):
            if isinstance(v, torch.Tensor):
                s.copy_(v)
            else:
                s.fill_(v)
        replay()
        return clone_outputs(out)


GRAPHS = weakref.WeakKeyDictionary()  # module -> GraphedCalls; outside the module, so deepcopy and pickling skip it


def graphed(module, fn, inputs, key):
    return GRAPHS.setdefault(module, GraphedCalls())(fn, inputs, key)


class GraphedUNet(unet.UNet):
    def forward(self, x, t, context, control=None, return_features=False):
        if not graphs_apply(x):
            return super().forward(x, t, context, control, return_features)

        def run(x, t, context, *control):  # every tensor (and the timestep) an input of the graph
            return unet.UNet.forward(self, x, t, context, list(control) or None, return_features)
        return graphed(self, run, [x, t, context, *(control or [])], (return_features,))


class GraphedControlNet(controlnet.ControlNet):
    def forward(self, x, t, context, hint, scale=1.0):
        if not graphs_apply(x):
            return super().forward(x, t, context, hint, scale)

        def run(x, t, context, hint):
            return controlnet.ControlNet.forward(self, x, t, context, hint, scale)
        return graphed(self, run, [x, t, context, hint], (scale,))


# -----------------------------------------------------------------------------
# the CPU allocator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() parameter numbers (malloc.h)


def keep_freed_memory(device="cpu"):
    """Let glibc's malloc keep the memory a training step frees, for the next step to reuse. PyTorch's CPU tensors
    come straight from malloc, and glibc serves large blocks (over 32 MB always) with fresh mmap()s and hands
    freed heap tops back to the kernel: each step's activations are then page-faulted and zeroed anew (README,
    Speed). With mmap and trimming off, they are not. Process-wide and not undone; the peak barely moves, the
    memory is just not returned between steps. Returns whether it applied: only for a CPU `device`, with glibc, and
    not with INNERCONTROL_PLAIN=1 or INNERCONTROL_KEEP_MEMORY=0."""
    if torch.device(device).type != "cpu" or os.environ.get("INNERCONTROL_PLAIN", "") not in ("", "0") \
            or os.environ.get("INNERCONTROL_KEEP_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False


# -----------------------------------------------------------------------------
# the switch

SWAPS = {nn.Conv2d: FastConv2d, nn.Linear: FastLinear, reward.StdConv2d: LeanStdConv2d, unet.Upsample: FastUpsample,
         unet.SpatialTransformer: TokenSpatialTransformer, unet.Attention: FastAttention, unet.GEGLU: LeanGEGLU,
         nn.GroupNorm: FastGroupNorm, reward.GroupNormAct: FastBitGroupNormAct, model.ResnetBlock: LeanResnetBlock,
         model.AttnBlock: TokenAttnBlock, model.Encoder: ChannelsLastEncoder, unet.UNet: GraphedUNet,
         controlnet.ControlNet: GraphedControlNet}


def norm_then_silu(m):
    """nn.Sequential(GroupNorm, SiLU, ...), the norm with its affine parameters."""
    return type(m) is nn.Sequential and len(m) >= 2 and type(m[0]) is nn.GroupNorm and m[0].affine \
        and type(m[1]) is nn.SiLU


def install(*modules):
    """Swap the faster layers into `modules` (None entries are skipped), in place; returns the first module.
    Parameters, buffers and state_dict keys stay as they are. INNERCONTROL_PLAIN=1 leaves the plain layers."""
    if os.environ.get("INNERCONTROL_PLAIN", "") not in ("", "0"):
        return modules[0] if modules else None
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            if isinstance(m, controlnet.ControlNet) and type(m.input_hint_block) is nn.Sequential:
                m.input_hint_block.__class__ = ChannelsLastSequential
            if norm_then_silu(m):
                m.__class__ = NormActSequential
            if type(m) in SWAPS:
                m.__class__ = SWAPS[type(m)]
    return modules[0] if modules else None
