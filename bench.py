"""Benchmarks against the diffusers reference, side by side in one process.

    python bench.py [NAME ...] [--reps N]     # every registered measurement when no NAME is given

Each measurement prints one line,
    NAME: ours <t> s, reference <t> s, ratio <ours/reference>[, more fields]
Ours and the reference hold the same weights (the very same tensors) and get the same inputs; after a
warm-up call each, their runs alternate, so a machine busy with something else slows both alike, and
each time is the median. Everything runs under torch.inference_mode with one thread setting.
Measurements register themselves in BENCHES (name -> function(reps) -> line).
diffusers is needed here, as in the tests; the library itself does not use it.
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from controlnet import ControlNet, controlnet_config_to_diffusers, controlnet_key_map, guided_eps
from unet import UNet, UNetConfig, unet_config_to_diffusers, unet_key_map

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


def shared_reference(ours, ref_cls, kwargs, names):
    """The diffusers model built empty and given our tensors (one copy of the weights in memory)."""
    with torch.device("meta"):
        ref = ref_cls(**kwargs)
    ref.load_state_dict({names[k]: v for k, v in ours.state_dict().items()}, strict=True, assign=True)
    return ref.eval()


def sd15_unets():
    from diffusers import UNet2DConditionModel
    cfg = UNetConfig()
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
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
    ours_cn = ControlNet(UNetConfig()).eval()
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"measurements to run (default: all of {', '.join(BENCHES)})")
    p.add_argument("--reps", type=int, default=5, help="timed runs of each side (median reported)")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        p.error(f"unknown measurement(s) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    for name in args.names or BENCHES:
        print(BENCHES[name](args.reps), flush=True)
