"""metrics.py against the references: torchmetrics (MS-SSIM, CLIPScore), torch-fidelity's
FeatureExtractorInceptionV3 (the FID Inception that torchmetrics' FID also runs), clean-fid's resize,
scipy's sqrtm (the Frechet distance as clean-fid computes it) and transformers' CLIPModel and CLIP
image processor. Random weights only; nothing is downloaded. A test whose reference is not installed
is skipped."""
import importlib
import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import formats
import metrics
import model
from formats import CheckpointError
from util import max_rel_err, randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub look-ups from any reference, whatever the order of tests


def _register_torch_fidelity():
    """Make torch_fidelity's submodules importable without running its __init__.py.

    That __init__ imports every feature extractor, and the CLIP one imports torchvision, which is not
    installed (PyPI's torchvision does not run beside this torch). The Inception extractor itself, and
    the part of it that torchmetrics imports, need none of that.
    """
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or "torch_fidelity" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return spec is not None
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__, pkg.__spec__, pkg.__file__ = list(spec.submodule_search_locations), spec, spec.origin
    sys.modules["torch_fidelity"] = pkg
    return True


def torchmetrics_module(name):
    # with torch-fidelity installed, `import torchmetrics` imports its Inception module too
    _register_torch_fidelity()
    return pytest.importorskip(name)

# -----------------------------------------------------------------------------
# MS-SSIM


