"""On a CUDA GPU: fp16 and bf16 against fp32, fp16 training with the GradScaler, resume, sampling against diffusers'
pipeline, and the CUDA paths of fused.py in use. Skipped without a GPU; `python -m pytest -m cuda` runs them
(tools/gpu_check.sh does). Every test prints its measured figures on a line starting with "cuda-check:".

Stated tolerances (relative: |ours - fp32 reference| / |reference|, over the whole output):
- fp16 weights (as sample.py runs), or fp32 weights under fp16 autocast (as train.py runs): <= 2e-2 outputs,
  <= 5e-2 input gradients, or no more than 1.5 times the plain layers' own error under the same autocast
  (fp16 rounds each op to 2^-11; SD1.5's networks are ~100 layers deep);
- the same in bf16: <= 1e-1 outputs, <= 2e-1 input gradients, or 1.5 times the plain layers' (bf16 rounds to 2^-8;
  a tiny random DPT already shows 4e-2);
- sample.py on CUDA against diffusers' pipeline on CUDA, same seed, 10 DDIM steps: mean |difference| <= 1 of 255 in
  fp32 (as on the CPU), <= 3 of 255 in fp16 (each side rounds differently; the trajectories drift apart);
- resume: the losses of steps 3-4 after a resume within 1e-3 of the uninterrupted run's (cuDNN's backward kernels
  are free to sum in any order, so two runs are not bitwise equal);
- CUDA graph replay against eager sampling: the same image to within one 8-bit level.
"""
import copy
import os

import numpy as np
import pytest
import torch

import controlnet
import fused
import model
import reward
import sample
import train
import unet

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = torch.device("cuda")


def report(name, **values):
    row = f"cuda-check: {name} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in values.items())
    print(row)
    if os.environ.get("GPU_REPORT"):
        with open(os.environ["GPU_REPORT"], "a") as f:
            f.write(row + "\n")


@torch.no_grad()
def randomize_cuda_(module, seed=0):
    """util.randomize_'s recipe drawn on the GPU (a CPU draw of SD1.5's 860 M weights takes half a minute)."""
    g = torch.Generator(DEV).manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.ndim >= 2:
            v = torch.randn(p.shape, generator=g, device=DEV) / p[0].numel() ** 0.5
        elif name.endswith(("weight", "scale")):
            v = 1 + 0.1 * torch.randn(p.shape, generator=g, device=DEV)
        else:
            v = 0.05 * torch.randn(p.shape, generator=g, device=DEV)
        p.copy_(v)
    return module


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


# -- half precision against fp32, SD1.5 shapes ------------------------------------------------------------

def sd15_net(name):
    """(plain fp32 network, its inputs, the call that runs it) at SD1.5 shapes with random weights, on the GPU."""
    cfg = unet.UNetConfig()
    g = torch.Generator(DEV).manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=DEV)  # noqa: E731
    call = lambda m, *a: m(*a)  # noqa: E731
    with torch.device(DEV):
        if name == "unet":
            net, inputs = unet.UNet(cfg), [randn(2, 4, 64, 64), torch.tensor([10, 700]), randn(2, 77, 768)]
        elif name == "controlnet":
            net = controlnet.ControlNet(cfg)
            inputs = [randn(2, 4, 64, 64), torch.tensor([10, 700]), randn(2, 77, 768), randn(2, 3, 512, 512).sigmoid()]
        elif name == "vae":  # the decoder at 512 px, what the reward loss back-propagates through
            net, inputs, call = model.VAE(model.VAEConfig()), [randn(1, 4, 64, 64)], lambda m, z: m.decode(z)
        else:  # DPT-Hybrid, the depth reward model, before its last ReLU (which zeroes much of a random net's output)
            from bench import HYBRID_MIDAS
            net, inputs = reward.DPT(reward.DPTConfig.from_dict(HYBRID_MIDAS)), [randn(1, 3, 384, 384).tanh()]
            call = lambda m, x: m.head.head[:-1](m.neck(*m.dpt(x))[m.config.head_in_index])  # noqa: E731
    return randomize_cuda_(net).eval().requires_grad_(False), inputs, call


def flat(out):
    return out.float().flatten() if isinstance(out, torch.Tensor) else torch.cat([flat(o) for o in out])


def autocast_grad(net, call, inputs, dtype):
    """Output and input gradient with fp32 weights under autocast, as train.py runs the ControlNet (and back-propagates
    through the frozen networks)."""
    x = inputs[0].clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        out = flat(call(net, x, *inputs[1:]))
    return out, torch.autograd.grad(out.square().sum() / 2, x)[0]


