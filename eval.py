"""The paper's evaluation, one row of its table: controllability, FID and CLIP score of a ControlNet on held-out
conditions, by ControlNet++'s eval/ protocol (arXiv 2404.07987, sec. 4.1), which InnerControl reuses unchanged.

    python eval.py --control depth --weights v1-5-pruned-emaonly.safetensors --controlnet controlnet.safetensors \
        --data multigen20m-depth-eval/ --evaluator dpt-large/ --inception pt_inception-2015-12-05-6726825d.pth \
        --clip clip-vit-base-patch16/ --out runs/depth-eval
    torchrun --nproc_per_node 8 eval.py ...            # the same row, the conditions split over 8 processes
    python eval.py --score-only --out runs/depth-eval --evaluator dpt-large/ --inception other.pth   # re-score

Per held-out condition, 4 images (UniPC, 20 steps, guidance 7.5, negative prompt "worst quality, low quality",
512 px, image and condition resized to 512 x 512 bicubic as upstream; `--guidance 3.0` for the paper's second
table), then:
- controllability. depth: the evaluator's (DPT-Large's) depth of the image over its max against the input map
  min-max normalised, both 8-bit, per-image RMSE (lower is better). hed / lineart: the annotator's edges of the
  generated image against its edges of the real image, 8-bit, multi-scale SSIM (lineart compared inverted, white
  lines on black; higher is better).
- FID: Inception features of each of the 4 image groups against the real images, with clean-fid's resizing;
  the mean over the groups.
- CLIP score: 100 x the cosine of CLIP ViT-B/16's image and prompt embeddings (torchmetrics' CLIPScore).

The output folder (--out), in upstream's layout where it has one (its eval/eval.py):
    images/group_{g}/{i}.png   the g-th generated image of condition i (i: the row's index in metadata.jsonl)
    annotations/{i}.png        the label, 8-bit (depth: the min-max normalised map; hed: the edges of the real
                               image; lineart: its inverted drawing, white lines on black, what the ControlNet sees)
    conditions/{i}.png         the ControlNet's input, 8-bit (a record; never read back)
    skipped/{i}                a condition whose files could not be read (delete the folder to retry them)
    prompts.jsonl              {"id", "text", "file_name"} per condition: the captions and the real images
    run.json                   the settings the images were made with; row.json, row.md: the row
Every file is written whole (a temporary name, then a rename) and a condition counts as done when all its images
are there, so a rerun generates only what is missing and a run killed at any point loses at most its batch in
flight. The row is always scored from the saved 8-bit PNGs, in condition order and in fixed chunks, so a resumed
run, a run split over processes and --score-only give exactly the row of one uninterrupted run. A rerun refuses a
folder made with other settings (run.json) rather than mix two models' images.

Where this departs from upstream: each batch of conditions is seeded `seed + index of its first condition` (upstream
seeds the global generator once), so that a condition's noise does not depend on which process makes it or on what
an earlier run already made; DPT's input is resized as the reward loss resizes it (bilinear, antialiased) rather
than by its image processor (bicubic); upstream's LineArt comparison inverts an 8-bit prediction with `1 - x` on
uint8, which wraps around (0 -> 1, 255 -> 2), where here both maps are inverted as 255 - x; the depth label is the
min-max normalised map after the bicubic resize (upstream min-max normalises the stored map and resizes it nearest),
and 16-bit depth maps keep their precision (upstream reads them as 8-bit RGB); controllability re-runs the
evaluator on the saved images at scoring time, where upstream saves its 8-bit predictions during generation.
"""
import contextlib
import datetime
import glob
import json
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
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
# what makes the images: a rerun into an existing folder must match these (run.json), or it would mix two runs
GENERATION_KEYS = ("control", "weights", "controlnet", "data", "control_column", "resize", *PROTOCOL, "batch",
                   "dtype")
SCORE_BATCH = 8  # conditions per scoring chunk (x images-per-cond images): fixed, so that every run scores alike


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


def read_real(root, file_name):
    """A held-out image as stored (FID's real set reads the files, not the resized ones), (3, H, W) uint8."""
    return torch.from_numpy(np.array(data.open_image(os.path.join(root, file_name)).convert("RGB"))).permute(2, 0, 1)


def real_image(dataset, i):
    return read_real(dataset.root, dataset.rows[i].file_name)


# -----------------------------------------------------------------------------
# the output folder


