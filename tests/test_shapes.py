"""The shapes world end to end at smoke scale (SHAPES_SMOKE=1: every stage a few steps, 64 px renders, 16x16
latents): `python train.py --control depth` runs every stage, prints the tables, writes loadable checkpoints,
figures and results; a rerun reuses the finished stages, and only those made with the current settings; --fresh
starts over; Ctrl-C mid-stage and a rerun continue from the stage's last checkpoint."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import formats
import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: the smoke stages run tiny ops, and on a busy machine two OpenMP threads that wait on
# each other slow them down many times over.
ENV = dict(os.environ, SHAPES_SMOKE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ENV.pop("SHAPES_PRESET", None)

ROWS = ["base model, no ControlNet", "ControlNet (stage 5, before fine-tuning)", "ControlNet (+2 steps)",
        "ControlNet++ (+2 steps)", "InnerControl (+2 steps)"]
STAGES = ["data", "vae", "base", "annotators/reward", "annotators/evaluator", "controlnet", "probe"] + \
    [f"finetune/{m}-seed{s}" for m in shapes.METHODS for s in shapes.SMOKE["seeds"]] + ["eval"]


def command(out, *extra, control="depth"):
    return [sys.executable, os.path.join(REPO, "train.py"), "--control", control, "--out", str(out), *extra]


def run(out, *extra, preset=None, timeout=600, control="depth"):
    env = dict(ENV, **({"SHAPES_PRESET": json.dumps(preset)} if preset else {}))
    t0 = time.perf_counter()
    p = subprocess.run(command(out, *extra, control=control), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, time.perf_counter() - t0


def table_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("| ")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "run"
    p, seconds = run(out)
    return out, p, seconds


def test_every_stage_runs_and_prints_the_table(smoke):
    out, p, _ = smoke
    for n in range(1, 9):
        assert f"\n{n}/8 " in "\n" + p.stdout, f"stage {n} not announced"
    assert "done, reusing" not in p.stdout
    for stage in STAGES:
        assert os.path.exists(os.path.join(out, stage, "done.json")), stage
    lines = table_lines(p.stdout)
    assert lines[0].startswith("| method | depth RMSE")
    for name in ROWS:
        row = [line for line in lines if line.startswith(f"| {name} |")]
        assert len(row) == 1, name
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        rmse = float(cells[1].split("±")[0])
        assert 0 <= rmse <= 255
        # the fine-tuned rows are mean ± std over the seeds
        assert ("±" in cells[1]) == ("steps)" in name)
    buckets = [line.split("|")[1].strip() for line in lines if re.fullmatch(r"\d+-\d+", line.split("|")[1].strip())]
    assert buckets == ["0-200", "200-400", "400-600", "600-800", "800-1000"]


@pytest.mark.parametrize("control", ["hed", "lineart"])
def test_edge_worlds_run_end_to_end(tmp_path, control):
    """The same world with edges: labels from the annotator on the render, SSIM in the table (higher is better);
    an untrained evaluator may score every image alike, and the control ratio is then NaN, not a crash."""
    out = tmp_path / "run"
    p, _ = run(out, control=control)
    for stage in STAGES:
        assert os.path.exists(os.path.join(out, stage, "done.json")), stage
    lines = table_lines(p.stdout)
    assert lines[0].startswith(f"| method | {control} SSIM (higher is better)")
    for name in ROWS:
        row = [line for line in lines if line.startswith(f"| {name} |")]
        assert len(row) == 1, name
        assert -1 <= float(row[0].strip("|").split("|")[1].split("±")[0]) <= 1
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["control"] == control and len(results["pairs"]) == 3
    # the share of the gap stage 5 closes, recomputed from the table's rows; NaN exactly where there is no gap
    base, start = (results["table"][i]["score"][0] for i in (0, 1))
    gap, ratio = base - results["floor"]["reconstruction"], results["floor"]["control_ratio"]
    assert math.isnan(ratio) if gap == 0 else ratio == pytest.approx((base - start) / gap)
    assert Image.open(out / "figure.png").size[0] == 7 * 96
    # the probe trained with the loss stage 6 picks for this control (line art: the alignment comparison)
    assert shapes.done_info(out / "probe")["settings"]["probe_loss"] == ("alignment" if control == "lineart"
                                                                         else "control")


def test_rescore_on_new_scenes(smoke):
    """tools/shapes_rescore.py: every fine-tuned ControlNet of the run scored on new held-out scenes, paired."""
    out = smoke[0]
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "shapes_rescore.py"), str(out), "--scenes", "4",
                        "--seed", "5", "--workers", "1"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(re.findall(r"^(ControlNet|ControlNet\+\+|InnerControl): \d", p.stdout, re.M)) == 3
    assert len(re.findall(r"^\w+(\+\+)? - \w+(\+\+)?: [+-]\d", p.stdout, re.M)) == 3
    with open(os.path.join(out, "rescore-4-seed5", "scores.json")) as f:
        scores = json.load(f)
    seeds = len(shapes.SMOKE["seeds"])
    assert sorted(scores) == sorted(shapes.METHODS)
    assert all(len(v) == seeds and all(len(r) == 4 for r in v) for v in scores.values())
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "shapes_rescore.py"), str(out), "--seed", "2"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_checkpoints_load(smoke):
    out = smoke[0]
    sd = formats.load_sd(os.path.join(out, "base", "sd.safetensors"))
    # the latents' per-channel mean and std are folded into the VAE's 1x1 convs: no scale left to apply
    assert sd.vae.cfg.scaling_factor == 1.0
    assert len(json.load(open(os.path.join(out, "vae", "done.json")))["latent_std"]) == 4
    assert sd.vae.cfg.ch == shapes.PRESET["vae_ch"]
    # the word-level tokenizer travels in the file: BOS + 7 words + EOS
    assert sd.tokenizer is not None and sd.tokenizer.count_tokens("a red sphere and a blue box") == 9
    # the base model carries the (normalised) VAE of stage 2 unchanged
    vae_ck = formats.load_state_dict(os.path.join(out, "vae", "vae.safetensors"))
    for k, v in sd.vae.state_dict().items():
        torch.testing.assert_close(v, vae_ck[k], rtol=0, atol=0)

    assert sd.vae.cfg.factor == 4  # 64 px scenes, 16x16 latents
    x = torch.randn(1, 4, 16, 16)
    context = sd.encode_prompt(["a red sphere"])
    hint = torch.rand(1, 3, 64, 64)
    start = formats.load_controlnet(os.path.join(out, "controlnet", "controlnet.safetensors"), sd.unet.config)
    residuals = start(x, 500, context, hint)
    levels, blocks = len(sd.unet.config.channel_mult), shapes.PRESET["unet_res_blocks"]
    # conv_in, every ResBlock, every downsampler, and the middle block: 13 at SD1.5's two ResBlocks per level
    assert len(residuals) == 1 + levels * blocks + (levels - 1) + 1
    assert residuals[0].shape == (1, shapes.PRESET["unet_ch"], 16, 16)
    # stage 5 trained the zero convs away from zero: the ControlNet acts on the UNet
    assert residuals[-1].abs().max() > 0
    start_sd = start.state_dict()
    for method in shapes.METHODS:
        for seed in shapes.SMOKE["seeds"]:
            net = formats.load_controlnet(os.path.join(out, "finetune", f"{method}-seed{seed}",
                                                          "controlnet.safetensors"), sd.unet.config)
            moved = max((v - start_sd[k]).abs().max().item() for k, v in net.state_dict().items())
            assert moved > 0, f"{method} seed {seed} did not change the ControlNet"

    probe = formats.load_probe(os.path.join(out, "probe", "probe.safetensors"))
    with torch.no_grad():
        _, feats = sd.unet(x, 500, context, control=residuals, return_features=True)
        assert probe(feats).shape == (1, 3, 16, 16)

    w = shapes.PRESET["annotator_width"]
    for name, net in (("reward", shapes.ToyAnnotatorUNet(w)), ("evaluator", shapes.ToyAnnotatorDilated(w))):
        net.load_state_dict(torch.load(os.path.join(out, "annotators", name, "checkpoint.pt"),
                                       weights_only=True)["modules"][0])
        assert net.eval()(torch.rand(2, 3, 64, 64) * 2 - 1).shape == (2, 1, 64, 64)


def test_figures_are_pngs(smoke):
    out = smoke[0]
    k = min(shapes.FIGURE_ROWS, shapes.SMOKE["n_test"])
    for name, columns in (("figure.png", 7), ("vae_figure.png", 2), ("probe_figure.png", 11)):
        with Image.open(os.path.join(out, name)) as im:
            im.verify()
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (columns * 96, 16 + k * 96)
            # not blank: the tiles hold images
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 50


def test_results_json(smoke):
    res = json.load(open(os.path.join(smoke[0], "results.json")))
    assert [r["method"] for r in res["table"]] == ROWS
    assert [len(r["score"]) for r in res["table"]] == [1, 1] + [len(shapes.SMOKE["seeds"])] * 3
    for r in res["table"]:
        assert all(0 <= s <= 255 for s in r["score"])
        assert all(math.isfinite(f) for f in r["fd"])
    assert [b["bucket"] for b in res["probe_by_timestep"]] == ["0-200", "200-400", "400-600", "600-800", "800-1000"]
    for b in res["probe_by_timestep"]:  # the paired difference over the same scenes, and its verdict
        assert b["difference"] == pytest.approx(b["probe_rmse"] - b["x0_reward_rmse"], abs=1e-4)  # float32 means
        assert b["lo"] <= b["difference"] <= b["hi"]
        assert b["verdict"] == ("probe" if b["hi"] < 0 else "x0" if b["lo"] > 0 else "level")
    assert res["preset"]["size"] == 64 and res["preset"]["finetune_steps"] == 2
    assert set(res["seconds"]) == set(STAGES)
    n_scenes, seeds = shapes.SMOKE["n_test"], len(shapes.SMOKE["seeds"])
    assert all(len(v) == seeds and all(len(s) == n_scenes for s in v) for v in res["per_scene"].values())
    assert [p["pair"] for p in res["pairs"]] == ["ControlNet++ - ControlNet", "InnerControl - ControlNet",
                                                 "InnerControl - ControlNet++"]
    for p in res["pairs"]:
        assert p["lo"] <= p["mean"] <= p["hi"] and p["significant"] == (p["lo"] > 0 or p["hi"] < 0)
    assert {"psnr", "psnr_objects", "real", "reconstruction", "control_ratio"} <= set(res["floor"])


def test_normalize_latents_is_exact():
    """The per-channel latent normalisation folded into the VAE's 1x1 convs: the latents come out normalised, and
    decoding them gives the same image as decoding the originals before the fold."""
    import model
    from util import randomize_
    vae = randomize_(model.VAE(model.VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)), 0).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        image = vae.decode(mean)
        m, s = mean.mean((0, 2, 3)), mean.std((0, 2, 3))
        shapes.normalize_latents_(vae, m, s)
        mean2, logvar2 = vae.encode(x)
        torch.testing.assert_close(mean2, (mean - m[:, None, None]) / s[:, None, None], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar2, logvar - 2 * s.log()[:, None, None], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(mean2), image, rtol=1e-5, atol=1e-5)


def test_paired_difference_interval():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 200, generator=g)
    mean, lo, hi = shapes.paired_difference(a + 0.5, a)  # a constant shift: the interval is the point
    assert mean == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    b = a + 0.3 + 0.5 * torch.randn(3, 200, generator=g)  # noisy: the interval holds the mean, excludes 0
    mean, lo, hi = shapes.paired_difference(b, a)
    assert lo < mean < hi and 0 < lo and hi - lo < 0.3
    mean, lo, hi = shapes.paired_difference(a + 0.01 * torch.randn(3, 200, generator=g), a)
    assert lo < 0 < hi  # no real difference: not significant


def test_rerun_reuses_finished_stages(smoke):
    out, first, first_seconds = smoke
    checkpoints = {s: os.path.getmtime(os.path.join(out, s, "done.json")) for s in STAGES}
    before = open(os.path.join(out, "results.json")).read()
    p, seconds = run(out)
    assert p.stdout.count("done, reusing") == len(STAGES)
    assert "resumed from" not in p.stdout
    assert table_lines(p.stdout) == table_lines(first.stdout)
    assert open(os.path.join(out, "results.json")).read() == before
    assert {s: os.path.getmtime(os.path.join(out, s, "done.json")) for s in STAGES} == checkpoints
    assert seconds < first_seconds


def test_a_stage_made_with_other_settings_is_redone(smoke):
    """A changed preset entry makes its stage stale, and every stage built on it; the others are reused."""
    out = smoke[0]
    p, _ = run(out, preset={"finetune_steps": 3})
    assert p.stdout.count("done, reusing") == 7  # data, vae, base, the annotators, controlnet, probe
    assert p.stdout.count("stale (made with another finetune_steps)") == len(shapes.METHODS) * len(shapes.SMOKE["seeds"])
    assert "8/8 eval: stale (made with another finetune stage)" in p.stdout
    assert [line for line in table_lines(p.stdout) if line.startswith("| InnerControl (+3 steps)")]
    rows = 2 + len(shapes.METHODS) * len(shapes.SMOKE["seeds"])
    assert f"2 of {rows} evaluations reused" in p.stdout  # the base model's and stage 5's rows
    p, _ = run(out)  # and back
    assert p.stdout.count("stale") == len(shapes.METHODS) * len(shapes.SMOKE["seeds"]) + 1
    assert f"2 of {rows} evaluations reused" in p.stdout  # the fine-tuned rows were made with 3 steps since


def test_added_seeds_reuse_the_rows_evaluated_before(smoke):
    """A third fine-tuning seed: its runs are trained and evaluated, the rows of the first two are reused as they
    were; results.json has the same per-scene scores for them."""
    out = smoke[0]
    before = json.load(open(os.path.join(out, "results.json")))
    p, _ = run(out, preset={"seeds": [0, 1, 2]})
    rows = 2 + len(shapes.METHODS) * 2
    assert f"{rows} of {rows + len(shapes.METHODS)} evaluations reused" in p.stdout
    assert "8/8 eval: stale (made with another seeds)" in p.stdout
    after = json.load(open(os.path.join(out, "results.json")))
    for m in shapes.METHODS:
        assert after["per_scene"][m][:2] == before["per_scene"][m] and len(after["per_scene"][m]) == 3
    assert after["table"][:2] == before["table"][:2]


def test_an_evaluation_is_reused_only_with_the_settings_it_was_made_with(tmp_path):
    P = dict(shapes.PRESET, probe_loss="control")
    made_by = shapes.settings(P, "depth", "finetune", method="innercontrol", seed=0)
    ref = shapes.evaluation_settings(P, "depth", made_by)
    assert shapes.evaluation_settings(dict(P, seeds=(0, 1, 2, 3)), "depth", made_by) == ref
    for entry in [{"eval_steps": 21}, {"guidance": 2.0}, {"eval_seed": 9}, {"base_steps": 1}, {"annotator_steps": 1},
                  {"n_test": 64}, {"world_seed": 1}]:
        other = dict(P, **entry)
        assert shapes.evaluation_settings(other, "depth", shapes.settings(other, "depth", "finetune",
                                                                          method="innercontrol", seed=0)) != ref, entry
    assert shapes.evaluation_settings(P, "hed", made_by) != ref
    assert shapes.evaluation_settings(P, "depth", dict(made_by, seed=1)) != ref
    assert shapes.evaluation_settings(P, "depth", None) != ref  # the base model's row
    path = str(tmp_path / "row.pt")
    torch.save({"settings": ref, "images": torch.zeros(1, 3, 4, 4), "scores": torch.ones(1), "fd": 2.0}, path)
    assert shapes.reused_evaluation(path, ref)[2] == 2.0
    assert shapes.reused_evaluation(path, dict(ref, eval_steps=21)) is None
    assert shapes.reused_evaluation(str(tmp_path / "none.pt"), ref) is None


def test_fresh_then_ctrl_c_then_rerun_resumes(smoke):
    out = smoke[0]
    probe_ck = os.path.join(out, "probe", "checkpoint.pt")
    # --fresh: everything is redone; the probe stage is made long enough to be interrupted in (the rerun uses the
    # same preset: a partial stage of other settings would be stale, and started over)
    t0 = time.time()
    preset = {"probe_steps": 40}
    env = dict(ENV, SHAPES_PRESET=json.dumps(preset))
    # a run started in the background by a non-interactive shell inherits SIGINT ignored; Ctrl-C must reach it
    proc = subprocess.Popen(command(out, "--fresh"), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (os.path.exists(probe_ck) and os.path.getmtime(probe_ck) >= t0):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the probe stage never wrote a checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "interrupted" in stderr
    assert "done, reusing" not in stdout  # --fresh retrained every stage before the probe
    for stage in ("data", "vae", "base", "controlnet"):
        assert os.path.getmtime(os.path.join(out, stage, "done.json")) >= t0
    assert not os.path.exists(os.path.join(out, "probe", "done.json"))
    assert not os.path.exists(os.path.join(out, "finetune")) and not os.path.exists(os.path.join(out, "results.json"))
    step = torch.load(probe_ck, weights_only=True)["step"]
    assert step >= 1
    log_path = os.path.join(out, "probe", "log.jsonl")
    logged = [json.loads(line) for line in open(log_path)]

    # the rerun continues the probe from its checkpoint and finishes the pipeline
    p, _ = run(out, preset=preset)
    assert f"resumed from {probe_ck} at step {step}" in p.stdout
    assert p.stdout.count("done, reusing") == 6  # data, vae, base, the two annotators, controlnet
    assert torch.load(probe_ck, weights_only=True)["step"] == 40
    rows = [json.loads(line) for line in open(log_path)]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[:len(logged)] == logged  # the interrupted run's log was continued, not restarted
    assert [line for line in table_lines(p.stdout) if line.startswith("| InnerControl")]
    assert os.path.exists(os.path.join(out, "results.json"))


def running(pid):
    """Is the process alive (not gone, not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_stops_the_workers_too(smoke, tmp_path):
    """SIGTERM (`kill`) during stage 7 stops the run as Ctrl-C does: exit 130 and no fine-tuning worker left
    running."""
    out = tmp_path / "run"
    for stage in ("data", "vae", "base", "annotators", "controlnet", "probe"):
        shutil.copytree(os.path.join(smoke[0], stage), out / stage)
    proc = subprocess.Popen(command(out), cwd=REPO, env=dict(ENV, SHAPES_PRESET=json.dumps({"finetune_steps": 2000})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((out / "finetune").glob("*/log.jsonl")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no fine-tuning run started"
            time.sleep(0.2)
        workers = [int(pid) for task in os.listdir(f"/proc/{proc.pid}/task")
                   for pid in open(f"/proc/{proc.pid}/task/{task}/children").read().split()]
        assert workers, "stage 7 runs in worker processes"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # failed: take the workers down with it (they share its new session)
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "interrupted" in stderr
    deadline = time.time() + 30
    alive = workers
    while alive and time.time() < deadline:
        alive = [pid for pid in alive if running(pid)]
        time.sleep(0.2)
    assert not alive, f"worker processes {alive} outlived the run"


def test_fit_resumes_where_it_stopped(tmp_path):
    """shapes.fit (the VAE, base and annotator stages): Ctrl-C in step 5 finishes that step and saves it; rerun, the
    same weights as one run."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = x @ torch.randn(8, 2, generator=torch.Generator().manual_seed(1))

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 2)

    def loss_fn_for(net, stop_at=None):
        def loss_fn(step):
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, landing in the middle of the step
            idx = shapes.batch_indices(step, len(x), 8, 0)
            return torch.nn.functional.mse_loss(net(x[idx]), y[idx])
        return loss_fn

    ref = make()
    shapes.fit(str(tmp_path / "ref"), [ref], loss_fn_for(ref), 12, 1e-2, save_every=100)
    net = make()
    with pytest.raises(KeyboardInterrupt):
        shapes.fit(str(tmp_path / "run"), [net], loss_fn_for(net, stop_at=5), 12, 1e-2, save_every=100)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6
    net = make()  # a new process: fresh weights, everything comes from the checkpoint
    shapes.fit(str(tmp_path / "run"), [net], loss_fn_for(net), 12, 1e-2, save_every=100)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_probe_loss_per_control_and_the_constant_probe_guard(smoke):
    """Line art's probe trains on the alignment loss's comparison, the others on the ControlNet's input; stage 6
    stops on a probe whose reading is the same for every scene (a saturated tanh), and passes a probe that varies."""
    P = dict(shapes.preset(), probe_steps=200)
    assert [shapes.probe_loss(P, c) for c in ("depth", "hed", "lineart")] == ["control", "control", "alignment"]
    assert shapes.probe_loss(dict(P, probe_loss="control"), "lineart") == "control"
    out = smoke[0]
    sd = formats.load_sd(os.path.join(out, "base", "sd.safetensors"))
    cn = formats.load_controlnet(os.path.join(out, "controlnet", "controlnet.safetensors"))
    reward_model = shapes.load_annotators(str(out), P, "depth")[0]
    probe = formats.load_probe(os.path.join(out, "probe", "probe.safetensors"))
    with torch.no_grad():
        torch.nn.init.normal_(probe.head[-1].weight, std=0.5)
        shapes.check_probe(sd, cn, probe, reward_model, os.path.join(out, "data", "train"), "depth", P)  # varies
        probe.head[-1].weight.zero_()
        probe.head[-1].bias.fill_(-30.0)  # tanh = -1 everywhere
    with pytest.raises(SystemExit, match="constant reading"):
        shapes.check_probe(sd, cn, probe, reward_model, os.path.join(out, "data", "train"), "depth", P)



def write_log(d, losses, every=10):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"step": (i + 1) * every, "loss_probe": float(loss)}) + "\n")


def test_loss_trend_tells_a_flat_loss_from_a_falling_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    noise = 1e-3 * torch.randn(60, generator=g)
    write_log(tmp_path / "flat", 0.01 + noise)
    flat = shapes.loss_trend(str(tmp_path / "flat"), "loss_probe")
    assert flat["flat"] and flat["window"] == 100 and flat["loss"] == pytest.approx(0.01, abs=1e-3)
    write_log(tmp_path / "falling", 0.02 * torch.exp(-torch.arange(60) / 30.0) + noise)  # -28% per 100 steps
    falling = shapes.loss_trend(str(tmp_path / "falling"), "loss_probe")
    assert not falling["flat"] and falling["slope_per_100"] < 0 and falling["relative"] < -0.2
    write_log(tmp_path / "short", [0.1, 0.05])
    assert shapes.loss_trend(str(tmp_path / "short"), "loss_probe") is None


def test_demonstration_checks_by_hand():
    pairs = [{"lo": -0.5, "hi": -0.1}, {"lo": -0.3, "hi": 0.1}, {"lo": -0.2, "hi": -0.1}]
    results = {"control": "depth", "floor": {"reconstruction": 13.0}, "pairs": pairs, "table": [
        {"method": "base model, no ControlNet", "score": [27.0]},
        {"method": "ControlNet (stage 5, before fine-tuning)", "score": [21.0]},
        {"method": "ControlNet (+120 steps)", "score": [20.0, 20.2]},
        {"method": "InnerControl (+120 steps)", "score": [19.0, 19.2]}]}
    c = shapes.demonstration_checks(results)
    assert c["best"] == "InnerControl (+120 steps)"
    assert c["gain"] == pytest.approx(1.9) and c["gain_over_distance_to_floor"] == pytest.approx(1.9 / 8)
    assert c["gain_over_seed_std"] == pytest.approx(1.9 / 0.1)
    assert c["widest_pair_half_width_over_gain"] == pytest.approx(0.2 / 1.9)
    edges = dict(results, control="hed", floor={"reconstruction": 0.9}, table=[
        {"method": "ControlNet (stage 5, before fine-tuning)", "score": [0.70]},
        {"method": "ControlNet++ (+120 steps)", "score": [0.75, 0.77]},
        {"method": "InnerControl (+120 steps)", "score": [0.74, 0.74]}])
    c = shapes.demonstration_checks(edges)  # SSIM: higher is better
    assert c["best"] == "ControlNet++ (+120 steps)" and c["gain_over_distance_to_floor"] == pytest.approx(0.3)


def test_world_seed_moves_every_seed_and_makes_every_stage_stale():
    P = dict(shapes.PRESET, probe_loss="control")
    other = dict(P, world_seed=1)
    assert shapes.world(P, 3) == 3 and shapes.world(other, 3) != 3
    for stage in shapes.STAGES:  # every stage reads the data stage, directly or through others
        assert shapes.fingerprint(shapes.settings(P, "depth", stage)) != \
            shapes.fingerprint(shapes.settings(other, "depth", stage)), stage


@pytest.mark.parametrize("entry, message", [({"probe_schedule": "linear"}, "use constant or cosine"),
                                            ({"probe_loss": "mse"}, "use auto, control or alignment"),
                                            ({"no_such_entry": 1}, "unknown entries")])
def test_bad_preset_entries_fail_in_one_line(monkeypatch, entry, message):
    """A bad SHAPES_PRESET entry stops the run before any stage, in one line that names the entry and the choices."""
    monkeypatch.setenv("SHAPES_PRESET", json.dumps(entry))
    with pytest.raises(SystemExit, match=message) as e:
        shapes.preset()
    assert str(e.value).startswith("shapes.py: error:") and "\n" not in str(e.value)