def edge_map(h, w, seed, n=12):
    """An HED-like soft edge map in [0, 1]: random line segments and circles, blurred."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    m = np.zeros((h, w))
    for _ in range(n):
        if g.random() < 0.5:
            (x0, y0), (x1, y1) = g.uniform(0, [w, h]), g.uniform(0, [w, h])
            d = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / math.hypot(x1 - x0, y1 - y0)
            t = ((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2)
            d = np.where((t >= 0) & (t <= 1), d, np.inf)
        else:
            cx, cy, r = g.uniform(0, w), g.uniform(0, h), g.uniform(10, min(h, w) / 3)
            d = np.abs(np.hypot(xx - cx, yy - cy) - r)
        m = np.maximum(m, np.exp(-d ** 2 / (2 * g.uniform(0.7, 2.0) ** 2)))
    return torch.from_numpy(m).float()


def edge_pairs(h, w):
    """Labels and 'predictions' that resemble them to varying degrees (shifted, noisy, unrelated)."""
    label = torch.stack([edge_map(h, w, s) for s in range(4)])[:, None]
    pred = label.clone()
    pred[0] = torch.roll(label[0], (2, -1), (1, 2))
    pred[1] = (label[1] + 0.15 * torch.randn(label[1].shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    pred[2] = edge_map(h, w, 99)[None]
    pred[3] = label[3] ** 2  # thinner edges
    return pred, label


def test_ms_ssim_matches_torchmetrics():
    tm = torchmetrics_module("torchmetrics.image")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 180, 211, generator=g)
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    b[2] = torch.rand(b[2].shape, generator=g)
    pred, label = edge_pairs(256, 192)
    rgb_a = torch.rand(2, 3, 192, 192, generator=g)
    rgb_b = (rgb_a + 0.1 * torch.randn(rgb_a.shape, generator=g)).clamp(0, 1)
    for x, y in ((a, b), (pred, label), (rgb_a, rgb_b)):
        ref = tm.MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, reduction="none")(x, y)
        mean_ref = tm.MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)(x, y)  # the protocol's object
        ours = metrics.ms_ssim(x, y)
        err = (ours - ref).abs().max().item()
        print(f"MS-SSIM {tuple(x.shape)}: ours {ours.tolist()} max abs err {err:.1e}")
        assert ours.shape == (len(x),) and err < 1e-5
        assert abs(ours.mean().item() - mean_ref.item()) < 1e-5
    assert 0 < ours.min() and ours.max() < 1  # the test maps exercise the interior, not only 0 / 1


def test_ms_ssim_edge_cases():
    tm = torchmetrics_module("torchmetrics.image")
    x = torch.rand(2, 1, 176, 176, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(metrics.ms_ssim(x, x), torch.ones(2), atol=1e-6)
    # anti-correlated maps: negative contrast terms, clipped to 0 by the "relu" default -> MS-SSIM 0
    ref = tm.MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, reduction="none")(x, 1 - x)
    assert torch.allclose(metrics.ms_ssim(x, 1 - x), ref, atol=1e-6)
    # 176 is the smallest side torchmetrics accepts with the defaults; so here
    small = torch.rand(1, 1, 175, 200)
    with pytest.raises(ValueError):
        tm.MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)(small, small)
    with pytest.raises(ValueError, match="176"):
        metrics.ms_ssim(small, small)
    assert metrics.MS_SSIM_MIN_SIZE == 176

# -----------------------------------------------------------------------------
# FID Inception


@torch.no_grad()
def random_inception(seed=0):
    """FIDInception with random weights that keep activations O(1) through its ~47 ReLU layers:
    He-scaled convolutions and batch-norm statistics near identity."""
    net = metrics.FIDInception().eval()
    g = torch.Generator().manual_seed(seed)
    for name, t in sorted(net.state_dict().items()):
        if t.ndim >= 2:
            t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2 / t[0].numel()))
        elif name.endswith("bn.weight"):
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("running_var"):
            t.copy_(1 + 0.2 * torch.rand(t.shape, generator=g))
        else:
            t.copy_(0.05 * torch.randn(t.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def inception():
    return random_inception()


def test_inception_matches_torch_fidelity(inception, tmp_path):
    if not _register_torch_fidelity():
        pytest.skip("torch-fidelity is not installed: `pip install --no-deps torch-fidelity==0.4.0` (as .ci/run does; "
                    "with its dependencies it would bring a torchvision that replaces this torch)")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.save(inception.state_dict(), tmp_path / "inception.pth")
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(tmp_path / "inception.pth"))
    # the same tensor names as the file both load (torch-fidelity's BatchNorm2d adds its batch counter)
    assert set(inception.state_dict()) == {k for k in ref.state_dict() if not k.endswith("num_batches_tracked")}
    g = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=299, mode="bicubic")
    noise = torch.randint(0, 256, (1, 3, 299, 299), generator=g)
    x = torch.cat([noise, (smooth.clamp(0, 1) * 255).round()]).to(torch.uint8)
    with torch.no_grad():
        ours, (theirs,) = inception(x.float()), ref(x)  # torch-fidelity's own resize is the identity at 299
    err = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    print(f"FID Inception pool3: max rel err {err:.1e} (features up to {theirs.abs().max().item():.2f})")
    assert ours.shape == (2, 2048) and err < 1e-4
    # the reference's own file (with batch counters) loads into ours too
    torch.save(ref.state_dict(), tmp_path / "with_counters.pth")
    again = formats.load_inception(tmp_path / "with_counters.pth")
    with torch.no_grad():
        assert torch.equal(again(x.float()), ours)


def test_load_inception_formats(inception, tmp_path):
    sd = inception.state_dict()
    torch.save(sd, tmp_path / "pt_inception.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "pt_inception.safetensors"))
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        want = inception(x)
        for name in ("pt_inception.pth", "pt_inception.safetensors"):
            assert torch.equal(formats.load_inception(tmp_path / name)(x), want)
    images = torch.randint(0, 256, (3, 3, 64, 48), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        want = inception(metrics.fid_resize(images))
    assert torch.equal(metrics.inception_features(inception, images, batch=2), want)
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, tmp_path / "no_fc.pth")
    with pytest.raises(CheckpointError, match="missing"):
        formats.load_inception(tmp_path / "no_fc.pth")
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")  # weights_only refuses modules
    with pytest.raises(CheckpointError):
        formats.load_inception(tmp_path / "pickled_module.pth")


def pil_clean_resize(img_hwc, size=299):
    """Hand-written statement of clean-fid's "clean" resize, for when clean-fid is not installed."""
    from PIL import Image
    # a float32 array becomes a 32-bit float ("F") image
    chans = [np.asarray(Image.fromarray(img_hwc[..., c].astype(np.float32)).resize((size, size), Image.BICUBIC))
             for c in range(3)]
    return np.stack(chans, -1).clip(0, 255).astype(np.float32)


def test_fid_resize_matches_clean_fid():
    try:
        from cleanfid.resize import build_resizer
        reference = build_resizer("clean")
    except ImportError:
        reference = pil_clean_resize
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in ((64, 80), (512, 384), (299, 299))]
    for img in images:
        ours = metrics.fid_resize([img])[0]
        ref = torch.from_numpy(np.ascontiguousarray(reference(img.permute(1, 2, 0).numpy()).transpose(2, 0, 1)))
        assert ours.dtype == torch.float32 and ours.shape == (3, 299, 299)
        assert torch.equal(ours, ref), (ours - ref).abs().max()
    # [0, 1] floats are rounded to 8 bits first, as a saved PNG would be
    f = torch.rand(2, 3, 40, 50, generator=g)
    assert torch.equal(metrics.fid_resize(f), metrics.fid_resize((f * 255).round().to(torch.uint8)))
    assert torch.equal(metrics.fid_resize(images[2][None])[0], images[2].float())  # 299 stays as it is
    gray = images[0][:1]
    assert torch.equal(metrics.fid_resize([gray]), metrics.fid_resize([gray.expand(3, -1, -1)]))


