"""Generate images with Stable Diffusion 1.x and a ControlNet: a prompt and a control map in, PNGs out.

    python sample.py --prompt "a red sphere and a blue box" --cond depth.png
    python sample.py --prompt "..." --cond depth.png --weights v1-5-pruned-emaonly.safetensors \
        --controlnet control_v11f1p_sd15_depth.pth --steps 20 --sampler dpmpp-2m --seed 0

Built from:
- DDIM (Song et al. 2020, arXiv 2010.02502) with the scheduler settings SD1.5 ships with: "leading"
  timestep spacing, steps_offset 1, and the last step landing on alphas_cumprod[0] (set_alpha_to_one
  False), eta 0.
- DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): multistep, second order, data prediction, with
  the settings diffusers' DPMSolverMultistepScheduler takes from an SD1.5 scheduler config (leading
  spacing over steps + 1 intervals, steps_offset 1, first step first order, final sigma 0).
- Classifier-free guidance (Ho & Salimans 2022) with the unconditional and conditional halves in one
  batched forward of the ControlNet and the UNet.
- The seed convention of the diffusers pipelines, so a seed gives the same image as the reference
  pipeline: initial latents drawn in fp32 from a CPU generator, then moved to the device and dtype.

The samplers are plain functions over an `eps_fn(x, t) -> eps` closure and the noise schedule's
alphas_cumprod, so they can be read (and tested) apart from the networks. `generate()` is what the
command line runs, callable from Python (evaluation uses it). With `probe=...` it also records the
InnerControl probe's reading of the control map from the UNet's decoder features during sampling.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError
from tqdm import tqdm

from controlnet import guided_eps, load_controlnet
from model import CheckpointError, load_sd
from probe import ProbeConfig, load_probe, probe_output01

# Where `python train.py --control depth` leaves the shapes-world model; used when no --weights is given.
DEFAULT_SHAPES_RUN = "runs/shapes-depth"

# -----------------------------------------------------------------------------
# samplers


def ddim_timesteps(steps, num_train_steps=1000, offset=1):
    """SD1.5's "leading" spacing: num_train_steps // steps apart, shifted by steps_offset, descending."""
    stride = num_train_steps // steps if steps > 0 else 0
    if stride < 1:
        raise ValueError(f"ddim: steps must be between 1 and {num_train_steps}, got {steps}")
    return [i * stride + offset for i in reversed(range(steps))]


def ddim(eps_fn, x, alphas_cumprod, steps, progress=False):
    """Deterministic DDIM (eta = 0) from pure noise x at t = T down to the clean latent.

    x_{t'} = sqrt(abar_t') * x0_hat + sqrt(1 - abar_t') * eps_hat, with x0_hat the one-step estimate
    (DDIM eq. 12). After the last timestep (t = 1) the target is abar[0], not 1 (set_alpha_to_one False).
    """
    abar = alphas_cumprod.double().tolist()
    stride = len(abar) // steps if steps > 0 else 0
    for t in tqdm(ddim_timesteps(steps, len(abar)), disable=not progress, desc="ddim"):
        a, a_prev = abar[t], abar[t - stride] if t - stride >= 0 else abar[0]
        eps = eps_fn(x, t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def dpmpp_2m_timesteps(steps, num_train_steps=1000, offset=1):
    """Leading spacing as diffusers' DPM-Solver applies it: steps + 1 intervals, the one ending at 0 dropped."""
    stride = num_train_steps // (steps + 1) if steps > 0 else 0
    if stride < 1:
        raise ValueError(f"dpmpp-2m: steps must be between 1 and {num_train_steps - 1}, got {steps}")
    return [i * stride + offset for i in range(steps, 0, -1)]


def dpmpp_2m(eps_fn, x, alphas_cumprod, steps, progress=False):
    """DPM-Solver++(2M): the exact exponential integrator of the data-prediction ODE, with x0_hat
    extrapolated linearly in lambda = log(alpha / sigma) from the previous step (arXiv 2211.01095, alg. 2).

    The first step has no history and is first order (= DDIM); the last goes to sigma = 0, where the
    update reduces to x0_hat itself (diffusers' final_sigmas_type "zero").
    """
    abar = alphas_cumprod.double().tolist()
    ts = dpmpp_2m_timesteps(steps, len(abar))
    alpha = [math.sqrt(abar[t]) for t in ts] + [1.0]
    sigma = [math.sqrt(1 - abar[t]) for t in ts] + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])]
    x0_prev = None
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="dpm++2m")):
        eps = eps_fn(x, t)
        x0 = (x - sigma[i] * eps) / alpha[i]
        if i == len(ts) - 1:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            # second-order correction: D = x0 + (h / 2 h_prev) (x0 - x0_prev)
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * (lam[i] - lam[i - 1])))
            x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d
        x0_prev = x0
    return x


