"""sample.py: samplers against diffusers' schedulers, end-to-end pixels against diffusers'
StableDiffusionControlNetPipeline, and the command line's handling of bad input."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import formats
import model
import sample
from formats import save_probe
from probe import Probe, ProbeConfig
from test_model import clip_vocab
from util import randomize_

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
# stable-diffusion-v1-5's scheduler/scheduler_config.json as published: a PNDMScheduler's, with no timestep_spacing
SD15_PUBLISHED = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


def fake_eps(x, t):
    """A deterministic, smooth stand-in for a denoiser that depends on both x and t."""
    s = float(t) / 1000
    return torch.tanh(0.7 * x + s) * (0.5 + s) + 0.1 * torch.sin(3 * x * (1 - s))


def reference_trajectory(scheduler, steps, x):
    scheduler.set_timesteps(steps)
    traj, ts = [], []
    for t in scheduler.timesteps:
        ts.append(int(t))
        x = scheduler.step(fake_eps(x, int(t)), t, x).prev_sample
        traj.append(x)
    return ts, traj


def our_trajectory(fn, steps, x, alphas_cumprod):
    traj, ts = [], []

    def eps_fn(x, t):
        if ts:  # the previous call's output is the state now passed in
            traj.append(x)
        ts.append(t)
        return fake_eps(x, t)

    x = fn(eps_fn, x, alphas_cumprod, steps)
    traj.append(x)
    return ts, traj


def sd15_alphas_cumprod():
    # NoiseSchedule's recipe, in float64: scaled linear betas 0.00085..0.012 over 1000 steps
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def reference_unipc():
    """UniPC as ControlNet++'s evaluation builds it: from_config of the SD1.5 pipeline's scheduler (a PNDMScheduler
    whose own default spacing, "leading", is marked as a default and so not carried over: UniPC's "linspace")."""
    from diffusers import PNDMScheduler, UniPCMultistepScheduler
    return UniPCMultistepScheduler.from_config(PNDMScheduler.from_config(SD15_PUBLISHED).config)


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "unipc"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 20, 25, 50])
def test_sampler_matches_diffusers(name, steps):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        ref = DDIMScheduler(**SD15_SCHEDULER)
    elif name == "unipc":
        ref = reference_unipc()
    else:  # what swapping DPM-Solver++ into an SD1.5 pipeline gives: from_config of its scheduler config
        ref = DPMSolverMultistepScheduler.from_config(DDIMScheduler(**SD15_SCHEDULER).config,
                                                      algorithm_type="dpmsolver++", solver_order=2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ref_ts, ref_traj = reference_trajectory(ref, steps, x)
    fn = sample.SAMPLERS[name][0]
    ts, traj = our_trajectory(fn, steps, x, sd15_alphas_cumprod())
    assert ts == ref_ts == sample.SAMPLERS[name][1](steps)
    assert len(traj) == len(ref_traj) == steps
    for i, (a, b) in enumerate(zip(traj, ref_traj)):
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < 1e-5, f"step {i}: {err}"
    if ts[0] > 500:  # the trajectory actually went somewhere (1-step DDIM starts at t = 1)
        assert (traj[-1] - x).abs().mean() > 0.1


def test_sampler_timesteps_sd15():
    assert sample.ddim_timesteps(20)[:3] == [951, 901, 851] and sample.ddim_timesteps(20)[-1] == 1
    assert sample.dpmpp_2m_timesteps(20)[:2] == [941, 894] and sample.dpmpp_2m_timesteps(20)[-1] == 48
    assert sample.unipc_timesteps(20)[:3] == [999, 949, 899] and sample.unipc_timesteps(20)[10:] == list(range(500, 0, -50))
    for fn, bad in ((sample.ddim_timesteps, 0), (sample.dpmpp_2m_timesteps, 1000), (sample.unipc_timesteps, 1000)):
        with pytest.raises(ValueError):
            fn(bad)


def test_unipc_configuration_and_every_step_count():
    ref = reference_unipc()
    c = ref.config
    assert (c.timestep_spacing, c.solver_order, c.solver_type, c.predict_x0, c.lower_order_final) == \
        ("linspace", 2, "bh2", True, True)
    assert (c.final_sigmas_type, c.prediction_type, list(c.disable_corrector)) == ("zero", "epsilon", [])
    for steps in range(1, 1000):
        ref.set_timesteps(steps)
        assert sample.unipc_timesteps(steps) == ref.timesteps.tolist(), steps


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_unipc_first_order_steps_are_ddim(steps):
    """UniPC's first step (no history) is DDIM to the next timestep, and its last DDIM to abar = 1 (x0_hat); with 1
    or 2 steps there is no second-order step, so the whole trajectory is DDIM."""
    abar = sd15_alphas_cumprod().tolist() + [1.0]

    def ddim_step(x, t, t_next):
        x0 = (x - (1 - abar[t]) ** 0.5 * fake_eps(x, t)) / abar[t] ** 0.5
        return abar[t_next] ** 0.5 * x0 + (1 - abar[t_next]) ** 0.5 * fake_eps(x, t)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts, traj = our_trajectory(sample.unipc, steps, x, sd15_alphas_cumprod())
    for i, (t, t_next) in enumerate(zip(ts, ts[1:] + [-1])):  # abar[-1] is the appended 1
        if i in (0, steps - 1) or steps <= 2:
            torch.testing.assert_close(traj[i], ddim_step(x if i == 0 else traj[i - 1], t, t_next), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# end to end: the command line against diffusers' StableDiffusionControlNetPipeline

SEED, STEPS, SIZE = 3, 10, 64
PROMPT, NEGATIVE = "a red sphere and a blue box on a grey floor", "blurry, low quality"
LONG_PROMPT = " ".join(["a small red sphere beside a tall blue box"] * 10)  # ~90 tokens: truncated
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    # the networks here are tiny: a second thread only adds synchronisation (and stalls on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def control_image(size=SIZE):
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    disc = ((xx - 0.4) ** 2 + (yy - 0.6) ** 2 < 0.08).astype(float)
    return Image.fromarray((np.stack([xx, yy, disc], -1) * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    return make_world(tmp_path_factory.mktemp("sample"))


def make_world(d):
    """A tiny random SD1.x + ControlNet as a diffusers pipeline folder, the same weights as an original
    single file and an lllyasviel-layout ControlNet, a control map, and the reference pipeline."""
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = model.tiny()
    # 64-wide heads, as CLIP has them: a single file without metadata gives the head count no other way
    cfg.text = dataclasses.replace(cfg.text, heads=cfg.text.width // 64)
    unet_ref = randomize_(UNet2DConditionModel(**formats.unet_config_to_diffusers(cfg.unet)), 1)
    controlnet_ref = randomize_(ControlNetModel.from_unet(unet_ref), 2)  # zero convs made non-zero too
    vae_ref = randomize_(AutoencoderKL(**formats.vae_config_to_diffusers(cfg.vae)), 3)
    text_ref = randomize_(CLIPTextModel(CLIPTextConfig(**formats.text_config_to_transformers(cfg.text))), 4)
    vocab, merges = clip_vocab()
    (d / "tok").mkdir()
    (d / "tok" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "tok" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
    tokenizer = CLIPTokenizer(str(d / "tok" / "vocab.json"), str(d / "tok" / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    pipe = StableDiffusionControlNetPipeline(
        vae=vae_ref, text_encoder=text_ref, tokenizer=tokenizer, unet=unet_ref, controlnet=controlnet_ref,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = d / "tiny-sd"
    pipe.save_pretrained(folder)
    for f in ("vocab.json", "merges.txt"):  # as SD1.5's folder has them (transformers 5 writes tokenizer.json only)
        shutil.copy(d / "tok" / f, folder / "tokenizer" / f)

    # the same weights as an original single file (no config metadata: the architecture comes from the
    # tensor shapes) and a ControlNet file in lllyasviel's layout (control_model. prefix, .pth)
    sd = formats.load_sd(folder)
    formats.save_sd(sd, d / "with-meta.safetensors")
    save_file(load_file(d / "with-meta.safetensors"), d / "tiny-sd.safetensors")
    net = formats.load_controlnet(folder / "controlnet", sd.unet.config)
    torch.save({"control_model." + k: v for k, v in net.state_dict().items()}, d / "control_tiny.pth")

    control_image().save(d / "cond.png")
    return SimpleNamespace(dir=d, folder=folder, single=d / "tiny-sd.safetensors",
                           controlnet_file=d / "control_tiny.pth", cond=d / "cond.png", pipe=pipe, sd=sd, net=net)


def reference(world, prompt, scheduler="ddim", num_images=1):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = world.pipe
    pipe.scheduler = DDIMScheduler(**SD15_SCHEDULER)
    if scheduler == "dpmpp-2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                                 solver_order=2)
    elif scheduler == "unipc":
        pipe.scheduler = reference_unipc()
    latents = torch.randn((num_images, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    out = pipe(prompt, image=Image.open(world.cond), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
               guidance_scale=7.5, latents=latents, height=SIZE, width=SIZE, num_images_per_prompt=num_images,
               output_type="np").images
    return (out * 255).round().astype(np.uint8)


def run_cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def check_close(ours, ref):
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64)).mean()
    # the comparison means something only if the reference image is neither flat nor saturated
    assert ref.std() > 20 and ((ref == 0) | (ref == 255)).mean() < 0.2
    assert diff <= 1.0, f"mean abs difference {diff:.3f} levels of 255"
    print(f"mean abs difference vs diffusers: {diff:.4f} levels of 255, max {np.abs(ours.astype(int) - ref).max()}")
    return diff


@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
def test_cli_matches_diffusers_ddim(world, layout):
    weights = ["--weights", world.folder] if layout == "diffusers" else \
        ["--weights", world.single, "--controlnet", world.controlnet_file]
    r = run_cli("--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--cond", world.cond, *weights,
                "--sampler", "ddim", "--steps", STEPS, "--guidance", 7.5, "--seed", SEED, "--size", SIZE,
                "--out", world.dir / f"ddim-{layout}.png", cwd=world.dir)
    assert r.returncode == 0, r.stderr
    image = Image.open(world.dir / f"ddim-{layout}.png")
    check_close(np.asarray(image.convert("RGB")), reference(world, PROMPT)[0])
    meta = image.text
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == NEGATIVE
    assert (meta["seed"], meta["steps"], meta["sampler"]) == (str(SEED), str(STEPS), "ddim")
    assert float(meta["guidance"]) == 7.5 and float(meta["control_scale"]) == 1.0
    if layout == "single-file":
        assert (meta["weights"], meta["controlnet"]) == ("tiny-sd.safetensors", "control_tiny.pth")
    else:
        assert (meta["weights"], meta["controlnet"]) == ("tiny-sd", "controlnet")


def test_cli_matches_diffusers_dpmpp_2m_long_prompt(world):
    r = run_cli("--prompt", LONG_PROMPT, "--negative-prompt", NEGATIVE, "--cond", world.cond, "--weights",
                world.folder, "--sampler", "dpmpp-2m", "--steps", STEPS, "--seed", SEED, "--out",
                world.dir / "dpm.png", cwd=world.dir)
    assert r.returncode == 0, r.stderr
    assert "truncated" in r.stderr  # and the reference truncates the same way: BOS + 75 tokens + EOS
    check_close(png(world.dir / "dpm.png"), reference(world, LONG_PROMPT, "dpmpp-2m")[0])


def test_cli_matches_diffusers_unipc(world):
    r = run_cli("--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--cond", world.cond, "--weights", world.folder,
                "--sampler", "unipc", "--steps", STEPS, "--seed", SEED, "--out", world.dir / "unipc.png", cwd=world.dir)
    assert r.returncode == 0, r.stderr
    check_close(png(world.dir / "unipc.png"), reference(world, PROMPT, "unipc")[0])


def test_cli_at_a_size_the_unet_does_not_divide(world):
    """A 88x72 map (9x11 latents; three halvings do not divide 9): the decoder's upsamplings land on the skips'
    sizes, and the image is the diffusers pipeline's."""
    from diffusers import DDIMScheduler
    control_image(96).crop((0, 0, 88, 72)).save(world.dir / "cond-88x72.png")
    r = run_cli("--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--cond", world.dir / "cond-88x72.png", "--weights",
                world.folder, "--steps", STEPS, "--seed", SEED, "--out", world.dir / "odd.png", cwd=world.dir)
    assert r.returncode == 0, r.stderr
    world.pipe.scheduler = DDIMScheduler(**SD15_SCHEDULER)
    latents = torch.randn((1, 4, 9, 11), generator=torch.Generator("cpu").manual_seed(SEED))
    ref = world.pipe(PROMPT, image=Image.open(world.dir / "cond-88x72.png"), negative_prompt=NEGATIVE,
                     num_inference_steps=STEPS, guidance_scale=7.5, latents=latents, height=72, width=88,
                     output_type="np").images[0]
    assert png(world.dir / "odd.png").shape == (72, 88, 3)
    check_close(png(world.dir / "odd.png"), (ref * 255).round().astype(np.uint8))


def test_cli_batch_grid_and_probe_strip(world):
    probe = randomize_(Probe(ProbeConfig.for_unet(world.sd.unet.config)), 5)
    save_probe(probe, world.dir / "probe.safetensors")
    r = run_cli("--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--cond", world.cond, "--weights", world.single,
                "--controlnet", world.controlnet_file, "--num-images", 2, "--seed", SEED, "--steps", STEPS,
                "--probe", world.dir / "probe.safetensors", "--out", world.dir / "batch.png", cwd=world.dir)
    assert r.returncode == 0, r.stderr
    ref = reference(world, PROMPT, num_images=2)
    for i in range(2):
        check_close(png(world.dir / f"batch_{i}.png"), ref[i])
    assert Image.open(world.dir / "batch_grid.png").size == (2 * SIZE, SIZE)
    strip = Image.open(world.dir / "batch_probe.png")
    # rows: the 2 images; columns: control | 5 probe readings | image
    assert strip.size == (7 * SIZE, 2 * SIZE)
    assert strip.text["columns"].count("t=") == 5
    np.testing.assert_array_equal(np.asarray(strip)[:SIZE, -SIZE:], png(world.dir / "batch_0.png"))


# -----------------------------------------------------------------------------
# control maps and bad input


def test_load_control_modes(tmp_path):
    rgb = np.asarray(control_image(16))
    gray = rgb[..., 0]
    deep = (np.arange(16 * 16).reshape(16, 16) * 255 + 100).astype(np.uint16)  # 16-bit depth, off the 8-bit grid
    cases = {
        "L": (Image.fromarray(gray), np.repeat(gray[None] / 255, 3, 0)),
        "RGB": (Image.fromarray(rgb), rgb.transpose(2, 0, 1) / 255),
        "RGBA": (Image.fromarray(np.dstack([rgb, np.full_like(gray, 7)])), rgb.transpose(2, 0, 1) / 255),
        "P": (Image.fromarray(rgb).quantize(16), None),
        "I;16": (Image.fromarray(deep), np.repeat(deep[None] / 65535, 3, 0)),
    }
    for mode, (img, expected) in cases.items():
        assert img.mode == mode
        img.save(tmp_path / f"{mode}.png")
        x = sample.load_control(tmp_path / f"{mode}.png")
        assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32, mode
        if expected is None:  # palette: the colours the palette maps to
            expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1) / 255
        np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6, err_msg=mode)  # I;16: no 8-bit rounding
    # resized to the output size, and a size not a multiple of 8 rounds down when no size is asked for
    assert sample.load_control(tmp_path / "RGB.png", (24, 8)).shape == (1, 3, 8, 24)
    Image.fromarray(rgb[:13, :]).save(tmp_path / "odd.png")
    assert sample.load_control(tmp_path / "odd.png").shape == (1, 3, 8, 16)


@pytest.fixture(scope="module")
def bad_files(world):
    from diffusers import ControlNetModel

    d = world.dir
    (d / "notes.png").write_text("this is not an image")
    (d / "junk.safetensors").write_bytes(b"this is not a checkpoint either")
    # a ControlNet for a UNet twice as wide: its residuals cannot be added to this UNet's skips
    wide = dict(world.pipe.controlnet.config)
    wide["block_out_channels"] = [2 * c for c in wide["block_out_channels"]]
    ControlNetModel.from_config(wide).save_pretrained(d / "wide-controlnet")
    save_probe(Probe(ProbeConfig()), d / "sd15-probe.safetensors")  # reads SD1.5's 1280/640/320 features
    return d


BAD_INPUT = {  # name: (arguments, a phrase the message must contain); {d} is the test folder
    "missing cond": (["--cond", "{d}/nope.png", "--weights", "{d}/tiny-sd"], "nope.png"),
    "unreadable cond": (["--cond", "{d}/notes.png", "--weights", "{d}/tiny-sd"], "notes.png"),
    "weights not a checkpoint": (["--cond", "{d}/cond.png", "--weights", "{d}/junk.safetensors"],
                                 "junk.safetensors: not a valid .safetensors file"),
    "missing weights": (["--cond", "{d}/cond.png", "--weights", "{d}/nowhere"], "nowhere"),
    "controlnet too wide": (["--cond", "{d}/cond.png", "--weights", "{d}/tiny-sd", "--controlnet",
                             "{d}/wide-controlnet"], "does not fit the UNet"),
    "size": (["--cond", "{d}/cond.png", "--weights", "{d}/tiny-sd", "--size", "60"], "multiple of 8"),
    "height": (["--cond", "{d}/cond.png", "--weights", "{d}/tiny-sd", "--height", "64", "--width", "36"],
               "multiple of 8"),
    "steps 0": (["--cond", "{d}/cond.png", "--weights", "{d}/tiny-sd", "--steps", "0"], "--steps"),
    "sampler": (["--cond", "{d}/cond.png", "--weights", "{d}/tiny-sd", "--sampler", "euler"], "euler"),
    "no weights": (["--cond", "{d}/cond.png"], "python train.py --control depth"),
    "no controlnet": (["--cond", "{d}/cond.png", "--weights", "{d}/tiny-sd.safetensors"], "--controlnet PATH"),
    "probe of another unet": (["--cond", "{d}/cond.png", "--weights", "{d}/tiny-sd", "--probe",
                               "{d}/sd15-probe.safetensors"], "sd15-probe.safetensors"),
}


def bad_input_args(d, name):
    args, phrase = BAD_INPUT[name]
    return ["--prompt", PROMPT, "--steps", "2", "--out", f"{d}/never.png", *(a.format(d=d) for a in args)], phrase


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_cli_bad_input(bad_files, name, capsys, monkeypatch):
    # in-process for speed: any exception other than SystemExit fails the test, as a traceback would;
    # the cwd has no runs/ folder, so "no weights" cannot find a shapes-world model
    monkeypatch.chdir(bad_files)
    args, phrase = bad_input_args(bad_files, name)
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code not in (0, None)
    assert len(lines) == 1 and phrase in lines[0], lines
    assert not (bad_files / "never.png").exists()


@pytest.mark.parametrize("name", ["weights not a checkpoint", "sampler"])
def test_cli_bad_input_subprocess(bad_files, name):
    args, phrase = bad_input_args(bad_files, name)
    r = run_cli(*args, cwd=bad_files)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(lines) == 1 and phrase in lines[0], r.stderr


def test_cli_uses_the_newest_model_folder_by_default(world, tmp_path, monkeypatch):
    """No --weights: the newest runs/*/model/ folder (what `python train.py --control depth` leaves), read through
    formats.load_sd like any other model file, with its bundled ControlNet; an older folder is not used."""
    old, new = tmp_path / "runs" / "old" / "model", tmp_path / "runs" / "new" / "model"
    for folder in (old, new):
        folder.mkdir(parents=True)
        shutil.copy(world.dir / "with-meta.safetensors", folder / "sd.safetensors")
        formats.save_controlnet(formats.load_controlnet(world.controlnet_file), folder / "controlnet.safetensors")
    (old / "controlnet.safetensors").write_bytes(b"not a checkpoint")  # picked up, it would fail
    os.utime(old / "sd.safetensors", (1, 1))
    monkeypatch.chdir(tmp_path)
    sample.main(["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--cond", str(world.cond), "--steps", str(STEPS),
                 "--seed", str(SEED), "--out", "default.png"])  # no --size: the map's own 64x64
    image = Image.open(tmp_path / "default.png")
    assert (image.text["weights"], image.text["controlnet"]) == ("model", "controlnet.safetensors")
    check_close(np.asarray(image.convert("RGB")), reference(world, PROMPT)[0])


def test_cli_without_weights_or_model_folder_says_what_to_do(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", PROMPT, "--cond", str(world.cond)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model folder" in err[0] and "python train.py --control depth" in err[0]


def test_generate_batched_controls_and_no_controlnet(world):
    """The Python entry point as evaluation uses it: several prompts with one control map each; and the
    base model alone (no ControlNet) at guidance 1, where both sides skip classifier-free guidance."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    prompts = [PROMPT, "a green cylinder"]
    maps = [control_image(), Image.fromarray(255 - np.asarray(control_image()))]
    control = torch.stack([torch.from_numpy(np.asarray(m) / 255).permute(2, 0, 1).float() for m in maps])
    ours = sample.generate(world.sd, prompts, control, world.net, negative_prompt=NEGATIVE, steps=STEPS,
                           seed=SEED)
    world.pipe.scheduler = DDIMScheduler(**SD15_SCHEDULER)
    latents = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    ref = world.pipe(prompts, image=maps, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS,
                     guidance_scale=7.5, latents=latents, output_type="np").images
    for a, b in zip(ours, ref):
        check_close(np.asarray(a), (b * 255).round().astype(np.uint8))

    base = StableDiffusionPipeline(vae=world.pipe.vae, text_encoder=world.pipe.text_encoder,
                                   tokenizer=world.pipe.tokenizer, unet=world.pipe.unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    ours = sample.generate(world.sd, PROMPT, steps=STEPS, guidance=1.0, seed=SEED, height=SIZE, width=SIZE)
    ref = base(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, latents=latents[:1], height=SIZE,
               width=SIZE, output_type="np").images
    check_close(np.asarray(ours[0]), (ref[0] * 255).round().astype(np.uint8))