@pytest.mark.parametrize("name", ["unet", "controlnet", "vae", "dpt"])
def test_half_precision_against_fp32(name):
    """Outputs against fp32 within the stated tolerances. Input gradients within theirs, or no further from fp32
    than the plain layers' own gradient under the same autocast (a random DPT's fp16 input gradient is ill-conditioned:
    on the CPU the plain network's is 15% off)."""
    net, inputs, call = sd15_net(name)
    x = inputs[0].clone().requires_grad_()
    # a true fp32 reference: cuDNN would run fp32 convs in TF32 (10 bits of mantissa) by default
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        ref = call(net, x, *inputs[1:])
        # a loss whose gradient is the output itself: O(1) values, far from fp16's underflow (a mean would not be)
        ref_grad, = torch.autograd.grad(flat(ref).square().sum() / 2, x)
    ref = flat(ref).detach()
    fast = fused.install(copy.deepcopy(net))
    for dtype, tol, grad_tol in ((torch.float16, 2e-2, 5e-2), (torch.bfloat16, 1e-1, 2e-1)):
        with torch.no_grad():  # half weights, as sample.py runs them
            half = copy.deepcopy(fast).to(dtype)
            out_half = flat(call(half, *[v.to(dtype) if v.is_floating_point() else v for v in inputs]))
            del half
        out_auto, grad = autocast_grad(fast, call, inputs, dtype)
        plain_grad = autocast_grad(net, call, inputs, dtype)[1]
        errors = dict(half_weights=rel(out_half, ref), autocast=rel(out_auto, ref), autocast_input_grad=rel(grad, ref_grad),
                      plain_autocast_input_grad=rel(plain_grad, ref_grad))
        report(f"{name} {str(dtype)[6:]} vs fp32", **errors)
        assert errors["half_weights"] <= tol and errors["autocast"] <= tol
        assert errors["autocast_input_grad"] <= max(grad_tol, 1.5 * errors["plain_autocast_input_grad"])


def test_fused_paths_are_in_use_on_the_gpu():
    """fp16 on CUDA: conv weights laid out NHWC, ResBlock outputs NHWC, GroupNorm + SiLU and GEGLU through their
    recomputing functions, the VAE attention's q, k, v with a contiguous last dimension."""
    net = fused.install(randomize_cuda_(unet.UNet(unet.UNetConfig(model_channels=64, context_dim=64)).to(DEV)))
    net.requires_grad_(False).half()
    x, ctx = torch.randn(1, 4, 32, 32, device=DEV, dtype=torch.half), torch.randn(1, 7, 64, device=DEV).half()
    outs = []
    hook = net.input_blocks[1][0].register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        net(x, 500, ctx)
    hook.remove()
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    assert net.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        y = net(xg, 500, ctx)
    names, seen, stack = set(), set(), [y.grad_fn]
    while stack:  # every node of the backward graph
        fn = stack.pop()
        if fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            names.add(type(fn).__name__)
            stack += [f for f, _ in fn.next_functions]
    assert {"GroupNormActFnBackward", "GEGLUFnBackward", "FrozenConv2dFnBackward"} <= names, names
    report("fused paths in use", autograd_functions=",".join(sorted(n for n in names if "Fn" in n)))


