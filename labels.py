"""What each loss compares, and in which space: the labels and normalisations shared by training and evaluation.

Read after probe.py. ControlNet++ (arXiv 2404.07987, sec. 3.2-3.3) and InnerControl (arXiv 2507.02321, eq. 6)
both compare a map read off the generation with a *label* made from the training pair:

  label            depth: the depth control map over its per-image max; hed / lineart: the annotator run on the
                   RGB image (as upstream trains and evaluates), so the ControlNet's input and the label agree
  control image    what the ControlNet sees: the depth map as given, the hed label, the inverted line art
  reward           the reward model on the decoded one-step estimate x0_hat, in the label's space
  probe            the probe's reading of the decoder features, brought into the label's space

Every map here is (B, 1, H, W) in [0, 1] unless said otherwise; the normalisations run in fp32.
"""
import torch
import torch.nn.functional as F

CONTROL_TYPES = ("depth", "hed", "lineart")

# Guards the per-image max / min-max divisions. A blank control map or a depth prediction that the DPT head's final
# ReLU zeroed everywhere has max 0, and x / 0 would put NaN into the whole batch's gradient. The normalisations run in
# fp32, where 1e-6 is far below any real map's max (controls are 8-bit images: their smallest nonzero max is 1/255),
# so it never changes a normal map and turns an empty one into zeros.
EPS = 1e-6


def resize(x, size):
    """Bilinear resize, antialiased when shrinking (as torchvision's tensor resize that upstream uses). The
    antialiased kernel has no bf16 CPU implementation, so it runs in fp32 and casts back."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)


def _per_image(x, reduce):
    return reduce(x.flatten(1), dim=1).view(-1, *[1] * (x.ndim - 1))


def normalize_per_image_max(x):
    """x / max(x) per sample, in fp32: depth maps are relative, so only their shape is compared."""
    x = x.float()
    return x / _per_image(x, torch.amax).clamp_min(EPS)


def normalize_per_image_minmax(x):
    """(x - min) / (max - min) per sample, in fp32."""
    x = x.float()
    lo = _per_image(x, torch.amin)
    return (x - lo) / (_per_image(x, torch.amax) - lo).clamp_min(EPS)


def depth_label(control):
    """Depth control map (B, 3, H, W) in [0, 1] -> label (B, 1, H, W): RGB mean over its per-image max."""
    return normalize_per_image_max(control.float().mean(1, keepdim=True))


def depth_reward_prediction(dpt, image):
    """Image in [0, 1] -> depth at the image's size over its per-image max, (B, 1, H, W) in [0, 1].
    ControlNet++: resize to the model's input size (384x384 for DPT; a model whose `input_size` is None runs at
    the image's own size), normalise with mean 0.5 / std 0.5, resize the prediction back bilinearly."""
    size = getattr(dpt, "input_size", 384)
    depth = dpt((image if size is None else resize(image, (size, size))) * 2 - 1)
    return normalize_per_image_max(resize(depth.float(), image.shape[-2:]))


def reward_prediction(control_type, model, image):
    """The reward model's output on a (decoded) image in [0, 1], in label space: (B, 1, H, W) in [0, 1].
    Differentiable for every control: upstream's HED detector casts its output to uint8, so upstream's HED reward
    loss passes no gradient at all; here it does (this project's choice, README)."""
    if control_type == "depth":
        return depth_reward_prediction(model, image)
    if control_type in ("hed", "lineart"):
        return model(image).float()
    raise ValueError(f"unknown control type {control_type!r}, expected one of {CONTROL_TYPES}")


@torch.no_grad()
def make_label(control_type, annotator, image01=None, control=None):
    """The reward / alignment target (B, 1, H, W) in [0, 1]. depth: the depth control map's. hed / lineart: the
    annotator run on the RGB image (image01 in [0, 1]), as upstream trains and evaluates, so that the ControlNet's
    input, the reward model's output and the label are one kind of map (ControlNet++ sec. 3.3); or, given
    `control`, an annotator output stored in the dataset (RGB mean)."""
    if control_type == "depth":
        return depth_label(control)
    if control is not None:
        return control.float().mean(1, keepdim=True)
    return reward_prediction(control_type, annotator, image01)


def control_image(control_type, label, control=None):
    """What the ControlNet sees (B, 3, H, W): the depth map as given; for hed the label itself; for lineart
    1 - label (ControlNet v1.1 lineart is conditioned on the inverted drawing)."""
    if control_type == "depth":
        return control
    if control_type == "hed":
        return label.expand(-1, 3, -1, -1)
    if control_type == "lineart":
        return (1 - label).expand(-1, 3, -1, -1)
    raise ValueError(f"unknown control type {control_type!r}, expected one of {CONTROL_TYPES}")


def probe_to_label_space(p, control_type, size=None):
    """Probe output p (B, C, h, w) in [0, 1] -> the label's space for the alignment loss (InnerControl):
    depth: channel mean over its per-image max; hed: as is; lineart: channel mean, min-max per image, inverted
    (the probe learns the ControlNet input, 1 - label). With `size`, p is first resized bilinearly to it."""
    p = p.float() if size is None else resize(p.float(), size)
    if control_type == "depth":
        return normalize_per_image_max(p.mean(1, keepdim=True))
    if control_type == "hed":
        return p
    if control_type == "lineart":
        return 1 - normalize_per_image_minmax(p.mean(1, keepdim=True))
    raise ValueError(f"unknown control type {control_type!r}, expected one of {CONTROL_TYPES}")
