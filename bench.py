"""Benchmarks against the diffusers reference, side by side in one process.

    python bench.py [NAME ...] [--reps N]                  # on the CPU; every CPU measurement when no NAME is given
    python bench.py --device cuda [NAME ...] [--reps N]    # on the GPU: fp16 and bf16, peak GPU memory too

Each measurement prints one line,
    NAME: ours <t> s, reference <t> s, ratio <ours/reference>[, more fields]
Ours and the reference hold the same weights (the very same tensors) and get the same inputs; after a
warm-up call each, their runs alternate, so a machine busy with something else slows both alike, and
each time is the median. Everything runs under torch.inference_mode with one thread setting.
Measurements register themselves in BENCHES (name -> function(reps) -> line), each for the devices it means
something on. On CUDA both sides use scaled_dot_product_attention (diffusers' default processor) and the same
dtype; ours runs its default CUDA paths (fused.py), and cfg-step replays CUDA graphs as sample.py does.
diffusers is needed here, as in the tests; the library itself does not use it.

The training steps (train-*) are the exception: a step takes minutes and gigabytes, so each side runs in its
own subprocess (`bench.py --train-worker ...`), one after the other, and their peak memory is compared too.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cli
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

BENCHES = {}  # name -> (function(reps) -> line, devices it runs on)
DEVICE = torch.device("cpu")  # --device


def bench(name, devices=("cpu", "cuda")):
    def register(fn):
        BENCHES[name] = (fn, devices)
        return fn
    return register


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(ours, reference, reps):
    """Median seconds of ours() and reference(), after one warm-up each, in alternating order."""
    ours(), reference()
    times = {ours: [], reference: []}
    for i in range(reps):
        for fn in ((ours, reference) if i % 2 == 0 else (reference, ours)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[ours]), statistics.median(times[reference])


def peak_gb(fn):
    """GPU memory fn() allocates at its peak above what was allocated before it, in GB."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def gpu_fields(run_ours, run_ref):
    """Peak memory of each side and the ratio, for a line measured on CUDA."""
    if DEVICE.type != "cuda":
        return []
    m_ours, m_ref = peak_gb(run_ours), peak_gb(run_ref)
    return [f"peak memory ours {m_ours:.2f} GB, reference {m_ref:.2f} GB", f"memory ratio {m_ours / m_ref:.3f}",
            torch.cuda.get_device_name()]


def line(name, t_ours, t_ref, *extra):
    return ", ".join([f"{name}: ours {t_ours:.3f} s", f"reference {t_ref:.3f} s", f"ratio {t_ours / t_ref:.3f}",
                      *extra])


def forward_flops(fn):
    """FLOPs of fn() counted on the meta device (no compute): convs, matmuls and attention matmuls."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(n=4096, reps=3, onednn=False):
    """What this machine does on a large fp32 matmul: through PyTorch's BLAS (MKL), or as the oneDNN 1x1
    convolution fused.onednn_gemm runs; the faster is the roof for our forward's GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = (lambda: fused.onednn_gemm(a, b)) if onednn else (lambda: a @ b)
    mm()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm()
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


def half_dtype(bf16):
    """The low precision of a line: on CUDA both sides run in it (fp16, or bf16); on the CPU ours runs bf16 autocast
    against the fp32 reference (or both fp32)."""
    return torch.bfloat16 if bf16 else (torch.float16 if DEVICE.type == "cuda" else None)


def sd15_unets(dtype=None):
    """Our SD1.5 UNet with random weights and the diffusers one holding the same tensors; on CUDA built there, in
    `dtype`, frozen (as sampling holds them)."""
    from diffusers import UNet2DConditionModel
    cfg = UNetConfig()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        ours = UNet(cfg).eval()
    if DEVICE.type == "cuda":
        ours.to(dtype).requires_grad_(False)
    ref = shared_reference(ours, UNet2DConditionModel, unet_config_to_diffusers(cfg), unet_key_map(cfg))
    return fused.install(ours), ref


