"""The shapes world: the whole of InnerControl, from an empty folder, on a 2-core CPU.

`python shapes.py --control depth` runs it, and so does `python train.py --control depth` with no --weights.
Synthetic 3D scenes (shapes_render.py) have exact depth, edges and line art, so every model the method needs can be
trained from scratch in minutes, and the paper's comparison (arXiv 2507.02321, Table 1) can be re-run in miniature:

  1 data          render train and held-out scenes (image, depth, soft edges, line art, object ids, caption)
  2 vae           a small VAE that downsamples 4x: 64 px scenes, 16x16x4 latents
  3 base          text-to-image UNet + a small text encoder with a word-level tokenizer
  4 annotators    two toy annotators for the control: the reward model, and an independent evaluator (another
                  architecture and seed), as DPT-Hybrid and DPT-Large are upstream
  5 controlnet    a ControlNet from the base UNet, diffusion loss only
  6 probe         the probe, pre-trained on the frozen UNet + ControlNet
  7 finetune      ControlNet, ControlNet++ and InnerControl fine-tuning from stage 5, the same seeds (the same
                  batches, timesteps and noise) for the three methods
  8 eval          controllability and a Frechet distance on held-out scenes, the same noise for every row; the
                  paired comparison of the methods; the VAE's floor; the figures

Each stage writes into OUT/<stage>/ and marks itself done (done.json, with the settings it was made with); a rerun
reuses a finished stage only when the current settings would make the same one (else it says which stage is stale
and redoes it), resumes an interrupted one from its last checkpoint (Ctrl-C saves one); --fresh starts over. Stage 8
keeps each row's evaluation in OUT/evaluations/, reused on the same terms. A finished run leaves its models in
OUT/model/ (sd.safetensors, controlnet.safetensors: the InnerControl-fine-tuned ControlNet of the first seed,
probe.safetensors), a model folder that formats.load_sd and sample.py read like any other.
SHAPES_SMOKE=1 runs every stage for a few steps (the CI smoke test); SHAPES_PRESET='{"finetune_steps": 500}'
overrides entries of the preset below, SHAPES_PRESET=gpu runs the larger world on a GPU.
"""
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm import tqdm

import cli
import data
import eval as evaluation
import formats
import fused
import metrics
import model
import labels
import shapes_render
import train
from controlnet import HINT_BLOCK_CHANNELS, ControlNet
from formats import load_controlnet, load_probe
from probe import Probe, ProbeConfig, probe_output01

# Sizes and step counts, chosen so that the whole run fits in 25 minutes on 2 AVX-512 CPU cores (about an hour on 2
# AVX2-only ones; stage times in docs/shapes.md). The annotators train beside the VAE; the fine-tuning runs and the
# evaluations go two at a time, one single-threaded process per core; the other stages use every core.
PRESET = dict(
    size=64, n_train=1500, n_test=128, seeds=(0, 1), device="cpu",
    world_seed=0,  # another value: another trajectory (other renders, initialisations, batches and noise; world())
    vae_ch=16, vae_mult=(1, 2, 4), vae_steps=1000, vae_batch=8, vae_lr=1e-3, vae_object_weight=10.0, vae_kl=1e-2,
    unet_ch=64, unet_res_blocks=1, unet_heads=2, base_steps=800, base_batch=32, base_lr=5e-4, caption_dropout=0.1,
    base_snr_gamma=5.0,  # Min-SNR-gamma weighting of the base model's loss (train.min_snr_weight)
    annotator_width=16, annotator_steps=250, annotator_batch=16, annotator_lr=2e-3,
    # stage 5 stops early, where the ControlNet follows the control only halfway (0.44 of the gap to the floor): from
    # a converged one (900 steps, 0.70-0.77) fine-tuning moved every method by 0.3-0.5 and nothing could be told
    # apart; the probe trains until its loss is flat (docs/experiments.md)
    controlnet_steps=300, controlnet_batch=16, controlnet_lr=1e-3, controlnet_ema=True, controlnet_empty_prompts=0.5,
    controlnet_snr_gamma=5.0,
    probe_steps=600, probe_batch=16, probe_lr=1e-3, probe_schedule="constant", probe_loss="auto",  # see probe_loss()
    # fine-tuning at stage 5's lr, as upstream fine-tunes at its ControlNet's (1e-5 both): at 2e-4 its gain reached a
    # quarter of stage 5's distance to the floor on one of three trajectories, at 1e-3 on all three
    finetune_steps=120, finetune_batch=16, finetune_lr=1e-3, finetune_ema=True, finetune_args=(),  # + train.py flags
    eval_steps=10, guidance=3.0, eval_seed=0, save_every=100, log_every=10,
    workers=None,  # worker processes for the independent runs (None: one per core)
)
# Every stage a few steps, at the real sizes (64 px scenes, 16x16 latents).
SMOKE = dict(n_train=16, n_test=8, seeds=(0, 1), vae_steps=2, base_steps=2, annotator_steps=2, controlnet_steps=2,
             probe_steps=2, finetune_steps=2, eval_steps=2, vae_batch=2, base_batch=4, annotator_batch=2,
             controlnet_batch=2, probe_batch=2, finetune_batch=2, save_every=1, log_every=1)
# A larger world for one GPU (under 10 minutes on a current data-centre GPU, by estimate from the CPU step counts:
# not yet measured): more scenes, longer stages, more held-out scenes and seeds for the comparison.
GPU = dict(device="cuda", n_train=6000, n_test=256, seeds=(0, 1, 2, 3, 4), vae_ch=32, vae_steps=3000, vae_batch=32,
           unet_ch=64, unet_res_blocks=2, base_steps=3000, base_batch=64, annotator_width=32, annotator_steps=1000,
           annotator_batch=32, controlnet_steps=1000, controlnet_batch=32, probe_steps=3000, probe_batch=32,
           finetune_steps=1000, finetune_batch=32, eval_steps=20, save_every=500, workers=1)
METHODS = ("controlnet", "controlnet++", "innercontrol")
FIGURE_ROWS = 6  # held-out scenes shown in the figures
NAMES = {"controlnet": "ControlNet", "controlnet++": "ControlNet++", "innercontrol": "InnerControl"}


