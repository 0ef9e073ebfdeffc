"""Benchmarks against the diffusers reference, side by side in one process.

    python bench.py [NAME ...] [--reps N]     # every registered measurement when no NAME is given

Each measurement prints one line,
    NAME: ours <t> s, reference <t> s, ratio <ours/reference>[, more fields]
Ours and the reference hold the same weights (the very same tensors) and get the same inputs; after a
warm-up call each, their runs alternate, so a machine busy with something else slows both alike, and
each time is the median. Everything runs under torch.inference_mode with one thread setting.
Measurements register themselves in BENCHES (name -> function(reps) -> line).
diffusers is needed here, as in the tests; the library itself does not use it.

The training steps (train-*) are the exception: a step takes minutes and gigabytes, so each side runs in its
own subprocess (`bench.py --train-worker ...`), one after the other, and their peak memory is compared too.
"""
import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fused
import model
import reward
import train
from controlnet import ControlNet
from formats import (controlnet_config_to_diffusers, controlnet_key_map, text_config_to_transformers,
                     unet_config_to_diffusers, unet_key_map, vae_config_to_diffusers, vae_key_map)
from probe import Probe, ProbeConfig, probe_output01
from sample import guided_eps
from unet import DecoderFeatures, UNet, UNetConfig

BENCHES = {}


def bench(name):
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def side_by_side(ours, reference, reps):
    """Median seconds of ours() and reference(), after one warm-up each, in alternating order."""
    ours(), reference()
    times = {ours: [], reference: []}
    for i in range(reps):
        for fn in ((ours, reference) if i % 2 == 0 else (reference, ours)):
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[ours]), statistics.median(times[reference])


def line(name, t_ours, t_ref, *extra):
    return ", ".join([f"{name}: ours {t_ours:.3f} s", f"reference {t_ref:.3f} s", f"ratio {t_ours / t_ref:.3f}",
                      *extra])


def forward_flops(fn):
    """FLOPs of fn() counted on the meta device (no compute): convs, matmuls and attention matmuls."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(n=4096, reps=3):
    """What this machine's BLAS does on a large fp32 matmul: the roof for our forward's GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def shared_reference(ours, ref, kwargs, names, transform=None):
    """The reference model given our tensors (one copy of the weights in memory): ref a class, built empty
    from kwargs, or a module already built (when it has buffers a meta build would leave empty).
    names: ours -> reference key; transform(reference key, tensor): a change of shape where needed."""
    if kwargs is not None:
        with torch.device("meta"):
            ref = ref(**kwargs)
    state = {names[k]: v for k, v in ours.state_dict().items()}
    ref.load_state_dict({k: transform(k, v) for k, v in state.items()} if transform else state, strict=True,
                        assign=True)
    return ref.eval()


def sd15_unets():
    from diffusers import UNet2DConditionModel
    cfg = UNetConfig()
    torch.manual_seed(0)
    ours = fused.install(UNet(cfg).eval())
    return ours, shared_reference(ours, UNet2DConditionModel, unet_config_to_diffusers(cfg), unet_key_map(cfg))


def unet_inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 64, 64, generator=g), torch.tensor(500), torch.randn(batch, 77, 768, generator=g)


def unet_bench(name, reps, bf16):
    ours, ref = sd15_unets()
    x, t, ctx = unet_inputs()

    def run_ours():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return ours(x, t, ctx)

    with torch.inference_mode():
        err = (run_ours().float() - ref(x, t, ctx).sample).abs().max().item()
        t_ours, t_ref = side_by_side(run_ours, lambda: ref(x, t, ctx), reps)
    del ours, ref
    with torch.device("meta"):
        m, (xm, tm, cm) = UNet(UNetConfig()), (v.to("meta") for v in unet_inputs())
        flops = forward_flops(lambda: m(xm, tm, cm))
    return line(name, t_ours, t_ref, f"ours {flops / t_ours / 1e9:.0f} GFLOP/s ({flops / 1e9:.0f} GFLOP)",
                f"fp32 matmul {matmul_gflops():.0f} GFLOP/s", f"max |ours - reference| {err:.1e}",
                f"{torch.get_num_threads()} threads")