def unet_inputs(batch=1, dtype=None):
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(batch, 4, 64, 64, generator=g), torch.tensor(500), torch.randn(batch, 77, 768, generator=g)
    dtype = dtype if DEVICE.type == "cuda" else torch.float32
    return x.to(DEVICE, dtype), t.to(DEVICE), ctx.to(DEVICE, dtype)


def cpu_autocast(bf16):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and DEVICE.type == "cpu")


def unet_bench(name, reps, bf16):
    dtype = half_dtype(bf16)
    ours, ref = sd15_unets(dtype)
    x, t, ctx = unet_inputs(dtype=dtype)

    def run_ours():
        with cpu_autocast(bf16):
            return ours(x, t, ctx)

    with torch.inference_mode():
        err = (run_ours().float() - ref(x, t, ctx).sample.float()).abs().max().item()
        t_ours, t_ref = side_by_side(run_ours, lambda: ref(x, t, ctx), reps)
        gpu = gpu_fields(run_ours, lambda: ref(x, t, ctx))
    del ours, ref
    xm, tm, cm = (v.to("meta") for v in unet_inputs())
    with torch.device("meta"):
        m = UNet(UNetConfig())
        flops = forward_flops(lambda: m(xm, tm, cm))
    peak = f"fp32 matmul {matmul_gflops():.0f} GFLOP/s (oneDNN {matmul_gflops(onednn=True):.0f})" \
        if DEVICE.type == "cpu" else f"{dtype}".replace("torch.", "")
    return line(name, t_ours, t_ref, f"ours {flops / t_ours / 1e9:.0f} GFLOP/s ({flops / 1e9:.0f} GFLOP)", peak,
                f"max |ours - reference| {err:.1e}", *gpu, f"{torch.get_num_threads()} threads")


@bench("unet")
def bench_unet(reps):
    """SD1.5 UNet forward, 64x64 latents, batch 1: fp32 on the CPU, fp16 on CUDA."""
    return unet_bench("unet", reps, bf16=False)


@bench("unet-bf16")
def bench_unet_bf16(reps):
    """The same in bf16 (on the CPU: ours under bf16 autocast against the fp32 reference)."""
    return unet_bench("unet-bf16", reps, bf16=True)


@bench("unet-nchw", devices=("cuda",))
def bench_unet_nchw(reps):
    """unet (fp16) with our NHWC convs and norms switched off: what channels_last is worth."""
    fused.CHANNELS_LAST = False
    try:
        return unet_bench("unet-nchw", reps, bf16=False)
    finally:
        fused.CHANNELS_LAST = True


def cfg_step_bench(name, reps, bf16, guidance=7.5, scale=1.0, graphs=True):
    from diffusers import ControlNetModel
    dtype = half_dtype(bf16)
    ours_unet, ref_unet = sd15_unets(dtype)
    with torch.device(DEVICE):
        ours_cn = ControlNet(UNetConfig()).eval()
    with torch.no_grad():  # non-zero zero convs, or the residuals would be trivially zero
        for conv in [*(z[0] for z in ours_cn.zero_convs), ours_cn.middle_block_out[0], ours_cn.input_hint_block[-1]]:
            torch.nn.init.normal_(conv.weight, std=0.02)
    if DEVICE.type == "cuda":
        ours_cn.to(dtype).requires_grad_(False)
    ref_cn = shared_reference(ours_cn, ControlNetModel, controlnet_config_to_diffusers(ours_cn),
                              controlnet_key_map(ours_cn.config))
    fused.install(ours_cn)
    g = torch.Generator().manual_seed(1)
    latents, t, _ = unet_inputs(dtype=dtype)
    io_dtype = latents.dtype
    context = torch.randn(2, 77, 768, generator=g).to(DEVICE, io_dtype)  # [uncond; cond]
    hint = torch.rand(1, 3, 512, 512, generator=g).to(DEVICE, io_dtype)

    def run_ours(graphs=graphs):  # as sample.generate runs it: on CUDA inside cuda_graphs() (a step is a replay)
        with cpu_autocast(bf16), (fused.cuda_graphs() if graphs else contextlib.nullcontext()):
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
        if DEVICE.type == "cuda":
            run_ours()  # the first call of a shape runs eagerly, the second records the graph
        err = (run_ours().float() - run_ref().float()).abs().max().item()
        t_ours, t_ref = side_by_side(run_ours, run_ref, reps)
        # memory of the eager step: a replay allocates nothing (its activations live in the graph's own pool)
        gpu = gpu_fields(lambda: run_ours(graphs=False), run_ref)
    return line(name, t_ours, t_ref, f"max |ours - reference| {err:.1e}", *gpu, f"{torch.get_num_threads()} threads")


