"""Train a ControlNet three ways: ControlNet, ControlNet++ and InnerControl, in one loop.

    python train.py --control depth                       # no weights: a synthetic world, end to end, on a CPU
    python train.py --method innercontrol --control depth --weights v1-5-pruned.safetensors \
        --controlnet control_v11f1p_sd15_depth.pth --probe probe.safetensors \
        --reward-model dpt-hybrid-midas/ --data my_imagefolder/ --out runs/depth
    torchrun --nproc_per_node 8 train.py ...              # DistributedDataParallel

The whole method is `training_step` below (read it first):
  ControlNet   (Zhang et al. 2023)    L = L_diff
  ControlNet++ (arXiv 2404.07987)     L = L_diff + lambda_r * L_reward                L_reward where t <= t_reward
  InnerControl (arXiv 2507.02321)     L = L_diff + lambda_r * L_reward + alpha * L_align
                                                                      L_align where t_align_min <= t <= t_align_max
Only the ControlNet is trained. The UNet, VAE, text encoder, reward model and probe are frozen.
`--stage probe` pre-trains the probe before InnerControl fine-tuning: `probe_step`, the same forward with only the
probe trained.
"""
import copy
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import cli
import data
import formats
import fused
import labels
import sample
from controlnet import ControlNet
from probe import Probe, ProbeConfig, probe_output01

HERE = os.path.dirname(os.path.abspath(__file__))

# Per-control loss windows and weights of the paper's training scripts (InnerControl, sec. 4.1; ControlNet++'s).
CONTROL_DEFAULTS = {
    "depth": dict(t_reward=400, lambda_reward=0.5),
    "hed": dict(t_reward=200, lambda_reward=1.0),
    "lineart": dict(t_reward=200, lambda_reward=1.0),
}


