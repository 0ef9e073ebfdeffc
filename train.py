"""Train a ControlNet three ways: ControlNet, ControlNet++ and InnerControl, in one loop.

    python train.py --control depth                       # no weights: the CPU shapes world, end to end
    python train.py --method innercontrol --control depth --weights v1-5-pruned.safetensors \
        --controlnet control_v11f1p_sd15_depth.pth --probe probe.safetensors \
        --reward-model dpt-hybrid-midas/ --data my_imagefolder/ --out runs/depth
    torchrun --nproc_per_node 8 train.py ...              # DistributedDataParallel

The whole method is `training_step` below (read it first):
  ControlNet   (Zhang et al. 2023)      L = L_diff
  ControlNet++ (arXiv 2404.07987)       L = L_diff + lambda_r * L_reward        L_reward where t <= t_reward
  InnerControl (arXiv 2507.02321)       L = L_diff + lambda_r * L_reward + alpha * L_align
                                                                                 L_align where t_align_min <= t <= t_align_max
Only the ControlNet is trained. The UNet, VAE, text encoder, reward model and probe are frozen.
`--stage probe` pre-trains the probe (Readout Guidance's recipe) before InnerControl fine-tuning.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import reward
from probe import probe_output01

# Per-control defaults from the paper's training scripts (METHOD.md).
CONTROL_DEFAULTS = {
    "depth": dict(t_reward=400, lambda_reward=0.5),
    "hed": dict(t_reward=200, lambda_reward=1.0),
    "lineart": dict(t_reward=200, lambda_reward=1.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["controlnet", "controlnet++", "innercontrol"], default="innercontrol")
    p.add_argument("--control", choices=list(CONTROL_DEFAULTS), default="depth")
    p.add_argument("--stage", choices=["probe", "finetune"], default="finetune")
    p.add_argument("--weights", help="SD1.x: original single file or diffusers folder (none: the shapes world)")
    p.add_argument("--controlnet", help="start from this ControlNet (else initialised from the UNet)")
    p.add_argument("--probe", help="pre-trained probe (.safetensors), needed by --method innercontrol")
    p.add_argument("--reward-model", help="reward model: DPT folder (depth), ControlNetHED.pth, sk_model.pth")
    p.add_argument("--data", help="imagefolder dataset with metadata.jsonl")
    p.add_argument("--control-column", default="conditioning_file_name")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--max-steps", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=8, help="per process, per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default 1e-5 (finetune), 1e-3 (probe)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--random-crop", action="store_true")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--ema", action="store_true", help="keep an EMA copy of the ControlNet")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=1.0, help="alignment loss weight (InnerControl)")
    p.add_argument("--lambda-reward", type=float, default=None, help="reward loss weight (per-control default)")
    p.add_argument("--t-reward", type=int, default=None, help="reward loss where t <= this (per-control default)")
    p.add_argument("--t-align-min", type=int, default=0)
    p.add_argument("--t-align-max", type=int, default=920)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=500, help="sample grid every N steps (0: never)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and ControlNet")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fresh", action="store_true", help="shapes world: start every stage over")
    args = p.parse_args(argv)
    for k, v in CONTROL_DEFAULTS[args.control].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = 1e-3 if args.stage == "probe" else 1e-5
    return args


# ----------------------------------------------------------------------------------------------
# The method. Everything the three papers add on top of plain diffusion training lives here.

def masked_mean(per_sample, count):
    """sum(mask * loss) / (sum(mask) + 1e-10) over the whole optimizer batch. `per_sample` holds the
    losses of this micro-batch's eligible samples only; `count` is the number of eligible samples
    of the optimizer batch (all micro-steps, all processes), so the pieces add up exactly. A batch
    with no eligible sample adds 0."""
    return per_sample.sum() / (count + 1e-10)


def per_sample_mse(a, b):
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def reward_loss(models, x_t, eps_hat, t, label, rows, count):
    """ControlNet++ (sec. 3.2): one-step x0 estimate -> VAE decode -> reward model -> MSE vs label.

    Only the `rows` with t <= t_reward are decoded and scored: the VAE decoder costs 3.7 UNet
    forwards at 512 px, so decoding the whole batch and masking afterwards (as upstream does)
    wastes most of the step. `rows` is a host tensor (t is drawn on the host), so no sync."""
    if len(rows) == 0:
        return eps_hat.sum() * 0.0
    rows = rows.to(x_t.device, non_blocking=True)
    x0 = models.sd.schedule.x0_from_eps(x_t[rows], eps_hat[rows], t[rows])
    image = ((models.sd.vae.decode_latents(x0.to(models.vae_dtype)) + 1) / 2).clamp(0, 1)
    pred = reward.reward_prediction(models.control, models.reward_model, image)
    lab = label[rows]
    if pred.shape[-2:] != lab.shape[-2:]:
        pred = F.interpolate(pred.float(), size=lab.shape[-2:], mode="bilinear", align_corners=False)
    return masked_mean(per_sample_mse(pred, lab), count)


def alignment_loss(models, features, label, rows, count):
    """InnerControl (sec. 3.2, eq. 6): the frozen probe reads the UNet decoder's features of this
    very forward pass and predicts the control; the ControlNet is trained so that the prediction
    matches the input control. Gradients reach the ControlNet through the UNet's activations."""
    if len(rows) == 0:
        return features.time_emb.sum() * 0.0
    rows = rows.to(features.time_emb.device, non_blocking=True)
    feats = type(features)(features.time_emb[rows], [m[rows] for m in features.maps])
    lab = label[rows]
    pred = reward.probe_to_label_space(probe_output01(models.probe(feats)), models.control, size=lab.shape[-2:])
    return masked_mean(per_sample_mse(pred, lab), count)