@bench("cfg-step")
def bench_cfg_step(reps):
    """One classifier-free-guided step, ControlNet + UNet, batch 2 (uncond, cond), 64x64 latents, 512 px hint."""
    return cfg_step_bench("cfg-step", reps, bf16=False)


@bench("cfg-step-bf16")
def bench_cfg_step_bf16(reps):
    """The same in bf16 (on the CPU: ours under bf16 autocast against the fp32 reference)."""
    return cfg_step_bench("cfg-step-bf16", reps, bf16=True)


@bench("cfg-step-eager", devices=("cuda",))
def bench_cfg_step_eager(reps):
    """cfg-step (fp16) without CUDA graphs: what replaying the step is worth."""
    return cfg_step_bench("cfg-step-eager", reps, bf16=False, graphs=False)


# -----------------------------------------------------------------------------
# training steps: one optimizer step of ControlNet, ControlNet++ and InnerControl
#
# Ours is train.py's `training_step` + `optimizer_step`. The reference is the upstream ControlNet++ /
# InnerControl training step written with diffusers / transformers modules (UNet2DConditionModel,
# ControlNetModel, AutoencoderKL, CLIPTextModel, DPTForDepthEstimation): it encodes, noises, runs
# ControlNet + UNet, and for the reward VAE-decodes and scores EVERY sample and masks afterwards; for
# InnerControl it collects the decoder's attn1 outputs with forward hooks and runs the probe on every
# sample (our Probe module on both sides: there is no reference probe).
# SD1.5 shapes with random weights (the same on both sides), depth control with a DPT-Hybrid-sized reward model,
# batch 4 with t = 100, 300, 600, 900. On the CPU: 256 px images (32x32 latents), fp32. On CUDA: 512 px, the
# paper's resolution (at 256 px a GPU step measures kernel-launch overhead more than the method), in one
# micro-batch, fp16 (or bf16) mixed precision as upstream trains: frozen networks in that dtype, the ControlNet
# in fp32 under autocast, a GradScaler for fp16. Each side runs in its own process, so their peak memory does not
# mix; "memory" is what the step adds above the built models (optimizer state, gradients, activations): the
# resident set's peak on the CPU, the GPU allocator's on CUDA. BENCH_TRAIN_CONFIG=tiny runs the tiny config (a
# quick check of the machinery).

REPO = os.path.dirname(os.path.abspath(__file__))
WORKER_FLAG = "--train-worker"
TIMESTEPS = (100, 300, 600, 900)
SEED = 0
# The reference's CPU step at batch 4 in one go peaks at ~23 GB resident (6.3 GB of weights, 4 GB of gradients
# and AdamW state, ~13 GB of activations: each decoded 256 px image keeps 1.5 GB for the backward through the
# VAE decoder): more than a 24 GB machine holds. On the CPU both sides therefore take the batch of 4 as 2
# micro-batches of 2 with gradient accumulation, as the upstream launch scripts do (--gradient_accumulation_steps);
# BENCH_TRAIN_MICRO=1 runs the batch in one go (32 GB and more). On a GPU the batch runs in one go.
MICRO_STEPS = int(os.environ.get("BENCH_TRAIN_MICRO", "0"))
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


