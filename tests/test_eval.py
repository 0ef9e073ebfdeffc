"""eval.py and the simple metrics: 8-bit RMSE, SSIM and the Frechet distance against hand values and independent
reference implementations; the protocol's labels, comparisons and row end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import eval as evaluation
import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- 8-bit RMSE -----------------------------------------------------------------------------------

def test_rmse_8bit_hand_values():
    label = torch.zeros(2, 1, 4, 4)
    pred = torch.zeros(2, 1, 4, 4)
    pred[0, :, :2] = 1.0          # half the pixels 255 vs 0: sqrt(255^2 / 2)
    pred[1] = 10 / 255            # every pixel 10 levels off: 10
    out = metrics.rmse_8bit(pred, label)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(255 / math.sqrt(2), abs=1e-4)
    assert out[1].item() == pytest.approx(10.0, abs=1e-4)


def test_rmse_8bit_quantises_and_clamps():
    label = torch.zeros(1, 1, 2, 2)
    # 0.9/255 truncates to level 0 (as upstream saves maps: x * 255, truncated); outside [0, 1] clamps to 0 and 255
    assert metrics.rmse_8bit(torch.full((1, 1, 2, 2), 0.9 / 255), label).item() == 0.0
    assert metrics.rmse_8bit(torch.full((1, 1, 2, 2), -3.0), label).item() == 0.0
    assert metrics.rmse_8bit(torch.full((1, 1, 2, 2), 7.0), label).item() == pytest.approx(255.0)


def test_rmse_8bit_resizes_prediction_to_label():
    label = torch.full((3, 1, 8, 8), 0.5)
    pred = torch.full((3, 1, 16, 16), 0.5)  # a constant map stays constant under bilinear resizing
    out = metrics.rmse_8bit(pred, label)
    assert out.shape == (3,) and torch.all(out == 0)


# -- SSIM -----------------------------------------------------------------------------------------

def ssim_reference(a, b, window=11, sigma=1.5, L=255.0):
    """Wang et al. 2004 written out window by window: Gaussian-weighted local statistics over every
    fully-contained 11x11 window of the 8-bit images, then the mean of the SSIM map."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    r = np.arange(window) - window // 2
    g1 = np.exp(-r ** 2 / (2 * sigma ** 2))
    w = np.outer(g1, g1)
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    H, W = a.shape
    vals = []
    for i in range(H - window + 1):
        for j in range(W - window + 1):
            pa, pb = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 24, 20, generator=g)
    # b: a blurred, noisy, shifted version of a, so that SSIM lands well inside (0, 1)
    b = (0.6 * a + 0.3 * torch.roll(a, 1, dims=-1) + 0.2 * torch.rand(3, 1, 24, 20, generator=g)).clamp(0, 1)
    b[2] = 1 - a[2]  # anti-correlated: a negative SSIM
    ours = metrics.ssim(a, b)
    assert ours.shape == (3,)
    a8 = metrics.to_8bit(a).numpy()
    b8 = metrics.to_8bit(b).numpy()
    for k in range(3):
        ref = ssim_reference(a8[k, 0], b8[k, 0])
        assert ours[k].item() == pytest.approx(ref, abs=1e-5), k
    assert ours[2] < 0 < ours[0] < 1


def test_ssim_identity_and_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 32, 32, generator=g)
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    noise = torch.randn(1, 1, 32, 32, generator=g)
    scores = [metrics.ssim(x, (x + s * noise).clamp(0, 1)).item() for s in (0.02, 0.1, 0.3)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


# -- Frechet distance -----------------------------------------------------------------------------

def with_exact_moments(n, mean, cov, seed):
    """n samples whose sample mean and (n-1 normalised) covariance are exactly `mean` and `cov`."""
    rng = np.random.default_rng(seed)
    d = len(mean)
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    # whiten to sample covariance I, then colour with a Cholesky factor of cov
    ell = np.linalg.cholesky(np.cov(z.T))
    z = z @ np.linalg.inv(ell).T
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def frechet_reference(mu1, s1, mu2, s2):
    # tr (S1 S2)^1/2 = sum of the square roots of the eigenvalues of S1 S2 (real and >= 0 for SPD S1, S2)
    ev = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev.real.clip(0)).sum())


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    f1 = with_exact_moments(500, mu1, np.diag(v1), 0)
    f2 = with_exact_moments(700, mu2, np.diag(v2), 1)
    # two Gaussians with diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.fid(f1, f2) == pytest.approx(expect, rel=1e-8, abs=1e-8)