SAMPLERS = {"ddim": (ddim, ddim_timesteps), "dpmpp-2m": (dpmpp_2m, dpmpp_2m_timesteps)}


def sampler_timesteps(sampler, steps):
    """The timesteps `sampler` visits with `steps` steps, in order (where a probe reading can be taken)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler][1](steps)


# -----------------------------------------------------------------------------
# generation


def evenly_spaced(items, k):
    """k items spread evenly from the first to the last (all of them when there are fewer than k)."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


@torch.no_grad()
def generate(sd, prompt, control=None, controlnet=None, negative_prompt="", steps=20, guidance=7.5,
             control_scale=1.0, sampler="ddim", seed=0, num_images=1, height=None, width=None,
             dtype=None, device=None, probe=None, readouts=None, probe_points=5, progress=False):
    """Sample images from a loaded StableDiffusion (model.py) and, optionally, a ControlNet.

    prompt: a string or a list of strings, each giving num_images images (the batch is
    len(prompts) * num_images, prompt-major, as in the diffusers pipelines). control: (1 or
    len(prompts), 3, H, W) in [0, 1], already at the output size. height/width default to the control's
    size, or 512. dtype/device default to the UNet's. The sampler state stays in fp32 whatever the
    network dtype. With a probe and a `readouts` list, appends (t, prediction in [0, 1]) at
    `probe_points` evenly spaced steps, read from the conditional half of the batch.
    Returns a list of PIL images.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt or ""] * len(prompts) if isinstance(negative_prompt, (str, type(None))) \
        else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    prompts = [p for p in prompts for _ in range(num_images)]
    negatives = [n for n in negatives for _ in range(num_images)]
    batch = len(prompts)

    param = next(sd.unet.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    if control is not None:
        height, width = height or control.shape[-2], width or control.shape[-1]
    height, width = height or 512, width or 512
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"image size must be a positive multiple of 8, got {height}x{width}")
    if control is not None and tuple(control.shape[-2:]) != (height, width):
        raise ValueError(f"control map is {control.shape[-1]}x{control.shape[-2]}, expected {width}x{height}")
    if (control is None) != (controlnet is None):
        raise ValueError("a control map and a ControlNet go together: give both or neither")
    timesteps = sampler_timesteps(sampler, steps)  # also validates sampler and steps
    probe_ts = set(evenly_spaced(timesteps, probe_points)) if probe is not None and readouts is not None else set()

    # classifier-free guidance: [uncond; cond] through the ControlNet and UNet as one batch
    # (the diffusers pipelines turn it off at scale <= 1, and so do we)
    cfg = guidance > 1
    warn_if_truncated(sd.tokenizer, set(prompts + (negatives if cfg else [])))
    context = sd.encode_prompt((negatives + prompts) if cfg else prompts).to(device, dtype)
    hint = None
    if control is not None:
        if control.shape[0] not in (1, batch // num_images):
            raise ValueError(f"{control.shape[0]} control maps for {batch // num_images} prompts")
        # one row per image; a single map is encoded once and shared by the whole batch
        hint = control.to(device=device, dtype=dtype)
        hint = hint if hint.shape[0] == 1 else hint.repeat_interleave(num_images, 0)

    def forward(x, t, context, return_features=False):
        residuals = controlnet(x, t, context, hint, scale=control_scale) if controlnet is not None else None
        return sd.unet(x, t, context, control=residuals, return_features=return_features)

    def eps_fn(x, t):
        x = x.to(dtype)
        if t in probe_ts:  # what the probe reads from the same features the conditional prediction uses
            _, features = forward(x, t, context[-batch:], return_features=True)
            readouts.append((t, probe_output01(probe(features).float())))
        if cfg:
            return guided_eps(sd.unet, controlnet, x, t, context, hint, guidance, control_scale).float()
        return forward(x, t, context).float()

    # seed convention of the reference pipelines: fp32 CPU noise, then the device and dtype
    shape = (batch, sd.unet.config.in_channels, height // 8, width // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    x = noise.to(device=device, dtype=dtype).float()  # init sigma is 1 for both samplers
    z = SAMPLERS[sampler][0](eps_fn, x, sd.schedule.alphas_cumprod, steps, progress=progress)

    images = sd.vae.decode_latents(z.to(dtype)).float()
    return to_pil((images / 2 + 0.5).clamp(0, 1))


def warn_if_truncated(tokenizer, prompts):
    for p in prompts:
        n = tokenizer.count_tokens(p)  # with BOS and EOS
        if n > tokenizer.max_len:
            print(f"warning: prompt truncated: {n} tokens with BOS/EOS, the text encoder reads {tokenizer.max_len}: "
                  f"{p[:40]!r}...", file=sys.stderr)


def to_pil(images):
    """(B, C, H, W) in [0, 1] -> PIL images, rounded to 8 bits as the reference pipeline does."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def make_grid(images, cols=None):
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