def train_setup(device, precision="fp16", **changes):
    """What a training line runs: the device, mixed precision, images, batch (its timesteps) and micro-batches."""
    cuda = device == "cuda"
    setup = dict(device=device, precision=precision if cuda else "fp32", resolution=512 if cuda else 256,
                 timesteps=list(TIMESTEPS), micro=MICRO_STEPS or (1 if cuda else 2), grad_checkpointing=False,
                 config=os.environ.get("BENCH_TRAIN_CONFIG", "sd15"))
    return {**setup, **changes}


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
    biases N(0, 0.05). only_zero: touch only all-zero tensors (a ControlNet's zero convs). Drawn on the module's
    device (a CUDA generator gives other numbers than the CPU's, the same ones on both sides)."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if only_zero and p.count_nonzero() > 0:
            continue
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g, device=device) / math.sqrt(p[0].numel()))
        elif name.endswith(("weight", "scale")):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=device))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g, device=device))
    return module


def build_train_models(config, device="cpu"):
    """SD (random, seeded), a ControlNet from its UNet (zero convs made non-zero so that the residuals
    matter), a probe and a DPT-Hybrid-sized reward model: ours, which the reference copies. Built on `device`."""
    torch.manual_seed(SEED)
    cfg = model.SDConfig() if config == "sd15" else model.tiny()
    with torch.device(device):
        sd = model.StableDiffusion(cfg, model.Tokenizer.from_bpe_gz())
        net = randomize(ControlNet.from_unet(sd.unet), SEED + 1, only_zero=True)
        probe = Probe(ProbeConfig.for_unet(cfg.unet))
        dpt = randomize(reward.DPT(reward.DPTConfig.from_dict(HYBRID_MIDAS if config == "sd15" else TINY_HYBRID)),
                        SEED + 2)
    with torch.no_grad():  # positions and [CLS] start at zero; make them matter
        g = torch.Generator(device).manual_seed(SEED + 3)
        for name, p in dpt.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, device=device))
    return sd, net, probe, dpt


def train_inputs(setup):
    """Images in [-1, 1], a smooth depth-like control map, prompts, the fixed t and the noises (drawn on the CPU)."""
    g = torch.Generator().manual_seed(SEED + 10)
    B, R = len(setup["timesteps"]), setup["resolution"]
    h = R // 8
    coarse = torch.rand(B, 1, 8, 8, generator=g)
    depth = torch.nn.functional.interpolate(coarse, size=(R, R), mode="bicubic", align_corners=False).clamp(0, 1)
    x = dict(image=torch.rand(B, 3, R, R, generator=g) * 2 - 1, control=depth.expand(-1, 3, -1, -1).contiguous(),
             t=torch.tensor(setup["timesteps"]), noise=torch.randn(B, 4, h, h, generator=g),
             latent_noise=torch.randn(B, 4, h, h, generator=g))
    x = {k: v.to(setup["device"]) if k != "t" else v for k, v in x.items()}
    return dict(x, text=[PROMPTS[i % len(PROMPTS)] for i in range(B)])


def micro_batches(x, n):
    """Rows a, a + n, a + 2n, ... for micro-step a: with t = 100, 300, 600, 900 and n = 2, each micro-batch
    holds one sample inside the reward window, as the whole batch holds half."""
    out = []
    for a in range(n):
        rows = list(range(a, len(x["t"]), n))
        out.append({k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) for k, v in x.items()})
        out[-1]["rows"] = rows
    return out


