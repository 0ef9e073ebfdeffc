"""ControlNet: parity with diffusers' ControlNetModel (also at odd latent sizes), loading lllyasviel files,
exporting both layouts, the guided step."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import controlnet as cn
import formats
import fused
import model
import sample
import unet
from util import max_rel_err, randomize_

TOL = 1e-4
TINY = unet.UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=64)


def reference(net):
    from diffusers import ControlNetModel
    ref = ControlNetModel(**formats.controlnet_config_to_diffusers(net))
    names = formats.controlnet_key_map(net.config, net.hint_block_channels)
    ref.load_state_dict({names[k]: v for k, v in net.state_dict().items()}, strict=True)
    return ref.eval()


def inputs(size, ctx_dim, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, 4, h // 8, w // 8, generator=g)
    t = torch.tensor([10, 700][:batch])
    ctx = torch.randn(batch, 77, ctx_dim, generator=g)
    hint = torch.rand(batch, 3, h, w, generator=g)
    return x, t, ctx, hint


def residual_error(net, ref, size, scale=1.0, batch=2):
    x, t, ctx, hint = inputs(size, net.config.context_dim, batch)
    with torch.no_grad():
        ours = net(x, t, ctx, hint, scale=scale)
        down, mid = ref(x, t, ctx, hint, conditioning_scale=scale, return_dict=False)
    refs = list(down) + [mid]
    assert len(ours) == len(refs) == 13
    for a, b in zip(ours, refs):
        assert a.shape == b.shape and b.abs().max() > 1e-3  # non-zero: the zero convs were randomised
    return max(max_rel_err(a, b) for a, b in zip(ours, refs))


def test_key_map_is_one_to_one():
    from diffusers import ControlNetModel
    net = cn.ControlNet(TINY)
    km = formats.controlnet_key_map(TINY)
    theirs = ControlNetModel(**formats.controlnet_config_to_diffusers(net)).state_dict()
    ours = net.state_dict()
    assert set(km) == set(ours) and set(km.values()) == set(theirs) and len(set(km.values())) == len(km)
    assert all(ours[k].shape == theirs[v].shape for k, v in km.items())


def test_parity_tiny():
    net = randomize_(cn.ControlNet(TINY), 0).eval()
    err = residual_error(net, reference(net), 128, scale=0.7)
    print(f"controlnet parity tiny: {err:.2e}")
    assert err <= TOL


def test_parity_at_a_size_the_downsampling_does_not_divide():
    net = randomize_(cn.ControlNet(TINY), 1).eval()
    assert residual_error(net, reference(net), (72, 88)) <= TOL  # 9x11 latents


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True])
def test_parity_sd15(fast):
    net = randomize_(cn.ControlNet(unet.UNetConfig()), 0).eval()
    ref = reference(net)
    err = residual_error(fused.install(net) if fast else net, ref, 512, batch=1)
    print(f"controlnet parity sd15: {err:.2e}")
    assert err <= TOL


def test_from_unet_copies_encoder_and_starts_as_noop():
    u = randomize_(unet.UNet(TINY), 3).eval()
    net = cn.ControlNet.from_unet(u)
    ours = net.state_dict()
    for k, v in u.state_dict().items():
        if k.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(ours[k], v), k
    x, t, ctx, hint = inputs(64, 64)
    with torch.no_grad():
        res = net(x, t, ctx, hint)
        assert all(r.abs().max() == 0 for r in res)  # zero convs: a new ControlNet changes nothing
        assert torch.equal(u(x, t, ctx, control=res), u(x, t, ctx))


def lllyasviel_file(tmp_path, net, prefix, suffix, extra=None):
    tensors = {prefix + k: v.contiguous() for k, v in net.state_dict().items()}
    tensors.update(extra or {})
    path = tmp_path / f"control_v11f1p_sd15_depth{suffix}"
    if suffix == ".pth":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))  # no metadata: the architecture comes from the shapes
    return path


def test_new_hint_encoder_passes_the_control_on():
    """A new ControlNet's hint encoder (He init) keeps the difference between two controls up to its
    zero conv; PyTorch's default init shrinks it to under 1% of the features' spread after 7 convs."""
    torch.manual_seed(0)
    net = cn.ControlNet(model.tiny().unet)
    a, b = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        fa, fb = net.input_hint_block[:-1](a), net.input_hint_block[:-1](b)
    assert (fa - fb).std() > 0.3 * fa.std()
    assert net.input_hint_block[-1].weight.abs().max() == 0  # the zero conv still starts at zero


@pytest.mark.parametrize("prefix,suffix", [("control_model.", ".pth"), ("", ".pth"), ("control_model.", ".safetensors"),
                                           ("", ".safetensors")])
def test_loads_lllyasviel_layout(tmp_path, prefix, suffix):
    net = randomize_(cn.ControlNet(TINY), 4)
    loaded = formats.load_controlnet(lllyasviel_file(tmp_path, net, prefix, suffix), unet_cfg=TINY)
    assert loaded.config == TINY
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_loads_only_the_controlnet_from_a_full_v10_file(tmp_path):
    # ControlNet v1.0 files carry the whole model next to control_model.*
    net = randomize_(cn.ControlNet(TINY), 5)
    extra = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "betas": torch.zeros(10)}
    loaded = formats.load_controlnet(lllyasviel_file(tmp_path, net, "control_model.", ".pth", extra), unet_cfg=TINY,
                                dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def test_refuses_misfit_and_wrong_files(tmp_path):
    net = cn.ControlNet(TINY)
    path = tmp_path / "cn.safetensors"
    formats.save_controlnet(net, path)
    other = unet.UNetConfig(**{**TINY.__dict__, "context_dim": 32})
    with pytest.raises(formats.CheckpointError, match="does not fit the UNet"):
        formats.load_controlnet(path, unet_cfg=other)
    wider = unet.UNetConfig(**{**TINY.__dict__, "model_channels": 64})
    with pytest.raises(formats.CheckpointError, match="model_channels 32 vs 64"):
        formats.load_controlnet(path, unet_cfg=wider)
    sd_file = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in unet.UNet(TINY).state_dict().items()},
              str(sd_file))
    with pytest.raises(formats.CheckpointError, match="full Stable Diffusion"):
        formats.load_controlnet(sd_file)
    formats.export_diffusers(net, tmp_path / "folder")
    with pytest.raises(formats.CheckpointError, match="pass its folder"):
        formats.load_controlnet(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(formats.CheckpointError, match="not a diffusers ControlNetModel folder"):
        formats.load_controlnet(tmp_path)


def test_our_file_keeps_heads_and_groups(tmp_path):
    cfg = unet.UNetConfig(**{**TINY.__dict__, "num_heads": 4, "norm_groups": 16})
    net = randomize_(cn.ControlNet(cfg), 7)
    formats.save_controlnet(net, tmp_path / "cn.safetensors")
    assert all(k.startswith("control_model.") for k in load_file(tmp_path / "cn.safetensors"))
    assert formats.load_controlnet(tmp_path / "cn.safetensors").config == cfg


def test_export_round_trip(tmp_path):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    net = randomize_(cn.ControlNet(TINY), 6).eval()
    # the diffusers folder loads with diffusers' own from_pretrained ...
    formats.export_diffusers(net, tmp_path / "folder")
    ref = ControlNetModel.from_pretrained(tmp_path / "folder").eval()
    assert residual_error(net, ref, 64) <= TOL
    # ... and with ours
    back = formats.load_controlnet(tmp_path / "folder", unet_cfg=TINY)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    # the original-layout export (control_model. prefix) goes through diffusers' own converter
    formats.save_controlnet(net, tmp_path / "cn.safetensors")
    converted = convert_controlnet_checkpoint(load_file(tmp_path / "cn.safetensors"),
                                              {"layers_per_block": TINY.num_res_blocks})
    ref2 = ControlNetModel(**formats.controlnet_config_to_diffusers(net))
    ref2.load_state_dict(converted, strict=True)
    assert residual_error(net, ref2.eval(), 64) <= TOL


def test_bgr_folder_is_flipped_to_rgb(tmp_path):
    net = randomize_(cn.ControlNet(TINY), 8).eval()
    formats.export_diffusers(net, tmp_path / "bgr")
    c = json.loads((tmp_path / "bgr" / "config.json").read_text())
    c["controlnet_conditioning_channel_order"] = "bgr"
    (tmp_path / "bgr" / "config.json").write_text(json.dumps(c))
    w = load_file(tmp_path / "bgr" / "diffusion_pytorch_model.safetensors")
    w["controlnet_cond_embedding.conv_in.weight"] = w["controlnet_cond_embedding.conv_in.weight"].flip(1).contiguous()
    save_file(w, str(tmp_path / "bgr" / "diffusion_pytorch_model.safetensors"))
    back = formats.load_controlnet(tmp_path / "bgr")
    x, t, ctx, hint = inputs(64, 64)
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(back(x, t, ctx, hint), net(x, t, ctx, hint)))


def test_guided_eps_matches_the_plain_doubled_batch():
    u = randomize_(unet.UNet(TINY), 1).eval()
    net = randomize_(cn.ControlNet(TINY), 2).eval()
    x, _, _, hint = inputs(64, 64)
    ctx = torch.randn(4, 7, 64)
    eps = sample.guided_eps(u, net, x, 500, ctx, hint, guidance=7.5, control_scale=0.8)
    with torch.no_grad():  # the plain way: latents and hint repeated for both halves
        x2, h2, t2 = torch.cat([x, x]), torch.cat([hint, hint]), torch.tensor([500] * 4)
        e = u(x2, t2, ctx, control=net(x2, t2, ctx, h2, scale=0.8))
    un, co = e.chunk(2)
    assert eps.shape == x.shape
    assert max_rel_err(eps, un + 7.5 * (co - un)) <= 1e-5
    # a single hint shared by every latent
    eps1 = sample.guided_eps(u, net, x, 500, ctx, hint[:1], guidance=7.5)
    eps2 = sample.guided_eps(u, net, x, 500, ctx, hint[:1].expand(2, -1, -1, -1), guidance=7.5)
    assert max_rel_err(eps1, eps2) <= 1e-5


def test_gradient_checkpointing_same_gradients():
    net = randomize_(cn.ControlNet(TINY), 9)
    x, t, ctx, hint = inputs(64, 64)
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.grad_checkpointing = ckpt
        sum(r.square().mean() for r in net(x, t, ctx, hint)).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