@bench("unet")
def bench_unet(reps):
    """SD1.5 UNet forward, fp32, 64x64 latents, batch 1."""
    return unet_bench("unet", reps, bf16=False)


@bench("unet-bf16")
def bench_unet_bf16(reps):
    """The same, ours under bf16 autocast against the fp32 reference."""
    return unet_bench("unet-bf16", reps, bf16=True)


def cfg_step_bench(name, reps, bf16, guidance=7.5, scale=1.0):
    from diffusers import ControlNetModel
    ours_unet, ref_unet = sd15_unets()
    ours_cn = fused.install(ControlNet(UNetConfig()).eval())
    with torch.no_grad():  # non-zero zero convs, or the residuals would be trivially zero
        for conv in [*(z[0] for z in ours_cn.zero_convs), ours_cn.middle_block_out[0], ours_cn.input_hint_block[-1]]:
            torch.nn.init.normal_(conv.weight, std=0.02)
    ref_cn = shared_reference(ours_cn, ControlNetModel, controlnet_config_to_diffusers(ours_cn),
                              controlnet_key_map(ours_cn.config))
    g = torch.Generator().manual_seed(1)
    latents, t, _ = unet_inputs()
    context = torch.randn(2, 77, 768, generator=g)  # [uncond; cond]
    hint = torch.rand(1, 3, 512, 512, generator=g)

    def run_ours():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return guided_eps(ours_unet, ours_cn, latents, t, context, hint, guidance, scale)

    hint2 = torch.cat([hint] * 2)  # the pipeline prepares the doubled control image once, before the loop

    def run_ref():  # what StableDiffusionControlNetPipeline does in one denoising step
        latent_in = torch.cat([latents] * 2)
        down, mid = ref_cn(latent_in, t, encoder_hidden_states=context, controlnet_cond=hint2,
                           conditioning_scale=scale, guess_mode=False, return_dict=False)
        eps = ref_unet(latent_in, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]
        eps_uncond, eps_text = eps.chunk(2)
        return eps_uncond + guidance * (eps_text - eps_uncond)

    with torch.inference_mode():
        err = (run_ours().float() - run_ref()).abs().max().item()
        t_ours, t_ref = side_by_side(run_ours, run_ref, reps)
    return line(name, t_ours, t_ref, f"max |ours - reference| {err:.1e}", f"{torch.get_num_threads()} threads")


@bench("cfg-step")
def bench_cfg_step(reps):
    """One classifier-free-guided step, ControlNet + UNet, batch 2 (uncond, cond), 64x64 latents, 512 px hint."""
    return cfg_step_bench("cfg-step", reps, bf16=False)


@bench("cfg-step-bf16")
def bench_cfg_step_bf16(reps):
    """The same, ours under bf16 autocast against the fp32 reference."""
    return cfg_step_bench("cfg-step-bf16", reps, bf16=True)


# -----------------------------------------------------------------------------
# training steps: one optimizer step of ControlNet, ControlNet++ and InnerControl
#
# Ours is train.py's `training_step` + `optimizer_step`. The reference is the upstream ControlNet++ /
# InnerControl training step written with diffusers / transformers modules (UNet2DConditionModel,
# ControlNetModel, AutoencoderKL, CLIPTextModel, DPTForDepthEstimation): it encodes, noises, runs
# ControlNet + UNet, and for the reward VAE-decodes and scores EVERY sample and masks afterwards; for
# InnerControl it collects the decoder's attn1 outputs with forward hooks and runs the probe on every
# sample (our Probe module on both sides: there is no reference probe).
# SD1.5 shapes with random weights (the same on both sides), 256 px images (32x32 latents), batch 4 with
# t = 100, 300, 600, 900, depth control with a DPT-Hybrid-sized reward model, fp32. Each side runs in its
# own process, so their peak memory does not mix; "memory" is the peak resident set of the step above that
# of the built models (the weights are the same on both sides; the step adds optimizer state, gradients
# and activations). BENCH_TRAIN_CONFIG=tiny runs the tiny config (a quick check of the machinery).

