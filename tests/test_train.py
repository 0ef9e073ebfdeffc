"""train.py: the loss math, the probe's wiring, gradients, resume, bad data, NaN handling, DDP."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import controlnet
import data
import formats
import model
import labels
import reward
import shapes_render
import train
from formats import save_probe
from probe import Probe, ProbeConfig
from util import randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DPT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64,
                patch_size=8, backbone_out_indices=[0, 1, 0, 1], neck_hidden_sizes=[8, 16, 32, 32],
                fusion_hidden_size=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def make_world(root):
    """A tiny random SD1.x, probe and DPT on disk, and 16 rendered 64 px scenes."""
    torch.manual_seed(0)
    sd = model.StableDiffusion(model.tiny(), model.Tokenizer.from_bpe_gz())
    randomize_(sd.vae, 1)
    formats.save_sd(sd, str(root / "sd.safetensors"))
    probe = Probe(ProbeConfig.for_unet(sd.unet.config))
    save_probe(probe, str(root / "probe.safetensors"))
    dpt = reward.DPT(reward.DPTConfig.from_dict(TINY_DPT))
    os.makedirs(root / "dpt")
    with open(root / "dpt" / "config.json", "w") as f:
        json.dump(TINY_DPT, f)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in dpt.state_dict().items()}, str(root / "dpt" / "model.safetensors"))
    shapes_render.write_shapes_dataset(root / "data", 16, seed=0, size=64)
    return root


def base_argv(world, out, *extra):
    return ["--weights", str(world / "sd.safetensors"), "--probe", str(world / "probe.safetensors"),
            "--reward-model", str(world / "dpt"), "--data", str(world / "data"), "--out", str(out),
            "--resolution", "64", "--batch-size", "2", "--num-workers", "0", "--log-every", "1",
            "--sample-every", "0", "--device", "cpu", "--lr", "1e-3", *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def make_models(world, *extra):
    args = train.parse_args(base_argv(world, "unused", *extra))
    return args, train.build_models(args)


def fake_batch(n=4, res=64):
    g = torch.Generator().manual_seed(3)
    return {"image": torch.rand(n, 3, res, res, generator=g) * 2 - 1,
            "control": torch.rand(n, 3, res, res, generator=g), "text": ["a red sphere"] * n}


# -- loss math -------------------------------------------------------------------------------------

def test_masked_mean_hand_values():
    # eligible rows hold 2.0 and 4.0 of a batch whose other micro-step had one more eligible sample
    assert train.masked_mean(torch.tensor([2.0, 4.0]), 3.0).item() == pytest.approx(2.0)
    assert train.masked_mean(torch.tensor([]), 0.0).item() == 0.0  # no eligible sample adds 0


def test_eligible_counts_follow_the_windows():
    args = train.parse_args(["--control", "depth"])
    assert (args.t_reward, args.lambda_reward, args.t_align_max) == (400, 0.5, 920)
    t = torch.tensor([0, 100, 400, 401, 920, 921, 999])
    assert train.eligible_counts(args, t) == {"all": 7.0, "reward": 3.0, "align": 5.0}
    hed = train.parse_args(["--control", "hed"])
    assert (hed.t_reward, hed.lambda_reward) == (200, 1.0)


def test_x0_estimate_inverts_add_noise():
    s = model.NoiseSchedule()
    x0 = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 400, 920, 999])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(s.x0_from_eps(x_t, eps, t), x0, rtol=0, atol=1e-9)


def test_min_snr_weighting(world, monkeypatch):
    """--snr-gamma g weighs each sample's diffusion loss by min(SNR_t, g) / SNR_t (Hang et al. 2023), SNR_t =
    abar_t / (1 - abar_t); without it every sample weighs 1, the papers' loss."""
    s = model.NoiseSchedule()
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    t = torch.tensor([0, 50, 300, 600, 999])
    snr = abar[t] / (1 - abar[t])
    w = train.min_snr_weight(type("SD", (), {"schedule": s})(), t, 5.0)
    torch.testing.assert_close(w, (torch.minimum(snr, torch.tensor(5.0)) / snr).float())
    assert w[0] < 0.01 and w[-1] == 1.0  # the low-noise steps are the ones turned down
    mse, per_sample = [], train.per_sample_mse
    monkeypatch.setattr(train, "per_sample_mse", lambda a, b: mse.append(per_sample(a, b)) or mse[-1])
    n, losses = torch.randn(5, 4, 8, 8), {}
    for gamma, weight in (("0", 1.0), ("5", w)):
        args, models = make_models(world, "--method", "controlnet", "--snr-gamma", gamma)
        mse.clear()
        losses[gamma] = train.training_step(models, fake_batch(5), t, n, torch.zeros_like(n), args,
                                            train.eligible_counts(args, t))["diffusion"].item()
        assert losses[gamma] == pytest.approx((mse[0] * weight).mean().item(), rel=1e-5)
    assert losses["5"] < losses["0"]


