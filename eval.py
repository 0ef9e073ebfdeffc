"""Controllability evaluation (ControlNet++ sec. 4.1; InnerControl sec. 4): generate from held-out
conditions and prompts, re-extract the control from the generated images, compare with the input.

    python eval.py --control depth --weights v1-5-pruned.safetensors --controlnet runs/depth/controlnet.safetensors \
        --data multigen_val/ --evaluator dpt-large/ --num 500 --images-per-cond 4

depth: an evaluator depth model (DPT-Large upstream) on the generated image vs the input map, both
as 8-bit grayscale, per-pixel RMSE (lower is better). hed / lineart: SSIM between the re-extracted
edges and the input's (higher is better). Generation uses sample.generate: 20 steps, guidance 7.5.
"""
import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import formats
import fused
import reward
import sample


def to_8bit(x01):
    return (x01.float().clamp(0, 1) * 255).round()


def rmse_8bit(pred01, label01):
    """Per-image RMSE between two maps quantised to 8-bit grayscale (B, 1, H, W) -> (B,)."""
    if pred01.shape[-2:] != label01.shape[-2:]:
        pred01 = F.interpolate(pred01.float(), size=label01.shape[-2:], mode="bilinear", align_corners=False)
    return (to_8bit(pred01) - to_8bit(label01)).pow(2).flatten(1).mean(1).sqrt()


def ssim(a01, b01, window=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5, 8-bit dynamic range) of
    single-channel maps (B, 1, H, W) in [0, 1] -> (B,)."""
    a, b = to_8bit(a01), to_8bit(b01)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :])[None, None]
    blur = lambda z: F.conv2d(z, kernel)  # "valid" windows only, as scikit-image's default
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def controllability(control_type, evaluator, images01, label01):
    """Per-image metric of generated images (B, 3, H, W) in [0, 1] against the label (B, 1, H, W)."""
    pred = reward.reward_prediction(control_type, evaluator, images01.float())
    if control_type == "depth":
        return rmse_8bit(pred, label01)
    return ssim(pred, label01)


@torch.no_grad()
def evaluator_features(evaluator, images01, batch=64):
    """Pooled features of the evaluator network (for a Frechet distance); needs `.features(x)`."""
    return torch.cat([evaluator.features(images01[i:i + batch].float() * 2 - 1).float()
                      for i in range(0, len(images01), batch)])


def frechet_distance(f1, f2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), computed in float64 through the symmetric
    form (S1^1/2 S2 S1^1/2)^1/2, which has the same trace and needs only eigh."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)

    def sqrtm(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r1 = sqrtm(s1)
    tr_cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_cross).item()


@torch.no_grad()
def generate_images(sd, texts, controls, controlnet, steps=20, guidance=7.5, seed=0, batch=16,
                    negative_prompt="", sampler="ddim", images_per_cond=1, size=None):
    """Images (N * images_per_cond, 3, H, W) in [0, 1] for prompts and control maps (N, 3, H, W), or
    with controls None (no ControlNet) at size x size."""
    out = []
    for i in range(0, len(texts), batch):
        imgs = sample.generate(sd, texts[i:i + batch],
                               control=None if controls is None else controls[i:i + batch],
                               controlnet=controlnet, steps=steps, guidance=guidance, seed=seed + i,
                               negative_prompt=negative_prompt, sampler=sampler, num_images=images_per_cond,
                               height=size, width=size)
        out += [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in imgs]
    return torch.stack(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="controllability of a ControlNet on held-out conditions")
    p.add_argument("--control", choices=["depth", "hed", "lineart"], default="depth")
    p.add_argument("--weights", required=True)
    p.add_argument("--controlnet", required=True)
    p.add_argument("--data", required=True, help="imagefolder with metadata.jsonl")
    p.add_argument("--control-column", default="conditioning_file_name")
    p.add_argument("--evaluator", required=True, help="depth: DPT-Large folder; hed/lineart: the annotator file")
    p.add_argument("--num", type=int, default=None, help="first N conditions (default: all)")
    p.add_argument("--images-per-cond", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write per-image metrics as JSON here")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    sd = formats.load_sd(args.weights, device=dev)
    net = formats.load_controlnet(args.controlnet, sd.unet.config, device=dev)
    evaluator = formats.load_reward_model(args.control, args.evaluator, device=dev)
    fused.install(sd, net, evaluator)
    ds = data.ControlDataset(args.data, args.resolution,
                             control_column=args.control_column if args.control == "depth" else None)
    n = len(ds) if args.num is None else min(args.num, len(ds))
    items = [x for x in (ds[i] for i in range(n)) if x is not None]
    if not items:
        sys.exit(f"error: no readable samples in {args.data}")
    controls = torch.stack([x["control"] for x in items]).to(dev) if args.control == "depth" else None
    image01 = (torch.stack([x["image"] for x in items]).to(dev) + 1) / 2
    label = reward.make_label(args.control, evaluator, image01, controls)
    cond = reward.control_image(args.control, label, controls)
    images = generate_images(sd, [x["text"] for x in items], cond, net, args.steps, args.guidance, args.seed,
                             args.batch, images_per_cond=args.images_per_cond)
    scores = controllability(args.control, evaluator, images.to(dev),
                             label.repeat_interleave(args.images_per_cond, 0))
    name = "depth RMSE (8-bit)" if args.control == "depth" else "SSIM"
    print(f"{name}: {scores.mean().item():.4f} ± {scores.std().item():.4f} over {len(scores)} images")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"metric": name, "values": scores.tolist()}, f)


if __name__ == "__main__":
    main()