def preset():
    P = dict(PRESET)
    if os.environ.get("SHAPES_SMOKE"):
        P.update(SMOKE)
    given = os.environ.get("SHAPES_PRESET", "")
    if given.strip() == "gpu":
        P.update(GPU)
    elif given:
        try:
            P.update(json.loads(given))
        except json.JSONDecodeError as e:
            sys.exit(f"shapes.py: error: SHAPES_PRESET is neither `gpu` nor a JSON object of preset entries ({e})")
    unknown = sorted(set(P) - set(PRESET))
    if unknown:
        sys.exit(f"shapes.py: error: SHAPES_PRESET names unknown entries {unknown}; the entries are {sorted(PRESET)}")
    P["seeds"], P["vae_mult"], P["finetune_args"] = tuple(P["seeds"]), tuple(P["vae_mult"]), tuple(P["finetune_args"])
    problem = io.StringIO()
    try:  # flags for the fine-tuning runs: checked here, so that a typo stops the run before any stage
        with contextlib.redirect_stderr(problem):
            train.parse_args(list(P["finetune_args"]))
    except SystemExit:
        sys.exit(f"shapes.py: error: finetune_args {list(P['finetune_args'])} from SHAPES_PRESET: "
                 f"{problem.getvalue().strip().removeprefix('train.py: error: ')}")
    if P["probe_schedule"] not in ("constant", "cosine"):
        sys.exit(f"shapes.py: error: SHAPES_PRESET probe_schedule is {P['probe_schedule']!r}; use constant or cosine")
    if P["probe_loss"] not in ("auto", "control", "alignment"):
        sys.exit(f"shapes.py: error: SHAPES_PRESET probe_loss is {P['probe_loss']!r}; use auto, control or alignment")
    if P["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("shapes.py: error: this preset runs on a GPU (device cuda) and none is available")
    if P["workers"] is None:
        P["workers"] = 1 if P["device"] != "cpu" else max(1, min(os.cpu_count() or 1, len(METHODS) * len(P["seeds"])))
    return P


# ----------------------------------------------------------------------------------------------
# Which settings make each stage: a stage is reused only when it was made with the settings the current run would
# use (its own preset entries, the control type, and the stages it is built from).

STAGES = {  # stage: (the preset entries that change its result, the stages it reads)
    "data": (("size", "n_train", "n_test", "world_seed"), ()),
    "vae": (("vae_ch", "vae_mult", "vae_steps", "vae_batch", "vae_lr", "vae_object_weight", "vae_kl"), ("data",)),
    "base": (("unet_ch", "unet_res_blocks", "unet_heads", "base_steps", "base_batch", "base_lr", "caption_dropout",
              "base_snr_gamma"), ("vae",)),
    "annotators": (("annotator_width", "annotator_steps", "annotator_batch", "annotator_lr"), ("data",)),
    "controlnet": (("controlnet_steps", "controlnet_batch", "controlnet_lr", "controlnet_ema",
                    "controlnet_empty_prompts", "controlnet_snr_gamma"), ("base", "annotators")),
    "probe": (("probe_steps", "probe_batch", "probe_lr", "probe_schedule", "probe_loss"), ("controlnet",)),
    "finetune": (("finetune_steps", "finetune_batch", "finetune_lr", "finetune_ema", "finetune_args"), ("probe",)),
    "eval": (("eval_steps", "guidance", "eval_seed", "seeds"), ("finetune",)),
}


def settings(P, control, stage, **extra):
    """What a stage is made from: its preset entries, the control, the fingerprints of the stages it reads."""
    keys, reads = STAGES[stage]
    out = {k: list(P[k]) if isinstance(P[k], tuple) else P[k] for k in keys}
    out.update({"control": control, **extra}, **{f"<{r}>": fingerprint(settings(P, control, r)) for r in reads})
    return out


def fingerprint(s):
    return hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]


def done_info(d):
    with open(os.path.join(d, "done.json")) as f:
        return json.load(f)


def mark_done(d, made_with, **info):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "done.json.tmp"), "w") as f:
        json.dump({"settings": made_with, "fingerprint": fingerprint(made_with), **info}, f)
    os.replace(os.path.join(d, "done.json.tmp"), os.path.join(d, "done.json"))


def header(n, name, d, what, made_with):
    """Print the stage's line; True when its finished result can be reused. A stage finished with other settings
    is stale: say which settings changed, and start it over (a partial one of other settings too)."""
    done = os.path.exists(os.path.join(d, "done.json"))
    old = done_info(d).get("settings", {}) if done else None  # {}: made before stages recorded their settings
    if old is None and os.path.exists(os.path.join(d, "settings.json")):  # interrupted: resume only the same
        with open(os.path.join(d, "settings.json")) as f:
            old = json.load(f)
    if old is not None and old != made_with:
        changed = [k.strip("<>") + " stage" if k.startswith("<") else k for k in sorted(set(old) | set(made_with))
                   if old.get(k) != made_with.get(k)]
        print(f"{n}/8 {name}: stale (made with another {', '.join(changed)}), redoing it", flush=True)
        shutil.rmtree(d)
        done = False
    elif done:
        print(f"{n}/8 {name}: done, reusing {d}", flush=True)
        return True
    if not done:
        print(f"{n}/8 {name}: {what}", flush=True)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "settings.json"), "w") as f:
            json.dump(made_with, f)
    return False


# ----------------------------------------------------------------------------------------------
# Models and data in memory

