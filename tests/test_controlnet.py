"""ControlNet: parity with diffusers' ControlNetModel, loading lllyasviel files, exporting both layouts."""
import pytest
import torch

import controlnet as cn
import model
import unet
from tests.util import max_rel_err, randomize_

TOL = 1e-4


def reference(net):
    from diffusers import ControlNetModel
    c = cn.controlnet_config_to_diffusers(net)
    c.pop("_class_name")
    ref = ControlNetModel(**c)
    names = cn.controlnet_key_map(net.config, net.hint_channels)
    ref.load_state_dict({names[k]: v for k, v in net.state_dict().items()}, strict=True)
    return ref.eval()


def residuals_match(net, ref, size, ctx_dim, scale=1.0, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    t = torch.tensor([10, 700][:batch])
    ctx = torch.randn(batch, 77, ctx_dim, generator=g)
    hint = torch.rand(batch, 3, size, size, generator=g)
    with torch.no_grad():
        ours = net(x, t, ctx, hint, scale=scale)
        down, mid = ref(x, t, ctx, hint, conditioning_scale=scale, return_dict=False)
    refs = list(down) + [mid]
    assert len(ours) == len(refs) == 13
    for a, b in zip(ours, refs):
        assert a.shape == b.shape and b.abs().max() > 1e-3  # non-zero: the zero convs were randomised
    return max(max_rel_err(a, b) for a, b in zip(ours, refs))


def test_parity_tiny():
    net = randomize_(cn.ControlNet(model.tiny().unet), 0).eval()
    assert residuals_match(net, reference(net), 64, 64, scale=0.7) <= TOL


@pytest.mark.slow
def test_parity_sd15():
    net = randomize_(cn.ControlNet(model.sd15().unet), 0).eval()
    assert residuals_match(net, reference(net), 256, 768, batch=1) <= TOL


def test_from_unet_copies_encoder_and_starts_as_noop():
    u = randomize_(unet.UNet(model.tiny().unet), 3)
    net = cn.ControlNet.from_unet(u)
    ours = net.state_dict()
    for k, v in u.state_dict().items():
        if k.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(ours[k], v), k
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64)
    res = net(x, 5, ctx, torch.rand(1, 3, 64, 64))
    assert all(r.abs().max() == 0 for r in res)  # zero convs: a new ControlNet changes nothing
    torch.testing.assert_close(u(x, 5, ctx, control=res), u(x, 5, ctx), rtol=0, atol=0)


@pytest.mark.parametrize("prefix,suffix", [("control_model.", ".pth"), ("", ".pth"), ("control_model.", ".safetensors")])
def test_loads_lllyasviel_layout(tmp_path, prefix, suffix):
    net = randomize_(cn.ControlNet(model.tiny().unet), 4)
    tensors = {prefix + k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"control_v11f1p_sd15_depth{suffix}"
    if suffix == ".pth":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file
        save_file(tensors, str(path))  # no metadata: the architecture comes from the shapes
    loaded = cn.load_controlnet(path, unet_cfg=model.tiny().unet)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_refuses_misfit_and_wrong_files(tmp_path):
    net = cn.ControlNet(model.tiny().unet)
    path = tmp_path / "cn.safetensors"
    cn.save_controlnet(net, path)
    other = model.tiny().unet
    other.context_dim = 32
    with pytest.raises(model.CheckpointError, match="does not fit the UNet"):
        cn.load_controlnet(path, unet_cfg=other)
    sd = model.StableDiffusion(model.tiny())
    model.save_sd(sd, str(tmp_path / "sd.safetensors"))
    with pytest.raises(model.CheckpointError, match="full Stable Diffusion"):
        cn.load_controlnet(tmp_path / "sd.safetensors")


def test_export_round_trip(tmp_path):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    net = randomize_(cn.ControlNet(model.tiny().unet), 6).eval()
    cn.export_diffusers(net, tmp_path / "folder")
    ref = ControlNetModel.from_pretrained(tmp_path / "folder").eval()
    assert residuals_match(net, ref, 64, 64) <= TOL
    # our own loader reads the folder back
    back = cn.load_controlnet(tmp_path / "folder")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    # the original-layout export, through diffusers' own converter
    cn.save_controlnet(net, tmp_path / "cn.safetensors")
    from safetensors.torch import load_file
    c = cn.controlnet_config_to_diffusers(net)
    c.pop("_class_name")
    converted = convert_controlnet_checkpoint(load_file(tmp_path / "cn.safetensors"), c)
    ref2 = ControlNetModel(**c)
    ref2.load_state_dict(converted, strict=True)
    assert residuals_match(net, ref2.eval(), 64, 64) <= TOL


def test_guided_eps_shares_the_hint():
    cfg = model.tiny().unet
    u = randomize_(unet.UNet(cfg), 1).eval()
    net = randomize_(cn.ControlNet(cfg), 2).eval()
    x, hint = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    ctx = torch.randn(4, 7, 64)
    t = torch.tensor([500] * 4)
    eps = cn.guided_eps(u, net, x, t, ctx, hint, guidance=7.5)
    with torch.no_grad():  # the plain way: the hint repeated for both halves
        x2 = torch.cat([x, x])
        e = u(x2, t, ctx, control=net(x2, t, ctx, torch.cat([hint, hint])))
    un, co = e.chunk(2)
    torch.testing.assert_close(eps, un + 7.5 * (co - un), rtol=1e-5, atol=1e-5)