def make_parser():
    p = cli.OneLineParser(prog="train.py", description=__doc__.split("\n")[0],
                          epilog="Without --weights, train.py runs the whole method from scratch on a small "
                                 "synthetic world instead, on a CPU (README).")
    what = p.add_argument_group("what to train")
    what.add_argument("--method", choices=["controlnet", "controlnet++", "innercontrol"], default="innercontrol",
                      help="the loss: diffusion only, + reward, + reward + alignment")
    what.add_argument("--control", choices=list(CONTROL_DEFAULTS), default="depth", help="the kind of control map")
    what.add_argument("--stage", choices=["probe", "finetune"], default="finetune",
                      help="probe: pre-train the probe (probe_step); finetune: train the ControlNet (training_step)")

    files = p.add_argument_group("model files")
    files.add_argument("--weights", help="SD1.x: an original single file or a diffusers folder")
    files.add_argument("--controlnet", help="the ControlNet to start from "
                                            "(default: none, a new one copied from the UNet)")
    files.add_argument("--probe", help="the pre-trained probe that --method innercontrol reads the features with")
    files.add_argument("--reward-model", help="depth: a DPT folder; hed: ControlNetHED.pth; lineart: model.pth "
                                              "of informative-drawings or sk_model.pth")

    dataset = p.add_argument_group("data")
    dataset.add_argument("--data", help="an imagefolder dataset (metadata.jsonl with file_name, text, control)")
    dataset.add_argument("--control-column", help="depth: the metadata column of the depth map "
                                                  "(default: conditioning_file_name)")
    dataset.add_argument("--label-column", help="hed / lineart: a column of stored annotator outputs used as labels "
                                                "(default: the annotator run on the image, as upstream)")
    dataset.add_argument("--resolution", type=int, default=512, help="training images are resolution^2 pixels")
    dataset.add_argument("--resize", choices=list(data.RESIZE_MODES), default="squash",
                         help="squash: straight to resolution^2, bicubic (upstream); crop: short side, then a crop")
    dataset.add_argument("--random-crop", action="store_true", help="with --resize crop: a random crop, not centred")
    dataset.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")

    method = p.add_argument_group("method (defaults: the paper's, per control)")
    method.add_argument("--alpha", type=float, default=1.0, help="alignment loss weight (InnerControl)")
    method.add_argument("--lambda-reward", type=float, help="reward loss weight (default: 0.5 depth, 1.0 edges)")
    method.add_argument("--t-reward", type=int, help="the reward loss where t <= this (default: 400 depth, "
                                                     "200 edges)")
    method.add_argument("--t-align-min", type=int, default=0, help="the alignment loss where t >= this")
    method.add_argument("--t-align-max", type=int, default=920, help="the alignment loss where t <= this")
    method.add_argument("--snr-gamma", type=float, default=0.0, help="Min-SNR-gamma weighting of the diffusion "
                                                                     "loss (0: off, the papers' loss)")
    method.add_argument("--probe-loss", choices=["control", "alignment"], default="control",
                        help="--stage probe: against the ControlNet's input (Readout Guidance) or the alignment "
                             "loss's own comparison")

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, default=10_000, help="optimizer steps")
    optim.add_argument("--batch-size", type=int, default=8, help="samples per process per micro-step")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    optim.add_argument("--lr", type=float, help="learning rate (default: 1e-5 finetune, 1e-3 probe)")
    optim.add_argument("--warmup-steps", type=int, default=10, help="linear learning-rate warm-up")
    optim.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                       help="after the warm-up: constant (upstream) or a cosine decay to 0 at --max-steps")
    optim.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (finetune)")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    optim.add_argument("--mixed-precision", type=cli.dtype_name, default="fp32", metavar="{fp32,bf16,fp16}",
                       help="compute dtype of the frozen networks and autocast (fp16 adds a GradScaler)")
    optim.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    optim.add_argument("--ema", action="store_true", help="keep an EMA copy of the ControlNet and export it")
    optim.add_argument("--ema-decay", type=float, default=0.9999, help="the EMA's decay after its warm-up")
    optim.add_argument("--seed", type=int, default=0, help="fixes the data order, timesteps and noise")
    optim.add_argument("--compile", action="store_true", help="torch.compile the UNet and ControlNet")
    optim.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (torchrun sets one per process)")

    output = p.add_argument_group("output")
    output.add_argument("--out", default="runs/train", help="folder for the log, checkpoints, samples and weights")
    output.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    output.add_argument("--log-every", type=int, default=10, help="write OUT/log.jsonl every N steps")
    output.add_argument("--save-every", type=int, default=500, help="write OUT/checkpoint.pt every N steps")
    output.add_argument("--sample-every", type=int, default=500, help="write a sample grid every N steps (0: never)")

    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    for key, value in CONTROL_DEFAULTS[args.control].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.control == "depth":
        args.control_column = args.control_column or "conditioning_file_name"
    elif args.control_column:  # the ControlNet's input for edges is the annotator's output, never a given map
        p.error(f"--control {args.control} takes its labels from the image (the annotator's output); "
                "--label-column names stored annotator outputs instead of --control-column")
    if args.random_crop and args.resize != "crop":
        p.error("--random-crop needs --resize crop (--resize squash resizes the whole image, nothing is cropped)")
    if args.snr_gamma < 0:
        p.error(f"--snr-gamma must be 0 (off) or positive, got {args.snr_gamma}")
    if args.lr is None:
        args.lr = 1e-3 if args.stage == "probe" else 1e-5
    return args


# ----------------------------------------------------------------------------------------------
# The method. Everything the three papers add on top of plain diffusion training lives here.

def masked_mean(per_sample, count):
    """sum(mask * loss) / (sum(mask) + 1e-10) over the whole optimizer batch. `per_sample` holds the losses of
    this micro-batch's eligible samples only; `count` is the number of eligible samples of the optimizer batch
    (all micro-steps, all processes), so the pieces add up exactly. A batch with no eligible sample adds 0."""
    return per_sample.sum() / (count + 1e-10)


def per_sample_mse(a, b):
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def min_snr_weight(sd, t, gamma):
    """Min-SNR-gamma (Hang et al. 2023): weight min(SNR, gamma) / SNR on the eps loss, so the many easy low-noise
    steps stop drowning the high-noise ones, where the layout is decided. 1 for gamma 0 (the papers' loss)."""
    abar = sd.schedule.alphas_cumprod[t].float()
    return (gamma * (1 - abar) / abar).clamp(max=1) if gamma else 1.0  # min(SNR, gamma) / SNR, SNR = abar / (1-abar)


def reward_loss(models, x_t, eps_hat, t, label, rows, count):
    """ControlNet++ (sec. 3.2): one-step x0 estimate -> VAE decode -> reward model -> MSE against the label.

    Only the `rows` with t <= t_reward are decoded and scored: the VAE decoder costs 3.7 UNet forwards at 512 px,
    so decoding the whole batch and masking afterwards (as upstream does) wastes most of the step. `rows` is a
    host tensor (t is drawn on the host), so no sync."""
    if len(rows) == 0:
        return eps_hat.sum() * 0.0
    rows = rows.to(x_t.device, non_blocking=True)
    x0 = models.sd.schedule.x0_from_eps(x_t[rows], eps_hat[rows], t[rows])
    image = ((models.sd.vae.decode_latents(x0.to(models.compute_dtype)) + 1) / 2).clamp(0, 1)
    pred = labels.reward_prediction(models.control, models.reward_model, image)
    return masked_mean(per_sample_mse(labels.resize(pred.float(), label.shape[-2:]), label[rows]), count)