def shapes_config(P, vocab_size, max_len):
    """The SD1.5 architecture at small widths: a UNet of width unet_ch over 4 levels (16x16 latents down to 2x2), a
    text encoder sized for the caption vocabulary, a VAE of width vae_ch that halves the size len(vae_mult) - 1
    times (4x: 64 px -> 16x16)."""
    cfg = model.tiny()
    # two heads, not SD's eight: narrow heads make the attention over the 256 tokens of the 16x16 level costly
    # (at width 32, eight heads 4 wide took a quarter of a step)
    cfg.unet.model_channels, cfg.unet.num_res_blocks, cfg.unet.num_heads = P["unet_ch"], P["unet_res_blocks"], \
        P["unet_heads"]
    cfg.text = model.TextConfig(vocab_size=vocab_size, width=64, layers=2, heads=2, max_len=max_len, mlp_dim=128)
    ch = P["vae_ch"]
    cfg.vae = model.VAEConfig(ch=ch, ch_mult=P["vae_mult"], num_res_blocks=1, norm_groups=max(1, min(32, ch // 2)))
    return cfg


def control_column(control):
    """Depth: the exact map is the control. Edges: none; the annotator reads the image itself, and its output is
    both the ControlNet's input and the label (ControlNet++ sec. 3.3)."""
    return "depth_file_name" if control == "depth" else None


def load_arrays(root, control, size):
    """A rendered split in memory: images (N,3,R,R) in [-1,1]; truths (N,3,R,R) in [0,1], the exact control map of
    the scene; objects (N,1,R,R), 1 on the pixels of the named objects; captions."""
    ds = data.ControlDataset(root, resolution=size, control_column=f"{control}_file_name")
    items = [ds[i] for i in range(len(ds))]
    ids = np.stack([np.asarray(Image.open(os.path.join(root, r.file_name.replace("images/", "ids/"))))
                    for r in ds.rows])
    return (torch.stack([x["image"] for x in items]), torch.stack([x["control"] for x in items]),
            torch.from_numpy(ids >= 2).float()[:, None], [x["text"] for x in items])


def world(P, seed):
    """Every seed of the run shifted by the preset's world_seed: world_seed 0 is the default run; any other value
    runs the whole pipeline on an independent trajectory (renders, initialisations, batches, noise, fine-tuning and
    sampling seeds), to check that a conclusion does not hang on one draw."""
    return seed + 100_000 * P["world_seed"]


def batch_indices(step, n, batch, seed):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch,), generator=g)


# ----------------------------------------------------------------------------------------------
# A small resumable loop for the from-scratch stages (VAE, base model, annotators).

def fit(out, modules, loss_fn, steps, lr, save_every=250, desc="", cosine=False):
    """AdamW on `modules` for `steps` steps (50 warm-up steps, then constant or a cosine decay to 0); loss_fn(step)
    draws its own batch and noise from the step number, so a resumed run sees exactly the batches it would have.
    Checkpoints to OUT/checkpoint.pt every `save_every` steps and when Ctrl-C or SIGTERM stops it, at the end of the
    step it landed in (train.StopSignals). Returns (final loss EMA, s/step)."""
    os.makedirs(out, exist_ok=True)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    decay = (lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))) if cosine else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * decay(s))
    path, step, running = os.path.join(out, "checkpoint.pt"), 0, None
    if os.path.exists(path):
        ck = train.load_checkpoint(path, params[0].device)
        for m, sd in zip(modules, ck["modules"]):
            m.load_state_dict(sd)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, running = ck["step"], ck.get("loss")
        print(f"resumed from {path} at step {step}")

    def save():
        train.save_checkpoint(path, {"modules": [m.state_dict() for m in modules], "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "step": step, "loss": running})

    for m in modules:
        m.train()
    bar = tqdm(total=steps, initial=step, desc=desc, dynamic_ncols=True)
    t0, first = time.perf_counter(), step
    stop = train.StopSignals()  # Ctrl-C or SIGTERM: finish the step, save it, then stop
    try:
        while step < steps and stop.signum is None:
            loss = loss_fn(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == steps:  # the only host syncs of the loop
                running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
                bar.set_postfix(loss=f"{running:.4g}")
            if step % save_every == 0 and step < steps:
                save()
    finally:
        stop.restore()
        bar.close()
    save()
    if stop.signum is not None:
        print(f"\ninterrupted: saved step {step} to {path}", file=sys.stderr)
        stop.deliver()
    return running, (time.perf_counter() - t0) / max(1, step - first)


# ----------------------------------------------------------------------------------------------
# Toy annotators. Two different architectures trained apart, so that the evaluator is not the reward model the
# fine-tuning optimised against. Depth: like DPT, input in [-1, 1] (what labels.depth_reward_prediction feeds),
# positive relative depth out. Edges: like HED and LineArt, input in [0, 1], a map in [0, 1] out.

class ToyAnnotatorUNet(nn.Module):
    """Reward model: a small encoder-decoder with skips."""
    input_size = None  # native resolution: labels.depth_reward_prediction skips DPT's 384 resize

    def __init__(self, w=16, kind="depth"):
        super().__init__()
        self.kind = kind
        c = lambda i, o, s=1: nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.SiLU())  # noqa: E731
        self.enc1, self.enc2, self.enc3 = c(3, w), c(w, 2 * w, 2), c(2 * w, 4 * w, 2)
        self.mid = nn.Sequential(c(4 * w, 4 * w), c(4 * w, 4 * w))
        self.dec2, self.dec1 = c(6 * w, 2 * w), c(3 * w, w)
        self.out = nn.Conv2d(w, 1, 3, 1, 1)

    def features(self, x):
        """Pooled bottleneck features of an image in [-1, 1] (for the Frechet distance)."""
        return self.mid(self.enc3(self.enc2(self.enc1(x)))).mean((2, 3))

    def forward(self, x):
        x = x if self.kind == "depth" else x * 2 - 1
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        m = self.mid(self.enc3(e2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        y = self.out(self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1)))
        return F.softplus(y) if self.kind == "depth" else torch.sigmoid(y)


class ToyAnnotatorDilated(nn.Module):
    """Evaluator: full-resolution dilated convolutions (a different inductive bias and seed)."""
    input_size = None

    def __init__(self, w=16, kind="depth"):
        super().__init__()
        self.kind = kind
        layers, c = [], 3
        for d in (1, 2, 4, 8, 1, 2, 4, 1):
            layers += [nn.Conv2d(c, w, 3, 1, d, dilation=d), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(w, 1, 1)

    def features(self, x):
        return self.body(x).mean((2, 3))

    def forward(self, x):
        y = self.out(self.body(x if self.kind == "depth" else x * 2 - 1))
        return F.softplus(y) if self.kind == "depth" else torch.sigmoid(y)


ANNOTATORS = {"reward": ToyAnnotatorUNet, "evaluator": ToyAnnotatorDilated}


# ----------------------------------------------------------------------------------------------
# Stages 1-4: data, VAE, base model, annotators

def stage_data(root, P, control):
    d = os.path.join(root, "data")
    if not header(1, "data", d, f"rendering {P['n_train']} + {P['n_test']} scenes at {P['size']} px",
                  settings(P, control, "data")):
        t0 = time.perf_counter()
        workers = min(os.cpu_count() or 1, 8) if P["n_train"] >= 200 else 0
        for split, n, seed in (("train", P["n_train"], 1), ("test", P["n_test"], 2)):  # held-out: another seed
            shapes_render.write_shapes_dataset(os.path.join(d, split), n, seed=world(P, seed), size=P["size"],
                                               control=control,
                                               num_workers=workers if n >= 200 else 0)
        mark_done(d, settings(P, control, "data"), seconds=time.perf_counter() - t0)
    return os.path.join(d, "train"), os.path.join(d, "test")


def stage_vae(root, P, cfg, control, images, objects):
    """A VAE whose loss weighs the objects' pixels vae_object_weight times the background's. With a plain mean over
    pixels the easy ground and sky dominate, and a budget of minutes gives objects that are dark blobs, colours gone;
    the renderer's exact object mask (dilated a pixel, for the edges) tells where to look (README)."""
    d, dev = os.path.join(root, "vae"), torch.device(P["device"])
    done = header(2, "vae", d, f"{P['vae_steps']} steps, batch {P['vae_batch']}", settings(P, control, "vae"))
    torch.manual_seed(world(P, 0))
    vae = fused.install(model.VAE(cfg.vae)).to(dev)
    if not done:
        t0 = time.perf_counter()
        weight = 1 + (P["vae_object_weight"] - 1) * F.max_pool2d(objects, 3, 1, 1)

        def loss_fn(step):
            idx = batch_indices(step, len(images), P["vae_batch"], world(P, 10))
            x, w = images[idx].to(dev), weight[idx].to(dev)
            mean, logvar = vae.encode(x)
            g = torch.Generator(dev).manual_seed(world(P, step))
            rec = vae.decode(mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g, device=dev))
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
            # L1 + MSE keeps edges sharper than MSE alone; the KL keeps the latent space smooth, which the base
            # model learns far faster than a sharper, rougher one (README)
            return ((rec - x).abs() + (rec - x).pow(2)).mul(w).sum() / (w.sum() * 3) + P["vae_kl"] * kl

        loss, step_time = fit(d, [vae], loss_fn, P["vae_steps"], P["vae_lr"], P["save_every"], desc="vae",
                              cosine=True)
        with torch.no_grad():
            means = torch.cat([vae.eval().encode(images[i:i + 256].to(dev))[0] for i in range(0, len(images), 256)])
        mean, std = means.mean((0, 2, 3)), means.std((0, 2, 3))
        normalize_latents_(vae, mean, std)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(d, "vae.safetensors"))
        mark_done(d, settings(P, control, "vae"), loss=loss, step_time=step_time, seconds=time.perf_counter() - t0,
                  latent_mean=mean.tolist(), latent_std=std.tolist())
    else:
        vae.load_state_dict(formats.load_state_dict(os.path.join(d, "vae.safetensors")))
    cfg.vae.scaling_factor = vae.cfg.scaling_factor = 1.0  # normalize_latents_ did the scaling
    return vae.requires_grad_(False).eval()


@torch.no_grad()
def normalize_latents_(vae, mean, std):
    """Fold a per-channel normalisation of the latents, (z - mean) / std, into the VAE's 1x1 quant_conv (the
    posterior's mean and log-variance) and post_quant_conv (its inverse), in place: the same architecture and file
    layout, with latents of zero mean and unit variance per channel. SD1.5 needs only its one global scale
    (scaling_factor); this small VAE's channels sit up to 3 stds off zero with half the others' spread, and the
    noise schedule then destroys those channels' content long before the rest (README)."""
    z = len(mean)
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:z] /= std[:, None, None, None]
    q.bias[:z] = (q.bias[:z] - mean) / std
    q.bias[z:] -= 2 * std.log()  # the log-variance of (z - mean) / std
    p.bias += p.weight[:, :, 0, 0] @ mean
    p.weight *= std[None, :, None, None]


def stage_base(root, P, cfg, control, tokenizer, vae, images, texts):
    d, dev = os.path.join(root, "base"), torch.device(P["device"])
    path = os.path.join(d, "sd.safetensors")
    if header(3, "base", d, f"text-to-image UNet + text encoder, {P['base_steps']} steps, batch {P['base_batch']}",
              settings(P, control, "base")):
        return formats.load_sd(path, device=dev)
    t0 = time.perf_counter()
    torch.manual_seed(world(P, 0))
    sd = fused.install(model.StableDiffusion(cfg, tokenizer)).to(dev)
    sd.vae.load_state_dict(vae.state_dict())
    with torch.no_grad():
        latents = torch.cat([sd.vae.encode_latents(images[i:i + 256].to(dev)) for i in range(0, len(images), 256)])
        ids, empty = tokenizer(texts).to(dev), tokenizer([""]).to(dev)

    def loss_fn(step):
        g = torch.Generator(dev).manual_seed(world(P, step))
        idx = batch_indices(step, len(latents), P["base_batch"], world(P, 20)).to(dev)
        x0, tok = latents[idx], ids[idx].clone()
        drop = torch.rand(len(idx), generator=g, device=dev) < P["caption_dropout"]  # for classifier-free guidance
        tok[drop] = empty
        t = torch.randint(0, 1000, (len(idx),), generator=g, device=dev)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        err = train.per_sample_mse(sd.unet(sd.schedule.add_noise(x0, eps, t), t, sd.text_encoder(tok)), eps)
        return (err * train.min_snr_weight(sd, t, P["base_snr_gamma"])).mean()

    loss, step_time = fit(d, [sd.unet, sd.text_encoder], loss_fn, P["base_steps"], P["base_lr"], P["save_every"],
                          desc="base")
    formats.save_sd(sd.eval(), path)
    mark_done(d, settings(P, control, "base"), loss=loss, step_time=step_time, seconds=time.perf_counter() - t0)
    return sd