def test_reward_path_decodes_only_eligible_rows(world):
    args, models = make_models(world, "--method", "controlnet++")
    rows_decoded = []
    decode = models.sd.vae.decode_latents
    models.sd.vae.decode_latents = lambda z: (rows_decoded.append(z.shape[0]), decode(z))[1]
    t = torch.tensor([100, 600, 900, 350])  # two rows with t <= 400
    counts = train.eligible_counts(args, t)
    n = torch.randn(4, 4, 8, 8)
    losses = train.training_step(models, fake_batch(), t, n, torch.zeros_like(n), args, counts)
    assert rows_decoded == [2]
    assert losses["reward"].item() > 0
    rows_decoded.clear()
    t = torch.tensor([500, 600, 900, 950])  # none eligible: nothing decoded, the loss adds 0
    losses = train.training_step(models, fake_batch(), t, n, torch.zeros_like(n), args,
                                 train.eligible_counts(args, t))
    assert rows_decoded == [] and losses["reward"].item() == 0.0


@pytest.mark.parametrize("control", ["hed", "lineart"])
def test_edge_labels_come_from_the_image(world, control):
    """hed / lineart: the annotator runs on the RGB training image, whatever control column the rows carry (never
    on a control map: annotator(annotator(image)) would train on the wrong target); a stored label is taken as is."""
    args = train.parse_args(base_argv(world, "unused", "--control", control, "--method", "controlnet++"))
    seen = []

    class Annotator(torch.nn.Module):  # a stand-in annotator that records what it reads
        def forward(self, image01):
            seen.append(image01.clone())
            return image01.mean(1, keepdim=True)
    sd = formats.load_sd(args.weights)
    ann = Annotator()
    models = train.Models(args, sd, controlnet.ControlNet.from_unet(sd.unet), reward_model=ann, annotator=ann)
    # what the loader yields without --label-column: no control at all
    batch, t, n = dict(fake_batch(), control=None), torch.tensor([100, 150, 600, 900]), torch.randn(4, 4, 8, 8)
    train.training_step(models, batch, t, n, torch.zeros_like(n), args, train.eligible_counts(args, t))
    torch.testing.assert_close(seen[0], (batch["image"] + 1) / 2)  # the label: from the image
    assert [s.shape[0] for s in seen] == [4, 2]  # then the reward on the two rows with t <= 200
    ds = data.ControlDataset(world / "data", 64, control_column=None)  # the default for edges: no control read
    assert ds[0]["control"] is None and data.collate([ds[0], ds[1]], 64)["control"] is None
    stored = torch.rand(4, 3, 64, 64)  # --label-column: stored annotator outputs are the label
    label = labels.make_label(control, ann, (batch["image"] + 1) / 2, stored)
    torch.testing.assert_close(label, stored.mean(1, keepdim=True))


# -- the probe -------------------------------------------------------------------------------------