def scipy_frechet(f1, f2):
    """The Frechet distance as clean-fid computes it: numpy mean/cov, scipy.linalg.sqrtm of S1 S2."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    d = mu1 - mu2
    return d.dot(d) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    D = 48
    A, B = rng.normal(size=(D, D)) / math.sqrt(D), rng.normal(size=(D, D)) / math.sqrt(D)
    f1 = rng.normal(size=(500, D)) @ A
    f2 = rng.normal(size=(400, D)) @ B + 0.3
    for x, y in ((f1, f2), (f1, f1[::-1] + 1e-3), (f2[:300], f2[100:])):
        ref, ours = scipy_frechet(x, y), metrics.fid(torch.from_numpy(x), torch.from_numpy(y))
        print(f"FID ours {ours:.10f} scipy {ref:.10f}")
        assert ours == pytest.approx(ref, rel=1e-7, abs=1e-9)
    assert metrics.fid(torch.from_numpy(f1), torch.from_numpy(f1)) == pytest.approx(0, abs=1e-9)


def test_fid_over_groups():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 8, generator=g)
    gen = torch.randn(30 * 4, 8, generator=g) + torch.arange(4).repeat(30)[:, None] * 0.5  # group g shifted by g/2
    want = sum(metrics.fid(real, gen.view(30, 4, 8)[:, k]) for k in range(4)) / 4
    assert metrics.fid_over_groups(real, gen, 4) == pytest.approx(want, rel=1e-12)
    assert metrics.fid(real, gen[0::4]) < metrics.fid(real, gen[3::4])
    with pytest.raises(ValueError):
        metrics.fid_over_groups(real, gen[:-1], 4)

# -----------------------------------------------------------------------------
# CLIP


def tiny_clip_config(eos_token_id=2):
    return metrics.CLIPConfig(model.TextConfig(width=64, layers=2, heads=2, mlp_dim=128),
                              metrics.VisionConfig(width=64, layers=2, heads=2, mlp_dim=128, patch=16),
                              projection_dim=32, eos_token_id=eos_token_id)


def hf_clip(cfg):
    from transformers import CLIPConfig, CLIPModel
    return CLIPModel(CLIPConfig(**formats.clip_config_to_transformers(cfg))).eval()


def load_into_hf(ours, ref):
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    # the temperature, and position_ids where older transformers still keep them in state dicts
    assert "logit_scale" in missing and all(k == "logit_scale" or k.endswith("position_ids") for k in missing)
    assert unexpected == []
    return ref


def pil_clip_image_processor():
    """transformers' PIL-based CLIP image processor: CLIPImageProcessorPil in transformers 5, where
    CLIPImageProcessor needs torchvision; CLIPImageProcessor itself in transformers 4."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil()
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor()


def pooled(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object


CAPTIONS = ["a photo of a cat", "A RED house, by the Lake!", "line art of a horse",
            "an extremely detailed photograph of a majestic lion on a rock at sunset " * 6]  # > 77 tokens


def test_clip_text_ids_match_clip_processor(tmp_path):
    pytest.importorskip("transformers")
    from test_model import write_clip_files
    from transformers import CLIPTokenizer
    write_clip_files(tmp_path)
    ref = CLIPTokenizer.from_pretrained(str(tmp_path))(CAPTIONS, padding=True, return_tensors="pt").input_ids
    assert ref.shape[1] > 77
    ref = ref[:, :77]  # what CLIPScore does to captions longer than the text tower
    ours = metrics.clip_text_ids(model.Tokenizer.from_bpe_gz(), CAPTIONS)
    assert ours.shape == (4, 77)
    assert torch.equal(ours, ref)  # pad id == EOS for CLIP, so padding to 77 or to the longest agrees
    assert ours[3, -1] != model.Tokenizer.from_bpe_gz().eos_id  # the long caption lost its EOS


@pytest.mark.parametrize("eos_token_id", [2, 49407])
def test_clip_embeddings_match_transformers(eos_token_id):
    pytest.importorskip("transformers")
    cfg = tiny_clip_config(eos_token_id)
    ours = randomize_(metrics.CLIP(cfg), seed=3).eval()
    ref = load_into_hf(ours, hf_clip(cfg))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224, generator=g)
    ids = metrics.clip_text_ids(model.Tokenizer.from_bpe_gz(), CAPTIONS)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        e_img, e_txt = ours(pixels, ids)
        r_img = pooled(ref.get_image_features(pixel_values=pixels))
        r_txt = pooled(ref.get_text_features(input_ids=ids, attention_mask=mask))
    err_img, err_txt = max_rel_err(e_img, r_img), max_rel_err(e_txt, r_txt)
    print(f"CLIP eos={eos_token_id}: image emb max rel err {err_img:.1e}, text emb {err_txt:.1e}")
    assert e_img.shape == (2, 32) and e_txt.shape == (4, 32)
    assert err_img < 1e-4 and err_txt < 1e-4