def alignment_loss(models, features, label, rows, count):
    """InnerControl (sec. 3.2, eq. 6): the frozen probe reads the UNet decoder's features of this very forward
    pass and predicts the control; the ControlNet is trained so that the prediction matches the input control.
    Gradients reach the ControlNet through the UNet's activations."""
    if len(rows) == 0:
        return features.time_emb.sum() * 0.0
    rows = rows.to(features.time_emb.device, non_blocking=True)
    feats = type(features)(features.time_emb[rows], [m[rows] for m in features.maps])
    pred = labels.probe_to_label_space(probe_output01(models.probe(feats)), models.control, size=label.shape[-2:])
    return masked_mean(per_sample_mse(pred, label[rows]), count)


def noisy_inputs(models, batch, t, noise, latent_noise):
    """One micro-batch on the device, ready for the networks (no gradients): the noisy latents x_t at the timesteps
    t (also returned on the device), the prompt embeddings, the ControlNet's input image and the label that the
    reward and alignment losses compare with."""
    sd, dev = models.sd, models.device
    with torch.no_grad():
        image = batch["image"].to(dev, models.compute_dtype, non_blocking=True)
        latents = sd.vae.encode_latents(image, latent_noise).float()
        context = sd.encode_prompt(batch["text"]).to(models.compute_dtype)
        given = None if batch["control"] is None else batch["control"].to(dev, non_blocking=True)
        # depth: the label is the depth map itself; hed/lineart: the annotator run on the RGB image, which is also
        # the ControlNet's input, so that input and label agree (ControlNet++ sec. 3.3; labels.py)
        label = labels.make_label(models.control, models.annotator, (image + 1) / 2, given)
        control = labels.control_image(models.control, label, given)
    t_dev = t.to(dev, non_blocking=True)
    x_t = sd.schedule.add_noise(latents, noise, t_dev)
    return x_t, t_dev, context, control.to(x_t.dtype), label


def training_step(models, batch, t, noise, latent_noise, args, counts):
    """One micro-step of ControlNet, ControlNet++ or InnerControl. Returns a dict of loss tensors (each already
    divided by the optimizer batch's eligible count); their sum is what is back-propagated into the ControlNet.

    t: host (CPU) long tensor of this micro-batch's timesteps (the loss windows select rows on the host, with no
    device sync); counts: eligible samples of the whole optimizer batch per loss (host numbers), so micro-steps and
    processes add up exactly (masked_mean)."""
    sd = models.sd
    # the batch -> noisy latents, prompt embeddings, the ControlNet's input and the label
    x_t, t_dev, context, control, label = noisy_inputs(models, batch, t, noise, latent_noise)

    # forward: the ControlNet's residuals into the frozen UNet; InnerControl also keeps the decoder's features
    innercontrol = args.method == "innercontrol"
    with models.autocast():
        residuals = models.controlnet(x_t, t_dev, context, control)
        if innercontrol:
            eps_hat, features = sd.unet(x_t, t_dev, context, control=residuals, return_features=True)
        else:
            eps_hat, features = sd.unet(x_t, t_dev, context, control=residuals), None

    # ControlNet: the diffusion loss on every sample
    diffusion = per_sample_mse(eps_hat, noise) * min_snr_weight(sd, t_dev, args.snr_gamma)
    losses = {"diffusion": masked_mean(diffusion, counts["all"])}

    # ControlNet++: the reward loss on the low-noise samples, where x0_hat is sharp enough to read
    if args.method in ("controlnet++", "innercontrol"):
        rows = torch.nonzero(t <= args.t_reward).flatten()
        reward = reward_loss(models, x_t, eps_hat, t_dev, label, rows, counts["reward"])
        losses["reward"] = args.lambda_reward * reward

    # InnerControl: the alignment loss on nearly every sample, read from inside the UNet
    if innercontrol:
        rows = torch.nonzero((t >= args.t_align_min) & (t <= args.t_align_max)).flatten()
        losses["align"] = args.alpha * alignment_loss(models, features, label, rows, counts["align"])
    return losses


