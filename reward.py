"""The reward models: the networks that read a control map (depth, soft edges, line art) off an image.

ControlNet++ (arXiv 2404.07987) scores a generated image by running a frozen "reward model" on it and comparing
the result with the input control; InnerControl (arXiv 2507.02321) keeps that loss and compares the probe's output
with the same label. This file holds, in plain PyTorch:

- DPT (Ranftl et al. 2021, "Vision Transformers for Dense Prediction") for depth: the hybrid MiDaS variant
  (BiT ResNet stages + ViT-B/16, the reward model) and DPT-Large (ViT-L/16, the evaluation model). Module names
  equal the Hugging Face transformers DPTForDepthEstimation state-dict keys, so Intel/dpt-hybrid-midas and
  Intel/dpt-large load as published with no key mapping; the architecture is built from their config.json.
- HED soft edges: the "ControlNetHED_Apache2" annotator of ControlNet v1.1 (ControlNetHED.pth).
- LineArt: the "LineDrawingModel" annotator of ControlNet v1.1 (sk_model.pth), a small ResNet generator.
The annotators take images in [0, 1] (B, 3, H, W) and return maps (B, 1, H, W) in [0, 1] at the input size;
labels.reward_prediction gives DPT the same contract (it resizes, normalises and rescales around the raw network).
What each loss compares, in which space, is labels.py's.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # transformers' hidden_act names (exact, erf-based GELU)


# ----------------------------------------------------------------------------------------------------------------------
# DPT: configuration (a subset of transformers' DPTConfig / BitConfig fields, read from config.json)

@dataclass
class BitConfig:
    """BiT ResNet backbone of DPT-Hybrid (Kolesnikov et al. 2020). Defaults are transformers' BitConfig defaults."""
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple = (256, 512, 1024, 2048)
    depths: tuple = (3, 4, 6, 3)
    layer_type: str = "preactivation"
    hidden_act: str = "relu"
    global_padding: str = None          # None (symmetric), "SAME" (TensorFlow style) or "VALID"
    num_groups: int = 32
    embedding_dynamic_padding: bool = False
    output_stride: int = 32
    width_factor: int = 1
    out_features: tuple = None          # e.g. ("stage1", "stage2", "stage3")
    out_indices: tuple = None


# What DPTConfig fills in when a hybrid config.json carries no backbone_config.
HYBRID_BIT_DEFAULTS = dict(global_padding="SAME", layer_type="bottleneck", depths=(3, 4, 9),
                           out_features=("stage1", "stage2", "stage3"), embedding_dynamic_padding=True)


@dataclass
class DPTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    is_hybrid: bool = False
    qkv_bias: bool = True
    backbone_out_indices: tuple = (2, 5, 8, 11)
    readout_type: str = "project"       # how the [CLS] token reaches the patch tokens: "ignore", "add", "project"
    reassemble_factors: tuple = (4, 2, 1, 0.5)
    neck_hidden_sizes: tuple = (96, 192, 384, 768)
    fusion_hidden_size: int = 256
    head_in_index: int = -1
    use_batch_norm_in_fusion_residual: bool = False
    use_bias_in_fusion_residual: bool = None
    add_projection: bool = False
    neck_ignore_stages: tuple = (0, 1)  # hybrid only: the two BiT maps skip the reassemble step
    backbone: BitConfig = None

    @classmethod
    def from_dict(cls, d):
        """From a transformers config.json dict; unknown keys are ignored."""
        names = {f.name for f in fields(cls)} - {"backbone"}
        cfg = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names and v is not None})
        if cfg.is_hybrid:
            b = d.get("backbone_config")
            b = HYBRID_BIT_DEFAULTS if b is None else b
            bit_names = {f.name for f in fields(BitConfig)}
            cfg.backbone = BitConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                        for k, v in b.items() if k in bit_names and v is not None})
            if cfg.backbone.global_padding is not None:
                cfg.backbone.global_padding = cfg.backbone.global_padding.upper()
        else:
            cfg.neck_ignore_stages = ()  # as in transformers: only the hybrid skips stages
        if cfg.add_projection or cfg.use_batch_norm_in_fusion_residual:
            raise NotImplementedError("DPT configs with add_projection or batch norm in the fusion blocks "
                                      "(not used by Intel/dpt-hybrid-midas or Intel/dpt-large)")
        if cfg.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"DPT hidden_act {cfg.hidden_act!r}")
        return cfg