def training_step(models, batch, t, noise, latent_noise, args, counts):
    """One micro-step of one method. Returns a dict of loss tensors (already divided by the
    optimizer batch's eligible counts); their sum is what is back-propagated.

    t: host (CPU) long tensor of this micro-batch's timesteps; counts: eligible samples of the
    whole optimizer batch per loss (host numbers), so micro-steps and processes add up exactly."""
    sd, dev = models.sd, models.device
    with torch.no_grad():
        image = batch["image"].to(dev, models.vae_dtype, non_blocking=True)
        mean, logvar = sd.vae.encode(image)
        latents = (mean + (0.5 * logvar).exp() * latent_noise.to(mean.dtype)) * sd.vae.cfg.scaling_factor
        latents = latents.float()
        context = sd.encode_prompt(batch["text"]).to(models.compute_dtype)
        cond = batch["control"].to(dev, torch.float32, non_blocking=True)
        # depth: the label is the map itself; hed/lineart: the annotator's output, which also
        # replaces the ControlNet's input so that input and label agree (ControlNet++ sec. 3.3)
        label = reward.make_label(models.control, models.annotator, cond.to(models.compute_dtype))
        control = reward.control_image(models.control, label, cond)
    t_dev = t.to(dev, non_blocking=True)
    x_t = sd.schedule.add_noise(latents, noise, t_dev)

    need_features = args.method == "innercontrol" or args.stage == "probe"
    # probe pre-training: nothing upstream of the probe needs a graph
    with models.autocast(), (torch.no_grad() if args.stage == "probe" else nullcontext()):
        residuals = models.controlnet(x_t, t_dev, context, control.to(x_t.dtype))
        eps_hat, features = sd.unet(x_t, t_dev, context, control=residuals, return_features=True) \
            if need_features else (sd.unet(x_t, t_dev, context, control=residuals), None)

    if args.stage == "probe":
        # Readout Guidance's probe pre-training: predict the control map from noisy features.
        pred01 = probe_output01(models.probe(features).float(), size=control.shape[-2:])
        return {"probe": masked_mean(per_sample_mse(pred01, control), counts["all"])}

    losses = {"diffusion": masked_mean(per_sample_mse(eps_hat, noise), counts["all"])}
    if args.method in ("controlnet++", "innercontrol"):
        rows = torch.nonzero(t <= args.t_reward).flatten()
        losses["reward"] = args.lambda_reward * reward_loss(models, x_t, eps_hat, t_dev, label, rows,
                                                            counts["reward"])
    if args.method == "innercontrol":
        rows = torch.nonzero((t >= args.t_align_min) & (t <= args.t_align_max)).flatten()
        losses["align"] = args.alpha * alignment_loss(models, features, label, rows, counts["align"])
    return losses


