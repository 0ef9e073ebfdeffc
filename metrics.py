"""The metrics of the evaluation protocol (ControlNet++'s eval/ scripts, which InnerControl reuses), written out
in plain PyTorch so that scoring needs none of the tools that define them.

- 8-bit RMSE for depth, and single-scale SSIM for edge maps too small for MS-SSIM (the shapes world).

- MS-SSIM for HED and LineArt: multi-scale SSIM (Wang, Simoncelli & Bovik 2003) computed the way
  torchmetrics' MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0) computes it with its
  defaults, on [0, 1] maps.
- FID (Heusel et al. 2017): the 2048-d pool3 features of the Inception-v3 graph TensorFlow published on
  2015-12-05, in the PyTorch layout of pytorch-fid's "FID Inception" (tensor names of the weights file
  pt_inception-2015-12-05-6726825d.pth), fed the way clean-fid's default "clean" mode feeds it; the
  Frechet distance of two feature sets; the protocol's mean over the 4 generated image groups.
- CLIP score (Hessel et al. 2021) as torchmetrics' CLIPScore computes it with
  openai/clip-vit-base-patch16: the CLIP ViT vision tower (Radford et al. 2021) under the tensor names
  of transformers' CLIPModel files, the text tower of model.py, and the image and text preprocessing
  that CLIPScore applies through transformers' CLIPProcessor.

The reference tools (torchmetrics, clean-fid, pytorch-fid, torch-fidelity, transformers) are used only
by the tests, which check this file against them with shared random weights.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import model

# -----------------------------------------------------------------------------
# 8-bit maps: RMSE (depth) and single-scale SSIM


def to_8bit(x01):
    """Maps in [0, 1] as the 8-bit levels upstream's evaluation saves them: x * 255, truncated (torchvision's
    to_pil_image on a float map), as floats."""
    return (x01.float().clamp(0, 1) * 255).floor()


def rmse_8bit(pred01, label01):
    """Per-image RMSE between two maps quantised to 8 bits (B, 1, H, W) -> (B,); the prediction is first resized
    (bilinear) to the label's size."""
    if pred01.shape[-2:] != label01.shape[-2:]:
        pred01 = F.interpolate(pred01.float(), size=label01.shape[-2:], mode="bilinear", align_corners=False)
    return (to_8bit(pred01) - to_8bit(label01)).pow(2).flatten(1).mean(1).sqrt()