def test_frechet_general_covariances():
    rng = np.random.default_rng(3)
    d = 6
    a1, a2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a1 @ a1.T + 0.1 * np.eye(d), a2 @ a2.T + 0.1 * np.eye(d)  # non-commuting SPD matrices
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    f1, f2 = with_exact_moments(300, mu1, s1, 4), with_exact_moments(200, mu2, s2, 5)
    ours = metrics.fid(f1, f2)
    assert ours == pytest.approx(frechet_reference(mu1, s1, mu2, s2), rel=1e-7)
    # symmetric in its arguments, and float32 input gives the same up to float32 rounding
    assert metrics.fid(f2, f1) == pytest.approx(ours, rel=1e-7)
    assert metrics.fid(f1.float(), f2.float()) == pytest.approx(ours, rel=1e-4)


def test_frechet_identical_sets_and_sample_estimate():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 16, generator=g)
    assert abs(metrics.fid(f, f)) < 1e-8
    assert abs(metrics.fid(f, f.flip(0))) < 1e-8  # order does not matter
    # independent samples of N(0, I) vs N(0, 4 I): closed form d * (1 - 2)^2 = d, up to sampling error
    a = torch.randn(20000, 4, generator=g)
    b = 2 * torch.randn(20000, 4, generator=g)
    assert metrics.fid(a, b) == pytest.approx(4.0, rel=0.05)


def test_frechet_rank_deficient():
    # fewer samples than dimensions (a singular covariance) must still give a finite number
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g) + 1
    fd = metrics.fid(f1, f2)
    assert math.isfinite(fd) and fd > 0


# -- controllability ------------------------------------------------------------------------------