def draw_timesteps(args, step, n):
    """t ~ U{0..999} for the whole optimizer batch (all micro-steps, all processes), on the host,
    from a generator seeded by the step: every process knows every sample's t without talking,
    the loss windows need no device sync, and resuming repeats the exact draw."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return torch.randint(0, 1000, (n,), generator=g)


def eligible_counts(args, t):
    return {"all": float(len(t)),
            "reward": float((t <= args.t_reward).sum()),
            "align": float(((t >= args.t_align_min) & (t <= args.t_align_max)).sum())}


# ----------------------------------------------------------------------------------------------
# Models, optimizer, checkpoints.

class Models:
    """Everything the step needs, frozen parts in the compute dtype, the ControlNet in fp32."""

    def __init__(self, args, sd, controlnet, probe=None, reward_model=None, annotator=None):
        self.args, self.sd, self.controlnet, self.probe = args, sd, controlnet, probe
        self.reward_model, self.annotator, self.control = reward_model, annotator, args.control
        self.device = torch.device(args.device)
        self.compute_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
        self.vae_dtype = self.compute_dtype
        frozen = [sd.unet, sd.vae, sd.text_encoder, reward_model, annotator]
        if args.stage == "finetune":
            frozen.append(probe)
        for m in frozen:
            if m is not None:
                m.requires_grad_(False).eval().to(self.device, self.compute_dtype)
        controlnet.to(self.device, torch.float32).train()
        if args.stage == "probe":
            controlnet.requires_grad_(False).eval()
            probe.to(self.device, torch.float32).train()
        if args.grad_checkpointing:
            controlnet.grad_checkpointing = sd.unet.grad_checkpointing = True

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def trainable(self):
        return self.probe if self.args.stage == "probe" else self.controlnet


def make_optimizer(args, module):
    # fused: one kernel per step, and it honours `found_inf` on the device (see optimizer_step)
    params = [p for p in module.parameters() if p.requires_grad]
    if args.stage == "probe":  # Readout Guidance: Adam, lr 1e-3, no weight decay
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=0.0, fused=True)
    else:  # ControlNet++ / InnerControl: AdamW(0.9, 0.999), weight decay 1e-2, eps 1e-8
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                eps=1e-8, fused=True)
    # constant schedule after a short linear warm-up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    return opt, sched


def optimizer_step(args, module, opt, sched, scaler, ema, loss_total, bad_streak):
    """Clip, step, EMA, with no host sync: a non-finite loss or gradient sets the fused optimizer's
    `found_inf`, which skips the update on the device; the EMA skips it too. Returns the gradient
    norm and the streak of consecutive skipped steps, both device tensors read at logging time."""
    params = [p for p in module.parameters() if p.requires_grad]
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip, foreach=True)
    bad = (~torch.isfinite(loss_total.detach()) | ~torch.isfinite(grad_norm)).float()
    opt.found_inf = bad
    opt.step()
    if scaler.is_enabled():
        scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema_params = list(ema.parameters())
        delta = torch._foreach_sub([p.detach() for p in module.parameters()], ema_params)
        torch._foreach_mul_(delta, (1 - args.ema_decay) * (1 - bad))
        torch._foreach_add_(ema_params, delta)
    return grad_norm.detach(), (bad_streak + 1) * bad


FLOPS_SEEN = {}  # FLOPs of one optimizer step, per setting, counted once per process
PEAK_SEEN = {}   # a device's measured matmul FLOP/s, the MFU denominator


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a kill mid-write leaves the previous checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    # weights_only: a checkpoint is data, never code
    return torch.load(path, map_location=device, weights_only=True)


def unwrap(module):
    return module.module if hasattr(module, "module") else module


def measure_matmul_flops(device, dtype=torch.float32, n=2048, repeats=5):
    """Achieved FLOP/s of a large matmul: the yardstick for model FLOPs utilisation on any device."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# The loop.