@pytest.mark.slow
def test_clip_vit_b16_parity():
    """openai/clip-vit-base-patch16's shapes (random weights)."""
    pytest.importorskip("transformers")
    cfg = metrics.CLIPConfig(eos_token_id=2)
    ours = randomize_(metrics.CLIP(cfg), seed=4).eval()
    ref = load_into_hf(ours, hf_clip(cfg))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = metrics.clip_text_ids(model.Tokenizer.from_bpe_gz(), CAPTIONS[:2])
    with torch.no_grad():
        e_img, e_txt = ours(pixels, ids)
        r_img = pooled(ref.get_image_features(pixel_values=pixels))
        r_txt = pooled(ref.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids)))
    err_img, err_txt = max_rel_err(e_img, r_img), max_rel_err(e_txt, r_txt)
    print(f"CLIP ViT-B/16: image emb max rel err {err_img:.1e}, text emb {err_txt:.1e}")
    assert e_img.shape == e_txt.shape == (2, 512) and err_img < 1e-4 and err_txt < 1e-4


def test_clip_preprocess_matches_transformers():
    pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in ((512, 512), (300, 251), (100, 500), (224, 224), (225, 600))]
    ref = pil_clip_image_processor()(images=images, return_tensors="pt").pixel_values
    ours = torch.cat([metrics.clip_preprocess([im]) for im in images])
    assert ours.dtype == torch.float32 and ours.shape == (5, 3, 224, 224)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


class FeaturesAsTensors(nn.Module):
    """CLIPModel whose get_*_features return the embedding tensors, as in transformers 4. transformers 5
    returns output objects, which torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, *args, **kwargs):
        return pooled(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return pooled(self.clip.get_text_features(*args, **kwargs))


def save_tiny_clip_folder(folder, ours):
    from test_model import write_clip_files
    from transformers import CLIPProcessor, CLIPTokenizer
    folder.mkdir()
    write_clip_files(folder)
    load_into_hf(ours, hf_clip(ours.clip_cfg)).save_pretrained(str(folder))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    CLIPProcessor(image_processor=pil_clip_image_processor(), tokenizer=tok).save_pretrained(str(folder))


def test_clip_score_matches_torchmetrics(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    clip_score_mod = torchmetrics_module("torchmetrics.functional.multimodal.clip_score")
    CLIPScore = torchmetrics_module("torchmetrics.multimodal.clip_score").CLIPScore
    from transformers import CLIPModel, CLIPProcessor
    folder = tmp_path / "openai-clip-tiny"
    save_tiny_clip_folder(folder, randomize_(metrics.CLIP(tiny_clip_config()), seed=5).eval())

    def load_reference():
        return (FeaturesAsTensors(CLIPModel.from_pretrained(str(folder)).eval()),
                CLIPProcessor.from_pretrained(str(folder)))

    clip = formats.load_clip(folder)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 256, 320), generator=g, dtype=torch.uint8)
    ref_model, ref_proc = load_reference()
    with torch.no_grad():
        # 100 * cos per image, before any clipping
        ref_raw, n = clip_score_mod._clip_score_update(list(images), CAPTIONS, ref_model, ref_proc)
    metric = CLIPScore(model_name_or_path=load_reference)
    metric.update(images[:2], CAPTIONS[:2])
    metric.update(images[2:], CAPTIONS[2:])
    ours_raw = 100 * metrics.clip_cosines(clip, images, CAPTIONS)
    per_image, mean = metrics.clip_score(clip, images, CAPTIONS)
    err = (ours_raw - ref_raw).abs().max().item()
    print(f"CLIP score: ours {ours_raw.tolist()} reference {ref_raw.tolist()} max abs err {err:.1e}")
    assert n == 4 and err < 1e-4
    assert torch.allclose(per_image, ref_raw.clamp_min(0), atol=1e-4)
    assert mean == pytest.approx(metric.compute().item(), abs=1e-4)
    # a pytorch_model.bin with the extras old files carry (position_ids buffers, logit_scale) loads too
    sd = dict(clip.state_dict(), logit_scale=torch.tensor(4.6),
              **{f"{tower}_model.embeddings.position_ids": torch.arange(length)[None]
                 for tower, length in (("text", 77), ("vision", 197))})
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    torch.save(sd, bin_folder / "pytorch_model.bin")
    again = formats.load_clip(bin_folder)
    assert torch.equal(100 * metrics.clip_cosines(again, images, CAPTIONS), ours_raw)


def test_load_clip_rejects_other_files(tmp_path):
    (tmp_path / "config.json").write_text('{"text_config": {}, "vision_config": {}}')
    save_file({"text_model.final_layer_norm.weight": torch.ones(512)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        formats.load_clip(tmp_path)