def probe_step(models, batch, t, noise, latent_noise, args, counts):
    """One micro-step of probe pre-training (before InnerControl fine-tuning): the probe learns to read the control
    map from the frozen UNet's decoder features (the frozen ControlNet in the forward), at every t. Returns
    {"probe": loss}; only the probe gets a gradient."""
    # the batch -> noisy latents, prompt embeddings, the ControlNet's input and the label
    x_t, t_dev, context, control, label = noisy_inputs(models, batch, t, noise, latent_noise)

    # forward through the frozen networks: nothing upstream of the probe needs a graph
    with models.autocast(), torch.no_grad():
        residuals = models.controlnet(x_t, t_dev, context, control)
        _, features = models.sd.unet(x_t, t_dev, context, control=residuals, return_features=True)

    # the probe's loss (the features come in the compute dtype; the probe trains in fp32)
    with models.autocast():
        if args.probe_loss == "alignment":  # what the alignment loss will ask of it, on every sample
            every_row = torch.arange(len(t))
            return {"probe": alignment_loss(models, features, label, every_row, counts["all"])}
        # Readout Guidance: the probe's output against the ControlNet's input, at full resolution
        pred01 = probe_output01(models.probe(features).float(), size=control.shape[-2:])
        return {"probe": masked_mean(per_sample_mse(pred01, control), counts["all"])}


# What one micro-step of each --stage is.
STEPS = {"finetune": training_step, "probe": probe_step}