REPO = os.path.dirname(os.path.abspath(__file__))
WORKER_FLAG = "--train-worker"
TIMESTEPS = (100, 300, 600, 900)
RESOLUTION = 256
SEED = 0
# The reference's step at batch 4 in one go peaks at ~23 GB resident (6.3 GB of weights, 4 GB of gradients
# and AdamW state, ~13 GB of activations: each decoded 256 px image keeps 1.5 GB for the backward through the
# VAE decoder): more than a 24 GB machine holds. Both sides therefore take the batch of 4 as 2 micro-batches
# of 2 with gradient accumulation, as the upstream launch scripts do (--gradient_accumulation_steps);
# BENCH_TRAIN_MICRO=1 runs the batch in one go (32 GB and more).
MICRO_STEPS = int(os.environ.get("BENCH_TRAIN_MICRO", "2"))
PROMPTS = ["a red sphere on a wooden table", "a city street at night, rain", "a cat sleeping on a sofa",
           "a mountain lake under a cloudy sky"]
# Intel/dpt-hybrid-midas's architecture (its config.json; the rest are DPTConfig defaults)
HYBRID_MIDAS = dict(is_hybrid=True, backbone_featmap_shape=[1, 1024, 24, 24], neck_hidden_sizes=[256, 512, 768, 768],
                    reassemble_factors=[1, 1, 1, 0.5])
TINY_HYBRID = dict(is_hybrid=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   image_size=384, patch_size=16, backbone_out_indices=[2, 5, 0, 1], neck_hidden_sizes=[16, 32, 32, 32],
                   reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16, backbone_featmap_shape=[1, 64, 4, 4],
                   readout_type="project",
                   backbone_config=dict(model_type="bit", global_padding="SAME", layer_type="bottleneck",
                                        depths=[1, 2, 1], hidden_sizes=[16, 32, 64], embedding_size=16, num_groups=4,
                                        out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True))


def status_kb(field):
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: its high-water mark)."""
    with open("/proc/self/status") as f:
        for row in f:
            if row.startswith(field + ":"):
                return int(row.split()[1])
    raise KeyError(field)


def reset_peak_memory():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current VmRSS (Linux >= 4.0)
        f.write("5")


@torch.no_grad()
def randomize(module, seed, only_zero=False):
    """Seeded random values that keep activations O(1): N(0, 1/fan_in) matrices, norm scales 1 + N(0, 0.1),
    biases N(0, 0.05). only_zero: touch only all-zero tensors (a ControlNet's zero convs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if only_zero and p.count_nonzero() > 0:
            continue
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif name.endswith(("weight", "scale")):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def build_train_models(config):
    """SD (random, seeded), a ControlNet from its UNet (zero convs made non-zero so that the residuals
    matter), a probe and a DPT-Hybrid-sized reward model: ours, which the reference copies."""
    torch.manual_seed(SEED)
    cfg = model.SDConfig() if config == "sd15" else model.tiny()
    sd = model.StableDiffusion(cfg, model.Tokenizer.from_bpe_gz())
    net = randomize(ControlNet.from_unet(sd.unet), SEED + 1, only_zero=True)
    probe = Probe(ProbeConfig.for_unet(cfg.unet))
    dpt = randomize(reward.DPT(reward.DPTConfig.from_dict(HYBRID_MIDAS if config == "sd15" else TINY_HYBRID)), SEED + 2)
    with torch.no_grad():  # positions and [CLS] start at zero; make them matter
        g = torch.Generator().manual_seed(SEED + 3)
        for name, p in dpt.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return sd, net, probe, dpt


def train_inputs():
    """Images in [-1, 1], a smooth depth-like control map, prompts, the fixed t and the noises."""
    g = torch.Generator().manual_seed(SEED + 10)
    B, R, h = len(TIMESTEPS), RESOLUTION, RESOLUTION // 8
    coarse = torch.rand(B, 1, 8, 8, generator=g)
    depth = torch.nn.functional.interpolate(coarse, size=(R, R), mode="bicubic", align_corners=False).clamp(0, 1)
    return dict(image=torch.rand(B, 3, R, R, generator=g) * 2 - 1, control=depth.expand(-1, 3, -1, -1).contiguous(),
                text=PROMPTS[:B], t=torch.tensor(TIMESTEPS), noise=torch.randn(B, 4, h, h, generator=g),
                latent_noise=torch.randn(B, 4, h, h, generator=g))


def micro_batches(x):
    """Rows a, a + n, a + 2n, ... for micro-step a: with t = 100, 300, 600, 900 and n = 2, each micro-batch
    holds one sample inside the reward window, as the whole batch holds half."""
    out = []
    for a in range(MICRO_STEPS):
        rows = list(range(a, len(x["t"]), MICRO_STEPS))
        out.append({k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) for k, v in x.items()})
        out[-1]["rows"] = rows
    return out