def ours_train_step(method, models, setup):
    """train.py's micro-steps (its --grad-accum) and optimizer step, as its loop runs them."""
    sd, net, probe, dpt = models
    args = train.parse_args(["--method", method, "--control", "depth", "--device", setup["device"],
                             "--mixed-precision", setup["precision"]]
                            + (["--grad-checkpointing"] if setup["grad_checkpointing"] else []))
    models = train.Models(args, sd, net, probe=probe if method == "innercontrol" else None,
                          reward_model=dpt if method != "controlnet" else None)
    opt, sched = train.make_optimizer(args, net)
    scaler = torch.amp.GradScaler(setup["device"], enabled=setup["precision"] == "fp16")
    x = train_inputs(setup)
    bad = torch.zeros((), device=setup["device"])

    def step():
        nonlocal bad
        counts = train.eligible_counts(args, x["t"])
        total, sums = 0, {}
        for mb in micro_batches(x, setup["micro"]):
            losses = train.training_step(models, mb, mb["t"], mb["noise"], mb["latent_noise"], args, counts)
            loss = sum(losses.values())
            scaler.scale(loss).backward()
            total = total + loss.detach()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.item()
        _, bad = train.optimizer_step(args, net, opt, sched, scaler, None, total, bad, 0)
        return sums
    return step