def test_timestep_reaches_every_bottleneck():
    torch.manual_seed(0)
    cfg = ProbeConfig(feature_channels=(64, 64, 32), time_dim=128, out_channels=3, norm_groups=8)
    probe = Probe(cfg)
    for block, c in zip(probe.blocks, cfg.feature_channels):
        x = torch.randn(2, c, 8, 8)
        e1, e2 = torch.randn(2, 128), torch.randn(2, 128)
        assert (block(x, e1) - block(x, e2)).abs().max() > 1e-4
    from unet import DecoderFeatures
    maps = [torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4), torch.randn(2, 32, 8, 8)]
    y1 = probe(DecoderFeatures(torch.randn(2, 128), maps))
    y2 = probe(DecoderFeatures(torch.randn(2, 128), maps))
    assert y1.shape == (2, 3, 8, 8) and (y1 - y2).abs().max() > 1e-4
    assert y1.abs().max() <= 1


def test_alignment_gradients_reach_only_the_controlnet(world):
    args, models = make_models(world, "--method", "innercontrol")
    randomize_(models.controlnet, 5)  # non-zero zero-convs, or no gradient reaches the residual path
    t = torch.tensor([500, 600, 700, 900])  # inside the alignment window, outside the reward window
    n = torch.randn(4, 4, 8, 8)
    losses = train.training_step(models, fake_batch(), t, n, torch.zeros_like(n), args,
                                 train.eligible_counts(args, t))
    assert losses["reward"].item() == 0.0 and losses["align"].item() > 0
    losses["align"].backward()
    grads = [p.grad for p in models.controlnet.parameters()]
    assert sum(g.abs().sum().item() for g in grads if g is not None) > 0
    for frozen in (models.sd.unet, models.sd.vae, models.sd.text_encoder, models.probe, models.reward_model):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())


def test_probe_stage_can_train_on_the_alignment_comparison(world, monkeypatch):
    """--stage probe --probe-loss alignment: the probe's loss is alignment_loss on this forward's features and the
    label, over every sample (t = 950 too, outside the fine-tuning window), and only the probe gets a gradient."""
    calls, alignment_loss = [], train.alignment_loss
    monkeypatch.setattr(train, "alignment_loss", lambda *a: calls.append(a) or alignment_loss(*a))
    t, n, batch = torch.tensor([100, 400, 700, 950]), torch.randn(4, 4, 8, 8), fake_batch()
    values = {}
    for loss in ("control", "alignment"):
        args, models = make_models(world, "--stage", "probe", "--probe-loss", loss)
        losses = train.probe_step(models, batch, t, n, torch.zeros_like(n), args, train.eligible_counts(args, t))
        values[loss] = losses["probe"]
    (_, _, label, rows, count), = calls  # called once, by the alignment run
    assert rows.tolist() == [0, 1, 2, 3] and count == 4.0
    torch.testing.assert_close(label, labels.depth_label(batch["control"]))
    assert abs(values["alignment"].item() - values["control"].item()) > 1e-6  # another loss, not the same one
    values["alignment"].backward()
    assert sum(p.grad.abs().sum().item() for p in models.probe.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in models.controlnet.parameters())


# -- the loop: resume, checkpoints, bad data, NaN ------------------------------------------------------

def run_main(argv):
    train.main(argv)


def test_resume_matches_uninterrupted_run(world, tmp_path):
    argv = base_argv(world, tmp_path / "a", "--method", "innercontrol", "--max-steps", "4")
    run_main(argv)
    run_main(base_argv(world, tmp_path / "b", "--method", "innercontrol", "--max-steps", "2", "--save-every", "2"))
    run_main(base_argv(world, tmp_path / "b", "--method", "innercontrol", "--max-steps", "4", "--resume"))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss_diffusion", "loss_reward", "loss_align"):
            assert abs(ra[k] - rb[k]) <= 1e-6, (k, ra, rb)
    assert os.path.exists(tmp_path / "a" / "controlnet.safetensors")


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    train.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dying_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert train.load_checkpoint(path, "cpu")["step"] == 1