def ssim(a01, b01, window=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5, 8-bit dynamic range, "valid" windows as
    scikit-image's default) of maps (B, 1, H, W) in [0, 1] -> (B,): for maps too small for MS-SSIM's 5 scales."""
    a, b = to_8bit(a01), to_8bit(b01)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = ((g / g.sum())[:, None] * (g / g.sum())[None, :])[None, None]
    blur = lambda z: F.conv2d(z, kernel)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


# -----------------------------------------------------------------------------
# MS-SSIM

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # the 5 scale weights of Wang et al. 2003
MS_SSIM_MIN_SIZE = 176  # torchmetrics' limit: side // 16 (the 5th scale) must exceed the 11-tap window minus 1


def gaussian_window(sigma=1.5, dtype=torch.float32, device=None):
    """Normalised 1-d Gaussian of 2 * int(3.5 sigma + 0.5) + 1 taps (torchmetrics' size rule: 11 for 1.5)."""
    r = int(3.5 * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _ssim_and_contrast(a, b, g, c1, c2):
    """Per-image (SSIM, contrast-structure term) at one scale, with torchmetrics' border handling."""
    C, r = a.shape[1], g.numel() // 2
    kernel = (g[:, None] * g[None, :]).expand(C, 1, -1, -1)
    # the five local moments in one depthwise convolution; reflect padding keeps the map at full size
    moments = F.pad(torch.cat([a, b, a * a, b * b, a * b]), (r, r, r, r), mode="reflect")
    mu_a, mu_b, aa, bb, ab = F.conv2d(moments, kernel, groups=C).chunk(5)
    var_a = (aa - mu_a ** 2).clamp_min(0)  # rounding can make E[x^2] - E[x]^2 slightly negative
    var_b = (bb - mu_b ** 2).clamp_min(0)
    cov = ab - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    ssim = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * cs
    # torchmetrics averages SSIM over every pixel (border windows see reflected pixels) but the contrast
    # term only over windows lying inside the image; kept so that the numbers agree
    return ssim.flatten(1).mean(1), cs[..., r:-r, r:-r].flatten(1).mean(1)


def ms_ssim(a01, b01, betas=MS_SSIM_BETAS, sigma=1.5, k1=0.01, k2=0.03):
    """Per-image multi-scale SSIM of maps (B, C, H, W) in [0, 1] -> (B,), higher is better (1 = identical).

    Equal to torchmetrics' MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0) with its defaults
    (to float rounding): Gaussian window of 11 taps with sigma 1.5, k1 = 0.01, k2 = 0.03 on a dynamic
    range of 1 (no clamping of the inputs), reflect-padded windows, the contrast-structure term at
    scales 1-4 and the full SSIM at scale 5, each clipped at 0 ("relu" normalisation), raised to the 5
    betas and multiplied; 2x2 average pooling (odd sides rounded down) between scales. Channels are
    averaged together with the pixels. torchmetrics' metric object returns the mean of these values.

    H and W must both be at least 176 (MS_SSIM_MIN_SIZE): torchmetrics refuses smaller images.
    """
    if a01.shape != b01.shape or a01.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) maps of one shape, got {tuple(a01.shape)} and {tuple(b01.shape)}")
    H, W = a01.shape[-2:]
    n = len(betas)
    # torchmetrics' rule: side // (n - 1)^2 must exceed taps - 1, i.e. side >= taps * 16 = 176 for 5 scales
    need = max((2 * int(3.5 * sigma + 0.5) + 1) * max(1, n - 1) ** 2, 2 ** n)
    if min(H, W) < need:
        raise ValueError(f"MS-SSIM with {n} scales needs maps of at least {need} pixels a side, got {H}x{W}")
    dtype = torch.promote_types(a01.dtype, torch.float32)
    a, b = a01.to(dtype), b01.to(dtype)
    g = gaussian_window(sigma, dtype, a.device)
    c1, c2 = k1 ** 2, k2 ** 2  # (k * data_range)^2 with data_range 1
    terms = []
    for i in range(n):
        ssim, cs = _ssim_and_contrast(a, b, g, c1, c2)
        terms.append(ssim if i == n - 1 else cs)
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    # a negative term to a fractional power is undefined: torchmetrics' default clips them to 0 first
    terms = torch.stack(terms).clamp_min(0)
    return (terms ** torch.tensor(betas, dtype=dtype, device=terms.device)[:, None]).prod(0)

# -----------------------------------------------------------------------------
# FID: the 2015-12-05 TensorFlow Inception-v3 in pytorch-fid's layout


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm with the tensors of nn.BatchNorm2d (minus num_batches_tracked, which
    only training reads). TensorFlow's Inception used eps 1e-3."""

    def __init__(self, c, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU: every convolution of Inception-v3."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = FrozenBatchNorm(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


# pooling steps of the branches. TensorFlow's average pool divides by the number of real (unpadded)
# pixels, hence count_include_pad=False; the last block of this graph max-pools where the paper says avg.
POOLS = {
    "avg3": lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
    "max3": lambda x: F.max_pool2d(x, 3, 1, 1),
    "max3s2": lambda x: F.max_pool2d(x, 3, 2),
}


class Mixed(nn.Module):
    """One Inception block: parallel branches whose outputs are concatenated along channels.

    convs: {name: (c_in, c_out, kernel, stride, padding)}, the block's convolutions under their file names.
    branches: each a sequence of steps, a step being a conv name, a POOLS key, or a tuple of conv names
    applied side by side to the same input and concatenated (the 1x3 / 3x1 pairs of the last blocks).
    """

    def __init__(self, convs, branches):
        super().__init__()
        for name, args in convs.items():
            self.add_module(name, ConvBN(*args))
        self.branches = branches

    def forward(self, x):
        outs = []
        for branch in self.branches:
            y = x
            for step in branch:
                if isinstance(step, tuple):
                    y = torch.cat([self.get_submodule(s)(y) for s in step], 1)
                elif step in POOLS:
                    y = POOLS[step](y)
                else:
                    y = self.get_submodule(step)(y)
            outs.append(y)
        return torch.cat(outs, 1)


def mixed_35(c_in, c_pool):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    return Mixed(dict(branch1x1=(c_in, 64, 1), branch5x5_1=(c_in, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                      branch3x3dbl_1=(c_in, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                      branch_pool=(c_in, c_pool, 1)),
                 [("branch1x1",), ("branch5x5_1", "branch5x5_2"),
                  ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), ("avg3", "branch_pool")])


def reduce_35_to_17(c_in):
    """Mixed_6a: stride-2 3x3 | 1x1-3x3-3x3(stride 2) | maxpool(stride 2)."""
    return Mixed(dict(branch3x3=(c_in, 384, 3, 2), branch3x3dbl_1=(c_in, 64, 1),
                      branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 2)),
                 [("branch3x3",), ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), ("max3s2",)])


def mixed_17(c7):
    """17x17 block (Mixed_6b..e): factorised 7x7 convolutions as 1x7 and 7x1 pairs."""
    h, v = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return Mixed(dict(branch1x1=(768, 192, 1),
                      branch7x7_1=(768, c7, 1), branch7x7_2=(c7, c7, *h), branch7x7_3=(c7, 192, *v),
                      branch7x7dbl_1=(768, c7, 1), branch7x7dbl_2=(c7, c7, *v), branch7x7dbl_3=(c7, c7, *h),
                      branch7x7dbl_4=(c7, c7, *v), branch7x7dbl_5=(c7, 192, *h),
                      branch_pool=(768, 192, 1)),
                 [("branch1x1",), ("branch7x7_1", "branch7x7_2", "branch7x7_3"),
                  tuple(f"branch7x7dbl_{i}" for i in range(1, 6)), ("avg3", "branch_pool")])


def reduce_17_to_8():
    """Mixed_7a: 1x1-3x3(stride 2) | 1x1-1x7-7x1-3x3(stride 2) | maxpool(stride 2)."""
    return Mixed(dict(branch3x3_1=(768, 192, 1), branch3x3_2=(192, 320, 3, 2),
                      branch7x7x3_1=(768, 192, 1), branch7x7x3_2=(192, 192, (1, 7), 1, (0, 3)),
                      branch7x7x3_3=(192, 192, (7, 1), 1, (3, 0)), branch7x7x3_4=(192, 192, 3, 2)),
                 [("branch3x3_1", "branch3x3_2"), tuple(f"branch7x7x3_{i}" for i in range(1, 5)), ("max3s2",)])


def mixed_8(c_in, pool):
    """8x8 block (Mixed_7b with avgpool, Mixed_7c with maxpool): 3x3 convolutions split into 1x3 and 3x1
    halves applied side by side."""
    h, v = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
    return Mixed(dict(branch1x1=(c_in, 320, 1),
                      branch3x3_1=(c_in, 384, 1), branch3x3_2a=(384, 384, *h), branch3x3_2b=(384, 384, *v),
                      branch3x3dbl_1=(c_in, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                      branch3x3dbl_3a=(384, 384, *h), branch3x3dbl_3b=(384, 384, *v),
                      branch_pool=(c_in, 192, 1)),
                 [("branch1x1",), ("branch3x3_1", ("branch3x3_2a", "branch3x3_2b")),
                  ("branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")), (pool, "branch_pool")])


class FIDInception(nn.Module):
    """Inception-v3 as frozen in TensorFlow's 2015-12-05 graph, returning the 2048-d pool3 features.

    Tensor names are those of pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 names),
    so that file loads as it is. forward takes (B, 3, 299, 299) images with values in [0, 255] and
    maps them to (x - 128) / 128, the scaling inside TensorFlow's graph, which clean-fid's TorchScript
    copy of the graph applies too. (pytorch-fid instead feeds [0, 1] images as 2x - 1, i.e.
    (x - 127.5) / 127.5 on the 0-255 scale, after a bilinear resize.) `fc` (1008 ImageNet-2012 logits
    plus 8 unused) is kept only so the file loads strictly; FID does not use it.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, 2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, 1, 1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = mixed_35(192, 32), mixed_35(256, 64), mixed_35(288, 64)
        self.Mixed_6a = reduce_35_to_17(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (mixed_17(c) for c in (128, 160, 160, 192))
        self.Mixed_7a = reduce_17_to_8()
        self.Mixed_7b, self.Mixed_7c = mixed_8(1280, "avg3"), mixed_8(2048, "max3")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x255):
        x = (x255 - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))           # 147x147
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))           # 71x71
        x = F.max_pool2d(x, 3, 2)                                                    # 35x35
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                                    # -> 8x8x2048
        return x.mean((2, 3))                                                        # pool3


def to_uint8(image):
    """An image (C, H, W) -> 8-bit RGB numpy (3, H, W): uint8 as it is, [0, 1] floats rounded as saving a
    PNG would; one channel repeated three times, as PIL's convert("RGB") does in both references."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.cpu().numpy()
    return np.repeat(image, 3, 0) if image.shape[0] == 1 else image


def fid_resize(images, size=299):
    """clean-fid's "clean" preprocessing: (B, 3, H, W) uint8, or a list of (3, H, W) (or [0, 1] floats,
    rounded to 8 bits first) -> (B, 3, size, size) float32 in [0, 255].

    Each channel becomes a 32-bit float PIL image, is resized with PIL's bicubic filter (which
    antialiases when shrinking), and is clipped to [0, 255] without rounding back to 8 bits.
    """
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(map(to_uint8, images)):
        for c in range(3):
            resized = Image.fromarray(img[c].astype(np.float32)).resize((size, size), Image.BICUBIC)  # mode "F"
            out[i, c] = np.asarray(resized).clip(0, 255)
    return torch.from_numpy(out)


@torch.no_grad()
def inception_features(net, images, batch=64):
    """pool3 features (N, 2048), float32 on the CPU, of images (N, 3, H, W) uint8 or [0, 1] floats."""
    dev = next(net.parameters()).device
    return torch.cat([net(fid_resize(images[i:i + batch]).to(dev)).float().cpu()
                      for i in range(0, len(images), batch)])


def feature_stats(f):
    """Mean and covariance (unbiased, as numpy.cov) of features (N, D), in float64."""
    f = torch.as_tensor(f).double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64.

    tr (S1 S2)^1/2 is taken as the sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which has
    the same eigenvalues as S1 S2 and is symmetric, so eigh suffices and tiny negative eigenvalues from
    rounding (rank-deficient covariances, fewer samples than dimensions) clip to 0 instead of turning
    complex as scipy.linalg.sqrtm's do.
    """
    mu1, s1, mu2, s2 = (torch.as_tensor(t).double() for t in (mu1, s1, mu2, s2))

    def psd_sqrt(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r1 = psd_sqrt(s1)
    tr_cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_cross).item()


def fid(real_features, gen_features):
    """FID between two feature sets (N, D), (M, D)."""
    return frechet_distance(*feature_stats(real_features), *feature_stats(gen_features))


def fid_over_groups(real_features, gen_features, groups=4):
    """The protocol's FID: generated images come `groups` per condition, prompt-major (as
    sample.generate and eval.generate_images order them), and group g holds the g-th image of every
    condition; the FID of each group against the real images, averaged."""
    if len(gen_features) % groups:
        raise ValueError(f"{len(gen_features)} generated features do not split into {groups} groups")
    real = feature_stats(real_features)
    return sum(frechet_distance(*real, *feature_stats(gen_features[g::groups])) for g in range(groups)) / groups

# -----------------------------------------------------------------------------
# CLIP score: ViT vision tower + model.py's text tower, transformers' CLIPModel tensor names

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch: int = 16
    image_size: int = 224
    act: str = "quick_gelu"


@dataclass
class CLIPConfig:
    """openai/clip-vit-base-patch16 by default."""
    text: model.TextConfig = field(
        default_factory=lambda: model.TextConfig(width=512, layers=12, heads=8, mlp_dim=2048))
    vision: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    # the text embedding is read at the EOS token. Configs written before transformers PR #24773 carry
    # eos_token_id 2 (openai's among them), and transformers then takes the position of the largest
    # token id instead, which is the first EOS whenever the prompt was not cut (EOS has the largest id)
    eos_token_id: int = 49407


class VisionAttention(model.CLIPAttention):
    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no causal mask here
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class VisionLayer(model.CLIPLayer):
    """The text tower's pre-LayerNorm layer with bidirectional attention."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.self_attn = VisionAttention(cfg.width, cfg.heads)


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, cfg.patch, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch) ** 2 + 1, cfg.width)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)                # (B, patches, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        return torch.cat([cls, x], 1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = PatchEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width)  # sic: the name in CLIP files
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.layers))))
        self.post_layernorm = nn.LayerNorm(cfg.width)

    def forward(self, pixels):
        """(B, 3, 224, 224) normalised pixels -> (B, width): the class token after the last LayerNorm."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIP(model.TextEncoder):
    """CLIP image and text embeddings. A TextEncoder subclass so that the text tower's tensors sit at
    text_model.*, beside vision_model.*, visual_projection and text_projection: the names of
    transformers' CLIPModel files, so state dicts map one to one (logit_scale, which scores do not use,
    and old files' position_ids buffers are dropped by load_clip)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__(cfg.text)
        self.clip_cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)

    def encode_image(self, pixels):
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, ids):
        hidden = super().forward(ids)
        if self.clip_cfg.eos_token_id == 2:
            pos = ids.argmax(-1)  # the legacy rule (see CLIPConfig); argmax takes the first maximum
        else:
            pos = (ids == self.clip_cfg.eos_token_id).int().argmax(-1)  # first EOS (0 if none)
        return self.text_projection(hidden[torch.arange(len(ids), device=ids.device), pos])

    def forward(self, pixels, ids):
        return self.encode_image(pixels), self.encode_text(ids)