def build_train_reference(models, method, dtype):
    """diffusers / transformers modules holding our tensors; the frozen ones in `dtype` (upstream's weight_dtype)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

    sd, net, probe, dpt = models
    for m in (sd.unet, sd.vae, sd.text_encoder, dpt, probe):
        m.to(dtype)
    cfg = sd.config
    unet = shared_reference(sd.unet, UNet2DConditionModel, unet_config_to_diffusers(cfg.unet), unet_key_map(cfg.unet))
    controlnet = shared_reference(net, ControlNetModel, controlnet_config_to_diffusers(net),
                                  controlnet_key_map(cfg.unet))
    vae = shared_reference(sd.vae, AutoencoderKL, vae_config_to_diffusers(cfg.vae), vae_key_map(cfg.vae),
                           lambda name, v: v[:, :, 0, 0] if ".attentions." in name and v.ndim == 4 else v)
    # built for real: CLIP has non-persistent buffers (position ids) that a meta build would leave empty
    device = next(net.parameters()).device
    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(**text_config_to_transformers(cfg.text)))
    text = shared_reference(sd.text_encoder, text, None,
                            {k: k[len("text_model."):] for k in sd.text_encoder.state_dict()})
    reward_model = None
    if method != "controlnet":
        with torch.device(device):
            reward_model = DPTForDepthEstimation(DPTConfig(**(HYBRID_MIDAS if cfg.unet.model_channels == 320
                                                               else TINY_HYBRID)))
        reward_model = shared_reference(dpt, reward_model, None, {k: k for k in dpt.state_dict()})
    for m in (unet, vae, text, reward_model, probe):
        if m is not None:
            m.requires_grad_(False).eval()
    return dict(unet=unet, controlnet=controlnet.train(), vae=vae, text=text, reward=reward_model,
                tokenizer=sd.tokenizer, probe=probe if method == "innercontrol" else None)


def reference_train_step(method, models, setup, t_reward=400, lambda_reward=0.5, t_align=(0, 920), alpha=1.0,
                         max_grad_norm=1.0):
    """The upstream script's step (train_controlnet_reward.py logic) on the diffusers modules. With mixed precision
    as accelerate runs it: the ControlNet's forward under autocast, the frozen networks in the weight dtype, fed
    inputs cast to it, a GradScaler for fp16."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    dtype = cli.DTYPES[setup["precision"]]
    m = build_train_reference(models, method, dtype)
    unet, controlnet, vae, text, reward_model, probe = (m[k] for k in ("unet", "controlnet", "vae", "text", "reward",
                                                                       "probe"))
    # SD1.5's scheduler config, read as DDPM (what the upstream script does)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=10)
    scaler = torch.amp.GradScaler(setup["device"], enabled=dtype == torch.float16)
    autocast = torch.autocast(setup["device"], dtype=dtype, enabled=dtype != torch.float32)
    x = train_inputs(setup)
    input_ids = m["tokenizer"](x["text"]).to(setup["device"])  # tokenised by the data loader upstream
    resize = lambda v, size: F.interpolate(v, size=size, mode="bilinear", align_corners=False, antialias=True)  # noqa
    R = setup["resolution"]

    feats = []  # InnerControl: the decoder transformers' attn1 outputs, collected with forward hooks
    if method == "innercontrol":
        for block in unet.up_blocks:
            for attn in getattr(block, "attentions", None) or []:
                attn.transformer_blocks[0].attn1.register_forward_hook(lambda mod, inp, out: feats.append(out))

    def micro_step(mb, n_micro):
        feats.clear()
        timesteps = mb["t"].to(setup["device"])
        encoder_hidden_states = text(mb["input_ids"])[0]
        controlnet_image = mb["control"]
        dist = vae.encode(mb["image"].to(dtype)).latent_dist
        latents = (dist.mean + dist.std * mb["latent_noise"].to(dtype)) * vae.config.scaling_factor  # .sample()
        noise = mb["noise"]
        noisy_latents = scheduler.add_noise(latents, noise.to(dtype), timesteps)
        with autocast:
            down_res, mid_res = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                           controlnet_cond=controlnet_image, return_dict=False)
        model_pred = unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states,
                          down_block_additional_residuals=[r.to(dtype) for r in down_res],
                          mid_block_additional_residual=mid_res.to(dtype)).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        losses = {"diffusion": loss}
        labels = controlnet_image.mean(1)
        labels = labels / labels.flatten(1).amax(1).view(-1, 1, 1)
        if method != "controlnet":  # x0 estimate, decode, score EVERY sample, then mask by t <= t_reward
            x0 = torch.stack([scheduler.step(eps, t, lat).pred_original_sample
                              for eps, t, lat in zip(model_pred, timesteps, noisy_latents)])
            image = (vae.decode((x0 / vae.config.scaling_factor).to(dtype)).sample / 2 + 0.5).clamp(0, 1)
            outputs = reward_model((resize(image, (384, 384)) - 0.5) / 0.5).predicted_depth
            outputs = resize(outputs[:, None].float(), (R, R))[:, 0]
            outputs = outputs / outputs.flatten(1).amax(1).view(-1, 1, 1)
            mask = (timesteps <= t_reward).float()
            r = F.mse_loss(outputs, labels, reduction="none").mean(dim=(-1, -2))
            losses["reward"] = lambda_reward * (mask * r).sum() / (mask.sum() + 1e-10)
        if method == "innercontrol":  # the probe on the hooked features of EVERY sample, then mask
            B = noisy_latents.shape[0]
            maps = [f.transpose(1, 2).reshape(B, f.shape[2], int(math.isqrt(f.shape[1])), -1) for f in feats]
            emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype))
            pred = probe_output01(probe(DecoderFeatures(emb, maps)).float(), size=(R, R)).mean(1)
            pred = pred / pred.flatten(1).amax(1).view(-1, 1, 1)
            mask = ((timesteps >= t_align[0]) & (timesteps <= t_align[1])).float()
            a = F.mse_loss(pred, labels, reduction="none").mean(dim=(-1, -2))
            losses["align"] = alpha * (mask * a).sum() / (mask.sum() + 1e-10)
        scaler.scale(sum(losses.values()) / n_micro).backward()  # accelerate divides by the accumulation steps
        return {k: v.item() / n_micro for k, v in losses.items()}

    def step():
        sums = {}
        for mb in micro_batches(x, setup["micro"]):
            mb["input_ids"] = input_ids[mb["rows"]]
            for k, v in micro_step(mb, setup["micro"]).items():
                sums[k] = sums.get(k, 0) + v
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad()
        return sums
    return step