# ----------------------------------------------------------------------------------------------------------------------
# DPT-Hybrid's BiT backbone: a ResNet-50-like stack of 3 stages where every conv is weight-standardised
# and every norm is a GroupNorm (BiT's recipe for transfer with small per-device batches).

def make_div(v, divisor=8):
    """Channel counts rounded to a multiple of 8, never more than 10% below v (BiT / timm convention)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def pad_same(x, k, s):
    """TensorFlow 'SAME' padding: the output is ceil(input / stride); the odd pixel goes to the bottom/right."""
    ph = max((math.ceil(x.shape[-2] / s) - 1) * s + k - x.shape[-2], 0)
    pw = max((math.ceil(x.shape[-1] / s) - 1) * s + k - x.shape[-1], 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) if ph or pw else x


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019): each filter is shifted and scaled to zero mean and
    unit variance before use. Computed in fp32 so the tiny eps survives bf16/fp16 weights."""

    def __init__(self, cin, cout, k, stride=1, padding=None, eps=1e-8):
        same = padding == "SAME" and (stride > 1 or k % 2 == 0)  # padding depends on the input size
        super().__init__(cin, cout, k, stride, 0 if (padding == "VALID" or same) else (stride - 1 + k - 1) // 2,
                         bias=False)
        self.same, self.eps = same, eps

    def forward(self, x):
        if self.same:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) * torch.rsqrt(var + self.eps)
        return self._conv_forward(x, w.to(self.weight.dtype), None)


class GroupNormAct(nn.GroupNorm):
    def __init__(self, groups, channels, act=True):
        super().__init__(groups, channels, eps=1e-5)
        self.act = act

    def forward(self, x):
        x = super().forward(x)
        return F.relu(x) if self.act else x


class BitBottleneck(nn.Module):
    """Non-pre-activation bottleneck (ResNet v1.5: the stride sits on the 3x3 conv); the first of a stage has a
    projection shortcut."""

    def __init__(self, c: BitConfig, cin, cout, stride, first):
        super().__init__()
        mid, pad, g = make_div(cout * 0.25), c.global_padding, c.num_groups
        self.downsample = nn.ModuleDict(dict(conv=StdConv2d(cin, cout, 1, stride, pad),
                                             norm=GroupNormAct(g, cout, act=False))) if first else None
        self.conv1, self.norm1 = StdConv2d(cin, mid, 1, 1, pad), GroupNormAct(g, mid)
        self.conv2, self.norm2 = StdConv2d(mid, mid, 3, stride, pad), GroupNormAct(g, mid)
        self.conv3, self.norm3 = StdConv2d(mid, cout, 1, 1, pad), GroupNormAct(g, cout, act=False)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample.norm(self.downsample.conv(x))
        h = self.norm1(self.conv1(x))
        h = self.norm2(self.conv2(h))
        h = self.norm3(self.conv3(h))
        return F.relu(h + shortcut)


