"""Generate images with Stable Diffusion 1.x and a ControlNet: a prompt and a control map in, PNGs out.

    python sample.py --prompt "a red sphere and a blue box" --cond depth.png
    python sample.py --prompt "..." --cond depth.png --weights v1-5-pruned-emaonly.safetensors \
        --controlnet control_v11f1p_sd15_depth.pth --steps 20 --sampler unipc --seed 0

The samplers are plain functions of an `eps_fn(x, t) -> eps` closure and the schedule's alphas_cumprod, set up as
diffusers' schedulers are from SD1.5's scheduler config, so a seed gives the reference pipeline's image: DDIM (Song
et al. 2020), DPM-Solver++(2M) (Lu et al. 2022) and UniPC (Zhao et al. 2023; ControlNet++'s evaluation sampler).
`generate` runs classifier-free guidance (Ho & Salimans 2022) as one [uncond; cond] batch through the ControlNet
and the UNet; its `callback(step, t, x, features)` sees the decoder features at every step (the probe strip is
one such callback).
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from tqdm import tqdm

import cli
import data
import formats
import fused
import labels
from probe import ProbeConfig, probe_output01
from unet import DecoderFeatures

# Where training runs leave their model folders (formats.MODEL_FOLDER): RUNS/*/model/, used when no --weights is given.
RUNS = "runs"

# -----------------------------------------------------------------------------
# samplers


def ddim_timesteps(steps, num_train_steps=1000, offset=1):
    """SD1.5's "leading" spacing: num_train_steps // steps apart, shifted by steps_offset, descending."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"ddim: steps must be between 1 and {num_train_steps}, got {steps}")
    return [i * (num_train_steps // steps) + offset for i in reversed(range(steps))]


def ddim(eps_fn, x, alphas_cumprod, steps, progress=False):
    """Deterministic DDIM (eta = 0) from pure noise x at t = T down to the clean latent:
    x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_hat (DDIM eq. 12). After the last timestep (t = 1) the
    target is abar[0], not 1 (set_alpha_to_one False)."""
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
    if not 1 <= steps < num_train_steps:
        raise ValueError(f"dpmpp-2m: steps must be between 1 and {num_train_steps - 1}, got {steps}")
    return [i * (num_train_steps // (steps + 1)) + offset for i in range(steps, 0, -1)]


def dpmpp_2m(eps_fn, x, alphas_cumprod, steps, progress=False):
    """DPM-Solver++(2M): the exact exponential integrator of the data-prediction ODE, with x0_hat extrapolated
    linearly in lambda = log(alpha / sigma) from the previous step (arXiv 2211.01095, alg. 2). The first step has
    no history and is first order (= DDIM); the last goes to sigma = 0, where the update is x0_hat itself."""
    abar = alphas_cumprod.double().tolist()
    ts = dpmpp_2m_timesteps(steps, len(abar))
    alpha = [math.sqrt(abar[t]) for t in ts] + [1.0]
    sigma = [math.sqrt(1 - abar[t]) for t in ts] + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])]
    x0_prev = None
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="dpm++2m")):
        x0 = (x - sigma[i] * eps_fn(x, t)) / alpha[i]
        if i == len(ts) - 1:
            return x0
        h = lam[i + 1] - lam[i]
        # second-order correction: D = x0 + (h / 2 h_prev) (x0 - x0_prev)
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * (lam[i] - lam[i - 1])))
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d
        x0_prev = x0


def unipc_timesteps(steps, num_train_steps=1000):
    """"linspace" spacing: steps + 1 points rounded from T - 1 down to 0, the one at 0 dropped. SD1.5's scheduler
    config names no spacing, so UniPC takes its own default (20 steps: 999, 949, ..., 549, 500, 450, ..., 50)."""
    if not 1 <= steps < num_train_steps:  # more would round two timesteps onto one (h = 0)
        raise ValueError(f"unipc: steps must be between 1 and {num_train_steps - 1}, got {steps}")
    stride = (num_train_steps - 1) / steps  # multiplied, not divided, to round the .5 cases as numpy does
    return [round(i * stride) for i in range(steps, 0, -1)]