def train_worker(spec):
    """bench.py --train-worker JSON: one side's steps of each method in spec["methods"], from the same starting
    ControlNet; one JSON line of results per method on stdout."""
    try:  # if the machine runs out of memory, this process goes first, not a neighbour's
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    cuda = spec["device"] == "cuda"
    if not cuda:  # both sides under the malloc settings train.py makes on the CPU (INNERCONTROL_KEEP_MEMORY=0: neither)
        spec["keeps_memory"] = fused.keep_freed_memory()
    t0 = time.perf_counter()
    models = build_train_models(spec["config"], spec["device"])
    start = {k: v.detach().cpu().clone() for k, v in models[1].state_dict().items()}
    build_s = time.perf_counter() - t0
    for method in spec["methods"]:
        models[1].load_state_dict(start)
        step = ours_train_step(method, models, spec) if spec["side"] == "ours" else \
            reference_train_step(method, models, spec)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = status_kb("VmRSS") * 1024
            reset_peak_memory()
        times, losses = [], []
        for i in range(1 + spec["steps"]):  # the first step is the warm-up (it also creates the optimizer state)
            sync()
            t0 = time.perf_counter()
            losses.append(step())
            sync()
            times.append(time.perf_counter() - t0)
            print(f"[{spec['side']} {method}] step {i}: {times[-1]:.2f} s, {losses[-1]}", file=sys.stderr, flush=True)
        peak = torch.cuda.max_memory_allocated() if cuda else status_kb("VmHWM") * 1024
        reserved = torch.cuda.max_memory_reserved() if cuda else peak
        print(json.dumps(dict(method=method, build_s=build_s, times=times, median=statistics.median(times[1:]),
                              losses=losses, base_gb=base / 2 ** 30, peak_gb=peak / 2 ** 30,
                              reserved_gb=reserved / 2 ** 30, step_gb=(peak - base) / 2 ** 30,
                              threads=torch.get_num_threads(), keeps_memory=spec.get("keeps_memory"))), flush=True)
        del step
        gc.collect()


def run_train_side(side, methods, setup, steps, timeout=None):
    spec = dict(setup, side=side, methods=list(methods), steps=steps)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), WORKER_FLAG, json.dumps(spec)], cwd=REPO,
                       stdout=subprocess.PIPE, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench.py: the {side} side of {', '.join(methods)} failed (exit code {p.returncode})")
    return {r["method"]: r for r in map(json.loads, p.stdout.strip().splitlines())}


TRAIN_METHODS = ("controlnet", "controlnet++", "innercontrol")
TRAIN_RUNS = {}  # (precision, steps) -> both sides' results for every method: on CUDA one process per side


def train_results(method, precision, reps):
    """A warm-up step, then the median of `reps` steps (on the CPU at most 2: a step takes minutes there), each side
    in its own process, one after the other (their memory must not overlap). On CUDA each side's process runs all
    three methods (from the same start) and the lines share them."""
    setup = train_setup(DEVICE.type, precision)
    if DEVICE.type == "cpu":
        steps = max(1, min(2, reps))
        return setup, run_train_side("reference", [method], setup, steps)[method], \
            run_train_side("ours", [method], setup, steps)[method]
    key = (precision, reps)
    if key not in TRAIN_RUNS:  # a side that fails (out of memory, say) is remembered, not rerun by the next line
        TRAIN_RUNS[key] = {}
        for side in ("reference", "ours"):
            try:
                TRAIN_RUNS[key][side] = run_train_side(side, TRAIN_METHODS, setup, max(1, reps))
            except RuntimeError as e:
                TRAIN_RUNS[key][side] = e
    runs = TRAIN_RUNS[key]
    return setup, *(r if isinstance(r, Exception) else r[method] for r in (runs["reference"], runs["ours"]))