def clip_preprocess(images, size=224):
    """CLIPScore's image preprocessing (transformers' PIL-based CLIPImageProcessor): (B, 3, H, W) uint8,
    or a list of (3, H, W) (or [0, 1] floats, rounded to 8 bits) -> (B, 3, size, size) float32.

    The shorter side is resized to `size` and the longer to int(size * long / short) (truncated) with
    PIL's bicubic filter on the 8-bit RGB image; the centre crop starts at (side - size) // 2; then
    x / 255 (in float64, then float32) and the OpenAI mean and std per channel.
    """
    mean = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
    out = []
    for img in map(to_uint8, images):
        h, w = img.shape[1:]
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        nh, nw = (new_long, size) if w <= h else (size, new_long)
        x = np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((nw, nh), Image.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[top:top + size, left:left + size].transpose(2, 0, 1)
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((x - mean) / std)
    return torch.from_numpy(np.stack(out))


def clip_text_ids(tokenizer, texts, max_len=77):
    """CLIPScore's text ids: BOS + tokens + EOS, cut to the first max_len tokens (for a long caption
    the cut drops EOS: torchmetrics truncates the processor's untruncated ids this way), padded with
    the tokenizer's pad id (EOS for CLIP), which the causal text tower never lets earlier tokens see."""
    out = torch.full((len(texts), max_len), tokenizer.pad_id, dtype=torch.long)
    for i, enc in enumerate(tokenizer.tok.encode_batch(list(texts))):
        ids = enc.ids[:max_len]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


@torch.no_grad()
def clip_cosines(clip, images, texts, tokenizer=None, batch=64):
    """Cosine similarity (B,) of the CLIP embeddings of images (B, 3, H, W) or a list of (3, H, W)
    (uint8, or [0, 1] floats rounded to 8 bits) and their captions."""
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) != len(images):
        raise ValueError(f"{len(images)} images but {len(texts)} captions")
    tokenizer = tokenizer or getattr(clip, "tokenizer", None) or model.Tokenizer.from_bpe_gz()
    p = next(clip.parameters())
    cos = []
    for i in range(0, len(images), batch):
        pixels = clip_preprocess(images[i:i + batch], clip.clip_cfg.vision.image_size).to(p.device, p.dtype)
        ids = clip_text_ids(tokenizer, texts[i:i + batch], clip.clip_cfg.text.max_len).to(p.device)
        e_img, e_txt = (F.normalize(e.float(), dim=-1) for e in clip(pixels, ids))
        cos.append((e_img * e_txt).sum(-1).cpu())
    return torch.cat(cos)


def clip_score(clip, images, texts, tokenizer=None, batch=64):
    """CLIP score of images and their captions -> (per_image, mean).

    per_image = 100 * max(cos(E_image, E_text), 0), shape (B,); mean = max(mean of 100 * cos, 0), which
    is what torchmetrics' CLIPScore.compute() returns (ControlNet++ prints the same mean without the
    outer max). The clippings matter only when cosines are negative, which real CLIP embeddings of an
    image and its caption essentially never are.
    """
    scores = 100 * clip_cosines(clip, images, texts, tokenizer, batch)
    return scores.clamp_min(0), scores.mean().clamp_min(0).item()