class Folder:
    """Paths of an evaluation folder (the layout in the module docstring) and its atomic writes."""

    def __init__(self, root, images_per_cond):
        self.root, self.k = os.fspath(root), images_per_cond

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def image(self, g, i):
        return self.path("images", f"group_{g}", f"{i}.png")

    def annotation(self, i):
        return self.path("annotations", f"{i}.png")

    def condition(self, i):
        return self.path("conditions", f"{i}.png")

    def skipped(self, i):
        return self.path("skipped", str(i))

    def is_done(self, i):
        return all(os.path.exists(self.image(g, i)) for g in range(self.k))

    def make_dirs(self):
        for d in ("annotations", "conditions", "skipped", *(f"images/group_{g}" for g in range(self.k))):
            os.makedirs(self.path(d), exist_ok=True)

    def remove_partial_files(self):
        """Temporary files a killed run left behind (never read: every path is read by its final name)."""
        for p in glob.glob(self.path("**", "*.tmp"), recursive=True):
            os.remove(p)

    @staticmethod
    def write(path, save):
        """save(tmp) writes the file under a temporary name; the rename makes it appear whole or not at all."""
        tmp = f"{path}.{os.getpid()}.tmp"
        save(tmp)
        os.replace(tmp, path)

    def write_png(self, path, array_u8):
        self.write(path, lambda tmp: Image.fromarray(array_u8).save(tmp, format="PNG"))

    def write_text(self, path, text):
        def save(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        self.write(path, save)

    def read_json(self, name):
        p = self.path(name)
        if not os.path.isfile(p):
            return None
        with open(p, encoding="utf-8") as f:
            return json.load(f)


def to_u8(x01):
    """(C, H, W) in [0, 1] -> (H, W, C) or (H, W) uint8, rounded (generate_images' images are exact 8-bit levels)."""
    a = (x01.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def annotation_u8(control_type, label01):
    """The label (1, H, W) as the 8-bit levels controllability compares: to_8bit of the label, or, for lineart, of
    the inverted label (white lines on black, as upstream's annotations/ store it)."""
    x = 1 - label01 if control_type == "lineart" else label01
    return metrics.to_8bit(x)[0].to(torch.uint8).cpu().numpy()


def annotation_label01(control_type, u8):
    """annotation_u8's inverse as a label in [0, 1] that controllability quantises back to exactly those levels
    (the level's middle, so that float rounding cannot move it to the next one)."""
    x = (torch.from_numpy(np.asarray(u8)).float()[None] + 0.5) / 255
    return 1 - x if control_type == "lineart" else x


def read_u8(path):
    with Image.open(path) as img:
        return np.array(img)


# -----------------------------------------------------------------------------
# processes: torchrun's RANK / WORLD_SIZE, or one


class Dist:
    def __init__(self, device):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device(device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
                torch.cuda.set_device(self.device)
            # a long timeout: a process that finished its share waits at the barrier for the others
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(hours=6))

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """rank 0's obj on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# generation


def run_settings(args, n):
    """run.json: what made the images (GENERATION_KEYS, paths made absolute) and how many conditions."""
    s = {key: getattr(args, key) for key in GENERATION_KEYS}
    for key in ("weights", "controlnet", "data"):
        s[key] = os.path.abspath(s[key])
    s["control_column"] = args.control_column if args.control == "depth" else None
    return dict(s, num=args.num, n=n)


def prepare_folder(folder, args, dataset, n):
    """rank 0: check or write run.json and prompts.jsonl, clear partial files; returns the batches left to make
    (batch b: conditions b * batch .. (b + 1) * batch - 1, seeded seed + b * batch)."""
    settings = run_settings(args, n)
    old = folder.read_json("run.json")
    if old is not None:
        diff = [k for k in GENERATION_KEYS if old.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise cli.CLIError(f"{folder.root} holds images made with {k} {old.get(k)!r}, not {settings[k]!r} "
                               f"(run.json; differing: {', '.join(diff)}); use another --out, or --score-only")
    prompts = [dict(id=i, text=r.text, file_name=r.file_name) for i, r in enumerate(dataset.rows[:n])]
    if os.path.isfile(folder.path("prompts.jsonl")):
        with open(folder.path("prompts.jsonl"), encoding="utf-8") as f:
            changed = [p["id"] for p, q in zip((json.loads(line) for line in f if line.strip()), prompts) if p != q]
        if changed:
            raise cli.CLIError(f"{folder.root}: condition {changed[0]} of prompts.jsonl is not row {changed[0]} of "
                               f"{args.data}/metadata.jsonl any more ({len(changed)} differ); use another --out")
    os.makedirs(folder.root, exist_ok=True)
    folder.make_dirs()
    folder.remove_partial_files()
    folder.write_text(folder.path("run.json"), json.dumps(settings, indent=1) + "\n")
    folder.write_text(folder.path("prompts.jsonl"), "".join(json.dumps(p) + "\n" for p in prompts))
    def finished(i):
        return folder.is_done(i) or os.path.exists(folder.skipped(i))

    return [lo for lo in range(0, n, args.batch) if not all(finished(i) for i in range(lo, min(lo + args.batch, n)))]


@torch.no_grad()
def generate_batch(folder, args, lo, hi, sd, controlnet, evaluator, dataset):
    """Conditions lo..hi-1 (one fixed batch, seeded seed + lo): generate, then write annotations, conditions and
    images; returns the number of images written."""
    device = next(controlnet.parameters()).device
    items = []
    for i in range(lo, hi):
        x = dataset[i]
        if x is None:  # unreadable: marked, never retried by a rerun (that would change the batch's other images)
            folder.write_text(folder.skipped(i), "")
        else:
            items.append((i, x))
    if not items:
        return 0
    image01 = (torch.stack([x["image"] for _, x in items]).to(device) + 1) / 2
    control = torch.stack([x["control"] for _, x in items]).to(device) if args.control == "depth" else None
    label = eval_label(args.control, evaluator, image01, control)
    cond = control if args.control == "depth" else labels.control_image(args.control, label)
    k = args.images_per_cond
    images = generate_images(sd, [x["text"] for _, x in items], cond, controlnet, args.steps, args.guidance,
                             args.seed + lo, len(items), args.negative_prompt, args.sampler, k)
    for j, (i, _) in enumerate(items):  # the label first: a condition whose images are all there is complete
        folder.write_png(folder.annotation(i), annotation_u8(args.control, label[j]))
        folder.write_png(folder.condition(i), to_u8(cond[j]))
        for g in range(k):
            folder.write_png(folder.image(g, i), to_u8(images[j * k + g]))
        if os.path.exists(folder.skipped(i)):
            os.remove(folder.skipped(i))
    return len(images)


def generate_folder(folder, args, sd, controlnet, evaluator, dataset, n, dist):
    """Make the images still missing in `folder`, the batches left shared round-robin over the processes."""
    todo = None
    try:
        todo = prepare_folder(folder, args, dataset, n) if dist.main else None
    except cli.CLIError as e:
        todo = str(e)
    todo = dist.broadcast(todo)
    if isinstance(todo, str):
        raise cli.CLIError(todo)
    mine = todo[dist.rank::dist.world]
    k, done = args.images_per_cond, n - sum(min(args.batch, n - lo) for lo in todo)
    if dist.main:
        print(f"{folder.root}: {done} of {n} conditions done; {n - done} to make ({(n - done) * k} images) on "
              f"{dist.world} process{'es' if dist.world > 1 else ''}", file=sys.stderr)
    total = sum(min(args.batch, n - lo) for lo in mine) * k
    with tqdm(total=total, desc=f"generate (rank {dist.rank} of {dist.world})" if dist.world > 1 else "generate",
              unit="img", dynamic_ncols=True, disable=not dist.main or total == 0) as bar:
        for lo in mine:
            hi = min(lo + args.batch, n)
            generate_batch(folder, args, lo, hi, sd, controlnet, evaluator, dataset)
            bar.update((hi - lo) * k)


# -----------------------------------------------------------------------------
# scoring: from the folder only


def scorable(folder, run, n=None):
    """The conditions done and those skipped among the first n (default run.json's); refuses a folder with
    conditions not made yet."""
    n = run["n"] if n is None else min(n, run["n"])
    done = [i for i in range(n) if folder.is_done(i)]
    skipped = [i for i in sorted(set(range(n)) - set(done)) if os.path.exists(folder.skipped(i))]
    missing = sorted(set(range(n)) - set(done) - set(skipped))
    if missing:
        raise cli.CLIError(f"{folder.root}: {len(missing)} of {n} conditions have no images yet (first: {missing[0]});"
                           f" run eval.py without --score-only to make them")
    if not done:
        raise cli.CLIError(f"{folder.root}: no readable samples among the first {n}")
    return done, skipped


@torch.no_grad()
def score_folder(folder, run, evaluator, inception=None, clip=None, data_root=None, n=None, device="cpu"):
    """The row from the saved PNGs of the first n conditions (default: run.json's), in condition order, in chunks
    of SCORE_BATCH conditions; FID's real images are read from data_root. Every condition must be done or marked
    skipped."""
    control, k = run["control"], run["images_per_cond"]
    done, skipped = scorable(folder, run, n)
    with open(folder.path("prompts.jsonl"), encoding="utf-8") as f:
        prompts = [json.loads(line) for line in f if line.strip()]
    scores, clip_scores, gen_features, real_features = [], [], [], []
    with tqdm(total=len(done) * k, desc="score", unit="img", dynamic_ncols=True) as bar:
        for c in range(0, len(done), SCORE_BATCH):
            ids = done[c:c + SCORE_BATCH]
            images = torch.stack([torch.from_numpy(read_u8(folder.image(g, i))).permute(2, 0, 1)
                                  for i in ids for g in range(k)])  # prompt-major, uint8
            images01 = images.to(device).float() / 255
            label = torch.stack([annotation_label01(control, read_u8(folder.annotation(i))) for i in ids]).to(device)
            scores.append(controllability(control, evaluator, images01, label.repeat_interleave(k, 0)).cpu())
            if inception is not None:
                gen_features.append(metrics.inception_features(inception, images))
                real_features.append(metrics.inception_features(
                    inception, [read_real(data_root, prompts[i]["file_name"]) for i in ids]))
            if clip is not None:
                clip_scores.append(100 * metrics.clip_cosines(clip, images, [prompts[i]["text"] for i in ids
                                                                             for _ in range(k)]))
            bar.update(len(ids) * k)
    scores = torch.cat(scores)
    # the generated images are prompt-major; group g is the g-th image of every condition (fid_over_groups)
    fid = metrics.fid_over_groups(torch.cat(real_features), torch.cat(gen_features), k) if gen_features else None
    clip_mean = max(torch.cat(clip_scores).mean().item(), 0.0) if clip_scores else None
    settings = {key: run[key] for key in (*PROTOCOL, "num", "dtype", "resize")}
    settings["num"] = settings["num"] if n is None else n
    return dict(control=control, metric=METRIC[control], controllability=scores.mean().item(),
                controllability_std=scores.std().item() if len(scores) > 1 else 0.0, fid=fid, clip_score=clip_mean,
                conditions=len(done), images=len(scores), skipped=len(skipped), settings=settings,
                weights=run["weights"], controlnet=run["controlnet"])


def table_row(row):
    """The paper's table cells: controllability / FID / CLIP score."""
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    return (f"| {os.path.basename(os.path.normpath(row['controlnet']))} | "
            f"{cell(row['controllability'], '.4f' if row['control'] != 'depth' else '.2f')} | "
            f"{cell(row['fid'], '.2f')} | {cell(row['clip_score'], '.2f')} |")


PROTOCOL_HELP = dict(
    sampler="the sampler (scheduler)", steps="sampling steps",
    guidance="classifier-free guidance scale (the paper also reports 3.0)",
    images_per_cond="images per condition (the FID groups)", resolution="image side: images and conditions are "
    "resized to it", seed="noise seed; a batch of conditions gets seed + the index of its first condition",
    negative_prompt="the negative prompt, for every image")


def make_parser():
    p = cli.OneLineParser(prog="eval.py", description="a ControlNet's row of the paper's table (ControlNet++'s "
                          "evaluation protocol); resumable, and split over processes by torchrun")
    m = p.add_argument_group("model files")
    m.add_argument("--weights", help="SD1.5: original single file or diffusers folder; not with --score-only")
    m.add_argument("--controlnet", help="the ControlNet evaluated: its file or diffusers folder; not with "
                                        "--score-only")
    m.add_argument("--evaluator", required=True, help="depth: a DPT-Large folder; hed: ControlNetHED.pth; "
                                                      "lineart: informative-drawings' model.pth")
    m.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth, for FID (default: none, no FID)")
    m.add_argument("--clip", help="openai/clip-vit-base-patch16 folder, for the CLIP score "
                                  "(default: none, no CLIP score)")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="imagefolder with metadata.jsonl, the held-out conditions; with --score-only, "
                                  "where FID's real images are (default: none; --score-only: run.json's)")
    d.add_argument("--control-column", default="conditioning_file_name", help="depth: the depth map column")
    d.add_argument("--num", type=int, help="the first N conditions (default: all)")
    d.add_argument("--resize", choices=list(data.RESIZE_MODES), default="squash",
                   help="squash: image and map to resolution^2, bicubic (upstream's); crop: short side, centre crop")
    r = p.add_argument_group("protocol")
    r.add_argument("--control", choices=list(METRIC), default="depth", help="control type: the metric and evaluator")
    for key, value in PROTOCOL.items():
        r.add_argument("--" + key.replace("_", "-"), type=type(value), default=value, help=PROTOCOL_HELP[key],
                       **({"choices": list(sample.SAMPLERS)} if key == "sampler" else {}))
    o = p.add_argument_group("output and run")
    o.add_argument("--out", help="folder for the images, labels, prompts and row.json / row.md; a rerun resumes "
                                 "it (default: a temporary folder, deleted at the end)")
    o.add_argument("--score-only", action="store_true", help="score the images in --out without generating "
                                                             "(settings from its run.json)")
    o.add_argument("--batch", type=int, default=1, help="conditions per generation batch (x images-per-cond)")
    o.add_argument("--dtype", type=cli.dtype_name,
                   help="network dtype: fp32, bf16 or fp16 (default: fp16 on cuda, fp32 on cpu)")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK)")
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.score_only:
        if not args.out:
            p.error("--score-only needs --out, the folder to score")
    else:
        need = [f"--{f}" for f in ("weights", "controlnet", "data") if getattr(args, f) is None]
        if need:
            p.error(f"the following arguments are required: {', '.join(need)} (or --score-only with --out)")
    if args.batch < 1 or (args.num is not None and args.num < 1):
        p.error("--batch and --num must be at least 1")
    return args


def load_scorers(args, control, device):
    evaluator = formats.load_reward_model(control, args.evaluator, device=device)
    inception = formats.load_inception(args.inception, device) if args.inception else None
    clip = formats.load_clip(args.clip, device=device) if args.clip else None
    return evaluator, inception, clip


def evaluate(args):
    """Generate what is missing (unless --score-only), then score on rank 0; returns the row there, None elsewhere."""
    dist = Dist(args.device)
    device = dist.device
    try:
        if args.score_only:
            folder = Folder(args.out, 1)
            run_json = folder.read_json("run.json")
            if run_json is None:
                raise cli.CLIError(f"{args.out}: no run.json; not a folder eval.py generated")
            folder.k = run_json["images_per_cond"]
            scorable(folder, run_json, args.num)  # before loading anything
            evaluator, inception, clip = load_scorers(args, run_json["control"], device)
            fused.install(evaluator)
            return score_folder(folder, run_json, evaluator, inception, clip, args.data or run_json["data"],
                                args.num, device) if dist.main else None
        if dist.world > 1 and not args.out:
            raise cli.CLIError("several processes need --out, the folder they share")
        args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
        dtype = cli.DTYPES[args.dtype]
        sd = formats.load_sd(args.weights, dtype=dtype, device=device)
        net = formats.load_controlnet(args.controlnet, sd.unet.config, dtype=dtype, device=device)
        evaluator, inception, clip = load_scorers(args, args.control, device)
        dataset = data.ControlDataset(args.data, args.resolution, resize=args.resize,
                                      control_column=args.control_column if args.control == "depth" else None)
        n = len(dataset) if args.num is None else min(args.num, len(dataset))
        fused.install(sd, net, evaluator)
        with tempfile.TemporaryDirectory(prefix="eval-") if not args.out else contextlib.nullcontext(args.out) \
                as out:
            folder = Folder(out, args.images_per_cond)
            generate_folder(folder, args, sd, net, evaluator, dataset, n, dist)
            del sd, net
            dist.barrier()
            if not dist.main:
                return None
            return score_folder(folder, folder.read_json("run.json"), evaluator, inception, clip, args.data,
                                device=device)
    finally:
        dist.close()


def main(argv=None):
    args = parse_args(argv)
    try:
        row = evaluate(args)
    except (cli.CLIError, formats.CheckpointError, data.DataError) as e:
        sys.exit(f"eval.py: error: {' '.join(str(e).split())}")
    if row is None:  # not rank 0
        return
    line = table_row(row)
    print(f"{row['metric']} {row['controllability']:.4f} ± {row['controllability_std']:.4f} over {row['images']} "
          f"images; FID {row['fid']}; CLIP score {row['clip_score']}")
    print(f"| ControlNet | {row['metric']} | FID | CLIP score |\n| --- | --- | --- | --- |\n{line}")
    if args.out:
        folder = Folder(args.out, 1)
        folder.write_text(folder.path("row.json"), json.dumps(row, indent=1) + "\n")
        folder.write_text(folder.path("row.md"), line + "\n")


if __name__ == "__main__":
    main()