def train(args, models, dataset, rank=0, world_size=1, log=print):
    """Run args.max_steps optimizer steps of args.method (or of the probe stage) and return the
    final step. Resumable from OUT/checkpoint.pt; logs to OUT/log.jsonl."""
    import copy

    from tqdm import tqdm

    import data
    os.makedirs(args.out, exist_ok=True)
    dev = models.device
    module = models.trainable()
    opt, sched = make_optimizer(args, module)
    scaler = torch.amp.GradScaler(dev.type, enabled=args.mixed_precision == "fp16")
    ema = None
    if args.ema and args.stage == "finetune":
        ema = copy.deepcopy(module).requires_grad_(False)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    step, skipped_data = 0, 0
    if args.resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, dev)
        module.load_state_dict(ck["trainable"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        step, skipped_data = ck["step"], ck["skipped_data"]
        if rank == 0:
            log(f"resumed from {ckpt_path} at step {step}")
    elif rank == 0 and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    if step >= args.max_steps:
        return step

    model = module
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(module)
    if args.stage == "probe":
        models.probe = model
    else:
        models.controlnet = model
    if args.compile:
        models.sd.unet = torch.compile(models.sd.unet)
        models.controlnet = torch.compile(models.controlnet)

    B, W, A = args.batch_size, world_size, args.grad_accum
    loader = data.make_loader(dataset, B, seed=args.seed, num_workers=args.num_workers, rank=rank,
                              world_size=W, start_step=step * A)
    batches = iter(loader)
    latent_hw = args.resolution // 8
    latent_ch = models.sd.unet.config.in_channels

    flops_per_step, peak = None, None
    bad_streak = torch.zeros((), device=dev)
    bad_total = torch.zeros((), device=dev)
    sums = {}
    t_log = time.perf_counter()
    steps_since_log = 0
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc=f"{args.stage}:{args.method}",
               dynamic_ncols=True)
    try:
        while step < args.max_steps:
            t_all = draw_timesteps(args, step, B * W * A)
            counts = eligible_counts(args, t_all)
            total = torch.zeros((), device=dev)
            for a in range(A):
                batch = next(batches)
                skipped_data += int(batch.get("skipped", 0))
                lo = (a * W + rank) * B
                t = t_all[lo:lo + B]
                # noise for the micro-batch of all processes, from a generator seeded by the step:
                # the same numbers in a one-process run, a multi-process run, and after a resume
                g = torch.Generator(dev).manual_seed(args.seed * 7919 + step * 131 + a)
                shape = (B * W, latent_ch, latent_hw, latent_hw)
                noise = torch.randn(shape, generator=g, device=dev)[rank * B:(rank + 1) * B]
                latent_noise = torch.randn(shape, generator=g, device=dev)[rank * B:(rank + 1) * B]
                n = len(batch["text"])  # unreadable files were dropped: keep the first n draws
                t, noise, latent_noise = t[:n], noise[:n], latent_noise[:n]
                sync = nullcontext() if (a == A - 1 or W == 1) else model.no_sync()
                counter = None
                flop_key = (args.method, args.stage, B, args.resolution, sum(p.numel() for p in module.parameters()))
                flops_per_step = flops_per_step or FLOPS_SEEN.get(flop_key)
                if flops_per_step is None and not args.compile:
                    # count the model FLOPs of the first micro-step once (it runs slower while counted)
                    from torch.utils.flop_counter import FlopCounterMode
                    counter = FlopCounterMode(display=False)
                with sync, (counter or nullcontext()):
                    losses = training_step(models, batch, t, noise, latent_noise, args, counts)
                    loss = sum(losses.values())
                    # DDP averages gradients over processes; the losses are already normalised by
                    # the whole optimizer batch, so scale by W to get the global batch's gradient.
                    scaler.scale(loss * W).backward()
                if counter is not None:
                    flops_per_step = FLOPS_SEEN[flop_key] = counter.get_total_flops() * A * W
                total = total + loss.detach()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach()
            grad_norm, bad_streak = optimizer_step(args, module, opt, sched, scaler, ema, total, bad_streak)
            bad_total = bad_total + (bad_streak > 0).float()
            step += 1
            steps_since_log += 1
            bar.update(1)

            if step % args.log_every == 0 or step == args.max_steps:
                # the only host syncs of the loop: once per logging interval
                names = sorted(sums)
                vals = torch.stack([sums[k] for k in names] + [grad_norm.float(), bad_streak, bad_total])
                if W > 1:
                    torch.distributed.all_reduce(vals[:len(names)])
                vals = vals.tolist()
                elapsed = time.perf_counter() - t_log
                row = {"step": step, **{f"loss_{k}": v / steps_since_log for k, v in zip(names, vals)},
                       "lr": sched.get_last_lr()[0], "grad_norm": vals[len(names)],
                       "step_time": elapsed / steps_since_log,
                       "samples_per_s": B * W * A * steps_since_log / elapsed,
                       "skipped_data": skipped_data, "skipped_steps": int(vals[-1])}
                if flops_per_step:
                    if peak is None:
                        dtype = models.compute_dtype if dev.type == "cuda" else torch.float32
                        peak = PEAK_SEEN.get((str(dev), dtype)) or measure_matmul_flops(dev, dtype)
                        PEAK_SEEN[(str(dev), dtype)] = peak
                    row["mfu"] = flops_per_step * steps_since_log / elapsed / (peak * W)
                if rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.4g}" for k, v in row.items()
                                     if k.startswith("loss_") or k == "mfu"})
                if int(vals[len(names) + 1]) >= 10:
                    raise RuntimeError(
                        f"stopping: the last {int(vals[len(names) + 1])} steps had a non-finite loss or "
                        f"gradient (all skipped). Lower --lr, or try --mixed-precision bf16/no; the last "
                        f"good checkpoint is {ckpt_path}")
                sums, steps_since_log, t_log = {}, 0, time.perf_counter()

            if (step % args.save_every == 0 or step == args.max_steps) and bad_streak.item() == 0:
                # (never during a streak of skipped steps: the last good checkpoint stays the last one)
                if rank == 0:
                    save_checkpoint(ckpt_path, checkpoint_state(module, ema, opt, sched, scaler, step, skipped_data))
            if rank == 0 and args.sample_every and step % args.sample_every == 0:
                write_sample_grid(args, models, dataset, step, ema)
    except KeyboardInterrupt:
        if rank == 0 and step > 0:
            save_checkpoint(ckpt_path, checkpoint_state(module, ema, opt, sched, scaler, step, skipped_data))
            log(f"\ninterrupted: saved step {step} to {ckpt_path}; run again (with --resume) to continue")
        raise
    finally:
        bar.close()
    return step