def train_annotator(root, P, control, name, i, images=None, truths=None):
    """One toy annotator (stage 4), trained to read the exact control from the image through the same function
    training and evaluation call (labels.reward_prediction)."""
    sub, dev = os.path.join(root, "annotators", name), torch.device(P["device"])
    if images is None:
        images, truths, _, _ = load_arrays(os.path.join(root, "data", "train"), control, P["size"])
    target = labels.depth_label(truths) if control == "depth" else truths[:, :1]
    torch.manual_seed(world(P, 100 + i))
    net = ANNOTATORS[name](P["annotator_width"], "depth" if control == "depth" else "edges").to(dev)
    t0 = time.perf_counter()

    def loss_fn(step):
        idx = batch_indices(step, len(images), P["annotator_batch"], world(P, 30 + i))
        x = (images[idx].to(dev) + 1) / 2
        return F.mse_loss(labels.reward_prediction(control, net, x), target[idx].to(dev))

    loss, step_time = fit(sub, [net], loss_fn, P["annotator_steps"], P["annotator_lr"], P["save_every"], desc=name)
    mark_done(sub, settings(P, control, "annotators"), loss=loss, step_time=step_time,
              seconds=time.perf_counter() - t0)
    return sub


def annotator_todo(root, P, control):
    return [name for name in ANNOTATORS if not header(
        4, f"annotators/{name}", os.path.join(root, "annotators", name),
        f"{ANNOTATORS[name].__name__}, {P['annotator_steps']} steps, batch {P['annotator_batch']}",
        settings(P, control, "annotators"))]


def load_annotators(root, P, control):
    """The reward model and the evaluator, frozen (their training: train_annotator)."""
    nets = []
    for name, cls in ANNOTATORS.items():
        net = cls(P["annotator_width"], "depth" if control == "depth" else "edges")
        path = os.path.join(root, "annotators", name, "checkpoint.pt")
        net.load_state_dict(train.load_checkpoint(path, "cpu")["modules"][0])
        nets.append(net.to(P["device"]).requires_grad_(False).eval())
    return nets


# ----------------------------------------------------------------------------------------------
# Stages 5-7: ControlNet, probe and fine-tuning, through train.py