def test_ctrl_c_mid_step_finishes_and_saves_the_step(world, tmp_path, monkeypatch):
    """A Ctrl-C that lands between the optimizer's update and the EMA's (sent from inside the EMA's decay at step 2)
    lets step 2 finish and saves it whole: resumed, the run ends with the uninterrupted run's weights. (Raised where it
    landed, it used to save step 1's counter with step 2's weights, and the resume applied step 2 twice.)"""
    extra = ("--method", "innercontrol", "--ema", "--max-steps", "4")
    run_main(base_argv(world, tmp_path / "a", *extra))
    ema_decay = train.ema_decay

    def ctrl_c_in_step_2(n, max_decay):
        if n == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return ema_decay(n, max_decay)

    monkeypatch.setattr(train, "ema_decay", ctrl_c_in_step_2)
    with pytest.raises(SystemExit) as stopped:
        run_main(base_argv(world, tmp_path / "b", *extra))
    monkeypatch.undo()
    assert stopped.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert train.load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"), "cpu")["step"] == 2
    run_main(base_argv(world, tmp_path / "b", *extra, "--resume"))
    a = load_file(str(tmp_path / "a" / "controlnet.safetensors"))
    b = load_file(str(tmp_path / "b" / "controlnet.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_sigterm_saves_the_step_and_ends_the_process(world, tmp_path):
    """SIGTERM (a preempted job, torchrun stopping its workers): the checkpoint holds the last logged step, the
    process then ends by SIGTERM, and --resume continues from there."""
    out = tmp_path / "out"
    argv = base_argv(world, out, "--method", "controlnet", "--max-steps", "1000")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (os.path.exists(out / "log.jsonl") and len(read_log(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, stderr[-2000:]
    step = train.load_checkpoint(str(out / "checkpoint.pt"), "cpu")["step"]
    assert step == read_log(out)[-1]["step"] >= 2
    assert f"SIGTERM: saved step {step} to" in stdout
    run_main(base_argv(world, out, "--method", "controlnet", "--max-steps", str(step + 1), "--resume"))
    assert [r["step"] for r in read_log(out)][-2:] == [step, step + 1]


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(world, tmp_path):
    """torchrun with two processes, SIGTERM to rank 1 alone (as when one node of a job is preempted): both ranks stop
    after the same step, rank 0 saves it and says so, and --resume continues from there. (When each rank stopped on
    its own signal, rank 0 went on into the next step's all-reduce, which failed when rank 1 had gone: nothing saved.)"""
    out = tmp_path / "out"
    argv = base_argv(world, out, "--method", "controlnet", "--max-steps", "1000")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29518", "train.py", *argv], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (os.path.exists(out / "log.jsonl") and len(read_log(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        workers = [int(pid) for task in os.listdir(f"/proc/{proc.pid}/task")
                   for pid in open(f"/proc/{proc.pid}/task/{task}/children").read().split()]
        rank1 = [pid for pid in workers if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    step = train.load_checkpoint(str(out / "checkpoint.pt"), "cpu")["step"]
    assert step == read_log(out)[-1]["step"] >= 2, stderr[-3000:]
    assert f"SIGTERM: saved step {step} to" in stdout, stderr[-3000:]
    run_main(base_argv(world, out, "--method", "controlnet", "--max-steps", str(step + 1), "--resume"))
    assert [r["step"] for r in read_log(out)][-2:] == [step, step + 1]


def test_bad_data_is_skipped_and_counted(world, tmp_path):
    import shutil
    ds = tmp_path / "ds"
    shutil.copytree(world / "data", ds)
    rows = [json.loads(line) for line in open(ds / "metadata.jsonl")]
    os.remove(ds / rows[0]["file_name"])  # missing image
    with open(ds / rows[1]["conditioning_file_name"], "wb") as f:
        f.write(b"not a png")  # corrupt control
    argv = base_argv(world, tmp_path / "out", "--method", "controlnet", "--max-steps", "8")  # one epoch
    argv[argv.index("--data") + 1] = str(ds)
    run_main(argv)
    log = read_log(tmp_path / "out")
    assert len(log) == 8 and log[-1]["skipped_data"] == 2


def bad_dataset(world, tmp_path, file_name):
    import shutil
    ds = tmp_path / "bad"
    shutil.copytree(world / "data", ds)
    rows = [json.loads(line) for line in open(ds / "metadata.jsonl")]
    rows[1]["file_name"] = file_name
    (ds / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ds


BAD_INPUT = {  # name: (arguments changed, a phrase the one-line message must contain)
    "escaping file_name": ({"--data": "{bad}"}, "escapes the dataset folder"),
    "missing weights": ({"--weights": "{tmp}/nowhere.safetensors"}, "nowhere.safetensors: no such file"),
    "no probe": ({"--probe": None}, "--probe PATH"),
    "not a probe": ({"--probe": "{world}/sd.safetensors"}, "not a probe file"),
    "reward model not a folder": ({"--reward-model": "{tmp}"}, "config.json"),
    "control column for edges": ({"--control": "hed"}, "--label-column"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_cli_bad_input_is_one_line(world, tmp_path, name, capsys):
    changes, phrase = BAD_INPUT[name]
    argv = base_argv(world, tmp_path / "out", "--max-steps", "1")
    if name == "control column for edges":
        argv += ["--control-column", "hed_file_name"]
    for flag, value in changes.items():
        i = argv.index(flag) if flag in argv else None
        if value is None:
            del argv[i:i + 2]
        elif i is None:
            argv += [flag, value]
        else:
            argv[i + 1] = value
    bad = bad_dataset(world, tmp_path, "../../etc/passwd") if "{bad}" in argv else None
    argv = [a.format(bad=bad, tmp=tmp_path, world=world) for a in argv]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert e.value.code not in (0, None) and len(lines) == 1 and phrase in lines[0], lines
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pt")


def test_cli_bad_input_subprocess_has_no_traceback(world, tmp_path):
    argv = base_argv(world, tmp_path / "out", "--max-steps", "1")
    argv[argv.index("--data") + 1] = str(bad_dataset(world, tmp_path, "../outside.png"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "escapes the dataset folder" in r.stderr


def test_nonfinite_steps_are_skipped_then_stop(world, tmp_path):
    args, models = make_models(world, "--method", "controlnet", "--max-steps", "30", "--save-every", "5")
    args.out = str(tmp_path / "nan")
    # one finite step to write a good checkpoint, then poison the ControlNet
    args.max_steps = 1
    train.train(args, models, data.ControlDataset(world / "data", 64))
    good = train.load_checkpoint(os.path.join(args.out, "checkpoint.pt"), "cpu")
    with torch.no_grad():
        next(models.controlnet.parameters()).fill_(float("nan"))
    poisoned = {k: v.clone() for k, v in models.controlnet.state_dict().items()}
    args.max_steps, args.resume = 30, False
    with pytest.raises(RuntimeError, match="non-finite"):
        train.train(args, models, data.ControlDataset(world / "data", 64))
    log = read_log(args.out)
    assert log[-1]["skipped_steps"] >= 10
    # the skipped steps changed nothing, and the last good checkpoint is intact
    for k, v in models.controlnet.state_dict().items():
        torch.testing.assert_close(v, poisoned[k], equal_nan=True)
    assert train.load_checkpoint(os.path.join(args.out, "checkpoint.pt"), "cpu")["step"] == good["step"]


def test_optimizer_step_skips_nonfinite_without_sync():
    args = train.parse_args(["--stage", "finetune"])
    net = torch.nn.Linear(3, 3)
    opt, sched = train.make_optimizer(args, net)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net(torch.randn(2, 3)).sum().backward()
    _, streak = train.optimizer_step(args, net, opt, sched, scaler, None, torch.tensor(float("nan")),
                                     torch.zeros(()), 0)
    assert streak.item() == 1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    net(torch.randn(2, 3)).sum().backward()
    _, streak = train.optimizer_step(args, net, opt, sched, scaler, None, torch.tensor(1.0), streak, 1)
    assert streak.item() == 0 and not torch.equal(net.weight, before["weight"])


def test_ema_follows_diffusers_warm_up():
    """The EMA decays as diffusers' EMAModel does (upstream's): 0 on the first update, then (1 + s) / (10 + s),
    capped; and a few optimizer steps leave our EMA weights where EMAModel.step leaves its shadow weights."""
    from diffusers.training_utils import EMAModel
    net = torch.nn.Linear(3, 2)
    ema, ref = copy.deepcopy(net).requires_grad_(False), EMAModel(net.parameters(), decay=0.999)
    for n in (1, 2, 3, 10, 100, 998, 999, 1000, 10_000):
        assert train.ema_decay(n, 0.999) == pytest.approx(ref.get_decay(n), abs=1e-12)
    args = train.parse_args(["--ema", "--ema-decay", "0.999", "--lr", "0.1"])
    opt, sched = train.make_optimizer(args, net)
    scaler, streak = torch.amp.GradScaler("cpu", enabled=False), torch.zeros(())
    for step in range(5):
        net(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        _, streak = train.optimizer_step(args, net, opt, sched, scaler, ema, torch.tensor(1.0), streak, step)
        ref.step(net.parameters())
        for a, b in zip(ema.parameters(), ref.shadow_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ema.weight, net.weight)  # a real average by step 5, not a copy


def test_probe_stage_writes_a_probe(world, tmp_path):
    run_main(base_argv(world, tmp_path / "p", "--stage", "probe", "--max-steps", "2"))
    from formats import load_probe
    assert load_probe(str(tmp_path / "p" / "probe.safetensors")).cfg.out_channels == 3
    assert "loss_probe" in read_log(tmp_path / "p")[0]


def test_ddp_two_processes_match_one(world, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) with batch 2 each == one process with batch 4."""
    one = base_argv(world, tmp_path / "one", "--method", "innercontrol", "--max-steps", "2")
    two = base_argv(world, tmp_path / "two", "--method", "innercontrol", "--max-steps", "2")
    one[one.index("--batch-size") + 1] = "4"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "train.py", *one], cwd=ROOT, env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", "train.py", *two], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ("loss_diffusion", "loss_reward", "loss_align"):
            assert abs(ra[k] - rb[k]) <= 1e-5, (k, ra[k], rb[k])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_probe_and_innercontrol_steps(world, tmp_path, precision):
    """The frozen networks in half precision, the trainable probe / ControlNet in fp32 under autocast (fp16 with a
    GradScaler), on the CPU: both stages run, and what they save loads."""
    from formats import load_controlnet, load_probe
    run_main(base_argv(world, tmp_path / "p", "--stage", "probe", "--max-steps", "6", "--mixed-precision", precision))
    assert load_probe(str(tmp_path / "p" / "probe.safetensors")).cfg.out_channels == 3
    run_main(base_argv(world, tmp_path / "f", "--method", "innercontrol", "--max-steps", "6", "--mixed-precision",
                       precision, "--probe", str(tmp_path / "p" / "probe.safetensors")))
    assert load_controlnet(str(tmp_path / "f" / "controlnet.safetensors")) is not None
    log = read_log(tmp_path / "f")
    assert math.isfinite(log[-1]["loss_diffusion"]) and log[-1]["skipped_steps"] < 6


def test_probe_starts_in_tanh_linear_range():
    """The head's last conv starts near zero: with He init (fan_out = 3) the output starts deep in
    tanh's flat tails, where the probe barely trains."""
    torch.manual_seed(0)
    cfg = ProbeConfig(feature_channels=(64, 64, 32), time_dim=128, out_channels=3, norm_groups=8)
    probe = Probe(cfg)
    from unet import DecoderFeatures
    maps = [torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4), torch.randn(2, 32, 8, 8)]
    feats = DecoderFeatures(torch.randn(2, 128), maps)
    y = probe(feats)
    assert y.abs().max() < 0.1
    y.square().sum().backward()
    assert probe.blocks[0].conv1.weight.grad.abs().max() > 0  # the gradient gets through the head


def test_fp16_overflow_step_is_skipped_and_the_scaler_backs_off(world):
    """--mixed-precision fp16 (here on the CPU, which has fp16 autocast and GradScaler too; test_cuda.py runs the
    same on a GPU): a step whose forward overflows fp16 is skipped on the device (no parameter, optimizer step
    count or EMA moves) and the loss scale halves; the next finite step trains at the new scale."""
    check_fp16_overflow_step(world, "cpu")


def check_fp16_overflow_step(world, device):
    args, models = make_models(world, "--method", "innercontrol", "--mixed-precision", "fp16", "--ema",
                               "--device", device)
    module = models.trainable()
    opt, sched = train.make_optimizer(args, module)
    scaler = torch.amp.GradScaler(device, enabled=True)
    ema = copy.deepcopy(module).requires_grad_(False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    t, n = torch.tensor([100, 300, 600, 900]), torch.randn(4, 4, 8, 8, device=device)

    def step(i, streak):
        counts = train.eligible_counts(args, t)
        losses = train.training_step(models, fake_batch(), t, n, torch.zeros_like(n), args, counts)
        loss = sum(losses.values())
        scaler.scale(loss).backward()
        return loss, train.optimizer_step(args, module, opt, sched, scaler, ema, loss.detach(), streak, i)[1]

    # an activation of the frozen UNet past fp16's range (65504): inf, then NaN downstream
    hook = models.sd.unet.middle_block.register_forward_hook(lambda m, inputs, out: (out[0] * 1e5, out[1]))
    loss, streak = step(0, torch.zeros((), device=device))
    hook.remove()
    assert not torch.isfinite(loss) and streak.item() == 1 and scaler.get_scale() == 2.0 ** 15
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(ema.state_dict()[k], before[k])
    assert all(s["step"].item() == 0 for s in opt.state.values())
    loss, streak = step(1, streak)
    assert torch.isfinite(loss) and streak.item() == 0 and scaler.get_scale() == 2.0 ** 15
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_grad_checkpointing_covers_the_reward_decode(world):
    """--grad-checkpointing recomputes the ControlNet's, the UNet's and the VAE decoder's activations (the reward
    loss back-propagates through a 512 px decode)."""
    _, models = make_models(world, "--grad-checkpointing")
    assert models.controlnet.grad_checkpointing and models.sd.unet.grad_checkpointing
    assert models.sd.vae.decoder.grad_checkpointing


def test_cosine_lr_schedule():
    """--lr-schedule cosine: the warm-up ramp, then diffusers' cosine-with-warm-up decay (its
    get_cosine_schedule_with_warmup, at every step after the warm-up), reaching 0 at --max-steps; the default
    stays constant after the warm-up."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    args = train.parse_args(["--stage", "probe", "--lr", "0.01", "--lr-schedule", "cosine", "--max-steps", "50",
                             "--warmup-steps", "5"])
    net = torch.nn.Linear(3, 3)
    opt, sched = train.make_optimizer(args, net)
    ref = get_cosine_schedule_with_warmup(torch.optim.SGD(net.parameters(), lr=0.01), 5, 50)
    lrs, ref_lrs = [], []
    for _ in range(51):
        lrs.append(opt.param_groups[0]["lr"])
        ref_lrs.append(ref.get_last_lr()[0])
        opt.step()
        sched.step()
        ref.optimizer.step()
        ref.step()
    assert lrs[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])
    assert lrs[5:] == pytest.approx(ref_lrs[5:], abs=1e-12)
    assert lrs[5] == pytest.approx(0.01) and lrs[50] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    constant = train.parse_args(["--max-steps", "50", "--warmup-steps", "5"])
    assert [train.lr_factor(constant, s) for s in (0, 4, 5, 49)] == [0.2, 1.0, 1.0, 1.0]