def train_bench(name, method, reps, precision="fp16"):
    setup, ref, ours = train_results(method, precision, reps)
    if isinstance(ours, Exception):
        raise ours
    if isinstance(ref, Exception):  # ours alone
        return (f"{name}: ours {ours['median']:.3f} s, reference failed ({ref}), step memory ours "
                f"{ours['step_gb']:.2f} GB (whole process {ours['peak_gb']:.2f} GB)")
    # the warm-up step runs from identical weights and inputs: its losses must agree
    first_ours, first_ref = ours["losses"][0], ref["losses"][0]
    worst = max(abs(v - first_ref[k]) / max(1e-8, abs(first_ref[k])) for k, v in first_ours.items())
    kind = "resident" if DEVICE.type == "cpu" else "GPU allocated"
    return line(name, ours["median"], ref["median"], f"first-step losses agree to {worst:.1e}",
                f"batch {len(setup['timesteps'])} in {setup['micro']} micro-batches, {setup['config']}, "
                f"{setup['resolution']} px, precision {setup['precision']}",
                f"{ours['threads']} threads, freed memory kept: {ours['keeps_memory'] and ref['keeps_memory']}"
                if DEVICE.type == "cpu" else torch.cuda.get_device_name(),
                f"step memory ours {ours['step_gb']:.2f} GB, reference {ref['step_gb']:.2f} GB "
                f"(whole process {ours['peak_gb']:.2f} / {ref['peak_gb']:.2f} GB {kind})",
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


for _method in TRAIN_METHODS:  # the bf16 lines on CUDA
    bench(f"train-{_method}-bf16", devices=("cuda",))(
        lambda reps, m=_method: train_bench(f"train-{m}-bf16", m, reps, precision="bf16"))

TIMESTEPS_512 = (50, 175, 300, 425, 550, 675, 800, 925)  # evenly spread: 3 rows in the depth reward window


@bench("train-innercontrol-512", devices=("cuda",))
def bench_train_innercontrol_512(reps):
    """InnerControl at the paper's per-GPU setting: 512 px, batch 8, fp16, gradient checkpointing; ours alone (the
    number that matters is whether it fits a 16 GB card), with its whole-process peak and samples/s."""
    setup = train_setup("cuda", "fp16", timesteps=list(TIMESTEPS_512), micro=1, grad_checkpointing=True)
    ours = run_train_side("ours", ["innercontrol"], setup, max(1, reps))["innercontrol"]
    B = len(TIMESTEPS_512)
    return (f"train-innercontrol-512: ours {ours['median']:.3f} s per step, {B / ours['median']:.2f} samples/s, "
            f"peak GPU memory {ours['peak_gb']:.2f} GB allocated ({ours['reserved_gb']:.2f} GB reserved), "
            f"of which the models {ours['base_gb']:.2f} GB, batch {B} at {setup['resolution']} px, fp16, "
            f"gradient checkpointing, {setup['config']}, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER_FLAG]:
        spec = json.loads(sys.argv[2])
        DEVICE = torch.device(spec["device"])
        sys.exit(train_worker(spec))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"measurements to run (default: all of {', '.join(BENCHES)} that run on "
                                            "--device)")
    p.add_argument("--reps", type=int, default=None, help="timed runs of each side (median reported; train-*: at "
                                                          "most 2 on the CPU); default 5 on the CPU, 20 on CUDA")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    DEVICE = torch.device(args.device)
    unknown = [n for n in args.names if n not in BENCHES or args.device not in BENCHES[n][1]]
    if unknown:
        p.error(f"unknown measurement(s) on {args.device}: {', '.join(unknown)}; known: "
                f"{', '.join(n for n, (_, d) in BENCHES.items() if args.device in d)}")
    reps, failed = args.reps or (20 if args.device == "cuda" else 5), []
    for name in args.names or [n for n, (_, d) in BENCHES.items() if args.device in d]:
        try:
            print(BENCHES[name][0](reps), flush=True)
        except Exception as e:  # noqa: BLE001 (one failed line, an out-of-memory say, must not lose the others)
            traceback.print_exc()
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            failed.append(name)
            gc.collect()
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    sys.exit(1 if failed else 0)