class GreyDepth(nn.Module):
    """A stand-in depth model: brightness of the input in [-1, 1] as (positive) depth."""
    input_size = None

    def forward(self, x):
        return (x.mean(1, keepdim=True) + 1) / 2 + 1e-3

    def features(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


class GreyEdges(nn.Module):
    def forward(self, x):
        return x.mean(1, keepdim=True)


def test_controllability_depth_and_edges():
    g = torch.Generator().manual_seed(0)
    label = torch.rand(3, 1, 32, 32, generator=g)
    label = label / label.flatten(1).amax(1).view(-1, 1, 1, 1)
    images = label.expand(-1, 3, -1, -1).clone()   # images whose "depth" is exactly the label
    rmse = evaluation.controllability("depth", GreyDepth(), images, label)
    assert rmse.shape == (3,)
    assert rmse.max().item() < 1.0  # only the 1e-3 offset and per-image max normalisation differ
    worse = evaluation.controllability("depth", GreyDepth(), images.flip(-1), label)
    assert torch.all(worse > 20)

    edges = evaluation.controllability("hed", GreyEdges(), images, label)
    assert edges.shape == (3,) and torch.allclose(edges, torch.ones(3), atol=1e-5)
    assert torch.all(evaluation.controllability("lineart", GreyEdges(), images.flip(-1), label) < 0.5)


def test_evaluator_features_batches():
    x = torch.rand(10, 3, 16, 16)
    f = evaluation.evaluator_features(GreyDepth(), x, batch=3)
    assert f.shape == (10, 6)
    torch.testing.assert_close(f, GreyDepth().features(x * 2 - 1))


def test_generate_images_shapes_and_order():
    import controlnet
    import model
    torch.manual_seed(0)
    tok = model.Tokenizer.word_level(["a", "red", "blue", "sphere", "box"], max_len=8)
    cfg = model.tiny()
    cfg.text = model.TextConfig(vocab_size=tok.vocab_size, width=64, layers=1, heads=2, max_len=8, mlp_dim=64)
    sd = model.StableDiffusion(cfg, tok).eval()
    net = controlnet.ControlNet.from_unet(sd.unet).eval()
    controls = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red sphere", "a blue box"]
    imgs = evaluation.generate_images(sd, prompts, controls, net, steps=2, guidance=3.0, images_per_cond=2, batch=1)
    assert imgs.shape == (4, 3, 64, 64) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    assert not torch.equal(imgs[0], imgs[1])  # two images of one condition: different noise
    # deterministic for a seed
    again = evaluation.generate_images(sd, prompts, controls, net, steps=2, guidance=3.0, images_per_cond=2, batch=1)
    torch.testing.assert_close(imgs, again, rtol=0, atol=0)
    base = evaluation.generate_images(sd, prompts[:1], None, None, steps=2, guidance=1.0, size=64)
    assert base.shape == (1, 3, 64, 64)


def test_protocol_defaults_are_upstreams():
    args = evaluation.parse_args(["--weights", "w", "--controlnet", "c", "--data", "d", "--evaluator", "e"])
    assert (args.sampler, args.steps, args.guidance, args.images_per_cond, args.resolution) == ("unipc", 20, 7.5, 4, 512)
    assert args.negative_prompt == "worst quality, low quality" and args.seed == 42


def test_labels_and_inverted_lineart():
    control = torch.rand(2, 3, 8, 8) * 0.5 + 0.2
    label = evaluation.eval_label("depth", None, None, control)  # min-max per image (upstream's evaluation)
    assert torch.allclose(label.flatten(1).amin(1), torch.zeros(2)) and torch.allclose(label.flatten(1).amax(1),
                                                                                        torch.ones(2))
    # line art: compared as white lines on black, so a map and its label agree exactly when equal, and the 8-bit
    # inversion is 255 - x (upstream's uint8 `1 - x` wraps around instead)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 176, 176, generator=g)
    lab = GreyEdges()(images)
    assert torch.allclose(evaluation.controllability("lineart", GreyEdges(), images, lab), torch.ones(2), atol=1e-6)
    inv = evaluation.controllability("lineart", GreyEdges(), images, 1 - lab)
    assert torch.all(inv < 0.5)
    a, b = 1 - metrics.to_8bit(lab) / 255, metrics.to_8bit(1 - lab) / 255  # what ms_ssim sees for the label
    assert (a - b).abs().max() <= 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny files of each kind eval.py reads (Stable Diffusion file, ControlNet, DPT folder, FID Inception weights,
    a CLIP folder, an imagefolder dataset of 6 shapes scenes), and the arguments that name them."""
    import controlnet
    import formats
    import model
    import reward
    import shapes_render
    from safetensors.torch import save_file
    from test_metrics import save_tiny_clip_folder, tiny_clip_config
    from util import randomize_
    tmp_path = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    tok = model.Tokenizer.word_level(shapes_render.SHAPES_VOCAB, max_len=8)
    cfg = model.tiny()
    cfg.text = model.TextConfig(vocab_size=tok.vocab_size, width=64, layers=1, heads=2, max_len=8, mlp_dim=64)
    sd = model.StableDiffusion(cfg, tok).eval()
    formats.save_sd(sd, tmp_path / "sd.safetensors")
    formats.save_controlnet(controlnet.ControlNet.from_unet(sd.unet), tmp_path / "cn.safetensors")
    dpt_cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                   patch_size=8, backbone_out_indices=[0, 1, 0, 1], neck_hidden_sizes=[8, 16, 32, 32],
                   fusion_hidden_size=16)
    dpt = reward.DPT(reward.DPTConfig.from_dict(dpt_cfg))
    (tmp_path / "dpt").mkdir()
    (tmp_path / "dpt" / "config.json").write_text(json.dumps(dpt_cfg))
    save_file({k: v.contiguous() for k, v in dpt.state_dict().items()}, str(tmp_path / "dpt" / "model.safetensors"))
    inception = randomize_(metrics.FIDInception(), 3)
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(tmp_path / "inception.safetensors"))
    clip = randomize_(metrics.CLIP(tiny_clip_config(49407)), 4)
    save_tiny_clip_folder(tmp_path / "clip", clip)
    shapes_render.write_shapes_dataset(tmp_path / "val", 6, seed=0, size=64)
    scorers = ["--evaluator", str(tmp_path / "dpt"), "--inception", str(tmp_path / "inception.safetensors"),
               "--clip", str(tmp_path / "clip"), "--device", "cpu"]
    gen = ["--control", "depth", "--weights", str(tmp_path / "sd.safetensors"),
           "--controlnet", str(tmp_path / "cn.safetensors"), "--data", str(tmp_path / "val"), "--steps", "2",
           "--resolution", "64", *scorers]
    return dict(root=tmp_path, gen=gen, scorers=scorers)


def read_row(out):
    with open(os.path.join(out, "row.json")) as f:
        return json.load(f)


def files_of(out):
    """Every generated image and label: path -> (inode, mtime_ns). os.replace gives a rewritten file a new inode."""
    found = {}
    for sub in ("images", "annotations"):
        for dirpath, _, names in os.walk(os.path.join(out, sub)):
            for name in names:
                st = os.stat(os.path.join(dirpath, name))
                found[os.path.join(dirpath, name)] = (st.st_ino, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    """One process, one run, no interruption: the reference row (6 conditions x 2 images, batch 2)."""
    out = tiny["root"] / "whole"
    evaluation.main([*tiny["gen"], "--images-per-cond", "2", "--batch", "2", "--out", str(out)])
    return out


def test_main_end_to_end(tiny, capsys):
    """`python eval.py` on tiny files of each kind: one row of the table, as JSON and as text, and the folder in
    upstream's layout."""
    out = tiny["root"] / "e2e"
    evaluation.main([*tiny["gen"], "--num", "2", "--images-per-cond", "2", "--out", str(out)])
    text = capsys.readouterr().out
    row = read_row(out)
    assert row["images"] == 4 and row["conditions"] == 2 and 0 <= row["controllability"] <= 255
    assert row["fid"] > 0 and math.isfinite(row["fid"]) and 0 <= row["clip_score"] <= 100
    assert row["settings"]["sampler"] == "unipc" and row["settings"]["negative_prompt"] == "worst quality, low quality"
    assert row["settings"]["resize"] == "squash"
    line = open(out / "row.md").read().strip()
    assert line in text and line.startswith("| cn.safetensors |") and line.count("|") == 5
    for i in range(2):
        for g in range(2):
            assert Image.open(out / "images" / f"group_{g}" / f"{i}.png").size == (64, 64)
        assert Image.open(out / "annotations" / f"{i}.png").mode == "L"
        assert Image.open(out / "conditions" / f"{i}.png").mode == "RGB"
    assert not (out / "images" / "group_0" / "2.png").exists()
    prompts = [json.loads(x) for x in open(out / "prompts.jsonl")]
    meta = [json.loads(x) for x in open(tiny["root"] / "val" / "metadata.jsonl")]
    assert [p["text"] for p in prompts] == [m["text"] for m in meta[:2]] and prompts[1]["id"] == 1
    assert json.load(open(out / "run.json"))["n"] == 2


def test_saved_pngs_score_as_the_images_in_memory(tiny):
    """The row is scored from the PNGs: the images read back are the generated images exactly, and a label read
    back quantises to the levels the label itself does."""
    images = torch.rand(3, 3, 8, 8)
    u8 = torch.stack([torch.from_numpy(evaluation.to_u8(x)).permute(2, 0, 1) for x in images])
    torch.testing.assert_close(u8.float() / 255, (images * 255).round() / 255, rtol=0, atol=0)
    label = torch.rand(1, 1, 40, 40)
    label[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 3 / 255, 254 / 255])  # exact levels, where truncation is fragile
    for control in ("depth", "hed", "lineart"):
        back = evaluation.annotation_label01(control, evaluation.annotation_u8(control, label[0]))[None]
        flip = (lambda x: 1 - x) if control == "lineart" else (lambda x: x)
        assert torch.equal(metrics.to_8bit(flip(back)), metrics.to_8bit(flip(label)))