def draw_timesteps(args, step, n):
    """t ~ U{0..999} for the whole optimizer batch (all micro-steps, all processes), on the host, from a generator
    seeded by the step: every process knows every sample's t without talking, the loss windows need no device
    sync, and resuming repeats the exact draw."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return torch.randint(0, 1000, (n,), generator=g)


def eligible_counts(args, t):
    return {"all": float(len(t)), "reward": float((t <= args.t_reward).sum()),
            "align": float(((t >= args.t_align_min) & (t <= args.t_align_max)).sum())}


def draw_noise(args, models, step, micro, rank, world_size, n):
    """The diffusion noise and the VAE posterior's sampling noise of this process's rows of one micro-batch, from a
    generator seeded by (step, micro-step): the same numbers in a one-process run, a multi-process run, and after
    a resume. The first n rows are kept (unreadable files shrink a batch)."""
    B, hw = args.batch_size, args.resolution // models.sd.vae.cfg.factor
    g = torch.Generator(models.device).manual_seed(args.seed * 7919 + step * 131 + micro)
    shape = (B * world_size, models.sd.unet.config.in_channels, hw, hw)
    return tuple(torch.randn(shape, generator=g, device=models.device)[rank * B:rank * B + n] for _ in range(2))


# ----------------------------------------------------------------------------------------------
# Models, optimizer, EMA.

class Models:
    """Everything a step needs. Frozen networks run in the compute dtype; the one being trained (the ControlNet, or
    the probe with --stage probe) keeps fp32 weights."""

    def __init__(self, args, sd, controlnet, probe=None, reward_model=None, annotator=None):
        self.args, self.sd, self.controlnet, self.probe = args, sd, controlnet, probe
        self.reward_model, self.annotator, self.control = reward_model, annotator, args.control
        self.device = torch.device(args.device)
        self.compute_dtype = cli.DTYPES[args.mixed_precision]
        fused.install(sd, controlnet, reward_model, annotator)  # faster layers, same function (fused.py)
        fused.keep_freed_memory(self.device)  # CPU: each step reuses the memory the last one freed (fused.py)
        for m in (sd.unet, sd.vae, sd.text_encoder, reward_model, annotator):
            if m is not None:
                m.requires_grad_(False).eval().to(self.device, self.compute_dtype)
        controlnet.to(self.device, torch.float32)  # fp32 weights, trained or not: it runs under autocast
        # fine-tuning trains the ControlNet and reads the frozen probe; probe pre-training trains the probe on the
        # frozen ControlNet
        self.trained = "probe" if args.stage == "probe" else "controlnet"
        if self.trained == "controlnet":
            controlnet.train()
            if probe is not None:
                probe.requires_grad_(False).eval().to(self.device, self.compute_dtype)
        else:
            controlnet.requires_grad_(False).eval()
            probe.to(self.device, torch.float32).train()
        if args.grad_checkpointing:
            controlnet.grad_checkpointing = sd.unet.grad_checkpointing = sd.vae.decoder.grad_checkpointing = True

    def autocast(self):
        fp32 = self.compute_dtype == torch.float32
        return nullcontext() if fp32 else torch.autocast(self.device.type, dtype=self.compute_dtype)

    def trainable(self):
        """The module being trained, as the step calls it (a DistributedDataParallel wrapper once `use` set one)."""
        return getattr(self, self.trained)

    def use(self, wrapped):
        """Call the trained module through `wrapped` (DistributedDataParallel) from now on."""
        setattr(self, self.trained, wrapped)


def make_optimizer(args, module):
    # fused: one kernel per step, and it honours `found_inf` on the device (see optimizer_step)
    params = [p for p in module.parameters() if p.requires_grad]
    if args.stage == "probe":  # Readout Guidance: Adam, lr 1e-3, no weight decay
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=0.0, fused=True)
    else:  # ControlNet++ / InnerControl: AdamW(0.9, 0.999), weight decay 1e-2, eps 1e-8
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                eps=1e-8, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, args))
    return opt, sched


def lr_factor(args, step):
    """The learning rate's multiplier at `step`: a short linear warm-up, then constant (upstream's schedule) or a
    cosine decay from 1 after the warm-up to 0 at --max-steps (a probe trained to the end of a decay settles at a
    minimum of its loss instead of wandering around one at full lr)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.lr_schedule == "constant":
        return warm
    progress = max(0, step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_decay(n, max_decay):
    """The decay of the n-th EMA update (n = 1, 2, ...), diffusers' EMAModel schedule as upstream trains with: the
    first update copies, then min(max_decay, (1 + s) / (10 + s)) with s = n - 1. With a constant 0.9999 from the
    start, 37% of the exported weights after 10,000 steps would still be the starting ControlNet's."""
    return 0.0 if n <= 1 else min(max_decay, n / (9 + n))


def optimizer_step(args, module, opt, sched, scaler, ema, loss_total, bad_streak, step):
    """Clip, step, EMA, with no host sync: a non-finite loss or gradient sets the fused optimizer's `found_inf`,
    which skips the update on the device; the EMA skips it too. `step` counts the optimizer steps before this one.
    Returns the gradient norm and the streak of consecutive skipped steps, device tensors read at logging time."""
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
        torch._foreach_mul_(delta, (1 - ema_decay(step + 1, args.ema_decay)) * (1 - bad))
        torch._foreach_add_(ema_params, delta)
    return grad_norm.detach(), (bad_streak + 1) * bad


# ----------------------------------------------------------------------------------------------
# Checkpoints, logging, sample grids.

class StopSignals:
    """Ctrl-C and SIGTERM (a cluster preempting the job, torchrun stopping its workers) ask the training loop to stop
    at the end of the step it is in: raised where it lands, a signal between the optimizer's update and the EMA's would
    leave a half-made step, which the checkpoint saved then would hand to a resume to apply again. Later signals wait
    for the same step (SIGKILL stops at once, losing the steps since the last checkpoint). deliver() then hands the
    signal to the handler that was there before (Ctrl-C: KeyboardInterrupt; SIGTERM: the end of the process; a
    caller's own handler: that). Handlers can only be set from the main thread; elsewhere, and for a signal the process
    ignores, nothing changes.

    Under torchrun the ranks get their signals at different moments (or only one of them does: a node's job preempted),
    so each would stop after a step of its own, and a rank that went on into the next step would wait in its gradient
    all-reduce for ranks that have left. With a process group, stop_now() asks every rank before each step whether any
    got a signal, on the CPU (gloo), so the question adds no wait on the GPU: they all stop after the same step."""

    def __init__(self, group=None):
        self.signum, self.handlers, self.group = None, {}, group
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(s)
                if handler not in (signal.SIG_IGN, None):
                    self.handlers[s] = handler
                    signal.signal(s, self.request)

    def restore(self):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)

    def request(self, signum, frame):
        # a later signal waits for the same step: a Ctrl-C reaches every process of a job, and a program that runs
        # this loop in worker processes may then signal them once more
        if self.signum is None:
            self.signum = signum

    def stop_now(self):
        if self.group is not None:
            mine = torch.tensor([self.signum or 0])
            torch.distributed.all_reduce(mine, torch.distributed.ReduceOp.MAX, group=self.group)
            self.signum = self.signum or int(mine) or None  # a rank with no signal of its own takes the others'
        return self.signum is not None

    def deliver(self):
        signum = self.signum
        handler = self.handlers.get(signum, signal.SIG_DFL)
        if callable(handler):
            handler(signum, None)
        else:
            sys.stdout.flush()  # what the run printed last, before the default action ends the process
            sys.stderr.flush()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            raise SystemExit(128 + signum)  # only if the signal's default action did not end the process


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a kill mid-write leaves the previous checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device):
    return torch.load(path, map_location=device, weights_only=True)  # a checkpoint is data, never code