class EmptyPrompts(data.ControlDataset):
    """A share of the captions replaced by "" (drawn per (seed, epoch, index), so a resumed run sees the same): the
    ControlNet paper trains its ControlNets with 50% empty prompts, so that they learn to read the scene from the
    control alone."""

    def __init__(self, *args, share=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.share = share

    def __getitem__(self, key):
        sample = super().__getitem__(key)
        key = key if isinstance(key, tuple) else (key, 0, self.seed)
        if sample is not None and self.share and np.random.default_rng((7, *key)).random() < self.share:
            sample["text"] = ""
        return sample


def run_train_stage(out, P, sd, controlnet, probe, reward_model, dataset, method, stage, control, steps, batch,
                    lr, seed, extra=(), empty_prompts=0.0):
    """One call of train.train with the shapes-world models (resuming OUT/checkpoint.pt if there is one); returns
    the path of the trained ControlNet or probe and the seconds it took."""
    argv = ["--method", method, "--stage", stage, "--control", control, "--out", out, "--max-steps", str(steps),
            "--batch-size", str(batch), "--lr", str(lr), "--seed", str(seed), "--resolution", str(P["size"]),
            "--num-workers", "0", "--device", P["device"], "--sample-every", "0", "--log-every", str(P["log_every"]),
            "--save-every", str(P["save_every"]), "--warmup-steps", "10", "--resume"]
    args = train.parse_args(argv + list(extra))
    models = train.Models(args, sd, controlnet, probe, reward_model, annotator=reward_model if control != "depth"
                          else None)
    ds = EmptyPrompts(dataset, P["size"], control_column=control_column(control), share=empty_prompts)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train.train(args, models, ds, log=print)  # prints "resumed from ... at step N" when it continues
    seconds = time.perf_counter() - t0
    path = train.finish(args, models)
    sd.requires_grad_(False).eval()
    return path, seconds


def loss_trend(d, key, window=100):
    """Whether a loss has flattened: over the last `window` steps of train.py's log, its mean, the least-squares
    slope per 100 steps with its standard error, and the slope over the mean. Each logged value averages a few
    batches of random timesteps, so the slope is noisy: it is flat when zero lies within two standard errors.
    None without enough logged steps."""
    rows = []
    if os.path.exists(os.path.join(d, "log.jsonl")):
        with open(os.path.join(d, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    last = [r for r in rows if key in r and r["step"] > rows[-1]["step"] - window] if rows else []
    if len(last) < 4:
        return None
    steps, losses = np.array([r["step"] for r in last], float), np.array([r[key] for r in last], float)
    slope, intercept = np.polyfit(steps, losses, 1)
    residuals = losses - (slope * steps + intercept)
    stderr = np.sqrt(residuals.var(ddof=2) / ((steps - steps.mean()) ** 2).sum())
    return {"window": int(steps[-1] - steps[0]) + int(steps[1] - steps[0]), "loss": float(losses.mean()),
            "slope_per_100": float(slope * 100), "stderr_per_100": float(stderr * 100),
            "relative": float(slope * 100 / losses.mean()), "flat": bool(abs(slope) <= 2 * stderr)}


def describe_trend(trend):
    verdict = "flat" if trend.get("flat") else "still moving"
    return (f"{trend['loss']:.4g}, slope {trend['slope_per_100']:+.2g} ± {trend.get('stderr_per_100', 0):.2g} per "
            f"100 steps ({trend['relative']:+.1%} of the loss): {verdict}")


def log_step_time(d):
    """Median step time from train.py's log (the first interval holds the FLOP count, so it is skipped)."""
    rows = []
    if os.path.exists(os.path.join(d, "log.jsonl")):
        with open(os.path.join(d, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    times = [r["step_time"] for r in rows[1:]] or [r["step_time"] for r in rows]
    return float(np.median(times)) if times else None


def stage_controlnet(root, P, sd, reward_model, train_dir, control):
    d = os.path.join(root, "controlnet")
    made_with = settings(P, control, "controlnet")
    if not header(5, "controlnet", d, f"from the base UNet, diffusion loss only, {P['controlnet_steps']} steps, "
                                      f"batch {P['controlnet_batch']}", made_with):
        torch.manual_seed(world(P, 0))
        # the hint encoder halves the control as often as the VAE halves the image: two stride-2 steps for 4x
        widths = HINT_BLOCK_CHANNELS[:2 * int(math.log2(sd.vae.cfg.factor)) + 1]
        _, seconds = run_train_stage(d, P, sd, ControlNet.from_unet(sd.unet, 3, widths), None, reward_model, train_dir,
                                     "controlnet", "finetune", control, P["controlnet_steps"], P["controlnet_batch"],
                                     P["controlnet_lr"], world(P, 0), ("--ema",) * P["controlnet_ema"] +
                                     ("--snr-gamma", str(P["controlnet_snr_gamma"])), P["controlnet_empty_prompts"])
        mark_done(d, made_with, seconds=seconds, step_time=log_step_time(d))
    return os.path.join(d, "controlnet.safetensors")


def stage_probe(root, P, sd, controlnet_path, reward_model, train_dir, control):
    d = os.path.join(root, "probe")
    made_with = settings(P, control, "probe")
    if not header(6, "probe", d, f"reads the control from the frozen UNet's decoder features, {P['probe_steps']} "
                                 f"steps, batch {P['probe_batch']}", made_with):
        torch.manual_seed(world(P, 0))
        probe = Probe(ProbeConfig.for_unet(sd.unet.config))
        path, seconds = run_train_stage(d, P, sd, load_controlnet(controlnet_path), probe, reward_model, train_dir,
                                        "innercontrol", "probe", control, P["probe_steps"], P["probe_batch"],
                                        P["probe_lr"], world(P, 0), ("--probe-loss", P["probe_loss"],
                                                                     "--lr-schedule", P["probe_schedule"]))
        check_probe(sd, load_controlnet(controlnet_path, device=P["device"]), load_probe(path, device=P["device"]),
                    reward_model, train_dir, control, P)
        trend = loss_trend(d, "loss_probe")
        if trend:
            print(f"  probe loss over its last {trend['window']} steps: {describe_trend(trend)}", flush=True)
        mark_done(d, made_with, seconds=seconds, step_time=log_step_time(d), loss_trend=trend)
    return os.path.join(d, "probe.safetensors")


def check_probe(sd, controlnet, probe, reward_model, train_dir, control, P):
    """Stop if the probe reads the same map from every scene: its tanh saturated (with --probe-loss control a
    line-art probe did this, README), and the alignment loss would pass no gradient. Stage 7 would then train
    ControlNet++ under InnerControl's name."""
    images, truths, _, texts = load_arrays(train_dir, control, P["size"])
    k = min(16, len(images))
    rows = probe_error_by_timestep(sd, controlnet, probe, reward_model, truths[:k].to(P["device"]),
                                   images[:k].to(P["device"]), texts[:k], control)
    spread = max(r["probe"].std((1, 2, 3)).max().item() for r in rows)
    if spread < 1e-3 and P["probe_steps"] >= 50:  # a few smoke-test steps leave the probe near its constant start
        sys.exit(f"shapes.py: error: the stage-6 probe gives a constant reading (spread {spread:.1e}); try another "
                 f"SHAPES_PRESET probe_lr or probe_loss, then rerun (stage 6 starts over)")


def probe_loss(P, control):
    """train.py --probe-loss for stage 6. "auto": Readout Guidance's target, the ControlNet's input, except for line
    art. Its input is thin white lines on a black ground; with that target the probe's loss stops falling after 30
    steps and its tanh ends saturated, its output the same for every scene. Trained on the alignment loss's own
    comparison (min-max normalised, so the scale of its output is free), it reads the outlines (README)."""
    if P["probe_loss"] != "auto":
        return P["probe_loss"]
    return "alignment" if control == "lineart" else "control"


def finetune_dir(root, method, seed):
    return os.path.join(root, "finetune", f"{method}-seed{seed}")


def finetune_one(root, P, control, method, seed, sd=None, reward_model=None):
    """One fine-tuning run (stage 7) from the stage-5 ControlNet. Loads what it needs from the finished stages when
    not given them, so that it can run in a worker process."""
    d = finetune_dir(root, method, seed)
    if sd is None:
        sd = formats.load_sd(os.path.join(root, "base", "sd.safetensors"), device=P["device"])
        reward_model = load_annotators(root, P, control)[0]
    probe = load_probe(os.path.join(root, "probe", "probe.safetensors")) if method == "innercontrol" else None
    _, seconds = run_train_stage(d, P, sd.requires_grad_(False).eval(),
                                 load_controlnet(os.path.join(root, "controlnet", "controlnet.safetensors")),
                                 probe, reward_model, os.path.join(root, "data", "train"), method, "finetune", control,
                                 P["finetune_steps"], P["finetune_batch"], P["finetune_lr"], world(P, seed),
                                 ("--ema",) * P["finetune_ema"] + P["finetune_args"])  # e.g. ["--alpha", "0.5"]
    mark_done(d, settings(P, control, "finetune", method=method, seed=seed), seconds=seconds,
              step_time=log_step_time(d))
    return d


def stage_finetune(root, P, sd, reward_model, control):
    """ControlNet, ControlNet++ and InnerControl from the same start, with the same seeds: the same batches,
    timesteps and noise for the three methods. The runs are independent, so they share the cores: one
    single-threaded worker process per core (the ops are small, and one process per core beats threads that wait
    on each other)."""
    jobs = [(m, s) for m in METHODS for s in P["seeds"]]
    todo = [(m, s) for m, s in jobs if not header(
        7, f"finetune {NAMES[m]}, seed {s}", finetune_dir(root, m, s),
        f"from stage 5, {P['finetune_steps']} steps, batch {P['finetune_batch']}",
        settings(P, control, "finetune", method=m, seed=s))]
    if P["workers"] > 1 and len(todo) > 1:
        print(f"  {len(todo)} runs in {P['workers']} worker processes (progress in each run's console.txt)",
              flush=True)
        Workers(P["workers"], [(finetune_one, (root, P, control, m, s)) for m, s in todo],
                [os.path.join(finetune_dir(root, m, s), "console.txt") for m, s in todo],
                [f"finetune {NAMES[m]}, seed {s}" for m, s in todo]).wait()
    else:
        for method, seed in todo:
            finetune_one(root, P, control, method, seed, sd, reward_model)
    return {(m, s): os.path.join(finetune_dir(root, m, s), "controlnet.safetensors") for m, s in jobs}


# ----------------------------------------------------------------------------------------------
# Worker processes: independent runs (the fine-tuning runs, the annotators, the evaluations) on separate cores.

_interrupted = False  # in a worker process: set by the first Ctrl-C, after which it starts no other call


def _worker_init():
    torch.set_num_threads(1)

    def interrupted(signum, frame):  # the first Ctrl-C stops the run (it saves a checkpoint); later ones wait
        global _interrupted
        _interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupted)


def _worker_call(fn, args, console):
    """Run fn(*args) with stdout and stderr (its progress bars) going to the file `console`."""
    if _interrupted:  # a call the pool had already queued for this worker: the run is stopping, do not start it
        raise KeyboardInterrupt
    os.makedirs(os.path.dirname(console), exist_ok=True)
    with open(console, "a", buffering=1) as f:
        sys.stdout, sys.stderr = f, f
        try:
            return fn(*args)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


class Workers:
    """Calls [(fn, args)] running in n spawned single-threaded processes, each call's output going to its console
    file. wait() prints one line per finished call. On Ctrl-C (or any error) stop() tells every worker to stop;
    each saves its checkpoint before the interrupt goes on."""

    def __init__(self, n, calls, consoles, names):
        self.pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        self.t0, self.consoles, self.names = time.perf_counter(), consoles, names
        self.futures = [self.pool.submit(_worker_call, fn, args, console)
                        for (fn, args), console in zip(calls, consoles)]

    def wait(self):
        """The calls' results, in order."""
        results = []
        try:
            for fut, name, console in zip(self.futures, self.names, self.consoles):
                try:
                    results.append(fut.result())
                except Exception as e:
                    raise RuntimeError(f"{name} failed ({type(e).__name__}: {e}); its output is in {console}") from e
                print(f"  {name}: done ({time.perf_counter() - self.t0:.0f} s)", flush=True)
        except BaseException:
            self.stop()
            raise
        self.pool.shutdown(wait=True)
        return results

    def stop(self):
        for fut in self.futures:
            fut.cancel()
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Stage 8: evaluation, the paired comparison, the figures

@torch.no_grad()
def probe_error_by_timestep(sd, controlnet, probe, reward_model, truths, images, texts, control, seed=0):
    """Per timestep bucket (0-200, ..., 800-1000): RMSE (8-bit) of the probe's reading of the control from the
    UNet's features, beside the reward model run on the one-step x0 estimate: the paper's sec. 3.1 argument,
    measured (the probe stays usable at high t, the x0 estimate blurs)."""
    dev, g = images.device, torch.Generator(images.device).manual_seed(seed)
    depth = truths if control == "depth" else None
    label = labels.make_label(control, reward_model, (images + 1) / 2, depth)
    cond = labels.control_image(control, label, depth)
    context, latents = sd.encode_prompt(texts), sd.vae.encode_latents(images)
    rows = []
    for lo in range(0, 1000, 200):
        t = torch.randint(lo, lo + 200, (len(images),), generator=g, device=dev)
        x_t = sd.schedule.add_noise(latents, torch.randn(latents.shape, generator=g, device=dev), t)
        eps, feats = sd.unet(x_t, t, context, control=controlnet(x_t, t, context, cond), return_features=True)
        p = labels.probe_to_label_space(probe_output01(probe(feats)), control, size=label.shape[-2:])
        x0 = sd.schedule.x0_from_eps(x_t, eps, t)
        r = labels.reward_prediction(control, reward_model, ((sd.vae.decode_latents(x0) + 1) / 2).clamp(0, 1))
        probe_rmse, x0_rmse = metrics.rmse_8bit(p, label).cpu(), metrics.rmse_8bit(r, label).cpu()
        mean, low, high = paired_difference(probe_rmse[None], x0_rmse[None])
        rows.append({"bucket": f"{lo}-{lo + 200}", "probe_rmse": probe_rmse.mean().item(),
                     "x0_reward_rmse": x0_rmse.mean().item(), "difference": mean, "lo": low, "hi": high,
                     "verdict": probe_verdict(low, high), "probe": p[:FIGURE_ROWS], "x0_reward": r[:FIGURE_ROWS]})
    return rows


def probe_verdict(lo, hi):
    """Which reads the control better in a t bucket, from the 95% interval of probe RMSE - x0_hat's RMSE over the
    scenes: "probe", "x0" or "level" (the interval holds 0). Runs on other world seeds agree about the probe when
    their verdicts agree."""
    return "probe" if hi < 0 else "x0" if lo > 0 else "level"


@torch.no_grad()
def evaluate_one(root, P, control, controlnet_path, texts, cond, label, real_features, sd=None, evaluator=None):
    """Generate the held-out scenes (with the ControlNet at controlnet_path, or none) and score them: returns
    (images, per-scene controllability (N,), Frechet distance to the real renders on the evaluator's features)."""
    if sd is None:  # in a worker process
        sd = formats.load_sd(os.path.join(root, "base", "sd.safetensors"), device=P["device"])
        evaluator = load_annotators(root, P, control)[1]
    controlnet = load_controlnet(controlnet_path, device=P["device"]) if controlnet_path else None
    fused.install(sd, controlnet, evaluator)
    # every row starts from the same initial noise (seed eval_seed): the rows differ only in their ControlNet, and
    # the spread over the fine-tuning seeds is the training's, not the sampler's
    gen = evaluation.generate_images(sd, texts, None if controlnet is None else cond.to(P["device"]), controlnet,
                                     steps=P["eval_steps"], guidance=P["guidance"], seed=world(P, P["eval_seed"]),
                                     size=P["size"])
    scores = evaluation.controllability(control, evaluator, gen.to(P["device"]), label.to(P["device"])).cpu()
    return gen, scores, metrics.fid(real_features, evaluation.evaluator_features(evaluator, gen.to(P["device"])))


def paired_difference(a, b, resamples=10_000, seed=0):
    """Mean of a - b over (seeds, scenes) score arrays of two methods run with the same seeds and evaluated on the
    same scenes from the same noise, with a 95% interval from a bootstrap over both seeds and scenes."""
    d = torch.as_tensor(np.asarray(a, np.float64) - np.asarray(b, np.float64))  # (S, N)
    g = torch.Generator().manual_seed(seed)
    si = torch.randint(0, d.shape[0], (resamples, d.shape[0]), generator=g)
    ni = torch.randint(0, d.shape[1], (resamples, d.shape[1]), generator=g)
    means = d[si[:, :, None], ni[:, None, :]].mean((1, 2))
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return d.mean().item(), lo, hi


@torch.no_grad()
def eval_inputs(control, reward_model, evaluator, images, truths):
    """What every evaluation of these held-out scenes shares: the ControlNet's input (the reward model's annotation,
    as in training), the label (the evaluator's) and the real renders' evaluator features (for the Frechet
    distance)."""
    depth = truths if control == "depth" else None
    cond = labels.control_image(control, labels.make_label(control, reward_model, (images + 1) / 2, depth), depth)
    label = evaluation.eval_label(control, evaluator, (images + 1) / 2, depth)
    return cond, label, evaluation.evaluator_features(evaluator, (images + 1) / 2).cpu()


def paired_table(per_scene, control):
    """Each pair of methods: the mean paired difference of their per-scene scores, its 95% interval, and whether
    it is significant (the interval excludes 0)."""
    pairs = []
    for a, b in (("controlnet++", "controlnet"), ("innercontrol", "controlnet"), ("innercontrol", "controlnet++")):
        mean, lo, hi = paired_difference(per_scene[a], per_scene[b])
        better = (mean < 0) == (control == "depth")  # depth RMSE: lower is better; edges' SSIM: higher
        pairs.append({"pair": f"{NAMES[a]} - {NAMES[b]}", "mean": mean, "lo": lo, "hi": hi,
                      "significant": lo > 0 or hi < 0, "better": NAMES[a] if better else NAMES[b]})
    return pairs


@torch.no_grad()
def vae_floor(sd, evaluator, images, objects, label, control):
    """The best any generated image can score: the evaluator on the VAE's reconstructions of the held-out renders,
    beside its score on the renders themselves, and the reconstructions' PSNR (all pixels, object pixels)."""
    rec = ((sd.vae.decode(sd.vae.encode(images)[0]) + 1) / 2).clamp(0, 1)
    real = (images + 1) / 2
    err = (rec - real).pow(2).mean(1, keepdim=True)

    def psnr(w):  # per image, over the pixels w marks, then the mean over images
        mse = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1)
        return (10 * torch.log10(1 / mse)).mean()
    return rec, {"psnr": psnr(torch.ones_like(objects)).item(), "psnr_objects": psnr(objects).item(),
                 "real": evaluation.controllability(control, evaluator, real, label).mean().item(),
                 "reconstruction": evaluation.controllability(control, evaluator, rec, label).mean().item()}


def save_figure(path, columns, headers, size=96):
    """columns: list of (N,C,H,W) tensors in [0,1]; one column each, one row per sample, a header row."""
    tile = lambda x: F.interpolate(x.float().cpu().expand(-1, 3, -1, -1), size=(size, size)).clamp(0, 1)  # noqa
    grid = torch.cat([torch.cat(list(tile(c)), 1) for c in columns], 2)
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    canvas = Image.new("RGB", (img.width, img.height + 16), "white")
    canvas.paste(img, (0, 16))
    draw = ImageDraw.Draw(canvas)
    for i, h in enumerate(headers):
        draw.text((i * size + 3, 2), h, fill="black")
    canvas.save(path)


def evaluation_settings(P, control, controlnet_stage):
    """What one row of the eval stage is made from: the sampling settings, the base model, the evaluator (and, through
    them, the held-out scenes), and the settings of the stage that made its ControlNet (None for the base model's
    row). The rows' list ("seeds") is not among them: adding fine-tuning seeds to a finished run leaves the
    evaluations of the rows it had unchanged."""
    return {**{k: P[k] for k in STAGES["eval"][0] if k != "seeds"}, "control": control,
            "<base>": fingerprint(settings(P, control, "base")),
            "<annotators>": fingerprint(settings(P, control, "annotators")),
            "controlnet": None if controlnet_stage is None else fingerprint(controlnet_stage)}


def reused_evaluation(path, made_with):
    """The saved (images, per-scene scores, Frechet distance) of one row, or None unless made with these settings."""
    if not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=True)
    return (saved["images"], saved["scores"], saved["fd"]) if saved["settings"] == made_with else None


def evaluate_and_save(path, made_with, *args):
    """evaluate_one, its result saved to path with the settings it was made with (in the worker, as each row ends:
    a Ctrl-C in stage 8 keeps the rows already done)."""
    images, scores, fd = evaluate_one(*args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"settings": made_with, "images": images.cpu(), "scores": scores, "fd": fd}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return images, scores, fd


def stage_eval(root, P, sd, controlnet_path, probe_path, finetuned, reward_model, evaluator, test_dir, control):
    d, dev = os.path.join(root, "eval"), torch.device(P["device"])
    t0 = time.perf_counter()
    images, truths, objects, texts = load_arrays(test_dir, control, P["size"])
    images, truths, objects = images.to(dev), truths.to(dev), objects.to(dev)
    cond, label, real_features = eval_inputs(control, reward_model, evaluator, images, truths)
    inputs = (texts, cond.cpu(), label.cpu(), real_features)
    # (row, seed, its ControlNet, the settings of the stage that made it); each row's result is kept in
    # OUT/evaluations/ (outside eval/, which a stale stage 8 deletes) and reused while its settings hold
    runs = [("base", 0, None, None), ("start", 0, controlnet_path, settings(P, control, "controlnet"))] + \
        [(m, s, finetuned[(m, s)], settings(P, control, "finetune", method=m, seed=s))
         for m in METHODS for s in P["seeds"]]
    res, todo = {}, []
    for name, seed, path, made_by in runs:
        row = os.path.join(root, "evaluations", f"{name}-seed{seed}.pt")
        made_with = evaluation_settings(P, control, made_by)
        saved = reused_evaluation(row, made_with)
        if saved is not None:
            res[name, seed] = saved
        else:
            todo.append(((name, seed), (row, made_with, root, P, control, path, *inputs)))
    if res:
        print(f"  {len(res)} of {len(runs)} evaluations reused ({os.path.join(root, 'evaluations')})", flush=True)
    if P["workers"] > 1 and len(todo) > 1:
        print(f"  {len(todo)} evaluations in {P['workers']} worker processes", flush=True)
        out = Workers(P["workers"], [(evaluate_and_save, args) for _, args in todo],
                      [os.path.join(d, "console.txt")] * len(todo),
                      [f"eval {name}, seed {seed}" for (name, seed), _ in todo]).wait()
    else:
        out = [evaluate_and_save(*args, sd, evaluator) for _, args in tqdm(todo, desc="eval", disable=not todo)]
    res.update({key: r for (key, _), r in zip(todo, out)})
    rec, floor = vae_floor(sd, evaluator, images, objects, label, control)
    base, start = res["base", 0][1].mean().item(), res["start", 0][1].mean().item()
    gap = base - floor["reconstruction"]  # 0 only where an untrained (smoke-test) evaluator scores every image alike
    floor["control_ratio"] = (base - start) / gap if gap else float("nan")  # the share of the gap stage 5 closes
    per_scene = {m: [res[m, s][1].tolist() for s in P["seeds"]] for m in METHODS}
    pairs = paired_table(per_scene, control)
    table = [("base model, no ControlNet", [base], [res["base", 0][2]]),
             ("ControlNet (stage 5, before fine-tuning)", [start], [res["start", 0][2]])]
    table += [(f"{NAMES[m]} (+{P['finetune_steps']} steps)", [res[m, s][1].mean().item() for s in P["seeds"]],
               [res[m, s][2] for s in P["seeds"]]) for m in METHODS]
    probe_rows = probe_error_by_timestep(sd, load_controlnet(controlnet_path, device=dev), load_probe(probe_path,
                                         device=dev), reward_model, truths, images, texts, control,
                                         seed=world(P, 0))
    k = min(FIGURE_ROWS, len(images))
    save_figure(os.path.join(root, "figure.png"),
                [cond[:k], (images[:k] + 1) / 2, res["base", 0][0][:k], res["start", 0][0][:k]]
                + [res[m, P["seeds"][0]][0][:k] for m in METHODS],
                ["condition", "real render", "base model", "stage 5"] + [NAMES[m] for m in METHODS])
    save_figure(os.path.join(root, "vae_figure.png"), [(images[:k] + 1) / 2, rec[:k]], ["render", "VAE"])
    save_figure(os.path.join(root, "probe_figure.png"),
                [label[:k]] + [r["probe"][:k] for r in probe_rows] + [r["x0_reward"][:k] for r in probe_rows],
                ["label"] + [f"probe t{r['bucket'].split('-')[0]}" for r in probe_rows] +
                [f"x0 t{r['bucket'].split('-')[0]}" for r in probe_rows])
    metric = "depth RMSE (8-bit, lower is better)" if control == "depth" else f"{control} SSIM (higher is better)"
    results = {"control": control, "metric": metric,  # 64 px maps are too small for MS-SSIM's 5 scales: SSIM
               "table": [{"method": m, "score": s, "fd": f} for m, s, f in table], "pairs": pairs, "floor": floor,
               "per_scene": per_scene,
               "probe_by_timestep": [{k2: v for k2, v in r.items() if k2 not in ("probe", "x0_reward")}
                                     for r in probe_rows], "preset": P,
               "probe_training": done_info(os.path.join(root, "probe")).get("loss_trend")}
    results["checks"] = demonstration_checks(results)
    mark_done(d, settings(P, control, "eval"), seconds=time.perf_counter() - t0)
    results["seconds"] = stage_seconds(root)
    with open(os.path.join(root, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(root, "results.json.tmp"), os.path.join(root, "results.json"))
    return results


def demonstration_checks(results):
    """Does fine-tuning matter in this run, and can its pairs be told apart? The best method's gain over stage 5, as
    a share of stage 5's distance to the floor (the evaluator on the VAE's reconstructions) and in units of that
    method's std over fine-tuning seeds, and the widest pair interval's half-width over that gain."""
    sign = -1 if results["control"] == "depth" else 1  # depth RMSE: lower is better; SSIM: higher
    rows = {r["method"]: np.asarray(r["score"], np.float64) for r in results["table"]}
    start = float(next(v for k, v in rows.items() if k.startswith("ControlNet (stage 5")).mean())
    tuned = {k: v for k, v in rows.items() if "(+" in k}
    best = max(tuned, key=lambda k: sign * tuned[k].mean())
    gain = sign * (tuned[best].mean() - start)
    distance = sign * (results["floor"]["reconstruction"] - start)
    half_width = max((p["hi"] - p["lo"]) / 2 for p in results["pairs"])
    return {"best": best, "gain": float(gain), "gain_over_distance_to_floor": float(gain / distance) if distance else
            float("nan"), "gain_over_seed_std": float(gain / tuned[best].std()) if tuned[best].std() > 0 else
            float("inf"), "widest_pair_half_width_over_gain": float(half_width / gain) if gain else float("inf")}


def stage_seconds(root):
    """Wall time each stage took (from its done.json), for the summary."""
    out = {}
    for dirpath, _, files in sorted(os.walk(root)):
        if "done.json" in files and "seconds" in done_info(dirpath):
            out[os.path.relpath(dirpath, root)] = round(done_info(dirpath)["seconds"], 1)
    return out


def mean_std(xs, fmt):
    xs = np.asarray(xs, dtype=np.float64)
    return f"{xs.mean():{fmt}} ± {xs.std():{fmt}}" if len(xs) > 1 else f"{xs.mean():{fmt}}"


def print_results(results):
    fmt = ".2f" if results["control"] == "depth" else ".4f"
    print(f"\n| method | {results['metric']} | Frechet distance to real renders (evaluator features) |")
    print("| --- | --- | --- |")
    for row in results["table"]:
        print(f"| {row['method']} | {mean_std(row['score'], fmt)} | {mean_std(row['fd'], '.3g')} |")
    n = len(results["table"][-1]["score"])
    print(f"(fine-tuning rows: mean ± std over {n} seeds)" if n > 1 else "(one seed)")
    print("\n| pair (same seeds, scenes and noise) | mean difference | 95% interval | significant |")
    print("| --- | --- | --- | --- |")
    for p in results["pairs"]:
        verdict = f"yes: {p['better']} is better" if p["significant"] else "no"
        print(f"| {p['pair']} | {p['mean']:+{fmt}} | [{p['lo']:+{fmt}}, {p['hi']:+{fmt}}] | {verdict} |")
    f = results["floor"]
    print(f"\nVAE: PSNR {f['psnr']:.2f} dB (object pixels {f['psnr_objects']:.2f} dB); evaluator on real renders "
          f"{f['real']:{fmt}}, on their reconstructions {f['reconstruction']:{fmt}}; the stage-5 ControlNet closes "
          f"{f['control_ratio']:.2f} of the gap between no ControlNet and the reconstructions")
    print("\n| t bucket | probe RMSE (8-bit) | reward model on one-step x0 RMSE (8-bit) | probe - x0, 95% interval | "
          "reads better |")
    print("| --- | --- | --- | --- | --- |")
    for r in results["probe_by_timestep"]:
        interval = f"{r['difference']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]" if "difference" in r else "-"
        print(f"| {r['bucket']} | {r['probe_rmse']:.2f} | {r['x0_reward_rmse']:.2f} | {interval} | "
              f"{r.get('verdict', '-')} |")
    if results.get("probe_training"):
        trend = results["probe_training"]
        print(f"\nprobe training loss over its last {trend['window']} steps: {describe_trend(trend)}")
    if results.get("checks"):
        c = results["checks"]
        print(f"\n{c['best']}: {c['gain']:{fmt}} better than stage 5, {c['gain_over_distance_to_floor']:.2f} of stage "
              f"5's distance to the floor, {c['gain_over_seed_std']:.1f}x its std over seeds; the widest pair "
              f"interval is ±{c['widest_pair_half_width_over_gain']:.2f}x that gain")
    if results.get("seconds"):
        print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))


def write_model_folder(root, controlnet_path, finetuned_path, probe_path):
    """root/model/: the base model, the InnerControl-fine-tuned ControlNet (the stage-5 one if that file is
    missing) and the probe, as a model folder that formats.load_sd and sample.py read like any other."""
    d = os.path.join(root, "model")
    os.makedirs(d, exist_ok=True)
    sources = {"sd.safetensors": os.path.join(root, "base", "sd.safetensors"), "probe.safetensors": probe_path,
               "controlnet.safetensors": finetuned_path if os.path.isfile(finetuned_path) else controlnet_path}
    for name, source in sources.items():
        shutil.copyfile(source, os.path.join(d, name + ".tmp"))
        os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))
    return d