def ours_train_step(method, config, extra_args=()):
    """train.py's micro-steps (its --grad-accum) and optimizer step, as its loop runs them."""
    sd, net, probe, dpt = build_train_models(config)
    args = train.parse_args(["--method", method, "--control", "depth", "--device", "cpu", "--mixed-precision", "no",
                             *extra_args])
    models = train.Models(args, sd, net, probe=probe if method == "innercontrol" else None,
                          reward_model=dpt if method != "controlnet" else None)
    opt, sched = train.make_optimizer(args, net)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = train_inputs()
    bad = torch.zeros(())

    def step():
        nonlocal bad
        counts = train.eligible_counts(args, x["t"])
        total, sums = 0, {}
        for mb in micro_batches(x):
            losses = train.training_step(models, mb, mb["t"], mb["noise"], mb["latent_noise"], args, counts)
            loss = sum(losses.values())
            loss.backward()
            total = total + loss.detach()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.item()
        _, bad = train.optimizer_step(args, net, opt, sched, scaler, None, total, bad, 0)
        return sums
    return step


def build_train_reference(config, method):
    """diffusers / transformers modules holding our tensors."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

    sd, net, probe, dpt = build_train_models(config)
    cfg = sd.config
    unet = shared_reference(sd.unet, UNet2DConditionModel, unet_config_to_diffusers(cfg.unet), unet_key_map(cfg.unet))
    controlnet = shared_reference(net, ControlNetModel, controlnet_config_to_diffusers(net),
                                  controlnet_key_map(cfg.unet))
    vae = shared_reference(sd.vae, AutoencoderKL, vae_config_to_diffusers(cfg.vae), vae_key_map(cfg.vae),
                           lambda name, v: v[:, :, 0, 0] if ".attentions." in name and v.ndim == 4 else v)
    # built for real: CLIP has non-persistent buffers (position ids) that a meta build would leave empty
    text = shared_reference(sd.text_encoder, CLIPTextModel(CLIPTextConfig(**text_config_to_transformers(
        cfg.text))), None, {k: k[len("text_model."):] for k in sd.text_encoder.state_dict()})
    reward_model = None
    if method != "controlnet":
        reward_model = shared_reference(dpt, DPTForDepthEstimation(DPTConfig(
            **(HYBRID_MIDAS if config == "sd15" else TINY_HYBRID))), None, {k: k for k in dpt.state_dict()})
    for m in (unet, vae, text, reward_model, probe):
        if m is not None:
            m.requires_grad_(False).eval()
    return dict(unet=unet, controlnet=controlnet.train(), vae=vae, text=text, reward=reward_model,
                tokenizer=sd.tokenizer, probe=probe if method == "innercontrol" else None)


def reference_train_step(method, config, t_reward=400, lambda_reward=0.5, t_align=(0, 920), alpha=1.0,
                         max_grad_norm=1.0):
    """The upstream script's step (train_controlnet_reward.py logic) on the diffusers modules."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    m = build_train_reference(config, method)
    unet, controlnet, vae, text, reward_model, probe = (m[k] for k in ("unet", "controlnet", "vae", "text", "reward",
                                                                       "probe"))
    # SD1.5's scheduler config, read as DDPM (what the upstream script does)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=10)
    x = train_inputs()
    input_ids = m["tokenizer"](x["text"])  # tokenised by the data loader upstream
    resize = lambda v, size: F.interpolate(v, size=size, mode="bilinear", align_corners=False, antialias=True)

    feats = []  # InnerControl: the decoder transformers' attn1 outputs, collected with forward hooks
    if method == "innercontrol":
        for block in unet.up_blocks:
            for attn in getattr(block, "attentions", None) or []:
                attn.transformer_blocks[0].attn1.register_forward_hook(lambda mod, inp, out: feats.append(out))

    def micro_step(mb, n_micro):
        feats.clear()
        timesteps = mb["t"]
        encoder_hidden_states = text(mb["input_ids"])[0]
        controlnet_image = mb["control"]
        dist = vae.encode(mb["image"]).latent_dist
        latents = (dist.mean + dist.std * mb["latent_noise"]) * vae.config.scaling_factor  # .sample()
        noise = mb["noise"]
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        down_res, mid_res = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                       controlnet_cond=controlnet_image, return_dict=False)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                          down_block_additional_residuals=list(down_res), mid_block_additional_residual=mid_res).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        losses = {"diffusion": loss}
        labels = controlnet_image.mean(1)
        labels = labels / labels.flatten(1).amax(1).view(-1, 1, 1)
        if method != "controlnet":  # x0 estimate, decode, score EVERY sample, then mask by t <= t_reward
            x0 = torch.stack([scheduler.step(eps, t, lat).pred_original_sample
                              for eps, t, lat in zip(model_pred, timesteps, noisy_latents)])
            image = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
            outputs = reward_model((resize(image, (384, 384)) - 0.5) / 0.5).predicted_depth
            outputs = resize(outputs[:, None], (RESOLUTION, RESOLUTION))[:, 0]
            outputs = outputs / outputs.flatten(1).amax(1).view(-1, 1, 1)
            mask = (timesteps <= t_reward).float()
            r = F.mse_loss(outputs, labels, reduction="none").mean(dim=(-1, -2))
            losses["reward"] = lambda_reward * (mask * r).sum() / (mask.sum() + 1e-10)
        if method == "innercontrol":  # the probe on the hooked features of EVERY sample, then mask
            B = noisy_latents.shape[0]
            maps = [f.transpose(1, 2).reshape(B, f.shape[2], int(math.isqrt(f.shape[1])), -1) for f in feats]
            emb = unet.time_embedding(unet.time_proj(timesteps).to(noisy_latents.dtype))
            pred = probe_output01(probe(DecoderFeatures(emb, maps)), size=(RESOLUTION, RESOLUTION)).mean(1)
            pred = pred / pred.flatten(1).amax(1).view(-1, 1, 1)
            mask = ((timesteps >= t_align[0]) & (timesteps <= t_align[1])).float()
            a = F.mse_loss(pred, labels, reduction="none").mean(dim=(-1, -2))
            losses["align"] = alpha * (mask * a).sum() / (mask.sum() + 1e-10)
        (sum(losses.values()) / n_micro).backward()  # accelerate divides by the accumulation steps
        return {k: v.item() / n_micro for k, v in losses.items()}

    def step():
        sums = {}
        for mb in micro_batches(x):
            mb["input_ids"] = input_ids[mb["rows"]]
            for k, v in micro_step(mb, MICRO_STEPS).items():
                sums[k] = sums.get(k, 0) + v
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        return sums
    return step