def checkpoint_state(module, ema, opt, sched, scaler, step, skipped_data):
    return {"trainable": module.state_dict(), "ema": None if ema is None else ema.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "skipped_data": skipped_data,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}


def restore(args, module, opt, sched, scaler, ema, log):
    """(step, skipped data) to start from: OUT/checkpoint.pt's with --resume, else (0, 0) and a fresh log."""
    path = os.path.join(args.out, "checkpoint.pt")
    if not (args.resume and os.path.exists(path)):
        if log and os.path.exists(os.path.join(args.out, "log.jsonl")):
            os.remove(os.path.join(args.out, "log.jsonl"))
        return 0, 0
    ck = load_checkpoint(path, next(module.parameters()).device)
    module.load_state_dict(ck["trainable"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["scaler"])
    if ema is not None and ck.get("ema") is not None:
        ema.load_state_dict(ck["ema"])
    torch.set_rng_state(ck["rng"]["torch"])
    random.setstate(ck["rng"]["python"])
    if log:
        log(f"resumed from {path} at step {ck['step']}")
    return ck["step"], ck["skipped_data"]


def unwrap(module):
    return module.module if hasattr(module, "module") else module


def measure_matmul_flops(device, dtype=torch.float32, n=2048, repeats=5):
    """Achieved FLOP/s of a large matmul: the yardstick for model FLOPs utilisation on any device."""
    a, sync = torch.randn(n, n, device=device, dtype=dtype), getattr(torch, device.type).synchronize
    a @ a
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


class Progress:
    """Loss sums, the progress bar, OUT/log.jsonl (losses, lr, gradient norm, step time, samples/s, MFU) and the
    stop after 10 skipped steps in a row. MFU: the model FLOPs of the first micro-step, counted once (that step
    runs slower), over the achieved FLOP/s of a large matmul on the same device."""

    def __init__(self, args, models, step, rank, world_size, skipped_data):
        self.args, self.models, self.rank, self.W = args, models, rank, world_size
        self.skipped_data, self.sums, self.since, self.t0 = skipped_data, {}, 0, time.perf_counter()
        self.flops, self.counter, self.peak, self.bad_total = None, None, None, 0
        self.bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc=f"{args.stage}:{args.method}",
                        dynamic_ncols=True)

    def count_flops(self):
        if self.flops is None and self.counter is None and not self.args.compile:
            self.counter = FlopCounterMode(display=False)
            return self.counter
        return nullcontext()

    def add(self, losses, batch):
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach()
        self.skipped_data += int(batch.get("skipped", 0))
        if self.counter is not None and self.flops is None:
            self.flops = self.counter.get_total_flops() * self.args.grad_accum * self.W

    def step(self, step, grad_norm, bad_streak, lr):
        """After each optimizer step; the loop's only host syncs, once per logging interval."""
        self.since += 1
        self.bar.update(1)
        self.bad_total = self.bad_total + (bad_streak > 0).float()
        if step % self.args.log_every and step != self.args.max_steps:
            return
        args, names = self.args, sorted(self.sums)
        vals = torch.stack([self.sums[k] for k in names] + [grad_norm.float(), self.bad_total, bad_streak])
        if self.W > 1:
            torch.distributed.all_reduce(vals[:len(names)])
        vals, elapsed = vals.tolist(), time.perf_counter() - self.t0
        row = {"step": step, **{f"loss_{k}": v / self.since for k, v in zip(names, vals)}, "lr": lr,
               "grad_norm": vals[len(names)], "step_time": elapsed / self.since,
               "samples_per_s": args.batch_size * self.W * args.grad_accum * self.since / elapsed,
               "skipped_data": self.skipped_data, "skipped_steps": int(vals[-2])}
        if self.flops:
            dev = self.models.device
            dtype = self.models.compute_dtype if dev.type == "cuda" else torch.float32
            self.peak = self.peak or measure_matmul_flops(dev, dtype)
            row["mfu"] = self.flops * self.since / elapsed / (self.peak * self.W)
        if self.rank == 0:
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix({k.replace("loss_", ""): f"{v:.4g}" for k, v in row.items()
                                  if k.startswith("loss_") or k == "mfu"})
        if vals[-1] >= 10:
            raise RuntimeError(f"stopping: the last {int(vals[-1])} steps had a non-finite loss or gradient (all "
                               f"skipped). Lower --lr, or try --mixed-precision bf16/fp32; the last good checkpoint "
                               f"is {os.path.join(args.out, 'checkpoint.pt')}")
        self.sums, self.since, self.t0 = {}, 0, time.perf_counter()