def test_attention_takes_the_fused_kernels():
    """With the math kernel ruled out, the UNet's attention and the VAE's (as tokens) still run in fp16: they reach
    scaled_dot_product_attention in a layout the flash / memory-efficient / cuDNN kernels take. (Reported, not
    asserted: whether the plain VAE block, whose last dimension is strided, needs the math kernel.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fused_only = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    net = randomize_cuda_(unet.UNet(unet.UNetConfig(model_channels=64, context_dim=64)).to(DEV)).half().eval()
    block = randomize_cuda_(model.AttnBlock(512, 32).to(DEV)).half().eval()
    x, ctx, h = (torch.randn(1, 4, 32, 32, device=DEV).half(), torch.randn(1, 7, 64, device=DEV).half(),
                 torch.randn(1, 512, 32, 32, device=DEV).half())
    with torch.no_grad():
        try:
            with sdpa_kernel(fused_only):
                block(h)
            plain_needs_math = False
        except RuntimeError:
            plain_needs_math = True
        fused.install(net, block)
        with sdpa_kernel(fused_only):
            net(x, 500, ctx), block(h)
    report("attention on fused kernels", unet=True, vae_as_tokens=True, plain_vae_block_needs_math=plain_needs_math)


def test_lean_paths_save_gpu_memory():
    """The frozen UNet's backward (what training back-propagates through to reach the ControlNet), fp16 autocast,
    SD1.5 shapes at 32x32 latents, batch 2: the peak memory of forward + backward with fused.py's paths against
    the plain layers."""
    net, _, _ = sd15_net("unet")
    fast = fused.install(copy.deepcopy(net).half())
    net.half()
    x, ctx = torch.randn(2, 4, 32, 32, device=DEV), torch.randn(2, 77, 768, device=DEV)
    peaks = {}
    for name, m in (("plain", net), ("fused", fast)):
        for _ in range(2):  # the first pass also lays the frozen weights out
            xg = x.clone().requires_grad_()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.float16):
                y = m(xg, torch.tensor([10, 700], device=DEV), ctx)
            y.float().square().mean().backward()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            del y, xg
    report("frozen UNet forward+backward peak", plain_gb=peaks["plain"], fused_gb=peaks["fused"],
           ratio=peaks["fused"] / peaks["plain"])
    assert peaks["fused"] < peaks["plain"]


# -- training on the GPU ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_world(tmp_path_factory):
    import test_train
    return test_train.make_world(tmp_path_factory.mktemp("world"))


def test_fp16_overflow_step_is_skipped_on_the_gpu(train_world):
    import test_train
    test_train.check_fp16_overflow_step(train_world, "cuda")
    report("fp16 overflow step skipped, scale halved", ok=True)


def test_resume_on_the_gpu_reproduces_losses(train_world, tmp_path):
    from test_train import base_argv, read_log
    extra = ("--method", "innercontrol", "--device", "cuda", "--mixed-precision", "fp16")
    train.main(base_argv(train_world, tmp_path / "a", *extra, "--max-steps", "4"))
    train.main(base_argv(train_world, tmp_path / "b", *extra, "--max-steps", "2", "--save-every", "2"))
    train.main(base_argv(train_world, tmp_path / "b", *extra, "--max-steps", "4", "--resume"))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    worst = max(abs(ra[k] - rb[k]) / max(1.0, abs(ra[k])) for ra, rb in zip(a, b)
                for k in ("loss_diffusion", "loss_reward", "loss_align"))
    report("resume on the GPU", worst_loss_difference=worst, steps=len(b))
    assert [r["step"] for r in b] == [1, 2, 3, 4] and worst <= 1e-3


# -- sampling against diffusers on the GPU ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_world(tmp_path_factory):
    import test_sample
    return test_sample.make_world(tmp_path_factory.mktemp("sample"))


def reference_on_gpu(world, dtype):
    from diffusers import DDIMScheduler
    from PIL import Image
    from test_sample import NEGATIVE, PROMPT, SD15_SCHEDULER, SEED, SIZE, STEPS
    pipe = copy.deepcopy(world.pipe)
    pipe.scheduler = DDIMScheduler(**SD15_SCHEDULER)
    pipe = pipe.to(DEV, dtype)
    latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    out = pipe(PROMPT, image=Image.open(world.cond), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
               guidance_scale=7.5, latents=latents.to(DEV, dtype), height=SIZE, width=SIZE, output_type="np").images
    return (out[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1.0), ("fp16", 3.0)])
def test_sample_matches_diffusers_on_the_gpu(sample_world, tmp_path, dtype, tol):
    from test_sample import NEGATIVE, PROMPT, SEED, SIZE, STEPS, png, run_cli
    r = run_cli("--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--cond", sample_world.cond, "--weights",
                sample_world.folder, "--sampler", "ddim", "--steps", STEPS, "--seed", SEED, "--size", SIZE,
                "--device", "cuda", "--dtype", dtype, "--out", tmp_path / "ours.png", cwd=sample_world.dir)
    assert r.returncode == 0, r.stderr
    ours = png(tmp_path / "ours.png").astype(np.float64)
    ref = reference_on_gpu(sample_world, torch.float32 if dtype == "fp32" else torch.float16)
    diff = np.abs(ours - ref)
    report(f"sample.py vs diffusers pipeline, CUDA {dtype}", mean_levels=float(diff.mean()),
           max_levels=float(diff.max()), reference_std=float(ref.std()))
    assert ref.std() > 20 and diff.mean() <= tol


def test_cuda_graphs_give_the_eager_image(sample_world, monkeypatch):
    sd = copy.deepcopy(sample_world.sd).to(DEV, torch.float16)
    net = copy.deepcopy(sample_world.net).to(DEV, torch.float16)
    fused.install(sd.requires_grad_(False), net.requires_grad_(False))
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = []
    for graphs in (False, True):
        monkeypatch.setattr(fused, "CUDA_GRAPHS", graphs)
        images.append(np.asarray(sample.generate(sd, "a red sphere", cond, net, steps=6, seed=2)[0]).astype(int))
    captured = len(fused.GRAPHS.get(sd.unet).graphs) if sd.unet in fused.GRAPHS else 0
    diff = np.abs(images[0] - images[1])
    report("CUDA graph replay vs eager sampling", max_levels=int(diff.max()), unet_graphs=captured)
    assert captured == 1 and diff.max() <= 1