class BiT(nn.Module):
    """Stem (7x7/2 conv, GroupNorm, 3x3/2 max-pool) and bottleneck stages; returns the selected stages' outputs."""

    def __init__(self, c: BitConfig):
        super().__init__()
        if c.layer_type != "bottleneck" or c.hidden_act != "relu":
            raise NotImplementedError(f"BiT layer_type={c.layer_type!r}, hidden_act={c.hidden_act!r}")
        self.cfg = c
        self.embedder = nn.ModuleDict(dict(
            convolution=StdConv2d(c.num_channels, c.embedding_size, 7, 2, c.global_padding),
            norm=GroupNormAct(c.num_groups, c.embedding_size)))
        stages, cin, stride_so_far = [], c.embedding_size, 4
        for i, (depth, width) in enumerate(zip(c.depths, c.hidden_sizes)):
            cout, stride = make_div(width * c.width_factor), 1 if i == 0 else 2
            if stride_so_far >= c.output_stride:
                raise NotImplementedError("dilated BiT stages (output_stride reached)")
            stride_so_far *= stride
            blocks = [BitBottleneck(c, cin if j == 0 else cout, cout, stride if j == 0 else 1, first=j == 0)
                      for j in range(depth)]
            stages.append(nn.ModuleDict(dict(layers=nn.Sequential(*blocks))))
            cin = cout
        self.encoder = nn.ModuleDict(dict(stages=nn.ModuleList(stages)))
        names = [f"stage{i + 1}" for i in range(len(stages))]
        if c.out_features is not None:
            self.out = [names.index(n) for n in c.out_features]
        elif c.out_indices is not None:
            self.out = [i - 1 for i in c.out_indices]  # index 0 is the stem
        else:
            self.out = list(range(len(stages)))
        self.channels = [make_div(c.hidden_sizes[i] * c.width_factor) for i in self.out]

    def forward(self, x):
        c = self.cfg
        x = self.embedder.convolution(x)
        if c.global_padding != "SAME":
            x = F.pad(x, (1, 1, 1, 1))
        x = self.embedder.norm(x)
        if c.embedding_dynamic_padding:
            x = pad_same(x, 3, 2)  # zero padding is harmless: the input is post-ReLU, so >= 0
        x = F.max_pool2d(x, 3, 2)
        outs = []
        for i, stage in enumerate(self.encoder.stages[:max(self.out) + 1]):
            x = stage.layers(x)
            if i in self.out:
                outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------------------------------------
# DPT: ViT encoder, reassemble + fusion neck, depth head

def resize_positions(pos, h, w):
    """Learned position embeddings of a square training grid, bilinearly resized to an h x w token grid
    (DPT sec. 3: this is what lets the model run at any resolution). The [CLS] position is kept as is."""
    grid = pos[:, 1:]
    n = int(math.sqrt(grid.shape[1]))
    if (n, n) == (h, w):
        return pos
    grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class ViTEmbeddings(nn.Module):
    """Tokens from 16x16 patches (DPT-Large) or from BiT stage-3 features (DPT-Hybrid), plus [CLS] and positions.
    The hybrid also hands its first two BiT stages to the neck as the two high-resolution maps."""

    def __init__(self, c: DPTConfig):
        super().__init__()
        size = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
        patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, c.hidden_size))
        if c.is_hybrid:
            self.backbone = nn.ModuleDict(dict(bit=BiT(c.backbone)))
            if len(self.backbone.bit.out) != 3:
                raise ValueError("DPT-Hybrid expects 3 BiT output stages")
            self.projection = nn.Conv2d(self.backbone.bit.channels[-1], c.hidden_size, 1)
        else:
            self.patch_embeddings = nn.ModuleDict(dict(
                projection=nn.Conv2d(c.num_channels, c.hidden_size, patch, stride=patch)))

    def forward(self, x):
        if hasattr(self, "backbone"):
            *maps, last = self.backbone.bit(x)
            grid = self.projection(last)
        else:
            grid, maps = self.patch_embeddings.projection(x), []
        B, _, h, w = grid.shape
        tokens = torch.cat([self.cls_token.expand(B, -1, -1).to(grid.dtype), grid.flatten(2).transpose(1, 2)], dim=1)
        return tokens + resize_positions(self.position_embeddings, h, w).to(grid.dtype), (h, w), maps