def write_sample_grid(args, models, dataset, step, ema=None):
    """OUT/samples/step_N.png: condition | generated | probe reading, for the first 4 samples."""
    items = [x for x in (dataset[i] for i in range(min(4, len(dataset)))) if x is not None]
    if not items:
        return
    with models.autocast():  # (train and eval mode are the same function: the ControlNet has no dropout or BN)
        grid = sample.sample_grid(models.sd, unwrap(models.controlnet if ema is None else ema), items, args.control,
                                  models.annotator, models.probe and unwrap(models.probe), seed=args.seed)
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    grid.save(os.path.join(args.out, "samples", f"step_{step:06d}.png"))


# ----------------------------------------------------------------------------------------------
# The loop.

def train(args, models, dataset, rank=0, world_size=1, log=print):
    """Run args.max_steps optimizer steps of this --stage's step (STEPS: the ControlNet's training_step, or the
    probe's probe_step); returns the final step. Resumable from OUT/checkpoint.pt; logs to OUT/log.jsonl."""
    os.makedirs(args.out, exist_ok=True)
    step_fn = STEPS[args.stage]
    module = models.trainable()
    opt, sched = make_optimizer(args, module)
    scaler = torch.amp.GradScaler(models.device.type, enabled=args.mixed_precision == "fp16")
    ema = None
    if args.ema and models.trained == "controlnet":
        ema = copy.deepcopy(module).requires_grad_(False)
    step, skipped = restore(args, module, opt, sched, scaler, ema, log if rank == 0 else None)
    if step >= args.max_steps:
        return step
    model = module
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(module)
        models.use(model)
    if args.compile:
        models.sd.unet, models.controlnet = torch.compile(models.sd.unet), torch.compile(models.controlnet)
    B, W, A = args.batch_size, world_size, args.grad_accum
    batches = iter(data.make_loader(dataset, B, seed=args.seed, num_workers=args.num_workers, rank=rank,
                                    world_size=W, start_step=step * A))
    progress = Progress(args, models, step, rank, W, skipped)
    bad_streak = torch.zeros((), device=models.device)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    def save():
        state = checkpoint_state(module, ema, opt, sched, scaler, step, progress.skipped_data)
        save_checkpoint(ckpt_path, state)
    # from here on, Ctrl-C or SIGTERM finishes the step it lands in, saves it and stops (every rank after the same step)
    stop = StopSignals(torch.distributed.new_group(backend="gloo") if W > 1 else None)
    try:
        while step < args.max_steps and not stop.stop_now():
            t_all = draw_timesteps(args, step, B * W * A)  # the whole optimizer batch's timesteps
            counts = eligible_counts(args, t_all)
            total = torch.zeros((), device=models.device)
            for a in range(A):
                # this process's rows of micro-batch a: samples, timesteps, noise
                batch = next(batches)
                n = len(batch["text"])
                t = t_all[(a * W + rank) * B:][:n]
                noise, latent_noise = draw_noise(args, models, step, a, rank, W, n)
                # forward backward (DDP averages gradients over processes at the last micro-step; the losses are
                # normalised by the whole optimizer batch already, so scale by W)
                with (model.no_sync() if W > 1 and a < A - 1 else nullcontext()), progress.count_flops():
                    losses = step_fn(models, batch, t, noise, latent_noise, args, counts)
                    loss = sum(losses.values())
                    scaler.scale(loss * W).backward()
                total = total + loss.detach()
                progress.add(losses, batch)
            # clip the gradient, step the optimizer and the EMA (skipped on the device if anything is non-finite)
            grad_norm, bad_streak = optimizer_step(args, module, opt, sched, scaler, ema, total, bad_streak, step)
            step += 1
            # timing and logging
            progress.step(step, grad_norm, bad_streak, sched.get_last_lr()[0])
            # checkpoint (never during a streak of skipped steps: the last good checkpoint stays the last one)
            if (step % args.save_every == 0 or step == args.max_steps) and rank == 0 and bad_streak.item() == 0:
                save()
            if rank == 0 and args.sample_every and step % args.sample_every == 0:
                write_sample_grid(args, models, dataset, step, ema)
        # saved while the handlers are still ours: under torchrun a rank that has stopped ends, and the launcher then
        # sends SIGTERM to the others, rank 0 among them
        if stop.signum is not None and rank == 0 and step > 0 and bad_streak.item() == 0:
            save()
            log(f"\n{signal.Signals(stop.signum).name}: saved step {step} to {ckpt_path}; run again with --resume "
                "to continue")
            sys.stdout.flush()
    finally:
        stop.restore()
        progress.bar.close()
    if stop.signum is not None:
        stop.deliver()  # Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process, as they would have
    return step