def unipc(eps_fn, x, alphas_cumprod, steps, progress=False):
    """UniPC-2 with B(h) = e^h - 1 ("bh2") on the data-prediction ODE, from pure noise x at t = T - 1.

    With x0_i the model's clean estimate at (x_i, t_i) and lambda = log(alpha / sigma), every update reads
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) (x0_i + sum_m rho_m D_m / r_m), D_m differences
    of x0 estimates, r_m their lambda offsets over h, rho solving the order conditions (sec. 3, thm. 3.1). The
    predictor UniP is first order on the first and last steps, second order between (= DPM-Solver++(2M)). The
    corrector UniC redoes x_i with the new x0_i as one more difference, after each evaluation but the last, without
    running the model again. With one unknown, rho = 1/2 (the h -> 0 limit, as diffusers has it)."""
    abar = alphas_cumprod.double().tolist()
    ts = unipc_timesteps(steps, len(abar))
    alpha = [math.sqrt(abar[t]) for t in ts] + [1.0]
    sigma = [math.sqrt(1 - abar[t]) for t in ts] + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])]

    def update(i, x, x0, d):  # from t_i to t_{i+1} with the correction d = sum_m rho_m D_m / r_m
        return (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(lam[i] - lam[i + 1])) * (x0 + d)

    x, x0s, x_prev = x.float(), [], None
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="unipc")):
        x0s.append((x - sigma[i] * eps_fn(x, t).float()) / alpha[i])
        if i == len(ts) - 1:  # alpha = 1, sigma = 0: a corrector here would be multiplied by zero
            return x0s[i]
        if i == 1:  # UniC-1
            x = update(0, x_prev, x0s[0], 0.5 * (x0s[1] - x0s[0]))
        elif i > 1:  # UniC-2: rho from the 2x2 order conditions
            h, z = lam[i] - lam[i - 1], lam[i - 1] - lam[i]
            r = (lam[i - 2] - lam[i - 1]) / h
            g1 = math.expm1(z) / z - 1  # z phi_2(z), 2 z phi_3(z), with z = -h in data prediction, B = e^z - 1
            b1, b2 = g1 / math.expm1(z), 2 * (g1 / z - 0.5) / math.expm1(z)
            rho1, rho2 = (b1 - b2) / (1 - r), (b2 - r * b1) / (1 - r)
            x = update(i - 1, x_prev, x0s[i - 1], (rho1 / r) * (x0s[i - 2] - x0s[i - 1]) + rho2 * (x0s[i] - x0s[i - 1]))
        x_prev = x
        r = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i]) if i > 0 else 1.0
        x = update(i, x, x0s[i], (0.5 / r) * (x0s[i - 1] - x0s[i]) if i > 0 else 0.0)  # UniP-1, then UniP-2


SAMPLERS = {"ddim": (ddim, ddim_timesteps), "dpmpp-2m": (dpmpp_2m, dpmpp_2m_timesteps),
            "unipc": (unipc, unipc_timesteps)}


