"""The paper's evaluation, one row of its table: controllability, FID and CLIP score of a ControlNet on held-out
conditions, by ControlNet++'s eval/ protocol (arXiv 2404.07987, sec. 4.1), which InnerControl reuses unchanged.

    python eval.py --control depth --weights v1-5-pruned-emaonly.safetensors --controlnet controlnet.safetensors \
        --data multigen20m-depth-eval/ --evaluator dpt-large/ --inception pt_inception-2015-12-05-6726825d.pth \
        --clip clip-vit-base-patch16/ --out runs/depth-eval

Per held-out condition, 4 images (UniPC, 20 steps, guidance 7.5, negative prompt "worst quality, low quality",
512 px; `--guidance 3.0` for the paper's second table), then:
- controllability. depth: the evaluator's (DPT-Large's) depth of the image over its max against the input map
  min-max normalised, both 8-bit, per-image RMSE (lower is better). hed / lineart: the annotator's edges of the
  generated image against its edges of the real image, 8-bit, multi-scale SSIM (lineart compared inverted, white
  lines on black; higher is better).
- FID: Inception features of each of the 4 image groups against the real images, with clean-fid's resizing;
  the mean over the groups.
- CLIP score: 100 x the cosine of CLIP ViT-B/16's image and prompt embeddings (torchmetrics' CLIPScore).
Where this departs from upstream: each batch of conditions is seeded `seed + batch index` (upstream seeds the
global generator once); DPT's input is resized as the reward loss resizes it (bilinear, antialiased) rather than
by its image processor (bicubic); upstream's LineArt comparison inverts an 8-bit prediction with `1 - x` on uint8,
which wraps around (0 -> 1, 255 -> 2), where here both maps are inverted as 255 - x.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
import formats
import fused
import metrics
import labels
import sample

PROTOCOL = dict(sampler="unipc", steps=20, guidance=7.5, images_per_cond=4, resolution=512, seed=42,
                negative_prompt="worst quality, low quality")
METRIC = {"depth": "depth RMSE (8-bit, lower is better)", "hed": "MS-SSIM (higher is better)",
          "lineart": "MS-SSIM (higher is better)"}


@torch.no_grad()
def eval_label(control_type, evaluator, image01, control=None):
    """What the generated image's re-extracted control is compared with, (B, 1, H, W) in [0, 1]. depth: the input
    map, min-max normalised per image (upstream's evaluation; training divides by the max). hed / lineart: the
    annotator's map of the real image (the ControlNet's input is made from it, labels.make_label)."""
    if control_type == "depth":
        return labels.normalize_per_image_minmax(control.float().mean(1, keepdim=True))
    return labels.make_label(control_type, evaluator, image01, control)


@torch.no_grad()
def controllability(control_type, evaluator, images01, label01):
    """Per-image controllability (B,) of generated images (B, 3, H, W) in [0, 1] against labels (B, 1, H, W) from
    eval_label: depth RMSE (8-bit), or MS-SSIM of the 8-bit maps (single-scale SSIM below 176 px, the smallest size
    MS-SSIM's 5 scales take)."""
    pred = labels.reward_prediction(control_type, evaluator, images01.float())  # depth: over its per-image max
    if control_type == "depth":
        return metrics.rmse_8bit(pred, label01)
    if control_type == "lineart":  # compared as ControlNet v1.1 sees line art: white lines on black
        pred, label01 = 1 - pred, 1 - label01
    a, b = metrics.to_8bit(pred) / 255, metrics.to_8bit(label01) / 255
    return metrics.ms_ssim(a, b) if min(a.shape[-2:]) >= metrics.MS_SSIM_MIN_SIZE else metrics.ssim(a, b)


@torch.no_grad()
def generate_images(sd, texts, controls, controlnet, steps=20, guidance=7.5, seed=0, batch=16, negative_prompt="",
                    sampler="ddim", images_per_cond=1, size=None):
    """Images (N * images_per_cond, 3, H, W) in [0, 1], prompt-major, for prompts and control maps (N, 3, H, W), or
    with controls None (no ControlNet) at size x size. Batch b of conditions is seeded seed + b * batch."""
    out = []
    for i in range(0, len(texts), batch):
        imgs = sample.generate(sd, texts[i:i + batch], control=None if controls is None else controls[i:i + batch],
                               controlnet=controlnet, steps=steps, guidance=guidance, seed=seed + i,
                               negative_prompt=negative_prompt, sampler=sampler, num_images=images_per_cond,
                               height=size, width=size)
        out += [sample.to_tensor(im) for im in imgs]
    return torch.stack(out)


@torch.no_grad()
def evaluator_features(evaluator, images01, batch=64):
    """Pooled features of an evaluator network that has `.features(x)` (the shapes world's Frechet distance)."""
    return torch.cat([evaluator.features(images01[i:i + batch].float() * 2 - 1).float()
                      for i in range(0, len(images01), batch)])


def real_image(dataset, i):
    """The held-out image as stored (FID's real set reads the files, not the training crops), (3, H, W) uint8."""
    return torch.from_numpy(np.array(data.open_image(os.path.join(dataset.root, dataset.rows[i].file_name))
                                      .convert("RGB"))).permute(2, 0, 1)


@torch.no_grad()
def evaluate(args, sd, controlnet, evaluator, inception=None, clip=None, dataset=None):
    """The protocol over the first args.num conditions of `dataset`, streamed batch by batch (images are scored,
    then dropped); returns the table row as a dict."""
    n = len(dataset) if args.num is None else min(args.num, len(dataset))
    k, device = args.images_per_cond, next(controlnet.parameters()).device
    scores, clip_scores, gen_features, real_features, skipped = [], [], [], [], 0
    for lo in tqdm(range(0, n, args.batch), desc="generate and score", unit="batch", dynamic_ncols=True):
        items = [(i, x) for i, x in ((i, dataset[i]) for i in range(lo, min(lo + args.batch, n))) if x is not None]
        skipped += min(args.batch, n - lo) - len(items)
        if not items:
            continue
        image01 = (torch.stack([x["image"] for _, x in items]).to(device) + 1) / 2
        control = torch.stack([x["control"] for _, x in items]).to(device) if args.control == "depth" else None
        label = eval_label(args.control, evaluator, image01, control)
        cond = control if args.control == "depth" else labels.control_image(args.control, label)
        texts = [x["text"] for _, x in items]
        images = generate_images(sd, texts, cond, controlnet, args.steps, args.guidance, args.seed + lo, len(items),
                                 args.negative_prompt, args.sampler, k).to(device)
        scores.append(controllability(args.control, evaluator, images, label.repeat_interleave(k, 0)).cpu())
        if inception is not None:
            gen_features.append(metrics.inception_features(inception, images))
            real_features.append(metrics.inception_features(inception, [real_image(dataset, i) for i, _ in items]))
        if clip is not None:
            clip_scores.append(100 * metrics.clip_cosines(clip, images, [t for t in texts for _ in range(k)]))
    if not scores:
        raise cli.CLIError(f"{args.data}: no readable samples among the first {n}")
    scores = torch.cat(scores)
    # the generated images are prompt-major; group g is the g-th image of every condition (fid_over_groups)
    fid = metrics.fid_over_groups(torch.cat(real_features), torch.cat(gen_features), k) if gen_features else None
    clip_mean = max(torch.cat(clip_scores).mean().item(), 0.0) if clip_scores else None
    return dict(control=args.control, metric=METRIC[args.control], controllability=scores.mean().item(),
                controllability_std=scores.std().item() if len(scores) > 1 else 0.0, fid=fid, clip_score=clip_mean,
                conditions=len(scores) // k, images=len(scores), skipped=skipped,
                settings={key: getattr(args, key) for key in (*PROTOCOL, "num", "dtype")},
                weights=args.weights, controlnet=args.controlnet)


def table_row(row):
    """The paper's table cells: controllability / FID / CLIP score."""
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    return (f"| {os.path.basename(os.path.normpath(row['controlnet']))} | "
            f"{cell(row['controllability'], '.4f' if row['control'] != 'depth' else '.2f')} | "
            f"{cell(row['fid'], '.2f')} | {cell(row['clip_score'], '.2f')} |")


def parse_args(argv=None):
    p = cli.OneLineParser(prog="eval.py", description="a ControlNet's row of the paper's table")
    p.add_argument("--control", choices=list(METRIC), default="depth")
    p.add_argument("--weights", required=True, help="SD1.5: original single file or diffusers folder")
    p.add_argument("--controlnet", required=True)
    p.add_argument("--data", required=True, help="imagefolder with metadata.jsonl (held-out conditions)")
    p.add_argument("--control-column", default="conditioning_file_name", help="depth: the depth map column")
    p.add_argument("--evaluator", required=True, help="depth: a DPT-Large folder; hed: ControlNetHED.pth; "
                                                      "lineart: informative-drawings' model.pth")
    p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth, for FID (none: no FID)")
    p.add_argument("--clip", help="openai/clip-vit-base-patch16 folder, for the CLIP score (none: no CLIP score)")
    p.add_argument("--num", type=int, help="the first N conditions (default: all)")
    for key, value in PROTOCOL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value,
                       **({"choices": list(sample.SAMPLERS)} if key == "sampler" else {}))
    p.add_argument("--batch", type=int, default=1, help="conditions per generation batch (x images-per-cond)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="folder for row.json and row.md")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        sd = formats.load_sd(args.weights, dtype=dtype, device=device)
        net = formats.load_controlnet(args.controlnet, sd.unet.config, dtype=dtype, device=device)
        evaluator = formats.load_reward_model(args.control, args.evaluator, device=device)
        inception = formats.load_inception(args.inception, device) if args.inception else None
        clip = formats.load_clip(args.clip, device=device) if args.clip else None
        dataset = data.ControlDataset(args.data, args.resolution,
                                      control_column=args.control_column if args.control == "depth" else None)
        fused.install(sd, net, evaluator)
        row = evaluate(args, sd, net, evaluator, inception, clip, dataset)
    except (cli.CLIError, formats.CheckpointError, data.DataError) as e:
        sys.exit(f"eval.py: error: {' '.join(str(e).split())}")
    line = table_row(row)
    print(f"{row['metric']} {row['controllability']:.4f} ± {row['controllability_std']:.4f} over {row['images']} "
          f"images; FID {row['fid']}; CLIP score {row['clip_score']}")
    print(f"| ControlNet | {row['metric']} | FID | CLIP score |\n| --- | --- | --- | --- |\n{line}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "row.json"), "w") as f:
            json.dump(row, f, indent=1)
        with open(os.path.join(args.out, "row.md"), "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