def checkpoint_state(module, ema, opt, sched, scaler, step, skipped_data):
    return {"trainable": module.state_dict(), "ema": None if ema is None else ema.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "skipped_data": skipped_data, "data_position": step,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}


@torch.no_grad()
def write_sample_grid(args, models, dataset, step, ema=None, n=4, steps=20):
    """condition | generated | probe prediction (at mid-trajectory), for the first n samples."""
    import numpy as np
    from PIL import Image

    import sample
    controlnet = unwrap(ema if ema is not None else models.controlnet)
    probe = unwrap(models.probe) if models.probe is not None else None
    rows = []
    was_training = controlnet.training
    controlnet.eval()
    for i in range(min(n, len(dataset))):
        item = dataset[i]
        if item is None:
            continue
        cond = item["control"][None].to(models.device)
        label = reward.make_label(args.control, models.annotator, cond.to(models.compute_dtype))
        control = reward.control_image(args.control, label, cond)
        readouts = []
        with models.autocast():
            image = sample.generate(models.sd, item["text"], control=control.float(), controlnet=controlnet,
                                    steps=steps, seed=args.seed + i, probe=probe, readouts=readouts,
                                    probe_points=3)[0]
        tiles = [control[0], torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255]
        if readouts:
            tiles.append(readouts[len(readouts) // 2][1][0])
        size = control.shape[-2:]
        tiles = [F.interpolate(x[None].float().cpu(), size=size, mode="bilinear")[0].expand(3, -1, -1) for x in tiles]
        rows.append(torch.cat(tiles, dim=2))
    controlnet.train(was_training)
    if rows:
        grid = (torch.cat(rows, dim=1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        Image.fromarray(grid).save(os.path.join(args.out, "samples", f"step_{step:06d}.png"))


def build_models(args):
    """Load SD1.x, the ControlNet (or a new one from the UNet), the probe and the reward model."""
    import controlnet as cn
    import model
    from probe import Probe, ProbeConfig, load_probe
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    sd = model.load_sd(args.weights, dtype=dtype)
    if args.controlnet:
        controlnet = cn.load_controlnet(args.controlnet, sd.unet.config)
    else:
        controlnet = cn.ControlNet.from_unet(sd.unet)
    probe = None
    if args.stage == "probe":
        probe = Probe(ProbeConfig.for_unet(sd.unet.config))
    elif args.method == "innercontrol":
        if not args.probe:
            sys.exit("error: --method innercontrol needs --probe PATH (pre-train one with --stage probe)")
        probe = load_probe(args.probe)
    # the reward model scores decoded images (ControlNet++, InnerControl); for hed/lineart it is also
    # the annotator that makes the labels, in every method and stage
    needs_reward = (args.stage == "finetune" and args.method in ("controlnet++", "innercontrol")) \
        or args.control in ("hed", "lineart")
    reward_model = None
    if needs_reward:
        if not args.reward_model:
            sys.exit(f"error: --control {args.control} with --method {args.method} needs --reward-model PATH "
                     "(depth: a DPT folder such as Intel/dpt-hybrid-midas; hed: ControlNetHED.pth; "
                     "lineart: sk_model.pth)")
        reward_model = reward.load_reward_model(args.control, args.reward_model)
    annotator = reward_model if args.control in ("hed", "lineart") else None
    return Models(args, sd, controlnet, probe, reward_model, annotator)


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if backend == "nccl" else None
    if device:
        torch.cuda.set_device(local)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def finish(args, models):
    """Final artefacts beside the checkpoint: the ControlNet (EMA if kept) or the probe, as safetensors."""
    import controlnet as cn
    from probe import save_probe
    ck = load_checkpoint(os.path.join(args.out, "checkpoint.pt"), "cpu")
    if args.stage == "probe":
        unwrap(models.probe).load_state_dict(ck["trainable"])
        save_probe(unwrap(models.probe), os.path.join(args.out, "probe.safetensors"))
        return os.path.join(args.out, "probe.safetensors")
    net = unwrap(models.controlnet)
    net.load_state_dict(ck["ema"] if ck.get("ema") is not None else ck["trainable"])
    cn.save_controlnet(net, os.path.join(args.out, "controlnet.safetensors"))
    return os.path.join(args.out, "controlnet.safetensors")


def main(argv=None):
    args = parse_args(argv)
    if args.weights is None:
        import shapes  # no weights given: train the whole shapes world on this machine
        return shapes.run(args)
    import data
    rank, world_size, device = setup_distributed()
    if device:
        args.device = device
    torch.manual_seed(args.seed)
    if not args.data:
        sys.exit("error: --weights needs --data (an imagefolder with metadata.jsonl)")
    models = build_models(args)
    annotator = None
    if models.reward_model is not None:  # rows without a control map get one from the annotator
        annotator = lambda image01: reward.reward_prediction(args.control, models.reward_model, image01)
    dataset = data.ControlDataset(args.data, args.resolution, control_column=args.control_column,
                                  random_crop=args.random_crop, annotator=annotator)
    try:
        train(args, models, dataset, rank, world_size)
    except RuntimeError as e:
        if str(e).startswith("stopping:"):
            sys.exit(f"error: {e}")
        raise
    if rank == 0:
        print(f"saved {finish(args, models)}")
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