def sampler_timesteps(sampler, steps):
    """The timesteps `sampler` visits with `steps` steps, in order."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler][1](steps)


# -----------------------------------------------------------------------------
# generation


def guided_eps(unet, controlnet, x, t, context, hint=None, guidance=7.5, control_scale=1.0, return_features=False):
    """One noise prediction with classifier-free guidance (Ho & Salimans 2022, eq. 6): eps_u + w (eps_c - eps_u).

    x (B, C, h, w); context [uncond; cond] (2B rows), or the B conditional rows when guidance <= 1 (no guidance,
    as the diffusers pipelines do); hint (B or 1 rows). With return_features, also the conditional half's decoder
    features."""
    B, pair = x.shape[0], guidance > 1
    if pair:
        x = torch.cat([x, x])
        t = t if torch.as_tensor(t).numel() == 1 else torch.cat([t, t])
        hint = hint if hint is None or hint.shape[0] == 1 else torch.cat([hint, hint])
    control = controlnet(x, t, context, hint, scale=control_scale) if controlnet is not None else None
    eps, features = unet(x, t, context, control=control, return_features=True) if return_features \
        else (unet(x, t, context, control=control), None)
    if pair:
        eps_uncond, eps = eps.chunk(2)
        eps = eps_uncond + guidance * (eps - eps_uncond)
        features = features and DecoderFeatures(features.time_emb[B:], [m[B:] for m in features.maps])
    return (eps, features) if return_features else eps


@torch.no_grad()
def generate(sd, prompt, control=None, controlnet=None, negative_prompt="", steps=20, guidance=7.5,
             control_scale=1.0, sampler="ddim", seed=0, num_images=1, height=None, width=None, dtype=None,
             device=None, callback=None, progress=False):
    """Sample images from a StableDiffusion (model.py) and, optionally, a ControlNet; returns PIL images.

    prompt: a string or a list, each giving num_images images (prompt-major, as the diffusers pipelines order
    them). control: (1 or len(prompts), 3, H, W) in [0, 1], at the output size. height/width default to the
    control's size, or 512; dtype/device to the UNet's. The sampler state stays in fp32 whatever the network dtype.
    callback(step, t, x, features): called at every step with the conditional half's DecoderFeatures."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt or ""] * len(prompts) if isinstance(negative_prompt, (str, type(None))) \
        else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    prompts, negatives = ([p for p in ps for _ in range(num_images)] for ps in (prompts, negatives))
    param = next(sd.unet.parameters())
    device, dtype = torch.device(device) if device is not None else param.device, dtype or param.dtype
    if control is not None:
        height, width = height or control.shape[-2], width or control.shape[-1]
    height, width = height or 512, width or 512
    f = sd.vae.cfg.factor
    if height % f or width % f or height <= 0 or width <= 0:
        raise ValueError(f"image size must be a positive multiple of {f} (the VAE's factor), got {height}x{width}")
    if control is not None and tuple(control.shape[-2:]) != (height, width):
        raise ValueError(f"control map is {control.shape[-1]}x{control.shape[-2]}, expected {width}x{height}")
    if (control is None) != (controlnet is None):
        raise ValueError("a control map and a ControlNet go together: give both or neither")
    sampler_timesteps(sampler, steps)  # validates sampler and steps
    warn_if_truncated(sd.tokenizer, set(prompts + (negatives if guidance > 1 else [])))
    context = sd.encode_prompt((negatives + prompts) if guidance > 1 else prompts).to(device, dtype)
    hint = None
    if control is not None:
        if control.shape[0] not in (1, len(prompts) // num_images):
            raise ValueError(f"{control.shape[0]} control maps for {len(prompts) // num_images} prompts")
        hint = control.to(device=device, dtype=dtype)  # one map is encoded once and shared by the whole batch
        hint = hint if hint.shape[0] == 1 else hint.repeat_interleave(num_images, 0)
    calls = []

    def eps_fn(x, t):
        out = guided_eps(sd.unet, controlnet, x.to(dtype), t, context, hint, guidance, control_scale,
                         return_features=callback is not None)
        if callback is not None:
            callback(len(calls), t, x, out[1])
            out = out[0]
        calls.append(t)
        return out.float()

    # the reference pipelines' seed convention: fp32 CPU noise, then the device and dtype
    shape = (len(prompts), sd.unet.config.in_channels, height // f, width // f)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    with fused.cuda_graphs():  # on CUDA the steps replay a recorded graph of each network (fused.py)
        z = SAMPLERS[sampler][0](eps_fn, noise.to(device=device, dtype=dtype).float(), sd.schedule.alphas_cumprod,
                                 steps, progress=progress)  # the initial sigma is 1 for every sampler here
    return to_pil((sd.vae.decode_latents(z.to(dtype)).float() / 2 + 0.5).clamp(0, 1))


def probe_readings(probe, at_steps):
    """A callback for `generate` that keeps the probe's reading (t, (B, C, h, w) in [0, 1]) at the given steps."""
    readings = []

    def callback(step, t, x, features):
        if step in at_steps:
            readings.append((t, probe_output01(probe(features).float())))
    return callback, readings


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


def to_tensor(image):
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def strip(rows, size):
    """Rows of (C, h, w) tiles in [0, 1] -> one PIL image, each tile resized to `size` and made RGB."""
    def tile(x):
        return F.interpolate(x[None].float().cpu(), size=size, mode="bilinear")[0].expand(3, -1, -1)[:3]

    grid = torch.cat([torch.cat([tile(x) for x in row], 2) for row in rows], 1)
    return to_pil(grid[None].clamp(0, 1))[0]


def make_grid(images):
    cols, tiles = math.ceil(math.sqrt(len(images))), [to_tensor(im) for im in images]
    tiles += [torch.zeros_like(tiles[0])] * (-len(tiles) % cols)  # black cells fill the last row
    return strip([tiles[i:i + cols] for i in range(0, len(tiles), cols)], tiles[0].shape[-2:])


@torch.no_grad()
def sample_grid(sd, controlnet, items, control_type, annotator=None, probe=None, steps=20, seed=0):
    """condition | generated | the probe's reading halfway through sampling, one row per dataset item."""
    rows, device = [], next(controlnet.parameters()).device
    for i, item in enumerate(items):
        given = None if item["control"] is None else item["control"][None].to(device)
        label = labels.make_label(control_type, annotator, (item["image"][None].to(device) + 1) / 2, given)
        control = labels.control_image(control_type, label, given)
        callback, readings = probe_readings(probe, {steps // 2}) if probe is not None else (None, [])
        image = generate(sd, item["text"], control.float(), controlnet, steps=steps, seed=seed + i, callback=callback)
        rows.append([control[0], to_tensor(image[0])] + [r[0] for _, r in readings])
    return strip(rows, rows[0][0].shape[-2:])


# -----------------------------------------------------------------------------
# command line


def load_control(path, size=None):
    """A control map as (1, 3, H, W) in [0, 1], from an image file in any mode data.to_rgb01 reads (16-bit maps
    keep their precision). size (W, H): resized with Lanczos, as the reference pipeline does; None: the map's
    own size, rounded down to a multiple of 8."""
    if not os.path.isfile(path):
        raise cli.CLIError(f"--cond {path}: no such file")
    try:
        img = data.open_image(path)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise cli.CLIError(f"--cond {path}: cannot read it as an image ({e.__class__.__name__})") from None
    size = tuple(size) if size is not None else (max(8, img.width // 8 * 8), max(8, img.height // 8 * 8))
    return torch.from_numpy(data.to_rgb01(img, size=None if img.size == size else size, resample=Image.LANCZOS))[None]


def newest_model_folder(runs=RUNS):
    """The most recently written RUNS/*/model/ folder (what `python train.py --control depth` leaves), or None."""
    folders = []
    if os.path.isdir(runs):
        for name in os.listdir(runs):
            sd_file = os.path.join(runs, name, "model", formats.MODEL_FOLDER["sd"])
            if os.path.isfile(sd_file):
                folders.append((os.path.getmtime(sd_file), os.path.dirname(sd_file)))
    return max(folders)[1] if folders else None


def make_parser():
    p = cli.OneLineParser(prog="sample.py", description="Stable Diffusion 1.x + ControlNet sampling")
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", required=True, help="the caption")
    what.add_argument("--cond", required=True, help="the control map image (depth, soft edges, line art)")
    what.add_argument("--negative-prompt", default="", help="what guidance steers away from")
    what.add_argument("--num-images", type=int, default=1, help="images for the prompt (more than one: also a grid)")
    what.add_argument("--seed", type=int, default=0, help="the initial noise (as the diffusers pipelines seed it)")
    what.add_argument("--size", type=int, help="square output size (default: the control map's size)")
    what.add_argument("--height", type=int, help="output height, with --width (default: the control map's)")
    what.add_argument("--width", type=int, help="output width, with --height (default: the control map's)")

    files = p.add_argument_group("model files")
    files.add_argument("--weights", help="SD1.x: an original single file, a diffusers folder or a model folder "
                                         f"(default: the newest {RUNS}/*/model/)")
    files.add_argument("--controlnet", help="an lllyasviel .pth/.safetensors or a diffusers folder (default: the "
                                            "one in the --weights folder)")
    files.add_argument("--probe", help="a probe: also save a strip of its readings along the trajectory")

    how = p.add_argument_group("sampling")
    how.add_argument("--sampler", choices=list(SAMPLERS), default="ddim", help="the ODE solver")
    how.add_argument("--steps", type=int, default=20, help="sampling steps")
    how.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1: none)")
    how.add_argument("--control-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals")
    how.add_argument("--dtype", type=cli.dtype_name, metavar="{fp32,bf16,fp16}",
                     help="network dtype (default: fp16 on cuda, fp32 on cpu)")
    how.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                     help="where to run")

    output = p.add_argument_group("output")
    output.add_argument("--out", default="out.png", help="the image file (several: OUT_0.png, OUT_1.png, ...)")
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        p.error(f"--num-images must be at least 1, got {args.num_images}")
    for name in ("size", "height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            p.error(f"--{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if args.size is not None and (args.height or args.width):
        p.error("give either --size or --height/--width, not both")
    if (args.height is None) != (args.width is None):
        p.error("give --height and --width together (or --size for a square)")
    if args.size is not None:
        args.height = args.width = args.size
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def load_models(args, dtype, device):
    """--weights / --controlnet / --probe -> (sd, controlnet, probe, weights, controlnet path), or a CLIError."""
    weights, cn_path = args.weights, args.controlnet
    if weights is None:
        weights = newest_model_folder()
        if weights is None:
            raise cli.CLIError(f"no --weights given and no model folder in {RUNS}/*/model/: train one with "
                               "`python train.py --control depth`, or pass SD1.5 weights, e.g. --weights "
                               "v1-5-pruned-emaonly.safetensors --controlnet control_v11f1p_sd15_depth.pth")

    def checked(flag, path, load, *args, **kwargs):
        if not os.path.exists(path):
            raise cli.CLIError(f"{flag} {path}: no such file or folder")
        try:
            return load(path, *args, **kwargs)
        except (formats.CheckpointError, ValueError, OSError) as e:
            msg = " ".join(str(e).split())
            raise cli.CLIError(msg if str(path) in msg else f"{flag} {path}: {msg}") from None

    sd = checked("--weights", weights, formats.load_sd, dtype=dtype, device=device)
    cn_path = cn_path or formats.bundled_controlnet(weights)
    if cn_path is None:
        raise cli.CLIError(f"no ControlNet for {weights}: pass one with --controlnet PATH (an lllyasviel "
                       ".pth/.safetensors or a diffusers ControlNetModel folder)")
    cn = checked("--controlnet", cn_path, formats.load_controlnet, sd.unet.config, dtype=dtype, device=device)
    probe = checked("--probe", args.probe, formats.load_probe, dtype=dtype, device=device) if args.probe else None
    if probe is not None:
        want = ProbeConfig.for_unet(sd.unet.config)
        if (probe.cfg.feature_channels, probe.cfg.time_dim) != (want.feature_channels, want.time_dim):
            raise cli.CLIError(f"--probe {args.probe}: reads decoder features of widths {probe.cfg.feature_channels}, "
                           f"this UNet has {want.feature_channels}; use a probe trained on this base model")
    fused.install(sd.requires_grad_(False), cn.requires_grad_(False))  # sampling trains nothing; fused.py's layers
    return sd, cn, probe, weights, cn_path


def save_png(image, path, meta):
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    image.save(path, pnginfo=info)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = cli.DTYPES[args.dtype]
    try:
        control = load_control(args.cond, (args.width, args.height) if args.height else None)
        sd, cn, probe, weights, cn_path = load_models(args, dtype, device)
    except cli.CLIError as e:
        cli.fail("sample.py", e)

    at_steps = {round(i * (args.steps - 1) / 4) for i in range(5)}  # five steps, first to last
    callback, readings = probe_readings(probe, at_steps) if probe is not None else (None, [])
    images = generate(sd, args.prompt, control, cn, negative_prompt=args.negative_prompt, steps=args.steps,
                      guidance=args.guidance, control_scale=args.control_scale, sampler=args.sampler, seed=args.seed,
                      num_images=args.num_images, dtype=dtype, device=device, callback=callback, progress=True)

    meta = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                guidance=args.guidance, control_scale=args.control_scale, sampler=args.sampler,
                weights=os.path.basename(os.path.normpath(weights)), cond=os.path.basename(args.cond),
                controlnet=os.path.basename(os.path.normpath(cn_path)), size=f"{images[0].width}x{images[0].height}",
                dtype=args.dtype)
    root, ext = os.path.splitext(args.out)
    ext = ext or ".png"
    paths = [root + ext] if len(images) == 1 else [f"{root}_{i}{ext}" for i in range(len(images))]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for i, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, dict(meta, index=i) if len(images) > 1 else meta)
    if len(images) > 1:
        paths.append(root + "_grid" + ext)
        save_png(make_grid(images), paths[-1], meta)
    if probe is not None:  # one row per image: control | the probe's reading at 5 steps | the image
        rows = [[control[min(b, len(control) - 1)]] + [r[b] for _, r in readings] + [to_tensor(im)]
                for b, im in enumerate(images)]
        paths.append(root + "_probe" + ext)
        save_png(strip(rows, (images[0].height, images[0].width)), paths[-1],
                 dict(meta, probe=os.path.basename(args.probe),
                      columns="control | " + " | ".join(f"t={t}" for t, _ in readings) + " | image"))
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    main()