# -----------------------------------------------------------------------------
# command line


class CLIError(Exception):
    """Bad input from the command line: reported as one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of the usage block
        print(f"sample.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def load_control(path, size=None):
    """A control map as (1, 3, H, W) in [0, 1], from an image file in any common mode.

    16-bit maps (I;16, I) keep their precision (full scale = 65535) instead of Pillow's 8-bit clip;
    alpha is dropped, palettes expanded, grayscale repeated to 3 channels. size (W, H): resized with
    Lanczos, as the reference pipeline does, unless the map already has that size; None: the map's own
    size, rounded down to a multiple of 8.
    """
    if not os.path.isfile(path):
        raise CLIError(f"--cond {path}: no such file")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise CLIError(f"--cond {path}: cannot read it as an image ({e.__class__.__name__})") from None
    if img.mode.startswith("I"):
        channels = [np.asarray(img, dtype=np.float32) / 65535]
    elif img.mode == "F":
        channels = [np.asarray(img, dtype=np.float32)]
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
        channels = [rgb[..., c] for c in range(3)]
    size = tuple(size) if size is not None else (max(8, img.width // 8 * 8), max(8, img.height // 8 * 8))
    if img.size != size:
        channels = [np.asarray(Image.fromarray(c).resize(size, Image.Resampling.LANCZOS)) for c in channels]
    arr = np.stack([np.clip(c, 0, 1) for c in channels] * (3 // len(channels)))
    return torch.from_numpy(arr).unsqueeze(0)


def find_shapes_model(run_dir=DEFAULT_SHAPES_RUN):
    """(weights, controlnet) of the trained shapes world, or None when it has not been trained yet.

    The InnerControl-fine-tuned ControlNet when that stage has finished, else the plain ControlNet."""
    def finished(stage, name):
        path = os.path.join(run_dir, stage, name)
        return path if os.path.isfile(path) and os.path.isfile(os.path.join(run_dir, stage, "done.json")) else None

    weights = finished("base", "sd.safetensors")
    controlnet = finished("finetune/innercontrol-seed0", "controlnet.safetensors") or \
        finished("controlnet", "controlnet.safetensors")
    return (weights, controlnet) if weights and controlnet else None


def parse_args(argv=None):
    p = OneLineParser(description="Stable Diffusion 1.x + ControlNet sampling")
    p.add_argument("--prompt", required=True)
    p.add_argument("--cond", required=True, help="control map image (depth, soft edges, line art)")
    p.add_argument("--weights", help="SD1.x original single file or diffusers folder "
                                     f"(default: the shapes-world model in {DEFAULT_SHAPES_RUN}/)")
    p.add_argument("--controlnet", help="lllyasviel .pth/.safetensors or diffusers folder "
                                        "(default: the controlnet/ subfolder of a diffusers --weights folder)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--control-scale", type=float, default=1.0)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--size", type=int, help="square output size (default: the control map's size)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out.png")
    p.add_argument("--probe", help="probe (.safetensors): also save a strip of its readings along the trajectory")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        p.error(f"--num-images must be at least 1, got {args.num_images}")
    for name in ("size", "height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            p.error(f"--{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {v}")
    if args.size is not None and (args.height or args.width):
        p.error("give either --size or --height/--width, not both")
    if (args.height is None) != (args.width is None):
        p.error("give --height and --width together (or --size for a square)")
    if args.size is not None:
        args.height = args.width = args.size
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def output_paths(out, n):
    root, ext = os.path.splitext(out)
    ext = ext or ".png"
    images = [root + ext] if n == 1 else [f"{root}_{i}{ext}" for i in range(n)]
    return images, root + "_grid" + ext, root + "_probe" + ext


def save_png(image, path, meta):
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    image.save(path, pnginfo=info)


def probe_strip(control, readouts, images):
    """One row per image: control map | the probe's reading at each recorded step | the final image."""
    h, w = images[0].height, images[0].width
    rows = []
    for b, image in enumerate(images):
        cells = [control[min(b, control.shape[0] - 1)]]
        for _, reading in readouts:
            r = torch.nn.functional.interpolate(reading[b:b + 1], size=(h, w), mode="bilinear")[0]
            cells.append(r.expand(3, -1, -1) if r.shape[0] == 1 else r[:3])
        cells.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1))
        rows.append(torch.cat(cells, dim=2))
    return to_pil(torch.cat(rows, dim=1)[None].clamp(0, 1))[0]