def train_worker(argv):
    """bench.py --train-worker SIDE METHOD CONFIG STEPS: one side's steps; one JSON line of results on stdout."""
    side, method, config, steps = argv[0], argv[1], argv[2], int(argv[3])
    try:  # if the machine runs out of memory, this process goes first, not a neighbour's
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    t0 = time.perf_counter()
    step = ours_train_step(method, config) if side == "ours" else reference_train_step(method, config)
    build_s = time.perf_counter() - t0
    gc.collect()
    base_kb = status_kb("VmRSS")
    reset_peak_memory()
    times, losses = [], []
    for i in range(1 + steps):  # the first step is the warm-up (it also creates the optimizer state)
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        print(f"[{side} {method}] step {i}: {times[-1]:.1f} s, {losses[-1]}", file=sys.stderr, flush=True)
    peak_kb = status_kb("VmHWM")
    print(json.dumps(dict(build_s=build_s, times=times, median=statistics.median(times[1:]), losses=losses,
                          base_gb=base_kb / 2 ** 20, peak_gb=peak_kb / 2 ** 20, step_gb=(peak_kb - base_kb) / 2 ** 20,
                          threads=torch.get_num_threads())), flush=True)


def run_train_side(side, method, config, steps):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), WORKER_FLAG, side, method, config, str(steps)],
                       cwd=REPO, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"bench.py: the {side} side of {method} failed (exit code {p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def train_bench(name, method, reps):
    """A warm-up step, then the median of `reps` steps (at most 2: a step takes minutes on a CPU), each side
    in its own process, one after the other (their memory must not overlap)."""
    config = os.environ.get("BENCH_TRAIN_CONFIG", "sd15")
    steps = max(1, min(2, reps))
    ref = run_train_side("reference", method, config, steps)
    ours = run_train_side("ours", method, config, steps)
    # the warm-up step runs from identical weights and inputs: its losses must agree
    first_ours, first_ref = ours["losses"][0], ref["losses"][0]
    worst = max(abs(v - first_ref[k]) / max(1e-8, abs(first_ref[k])) for k, v in first_ours.items())
    return line(name, ours["median"], ref["median"], f"first-step losses agree to {worst:.1e}",
                f"batch {len(TIMESTEPS)} in {MICRO_STEPS} micro-batches, {config}, {RESOLUTION} px",
                f"{ours['threads']} threads",
                f"step memory ours {ours['step_gb']:.2f} GB, reference {ref['step_gb']:.2f} GB "
                f"(whole process {ours['peak_gb']:.2f} / {ref['peak_gb']:.2f} GB)",
                f"memory ratio {ours['step_gb'] / ref['step_gb']:.3f}")


@bench("train-controlnet")
def bench_train_controlnet(reps):
    """One optimizer step of ControlNet training: the diffusion loss only."""
    return train_bench("train-controlnet", "controlnet", reps)


@bench("train-controlnet++")
def bench_train_controlnetpp(reps):
    """ControlNet++: + the reward loss (ours decodes and scores only the t <= 400 rows)."""
    return train_bench("train-controlnet++", "controlnet++", reps)


@bench("train-innercontrol")
def bench_train_innercontrol(reps):
    """InnerControl: + the reward loss + the probe's alignment loss."""
    return train_bench("train-innercontrol", "innercontrol", reps)


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER_FLAG]:
        sys.exit(train_worker(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"measurements to run (default: all of {', '.join(BENCHES)})")
    p.add_argument("--reps", type=int, default=5, help="timed runs of each side (median reported; train-*: at most 2)")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        p.error(f"unknown measurement(s) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    for name in args.names or BENCHES:
        print(BENCHES[name](args.reps), flush=True)