def test_resume_after_sigkill_gives_the_same_row(tiny, uninterrupted):
    """A run killed (SIGKILL) after some images are written, then rerun: only the missing conditions are made,
    and the row equals an uninterrupted run's exactly."""
    import signal
    import subprocess
    import sys
    import time
    out = tiny["root"] / "killed"
    cmd = [sys.executable, os.path.join(REPO, "eval.py"), *tiny["gen"], "--images-per-cond", "2", "--batch", "2",
           "--out", str(out)]
    # more steps than the reference run would change the images: slow the run down from outside instead, by
    # stopping it (SIGSTOP) as soon as the first batch is complete, then killing it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    done = lambda i: all((out / "images" / f"group_{g}" / f"{i}.png").exists() for g in range(2))  # noqa: E731
    deadline = time.time() + 90
    while not (done(0) and done(1)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    finished = [i for i in range(6) if done(i)]
    proc.kill()
    proc.wait()
    assert 2 <= len(finished) < 6, f"the run was not caught in the middle ({finished}); {proc.stderr.read()[-2000:]}"
    before = files_of(out)
    kept = {p: v for p, v in before.items() if any(f"{os.sep}{i}.png" in p for i in finished)}
    evaluation.main([*tiny["gen"], "--images-per-cond", "2", "--batch", "2", "--out", str(out)])
    after = files_of(out)
    assert all(after[p] == v for p, v in kept.items())  # no finished condition was made (or written) again
    assert len(after) == len(files_of(uninterrupted)) == 6 * 3
    assert read_row(out) == read_row(uninterrupted)
    assert not list(out.rglob("*.tmp"))
    # a rerun of a finished folder makes nothing and scores the same
    evaluation.main([*tiny["gen"], "--images-per-cond", "2", "--batch", "2", "--out", str(out)])
    assert files_of(out) == after and read_row(out) == read_row(uninterrupted)


def test_two_processes_give_the_row_of_one(tiny, uninterrupted):
    """torchrun --nproc_per_node 2 (gloo on the CPU): the conditions split over two processes, one row."""
    import subprocess
    import sys
    out = tiny["root"] / "torchrun"
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             os.path.join(REPO, "eval.py"), *tiny["gen"], "--images-per-cond", "2", "--batch", "2",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:  # torchrun and both workers, whatever happened
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert read_row(out) == read_row(uninterrupted)
    assert stdout.count("| cn.safetensors |") == 1  # rank 0 alone reports


def test_score_only_reproduces_the_row(tiny, uninterrupted, tmp_path, capsys):
    """--score-only re-scores a folder without the generation's model files; missing images are refused."""
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    os.remove(out / "row.json")
    evaluation.main(["--score-only", "--out", str(out), *tiny["scorers"]])
    row = read_row(out)
    assert row == read_row(uninterrupted)
    # without CLIP and FID: the same controllability, the rest left out
    evaluation.main(["--score-only", "--out", str(out), "--evaluator", str(tiny["root"] / "dpt"), "--device", "cpu"])
    partial = read_row(out)
    assert partial["clip_score"] is None and partial["fid"] is None
    assert partial["controllability"] == row["controllability"]
    # a folder with a condition missing is not scored
    os.remove(out / "images" / "group_1" / "3.png")
    with pytest.raises(SystemExit, match="1 of 6 conditions have no images yet .first: 3."):
        evaluation.main(["--score-only", "--out", str(out), *tiny["scorers"]])


def test_rerun_with_other_settings_is_refused(tiny, uninterrupted, capsys):
    with pytest.raises(SystemExit, match="guidance 7.5, not 3.0"):
        evaluation.main([*tiny["gen"], "--images-per-cond", "2", "--batch", "2", "--guidance", "3.0",
                         "--out", str(uninterrupted)])
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--evaluator", "e"])
    assert "--weights, --controlnet, --data" in capsys.readouterr().err


def test_help_groups_the_flags():
    """--help: flags grouped as a reader looks for them (every flag's help and default: tests/test_cli.py)."""
    groups = {g.title: {a.option_strings[0] for a in g._group_actions} for g in evaluation.make_parser()._action_groups}
    assert groups["model files"] == {"--weights", "--controlnet", "--evaluator", "--inception", "--clip"}
    assert groups["data"] == {"--data", "--control-column", "--num", "--resize"}
    assert groups["protocol"] == {"--control", *("--" + k.replace("_", "-") for k in evaluation.PROTOCOL)}
    assert groups["output and run"] == {"--out", "--score-only", "--batch", "--dtype", "--device"}