def load_models(args, dtype, device):
    """--weights / --controlnet / --probe -> (sd, controlnet, probe), or a CLIError saying what is wrong."""
    weights, cn_path = args.weights, args.controlnet
    if weights is None:
        found = find_shapes_model()
        if found is None:
            raise CLIError(f"no --weights given and no shapes-world model in {DEFAULT_SHAPES_RUN}/: train one with "
                           "`python train.py --control depth`, or pass SD1.5 weights, e.g. --weights "
                           "v1-5-pruned-emaonly.safetensors --controlnet control_v11f1p_sd15_depth.pth")
        weights, cn_path = found[0], cn_path or found[1]

    def checked(flag, path, load, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except SafetensorError as e:
            raise CLIError(f"{flag} {path}: not a valid .safetensors file ({e})") from None
        except (CheckpointError, ValueError, OSError) as e:
            msg = " ".join(str(e).split())
            raise CLIError(msg if str(path) in msg else f"{flag} {path}: {msg}") from None

    if not os.path.exists(weights):
        raise CLIError(f"--weights {weights}: no such file or folder")
    sd = checked("--weights", weights, load_sd, dtype=dtype, device=device)
    if cn_path is None and os.path.isdir(os.path.join(weights, "controlnet")):
        cn_path = os.path.join(weights, "controlnet")
    if cn_path is None:
        raise CLIError(f"no ControlNet for {weights}: pass one with --controlnet PATH (an lllyasviel "
                       ".pth/.safetensors or a diffusers ControlNetModel folder)")
    if not os.path.exists(cn_path):
        raise CLIError(f"--controlnet {cn_path}: no such file or folder")
    cn = checked("--controlnet", cn_path, load_controlnet, sd.unet.config, dtype=dtype, device=device)
    if args.probe and not os.path.isfile(args.probe):
        raise CLIError(f"--probe {args.probe}: no such file")
    probe = checked("--probe", args.probe, load_probe, device=device, dtype=dtype) if args.probe else None
    if probe is not None:
        want = ProbeConfig.for_unet(sd.unet.config)
        if (probe.cfg.feature_channels, probe.cfg.time_dim) != (want.feature_channels, want.time_dim):
            raise CLIError(f"--probe {args.probe}: reads decoder features of widths {probe.cfg.feature_channels}, "
                           f"this UNet has {want.feature_channels}; use a probe trained on this base model")
    return sd, cn, probe, weights, cn_path


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        control = load_control(args.cond, (args.width, args.height) if args.height else None)
        sd, cn, probe, weights, cn_path = load_models(args, dtype, device)
    except CLIError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)

    readouts = [] if probe is not None else None
    images = generate(sd, args.prompt, control, cn, negative_prompt=args.negative_prompt, steps=args.steps,
                      guidance=args.guidance, control_scale=args.control_scale, sampler=args.sampler,
                      seed=args.seed, num_images=args.num_images, dtype=dtype, device=device,
                      probe=probe, readouts=readouts, progress=True)

    meta = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                guidance=args.guidance, control_scale=args.control_scale, sampler=args.sampler,
                weights=os.path.basename(os.path.normpath(weights)),
                controlnet=os.path.basename(os.path.normpath(cn_path)),
                cond=os.path.basename(args.cond), size=f"{images[0].width}x{images[0].height}", dtype=args.dtype)
    paths, grid_path, probe_path = output_paths(args.out, len(images))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for i, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, dict(meta, index=i) if len(images) > 1 else meta)
    if len(images) > 1:
        save_png(make_grid(images), grid_path, meta)
    if probe is not None:
        save_png(probe_strip(control, readouts, images), probe_path,
                 dict(meta, probe=os.path.basename(args.probe),
                      columns="control | " + " | ".join(f"t={t}" for t, _ in readouts) + " | image"))
    print("wrote " + ", ".join(paths + ([grid_path] if len(images) > 1 else [])
                              + ([probe_path] if probe is not None else [])))


if __name__ == "__main__":
    main()
