"""Reward models: DPT parity with transformers, the annotators at their original key names, the normalisations."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import formats
import fused
import labels
import reward
from util import max_rel_err, randomize_

# Tiny configs in transformers' DPTConfig fields. Hybrid: BiT stages at strides 4/8/16 (16, 32, 64 channels),
# a 2-layer ViT on the stride-16 grid. Non-hybrid: a 4-layer ViT on 8x8 patches.
HYBRID = dict(is_hybrid=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=64, patch_size=16, backbone_out_indices=[2, 5, 0, 1], neck_hidden_sizes=[16, 32, 32, 32],
              reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16, backbone_featmap_shape=[1, 64, 4, 4],
              readout_type="project",
              backbone_config=dict(model_type="bit", global_padding="SAME", layer_type="bottleneck", depths=[1, 2, 1],
                                   hidden_sizes=[16, 32, 64], embedding_size=16, num_groups=4,
                                   out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True))
VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
           patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16)
# The published architectures (Intel/dpt-hybrid-midas, Intel/dpt-large); the rest are DPTConfig defaults.
HYBRID_MIDAS = dict(is_hybrid=True, backbone_featmap_shape=[1, 1024, 24, 24], neck_hidden_sizes=[256, 512, 768, 768],
                    reassemble_factors=[1, 1, 1, 0.5])
DPT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024])


def reference_and_ours(cfg, seed=0):
    from transformers import DPTConfig, DPTForDepthEstimation
    ref = randomize_(DPTForDepthEstimation(DPTConfig(**copy.deepcopy(cfg))), seed).eval()
    with torch.no_grad():  # position embeddings are tiny under 1/sqrt(fan_in): make them matter
        g = torch.Generator().manual_seed(seed + 1)
        for p in (ref.dpt.embeddings.cls_token, ref.dpt.embeddings.position_embeddings):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    ours = reward.DPT(reward.DPTConfig.from_dict(copy.deepcopy(cfg))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def image(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def dpt_parity(cfg, size):
    ref, ours = reference_and_ours(cfg)
    x = image(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        want, got = ref(x).predicted_depth, ours(x)
    assert got.shape == (2, 1, *want.shape[-2:])
    assert (want > 0).float().mean() > 0.3  # the final ReLU must not hide the comparison
    err = max_rel_err(got[:, 0], want)
    print(f"DPT parity {'hybrid' if cfg.get('is_hybrid') else 'vit'} {cfg.get('readout_type', 'project')} {size}px:"
          f" {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("padding,dynamic", [("SAME", True), (None, False)])
def test_dpt_hybrid_parity(padding, dynamic):
    cfg = copy.deepcopy(HYBRID)
    cfg["backbone_config"].update(global_padding=padding, embedding_dynamic_padding=dynamic)
    dpt_parity(cfg, 64)


@pytest.mark.parametrize("readout,size", [("project", 64), ("project", 96), ("add", 80), ("ignore", 64)])
def test_dpt_vit_parity(readout, size):
    dpt_parity(dict(VIT, readout_type=readout), size)  # 96/80 px: position embeddings resized from the 8x8 grid


@pytest.mark.parametrize("cfg", [HYBRID_MIDAS, DPT_LARGE], ids=["dpt-hybrid-midas", "dpt-large"])
def test_dpt_published_layouts_have_transformers_keys(cfg):
    from transformers import DPTConfig, DPTForDepthEstimation
    with torch.device("meta"):
        ref = DPTForDepthEstimation(DPTConfig(**cfg))
        ours = reward.DPT(reward.DPTConfig.from_dict(cfg))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(ref)


def test_dpt_hybrid_default_backbone_from_config_without_backbone_config():
    cfg = reward.DPTConfig.from_dict(dict(HYBRID_MIDAS))  # transformers fills in the BiT-R50 (3 stages) defaults
    assert cfg.backbone.depths == (3, 4, 9) and cfg.backbone.global_padding == "SAME"
    assert cfg.backbone.layer_type == "bottleneck" and cfg.backbone.embedding_dynamic_padding


def test_dpt_any_size_and_bf16_autocast():
    _, vit = reference_and_ours(VIT)
    with torch.no_grad():  # not square, not a multiple of the patch: the token grid and positions follow the input
        y = vit(image(1, 3, 72, 100) * 2 - 1)
    assert y.shape[:2] == (1, 1) and y.shape[-1] > y.shape[-2] and torch.isfinite(y).all()
    _, dpt = reference_and_ours(HYBRID)
    x = image(2, 3, 72, 100)
    with torch.no_grad():
        d = labels.depth_reward_prediction(dpt, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d16 = labels.depth_reward_prediction(dpt, x)
    assert d.shape == d16.shape == (2, 1, 72, 100) and d.dtype == d16.dtype == torch.float32
    assert d.min() >= 0 and torch.allclose(d.flatten(1).amax(1), torch.ones(2))
    print(f"DPT bf16 autocast vs fp32, normalised depth: {(d16 - d).abs().max():.3f}")
    assert (d16 - d).abs().max() < 0.05


def test_depth_reward_prediction_is_dpt_at_384_with_half_mean_std():
    _, dpt = reference_and_ours(HYBRID)
    assert dpt.input_size == HYBRID["image_size"]  # the config's size (384 for both Intel models)
    dpt.input_size = 384
    x = image(1, 3, 384, 384)
    with torch.no_grad():
        d = labels.depth_reward_prediction(dpt, x)
        raw = dpt((x - 0.5) / 0.5)
    raw = F.interpolate(raw, size=(384, 384), mode="bilinear") if raw.shape[-1] != 384 else raw
    assert torch.allclose(d, raw / raw.max(), atol=1e-6)


def test_depth_reward_prediction_at_native_size():
    class Brightness(torch.nn.Module):
        input_size = None  # a depth model without DPT's fixed input size runs at the image's own size

        def forward(self, x):  # x in [-1, 1]
            return (x.mean(1, keepdim=True) + 1) / 2

    x = torch.tensor([[[[0.2, 0.4]], [[0.2, 0.4]], [[0.2, 0.4]]]])
    assert torch.allclose(labels.depth_reward_prediction(Brightness(), x), torch.tensor([[[[0.5, 1.0]]]]))
    assert torch.allclose(labels.reward_prediction("depth", Brightness(), x), torch.tensor([[[[0.5, 1.0]]]]))


@pytest.mark.parametrize("fmt", ["model.safetensors", "pytorch_model.bin"])
def test_load_dpt_folder(tmp_path, fmt):
    ref, ours = reference_and_ours(HYBRID)
    cfg = dict(ref.config.to_dict(), architectures=["DPTForDepthEstimation"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / fmt) if fmt.endswith("safetensors") else torch.save(sd, tmp_path / fmt)
    x = image(1, 3, 64, 64)
    for loaded in (formats.load_dpt(str(tmp_path)), formats.load_dpt(str(tmp_path / fmt))):
        with torch.no_grad():
            assert torch.equal(loaded(x), ours(x))
    frozen = formats.load_reward_model("depth", str(tmp_path), dtype=torch.bfloat16)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert frozen.dpt.layernorm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(frozen(x.bfloat16())).all()


def test_load_dpt_rejects_wrong_keys(tmp_path):
    ref, _ = reference_and_ours(HYBRID)
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    sd = {("x." + k if k.startswith("head.") else k): v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        formats.load_dpt(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Annotators: state dicts written by hand at the original files' key names and shapes

def conv_weights(sd, name, cout, cin, k, g, scale=1.0, transposed=False):
    shape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
    sd[name + ".weight"] = scale * torch.randn(shape, generator=g) * math.sqrt(2 / (cin * k * k))
    sd[name + ".bias"] = 0.05 * torch.randn(cout, generator=g)


def hed_state_dict(seed=0):
    """ControlNetHED.pth layout: norm (1,3,1,1), blockN.convs.M.{weight,bias}, blockN.projection.{weight,bias}."""
    g = torch.Generator().manual_seed(seed)
    sd = {"norm": 127.5 + 10 * torch.randn(1, 3, 1, 1, generator=g)}
    cin = 3
    for b, (w, n) in enumerate(zip((64, 128, 256, 512, 512), (2, 2, 3, 3, 3)), start=1):
        for i in range(n):
            scale = 1 / 128 if (b, i) == (1, 0) else 1  # the first conv sees 0-255 values
            conv_weights(sd, f"block{b}.convs.{i}", w, cin if i == 0 else w, 3, g, scale=scale)
        conv_weights(sd, f"block{b}.projection", 1, w, 1, g, scale=0.5)
        cin = w
    return sd


def hed_reference(sd, x):
    """METHOD.md's HED, restated with functional ops."""
    h, logits = x * 255 - sd["norm"], []
    for b, n in enumerate((2, 2, 3, 3, 3), start=1):
        h = F.max_pool2d(h, 2) if b > 1 else h
        for i in range(n):
            h = F.relu(F.conv2d(h, sd[f"block{b}.convs.{i}.weight"], sd[f"block{b}.convs.{i}.bias"], padding=1))
        side = F.conv2d(h, sd[f"block{b}.projection.weight"], sd[f"block{b}.projection.bias"])
        logits.append(F.interpolate(side, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return torch.sigmoid(torch.stack(logits).mean(0))


def lineart_state_dict(n_res=3, seed=0):
    """sk_model.pth layout: model0.1, model1.{0,3}, model2.N.conv_block.{1,5}, model3.{0,3} (transposed), model4.1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    conv_weights(sd, "model0.1", 64, 3, 7, g)
    conv_weights(sd, "model1.0", 128, 64, 3, g)
    conv_weights(sd, "model1.3", 256, 128, 3, g)
    for i in range(n_res):
        conv_weights(sd, f"model2.{i}.conv_block.1", 256, 256, 3, g)
        conv_weights(sd, f"model2.{i}.conv_block.5", 256, 256, 3, g)
    conv_weights(sd, "model3.0", 128, 256, 3, g, transposed=True)
    conv_weights(sd, "model3.3", 64, 128, 3, g, transposed=True)
    conv_weights(sd, "model4.1", 1, 64, 7, g, scale=0.3)
    return sd


def lineart_reference(sd, x):
    """METHOD.md's LineArt generator, restated with functional ops (input size a multiple of 4)."""
    conv = lambda h, n, **kw: F.conv2d(h, sd[n + ".weight"], sd[n + ".bias"], **kw)
    up = lambda h, n: F.conv_transpose2d(h, sd[n + ".weight"], sd[n + ".bias"], stride=2, padding=1, output_padding=1)
    act = lambda h: F.relu(F.instance_norm(h))
    h = act(conv(F.pad(x, (3,) * 4, mode="reflect"), "model0.1"))
    h = act(conv(h, "model1.0", stride=2, padding=1))
    h = act(conv(h, "model1.3", stride=2, padding=1))
    for i in range(3):
        r = act(conv(F.pad(h, (1,) * 4, mode="reflect"), f"model2.{i}.conv_block.1"))
        h = h + F.instance_norm(conv(F.pad(r, (1,) * 4, mode="reflect"), f"model2.{i}.conv_block.5"))
    h = act(up(act(up(h, "model3.0")), "model3.3"))
    return torch.sigmoid(conv(F.pad(h, (3,) * 4, mode="reflect"), "model4.1"))


def test_hed_original_keys_shapes_and_semantics():
    sd = hed_state_dict()
    hed = reward.HED().eval()
    hed.load_state_dict(sd, strict=True)
    assert hed.norm.shape == (1, 3, 1, 1)
    for shape in [(2, 3, 32, 48), (1, 3, 37, 50)]:  # odd sizes: pooled maps are upsampled back to the input
        x = image(*shape)
        with torch.no_grad():
            y = hed(x)
        assert y.shape == (shape[0], 1, *shape[2:]) and y.min() > 0 and y.max() < 1
        assert y.std() > 1e-3  # not saturated: the comparison below is informative
        assert (y - hed_reference(sd, x)).abs().max() < 1e-5
    x = image(1, 3, 32, 32)
    with torch.no_grad():
        before = hed(x)
        hed.norm += 20  # the mean really is subtracted from the 0-255 input
        assert (hed(x) - before).abs().max() > 1e-3
        assert (hed(x) - hed_reference(dict(sd, norm=sd["norm"] + 20), x)).abs().max() < 1e-5


def test_lineart_original_keys_shapes_and_semantics():
    sd = lineart_state_dict()
    model = reward.LineArt().eval()
    model.load_state_dict(sd, strict=True)
    x = image(2, 3, 32, 48)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 1, 32, 48) and y.min() >= 0 and y.max() <= 1 and y.std() > 1e-3
        assert (y - lineart_reference(sd, x)).abs().max() < 1e-5
        odd = model(image(1, 3, 30, 45))  # any size: padded to a multiple of 4, cropped back
        assert odd.shape == (1, 1, 30, 45) and odd.min() >= 0 and odd.max() <= 1


def test_annotators_under_bf16_autocast():
    hed, lineart = reward.HED().eval(), reward.LineArt().eval()
    hed.load_state_dict(hed_state_dict())
    lineart.load_state_dict(lineart_state_dict())
    x = image(1, 3, 36, 28)
    for m in (hed, lineart):
        with torch.no_grad():
            y = m(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y16 = m(x)
        assert y16.shape == y.shape and torch.isfinite(y16).all()
        assert (y16.float() - y).abs().max() < 0.05


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_load_reward_model_annotators(tmp_path, fmt):
    for control, sd in (("hed", hed_state_dict()), ("lineart", lineart_state_dict(n_res=2))):
        path = str(tmp_path / f"{control}.{fmt}")
        save_file(sd, path) if fmt == "safetensors" else torch.save(sd, path)
        model = formats.load_reward_model(control, path)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
        with torch.no_grad():
            assert model(image(1, 3, 32, 32)).shape == (1, 1, 32, 32)
        assert formats.load_reward_model(control, path, dtype=torch.bfloat16).norm.dtype == torch.bfloat16 \
            if control == "hed" else True
    bad = str(tmp_path / f"bad.{fmt}")
    sd = {"module." + k: v for k, v in hed_state_dict().items()}
    save_file(sd, bad) if fmt == "safetensors" else torch.save(sd, bad)
    with pytest.raises(ValueError, match="missing"):
        formats.load_reward_model("hed", bad)


# ---------------------------------------------------------------------------------------------------------------------
# Normalisations, hand-computed

def test_per_image_normalisations():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(labels.normalize_per_image_max(x)[0, 0], torch.tensor([[0.25, 0.5], [0.75, 1.0]]))
    assert torch.equal(labels.normalize_per_image_max(x)[1], torch.zeros(1, 2, 2))  # blank map: zeros, not NaN
    y = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    assert torch.equal(labels.normalize_per_image_minmax(y)[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(labels.normalize_per_image_minmax(y)[1], torch.zeros(1, 2, 2))
    assert labels.normalize_per_image_max(x.bfloat16()).dtype == torch.float32


def test_depth_label():
    control = torch.tensor([[[[0.3, 0.6]], [[0.3, 0.0]], [[0.0, 0.9]]]])  # RGB means 0.2, 0.5
    label = labels.depth_label(control)
    assert label.shape == (1, 1, 1, 2)
    assert torch.allclose(label, torch.tensor([[[[0.4, 1.0]]]]))
    assert torch.equal(labels.make_label("depth", None, torch.rand(1, 3, 1, 2), control), label)


def test_probe_to_label_space():
    p = torch.tensor([[[[0.2, 0.4, 1.0]], [[0.0, 0.4, 0.6]]]])  # channel means 0.1, 0.4, 0.8
    assert torch.allclose(labels.probe_to_label_space(p, "depth"), torch.tensor([[[[0.125, 0.5, 1.0]]]]))
    assert torch.allclose(labels.probe_to_label_space(p, "lineart"), torch.tensor([[[[1.0, 4 / 7, 0.0]]]]))
    assert torch.equal(labels.probe_to_label_space(p, "hed"), p)
    q = torch.full((2, 3, 8, 8), 0.25)
    assert torch.allclose(labels.probe_to_label_space(q, "hed", size=(32, 32)), torch.full((2, 3, 32, 32), 0.25))
    assert torch.allclose(labels.probe_to_label_space(q, "depth", size=(32, 32)), torch.ones(2, 1, 32, 32))
    with pytest.raises(ValueError):
        labels.probe_to_label_space(p, "canny")


def test_labels_controls_and_reward_predictions_of_annotators():
    """hed / lineart: the label is the annotator run on the RGB image (upstream's), never on a control map; a stored
    annotator output, when given, is the label itself. The ControlNet sees the label (hed) or its inverse (lineart)."""
    hed, lineart = reward.HED().eval(), reward.LineArt().eval()
    hed.load_state_dict(hed_state_dict())
    lineart.load_state_dict(lineart_state_dict())
    image01, stored = image(2, 3, 32, 32), image(2, 1, 32, 32, seed=5).expand(-1, 3, -1, -1)
    for control, model in (("hed", hed), ("lineart", lineart)):
        label = labels.make_label(control, model, image01)
        assert label.shape == (2, 1, 32, 32) and not label.requires_grad
        with torch.no_grad():
            assert torch.equal(label, model(image01))
            assert torch.equal(labels.reward_prediction(control, model, image01), label)
        torch.testing.assert_close(labels.make_label(control, model, image01, stored), stored[:, :1])
    lab = labels.make_label("lineart", lineart, image01)
    assert torch.equal(labels.control_image("lineart", lab), (1 - lab).expand(-1, 3, -1, -1))
    lab = labels.make_label("hed", hed, image01)
    assert torch.equal(labels.control_image("hed", lab), lab.expand(-1, 3, -1, -1))
    assert labels.control_image("depth", None, stored) is stored


def test_reward_gradients_reach_the_image():
    """The reward loss trains the ControlNet through the frozen reward model: d(loss)/d(image) must exist."""
    _, dpt = reference_and_ours(HYBRID)
    hed = reward.HED()
    hed.load_state_dict(hed_state_dict())
    for control, model in (("depth", dpt.requires_grad_(False)), ("hed", hed.requires_grad_(False))):
        x = image(1, 3, 48, 48).requires_grad_()
        pred = labels.reward_prediction(control, model, x)
        assert pred.shape == (1, 1, 48, 48)
        F.mse_loss(pred, torch.zeros_like(pred)).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def saved_bytes(fn):
    """Bytes autograd keeps for the backward while fn() runs, and fn()'s result."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_frozen_dpt_keeps_less_for_the_backward():
    """The reward path back-propagates through the frozen DPT: with fused.py's convs it keeps no conv inputs, and
    the gradient stays transformers' own."""
    ref, dpt = reference_and_ours(HYBRID)
    ref.requires_grad_(False)
    fused.install(dpt.requires_grad_(False))
    x0 = image(1, 3, 64, 64) * 2 - 1
    x_ref, x_ours = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    n_ref, y_ref = saved_bytes(lambda: ref(x_ref).predicted_depth)
    n_ours, y_ours = saved_bytes(lambda: dpt(x_ours))
    y_ref.square().sum().backward()
    y_ours.square().sum().backward()
    print(f"DPT saved for backward: ours {n_ours / 2**20:.1f} MiB, transformers {n_ref / 2**20:.1f} MiB")
    assert max_rel_err(x_ours.grad, x_ref.grad) < 1e-4
    assert n_ours < 0.85 * n_ref