# ----------------------------------------------------------------------------------------------
# The whole run

def make_parser():
    p = cli.OneLineParser(prog="shapes.py", description="InnerControl from scratch on a synthetic world of shapes, "
                          "on a CPU: every model the method needs, the three methods, the comparison",
                          epilog="Sizes and step counts: PRESET in shapes.py; SHAPES_PRESET='{\"finetune_steps\": "
                                 "300}' overrides entries, SHAPES_PRESET=gpu runs the larger world on a GPU.")
    p.add_argument("--control", choices=list(labels.CONTROL_TYPES), default="depth", help="the kind of control map")
    p.add_argument("--out", help="the run's folder (default: runs/shapes-CONTROL)")
    p.add_argument("--fresh", action="store_true", help="delete the run's folder and start every stage over")
    return p


def parse_args(argv=None):
    p = make_parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:  # most likely train.py flags given without --weights, which hands the run over to this script
        p.error(f"unrecognized arguments: {' '.join(unknown)} (without --weights, train.py runs the shapes world, "
                "whose flags are --control, --out and --fresh; give --weights to train SD1.x)")
    return args


def main(argv=None):
    """The whole pipeline, resumable: rerun the same command to continue."""
    args = parse_args(argv)
    root = args.out or f"runs/shapes-{args.control}"
    P = preset()
    P["probe_loss"] = probe_loss(P, args.control)  # "auto" resolved, so that stage 6's settings record the loss
    if args.fresh and os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    # `kill` stops a run as Ctrl-C does: the worker processes save their checkpoints and stop with it (on a plain
    # SIGTERM the main process would die alone and leave them running)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(root, P, args.control)
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to continue from the last checkpoint in {root}",
              file=sys.stderr)
        sys.exit(130)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def run(root, P, control):
    """Stages 1-8 into root; returns the results (also in root/results.json)."""
    t0 = time.time()
    cores = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ and P["device"] == "cpu":
        # The ops of these small models are short, and with two threads each one waits for both: one other busy
        # process on a 2-core machine makes a step 5-20x slower (measured). So one thread while the annotators'
        # worker runs beside the VAE; the base model, the ControlNet and the probe then have the machine to
        # themselves and use every core (OMP_NUM_THREADS=1 keeps one thread throughout, for a shared machine).
        torch.set_num_threads(1)
    print(f"shapes world -> {root} (control: {control}, {P['device']}, {cores} thread{'s' if cores > 1 else ''} "
          f"for stages 3, 5, 6)")
    train_dir, test_dir = stage_data(root, P, control)
    images, truths, objects, texts = load_arrays(train_dir, control, P["size"])
    # stage 4 needs only the data: with a second core its annotators train beside stage 2
    todo, background = annotator_todo(root, P, control), None
    if todo and P["workers"] > 1:
        print("  annotators train in a worker process beside stage 2 (progress in annotators/*/console.txt)",
              flush=True)
        background = Workers(1, [(train_annotator, (root, P, control, name, list(ANNOTATORS).index(name)))
                                 for name in todo],
                             [os.path.join(root, "annotators", name, "console.txt") for name in todo],
                             [f"4/8 annotators/{name}" for name in todo])
    try:
        tokenizer = model.Tokenizer.word_level(shapes_render.SHAPES_VOCAB, max_len=16)
        cfg = shapes_config(P, tokenizer.vocab_size, max_len=16)
        vae = stage_vae(root, P, cfg, control, images, objects)
        if background is not None:
            background.wait()
        else:
            for name in todo:
                train_annotator(root, P, control, name, list(ANNOTATORS).index(name), images, truths)
    except BaseException:
        if background is not None:
            background.stop()
        raise
    torch.set_num_threads(cores)
    sd = stage_base(root, P, cfg, control, tokenizer, vae, images, texts)
    sd.requires_grad_(False).eval()
    reward_model, evaluator = load_annotators(root, P, control)
    cn_path = stage_controlnet(root, P, sd, reward_model, train_dir, control)
    probe_path = stage_probe(root, P, sd, cn_path, reward_model, train_dir, control)
    finetuned = stage_finetune(root, P, sd, reward_model, control)
    results_path = os.path.join(root, "results.json")
    if header(8, "eval", os.path.join(root, "eval"), f"{P['n_test']} held-out scenes, {P['eval_steps']} sampling "
              f"steps, guidance {P['guidance']}", settings(P, control, "eval")) and os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    else:
        results = stage_eval(root, P, sd, cn_path, probe_path, finetuned, reward_model, evaluator, test_dir, control)
    print_results(results)
    model_dir = write_model_folder(root, cn_path, finetuned[("innercontrol", P["seeds"][0])], probe_path)
    print(f"\nmodels: {model_dir} (python sample.py --prompt ... --cond MAP.png reads it)")
    print(f"figures: {root}/figure.png, {root}/vae_figure.png, {root}/probe_figure.png; results: {results_path} "
          f"({(time.time() - t0) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