class SelfAttention(nn.Module):
    def __init__(self, c: DPTConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.attention = nn.ModuleDict({n: nn.Linear(d, d, bias=c.qkv_bias) for n in ("query", "key", "value")})
        self.output = nn.ModuleDict(dict(dense=nn.Linear(d, d)))

    def forward(self, x):
        B, N, D = x.shape
        a = self.attention
        # one matmul for q, k and v; the state dict keeps the three separate projections
        w = torch.cat([a.query.weight, a.key.weight, a.value.weight])
        b = torch.cat([a.query.bias, a.key.bias, a.value.bias]) if a.query.bias is not None else None
        q, k, v = F.linear(x, w, b).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.output.dense(y.transpose(1, 2).reshape(B, N, D))


class ViTLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, c: DPTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = SelfAttention(c)
        self.layernorm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(c.hidden_size, c.intermediate_size)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(c.intermediate_size, c.hidden_size)))
        self.act = ACTIVATIONS[c.hidden_act]()

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class ViT(nn.Module):
    def __init__(self, c: DPTConfig):
        super().__init__()
        self.embeddings = ViTEmbeddings(c)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(ViTLayer(c) for _ in range(c.num_hidden_layers))))
        # part of the published weights, but depth estimation reads the layers' outputs before this norm
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        # the hybrid's first two taps are BiT maps, so only the last two indices pick transformer layers
        self.taps = sorted(set(c.backbone_out_indices[2:] if c.is_hybrid else c.backbone_out_indices))

    def forward(self, x):
        x, grid, features = self.embeddings(x)
        for i, layer in enumerate(self.encoder.layer[:self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                features.append(x)
        return features, grid


class ReassembleLayer(nn.Module):
    """Tokens-as-image -> 1x1 projection -> resample by `factor` (transposed conv up, strided conv down)."""

    def __init__(self, d, channels, factor):
        super().__init__()
        self.projection = nn.Conv2d(d, channels, 1)
        if factor > 1:
            self.resize = nn.ConvTranspose2d(channels, channels, int(factor), stride=int(factor))
        elif factor == 1:
            self.resize = nn.Identity()
        else:
            self.resize = nn.Conv2d(channels, channels, 3, stride=int(1 / factor), padding=1)

    def forward(self, x):
        return self.resize(self.projection(x))


class Reassemble(nn.Module):
    """DPT sec. 3 "Reassemble": drop or merge the readout ([CLS]) token, fold tokens into an image, resample."""

    def __init__(self, c: DPTConfig):
        super().__init__()
        self.readout, self.skip = c.readout_type, set(c.neck_ignore_stages)
        n, d = len(c.neck_hidden_sizes), c.hidden_size
        self.layers = nn.ModuleList(
            nn.Identity() if i in self.skip else ReassembleLayer(d, c.neck_hidden_sizes[i], c.reassemble_factors[i])
            for i in range(n))
        if self.readout == "project":  # concatenate [CLS] to every token, project back to d (DPT eq. 2)
            self.readout_projects = nn.ModuleList(nn.Sequential(nn.Identity()) if i in self.skip else
                                                  nn.Sequential(nn.Linear(2 * d, d), ACTIVATIONS[c.hidden_act]())
                                                  for i in range(n))

    def forward(self, features, grid):
        out = []
        for i, x in enumerate(features):
            if i in self.skip:  # already an image (a BiT stage)
                out.append(x)
                continue
            cls, x = x[:, :1], x[:, 1:]
            if self.readout == "project":
                x = self.readout_projects[i](torch.cat([x, cls.expand_as(x)], dim=-1))
            elif self.readout == "add":
                x = x + cls
            out.append(self.layers[i](x.transpose(1, 2).reshape(x.shape[0], -1, *grid)))
        return out


class PreActResidual(nn.Module):
    def __init__(self, c: DPTConfig):
        super().__init__()
        f, bias = c.fusion_hidden_size, c.use_bias_in_fusion_residual is not False
        self.convolution1 = nn.Conv2d(f, f, 3, padding=1, bias=bias)
        self.convolution2 = nn.Conv2d(f, f, 3, padding=1, bias=bias)

    def forward(self, x):
        return x + self.convolution2(F.relu(self.convolution1(F.relu(x))))


class FusionLayer(nn.Module):
    """DPT sec. 3 "Fusion": add the (refined) finer map, refine, upsample x2, 1x1 projection."""

    def __init__(self, c: DPTConfig):
        super().__init__()
        self.projection = nn.Conv2d(c.fusion_hidden_size, c.fusion_hidden_size, 1)
        self.residual_layer1 = PreActResidual(c)
        self.residual_layer2 = PreActResidual(c)

    def forward(self, x, skip=None):
        if skip is not None:
            if skip.shape != x.shape:  # odd input sizes: sizes along the pyramid need not halve exactly
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.residual_layer1(skip)
        x = self.residual_layer2(x)
        return self.projection(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class Neck(nn.Module):
    def __init__(self, c: DPTConfig):
        super().__init__()
        self.reassemble_stage = Reassemble(c)
        self.convs = nn.ModuleList(nn.Conv2d(ch, c.fusion_hidden_size, 3, padding=1, bias=False)
                                   for ch in c.neck_hidden_sizes)
        self.fusion_stage = nn.ModuleDict(dict(layers=nn.ModuleList(FusionLayer(c) for _ in c.neck_hidden_sizes)))

    def forward(self, features, grid):
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble_stage(features, grid))]
        fused, x = [], None
        for layer, m in zip(self.fusion_stage.layers, maps[::-1]):  # coarsest first
            x = layer(m) if x is None else layer(x, m)
            fused.append(x)
        return fused


class DPT(nn.Module):
    """DPT depth estimation. Input: an image normalised as the checkpoint expects (both Intel models: mean 0.5,
    std 0.5, i.e. [-1, 1]), any size. Output: relative inverse depth (B, 1, h, w), >= 0; h, w equal the input's at
    multiples of 32 (the fusion pyramid is driven by the coarsest map, so other sizes come out near, not equal)."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.config = cfg
        # the resolution the reward path resizes to: 384 for both Intel models (their config's
        # image_size, the size they were trained at and that ControlNet++ runs them at)
        self.input_size = cfg.image_size
        self.dpt = ViT(cfg)
        self.neck = Neck(cfg)
        f = cfg.fusion_hidden_size
        self.head = nn.ModuleDict(dict(head=nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 1), nn.ReLU())))

    def forward(self, x):
        features, grid = self.dpt(x)
        return self.head.head(self.neck(features, grid)[self.config.head_in_index])


# ----------------------------------------------------------------------------------------------------------------------
# Annotators of ControlNet v1.1

class HEDBlock(nn.Module):
    """n 3x3 conv + ReLU, and a 1x1 side output (the "projection") to one edge logit map."""

    def __init__(self, cin, cout, n):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HED(nn.Module):
    """ControlNetHED_Apache2: a VGG-16-like trunk (Xie & Tu 2015's holistically-nested edges) with a learned
    per-channel mean `norm` subtracted from the 0-255 RGB input; the 5 side outputs are upsampled to the input
    size, averaged and squashed. Image in [0, 1] (B, 3, H, W) -> soft edges in (0, 1), (B, 1, H, W).
    The output is not rounded to 8 bits as the annotator's image output is: rounding would cut the gradient
    that the reward loss sends back through this model."""

    widths, depths = (64, 128, 256, 512, 512), (2, 2, 3, 3, 3)

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        cin = 3
        for i, (w, n) in enumerate(zip(self.widths, self.depths)):
            setattr(self, f"block{i + 1}", HEDBlock(cin, w, n))
            cin = w

    def forward(self, image):
        size = image.shape[-2:]
        h = image * 255 - self.norm.to(image.dtype)
        logits = 0
        for i in range(5):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h, side = getattr(self, f"block{i + 1}")(h)
            logits = logits + F.interpolate(side, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits / 5)


class LineArtResidual(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(),
                                        nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x):
        return x + self.conv_block(x)


class LineArt(nn.Module):
    """LineDrawingModel (the generator of "Learning to generate line drawings", Chan et al. 2022, as shipped with
    ControlNet v1.1): a CycleGAN-style ResNet generator with InstanceNorm everywhere. Image in [0, 1]
    (B, 3, H, W) -> line drawing in (0, 1), (B, 1, H, W)."""

    def __init__(self, n_residual_blocks=3):
        super().__init__()
        IN = nn.InstanceNorm2d
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), IN(64), nn.ReLU())
        self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), IN(128), nn.ReLU(),
                                    nn.Conv2d(128, 256, 3, stride=2, padding=1), IN(256), nn.ReLU())
        self.model2 = nn.Sequential(*[LineArtResidual(256) for _ in range(n_residual_blocks)])
        up = lambda cin, cout: nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)  # exact x2
        self.model3 = nn.Sequential(up(256, 128), IN(128), nn.ReLU(), up(128, 64), IN(64), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, image):
        H, W = image.shape[-2:]
        # two stride-2 steps and two exact x2 steps: pad to a multiple of 4 so the output lines up with the input
        x = F.pad(image, (0, -W % 4, 0, -H % 4), mode="replicate") if (H % 4 or W % 4) else image
        for m in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = m(x)
        return x[..., :H, :W]