# ----------------------------------------------------------------------------------------------
# Loading, distributed setup, the command line.

def build_models(args):
    """Load SD1.x, the ControlNet (or a new one from the UNet), the probe and the reward model."""
    sd = formats.load_sd(args.weights, dtype=cli.DTYPES[args.mixed_precision])
    if args.controlnet:
        controlnet = formats.load_controlnet(args.controlnet, sd.unet.config)
    else:
        controlnet = ControlNet.from_unet(sd.unet)
    probe = None
    if args.stage == "probe":  # a new probe to pre-train
        probe = Probe(ProbeConfig.for_unet(sd.unet.config))
    elif args.method == "innercontrol":  # InnerControl reads the features with a pre-trained probe
        if not args.probe:
            raise cli.CLIError("--method innercontrol needs --probe PATH (pre-train one with --stage probe)")
        probe = formats.load_probe(args.probe)
    # the reward model scores decoded images (ControlNet++, InnerControl); for hed/lineart it makes every label
    scores_images = args.stage == "finetune" and args.method in ("controlnet++", "innercontrol")
    reward_model = None
    if scores_images or args.control != "depth":
        if not args.reward_model:
            raise cli.CLIError(f"--control {args.control} with --method {args.method} needs --reward-model PATH "
                               "(depth: a DPT folder such as Intel/dpt-hybrid-midas; hed: ControlNetHED.pth; "
                               "lineart: model.pth of awacke1/Image-to-Line-Drawings, or sk_model.pth)")
        reward_model = formats.load_reward_model(args.control, args.reward_model)
    annotator = reward_model if args.control in ("hed", "lineart") else None
    return Models(args, sd, controlnet, probe, reward_model, annotator)


def setup_distributed():
    """(rank, world size, device): torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, None
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else None
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def finish(args, models):
    """The final artefact beside the checkpoint: the ControlNet (EMA if kept) or the probe, as safetensors."""
    if not os.path.exists(os.path.join(args.out, "checkpoint.pt")):  # a checkpoint is never written mid-streak
        raise RuntimeError("stopping: every step so far was skipped (a non-finite loss or gradient; with fp16 the "
                           "first steps are, while the loss scale settles): nothing to save; run more steps")
    ck = load_checkpoint(os.path.join(args.out, "checkpoint.pt"), "cpu")
    net = unwrap(models.trainable())
    net.load_state_dict(ck["ema"] if ck.get("ema") is not None else ck["trainable"])
    path = os.path.join(args.out, f"{models.trained}.safetensors")
    if models.trained == "probe":
        formats.save_probe(net, path)
    else:
        formats.save_controlnet(net, path)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not {"--weights", "-h", "--help"} & {flag.split("=")[0] for flag in argv}:
        os.execv(sys.executable, [sys.executable, os.path.join(HERE, "shapes.py"), *argv])  # no weights: shapes.py
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    args.device = device or args.device
    if device:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    try:
        if not args.data:
            raise cli.CLIError("--weights needs --data (an imagefolder with metadata.jsonl)")
        models = build_models(args)
        annotator = None
        if models.reward_model is not None:  # rows without a depth map (or stored label) get one from the model
            annotator = functools.partial(labels.reward_prediction, args.control, models.reward_model)
        column = args.control_column if args.control == "depth" else args.label_column
        dataset = data.ControlDataset(args.data, args.resolution, control_column=column, resize=args.resize,
                                      random_crop=args.random_crop, annotator=annotator)
    except (cli.CLIError, formats.CheckpointError, data.DataError) as e:
        cli.fail("train.py", e)
    try:
        train(args, models, dataset, rank, world_size)
        if rank == 0:
            print(f"saved {finish(args, models)}")
    except KeyboardInterrupt:  # Ctrl-C: train() has said what it saved
        sys.exit(130)
    except RuntimeError as e:
        if str(e).startswith("stopping:"):
            sys.exit(f"train.py: error: {e}")
        raise
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
