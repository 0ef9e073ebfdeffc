"""Files as InnerControl released them: its probes ("align models", a torch pickle in Readout Guidance's format) and
its ControlNets (diffusers folders, in either of save_pretrained's layouts), read by formats.py as they are."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import formats
import model
import train
from formats import CheckpointError
from probe import ProbeConfig
from test_train import base_argv, make_world, read_log
from unet import DecoderFeatures, UNetConfig
from util import max_rel_err, randomize_

# The probe of the tiny test UNet (model.tiny()), as upstream's training config would describe it: the decoder's
# attention widths in forward order, the time embedding width (4 x 32), a small projection and norm groups that
# divide it (upstream's GroupNorm needs that; SD1.5's files have projection_dim 384 and 32 groups).
TINY_DIMS = [128, 128, 128, 64, 64, 64, 32, 32, 32]
TINY_TIME = 128
PROJ = 64
GROUPS = 8


# -- upstream's probe format, written the way its trainer writes it ----------------------------------------------

def upstream_state(dims, time_dim, proj, sequential, out_channels=3, seed=0):
    """Random weights under upstream's names (AggregationNetwork.state_dict()), listed here by hand."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) / math.sqrt(math.prod(shape[1:]))  # noqa: E731
    norm = lambda prefix, c: {f"{prefix}.norm.weight": 1 + 0.1 * torch.randn(c, generator=g),  # noqa: E731
                              f"{prefix}.norm.bias": 0.1 * torch.randn(c, generator=g)}
    mid = proj // 4
    sd = {}
    for i, c in enumerate(dims):
        p = f"bottleneck_layers.{i}.0" if sequential else f"bottleneck_layers.{i}"
        if c != proj:
            sd[f"{p}.shortcut.weight"] = rand(proj, c, 1, 1)
            sd.update(norm(f"{p}.shortcut", proj))
        sd[f"{p}.conv1.weight"] = rand(mid, c, 1, 1)
        sd.update(norm(f"{p}.conv1", mid))
        sd[f"{p}.conv2.weight"] = rand(mid, mid, 3, 3)
        sd.update(norm(f"{p}.conv2", mid))
        sd[f"{p}.conv3.weight"] = rand(proj, mid, 1, 1)
        sd.update(norm(f"{p}.conv3", proj))
        sd[f"{p}.emb_layers.weight"] = rand(mid, time_dim)
        sd[f"{p}.emb_layers.bias"] = 0.1 * torch.randn(mid, generator=g)
    sd["mixing_weights"] = torch.randn(len(dims), generator=g)  # far from the all-ones start: the softmax matters
    for j, (cin, cout, k) in zip((0, 2, 4), ((proj, 128, 3), (128, 32, 3), (32, out_channels, 1))):
        sd[f"output_head.{j}.weight"] = rand(cout, cin, k, k)
        sd[f"output_head.{j}.bias"] = 0.1 * torch.randn(cout, generator=g)
    return sd


def upstream_config(dims, proj, sequential, groups=GROUPS):
    """Readout Guidance's training config as its trainer saves it (InnerControl's loader reads the same fields)."""
    return {"model_id": "runwayml/stable-diffusion-v1-5", "diffusion_mode": "generation", "num_timesteps": 1000,
            "save_timestep": [0], "prompt": "", "negative_prompt": "", "guidance_scale": -1,
            "projection_dim": proj,
            "aggregation_kwargs": {"use_output_head": True, "output_head_channels": 3,
                                   "bottleneck_sequential": sequential, "num_norm_groups": groups},
            "weight_decay": 0, "max_steps": 5000, "lr": 1e-3, "batch_size": 8, "dims": list(dims),
            "dataset_args": {"control_type": "depth", "control_range": [-1, 1], "sparse_loss": False}}


def write_upstream_probe(path, sequential, seed=0, state=None, config=None):
    state = upstream_state(TINY_DIMS, TINY_TIME, PROJ, sequential, seed=seed) if state is None else state
    config = upstream_config(TINY_DIMS, PROJ, sequential) if config is None else config
    optimizer = {"state": {0: {"step": torch.tensor(5000.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-3, "weight_decay": 0, "params": [0]}]}
    torch.save({"step": 5000, "config": config, "aggregation_network": state, "optimizer_state_dict": optimizer},
               str(path))
    return state


def upstream_forward(sd, config, maps, emb):
    """Upstream's semantics on the raw state dict: every map resized (bilinear) to the latent size and concatenated,
    then cut back per layer; each block conv-GN-ReLU (+ ReLU(Linear(emb)) unless bottleneck_sequential), conv-GN-ReLU,
    conv-GN, + shortcut, ReLU; softmax-weighted sum; head conv3x3-SiLU-conv3x3-SiLU-conv1x1, tanh."""
    kw = config["aggregation_kwargs"]
    groups, sequential = kw["num_norm_groups"], kw["bottleneck_sequential"]
    size = maps[-1].shape[-2:]  # the last (largest) decoder map is at the latent resolution
    x = torch.cat([F.interpolate(m, size=size, mode="bilinear") for m in maps], dim=1)
    w = torch.softmax(sd["mixing_weights"], dim=0)
    out, start = 0, 0
    for i, c in enumerate(config["dims"]):
        feats, start = x[:, start:start + c], start + c
        p = f"bottleneck_layers.{i}.0." if sequential else f"bottleneck_layers.{i}."

        def conv_gn(name, h, pad=0):
            h = F.conv2d(h, sd[p + name + ".weight"], padding=pad)
            return F.group_norm(h, groups, sd[p + name + ".norm.weight"], sd[p + name + ".norm.bias"])
        h = F.relu(conv_gn("conv1", feats))
        if not sequential:
            h = h + F.relu(F.linear(emb, sd[p + "emb_layers.weight"], sd[p + "emb_layers.bias"]))[:, :, None, None]
        h = F.relu(conv_gn("conv2", h, pad=1))
        h = conv_gn("conv3", h)
        skip = conv_gn("shortcut", feats) if p + "shortcut.weight" in sd else feats
        out = out + w[i] * F.relu(h + skip)
    h = F.silu(F.conv2d(out, sd["output_head.0.weight"], sd["output_head.0.bias"], padding=1))
    h = F.silu(F.conv2d(h, sd["output_head.2.weight"], sd["output_head.2.bias"], padding=1))
    return torch.tanh(F.conv2d(h, sd["output_head.4.weight"], sd["output_head.4.bias"]))


def tiny_features(seed=1, batch=2, latent=8):
    """Decoder attention maps of the tiny UNet at its three attention levels (latent / 4, / 2, / 1)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [latent // 4] * 3 + [latent // 2] * 3 + [latent] * 3
    maps = [torch.randn(batch, c, s, s, generator=g) for c, s in zip(TINY_DIMS, sizes)]
    return maps, torch.randn(batch, TINY_TIME, generator=g)


@pytest.mark.parametrize("sequential", [True, False])
def test_upstream_probe_file_loads_strictly_and_matches_upstream_semantics(tmp_path, sequential):
    path = tmp_path / "depth.pt"
    sd = write_upstream_probe(path, sequential)
    probe = formats.load_probe(path).eval()
    assert probe.cfg == ProbeConfig(feature_channels=tuple(TINY_DIMS), time_dim=TINY_TIME, bottleneck_dim=PROJ // 4,
                                    proj_dim=PROJ, out_channels=3, norm_groups=GROUPS, time_in_blocks=not sequential)
    # every tensor of the file is in the probe, once (strict both ways)
    ours = probe.state_dict()
    assert len(ours) == len(sd)
    assert sorted(round(v.double().sum().item(), 6) for v in ours.values()) == \
        sorted(round(v.double().sum().item(), 6) for v in sd.values())
    maps, emb = tiny_features()
    config = upstream_config(TINY_DIMS, PROJ, sequential)
    with torch.no_grad():
        got = probe(DecoderFeatures(emb, maps))
        want = upstream_forward(sd, config, maps, emb)
        other_t = probe(DecoderFeatures(torch.randn_like(emb), maps))
    err = (got - want).abs().max().item()
    print(f"upstream probe (bottleneck_sequential={sequential}): max abs diff {err:.2e}")
    assert got.shape == (2, 3, 8, 8) and want.std() > 1e-2 and err <= 1e-5
    # the sequential wrapping calls the blocks without the timestep; the plain list feeds it to every block
    assert torch.equal(other_t, got) == sequential

    # exported to our safetensors (the flag in the metadata) and read back identically
    formats.save_probe(probe, tmp_path / "probe.safetensors")
    back = formats.load_probe(tmp_path / "probe.safetensors")
    assert back.cfg == probe.cfg
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.items())
    with torch.no_grad():
        assert torch.equal(back.eval()(DecoderFeatures(emb, maps)), got)


def test_upstream_probe_mismatches_are_named_in_one_line(tmp_path):
    def refused(state=None, config=None, sequential=True):
        write_upstream_probe(tmp_path / "p.pt", sequential, state=state, config=config)
        with pytest.raises(CheckpointError) as e:
            formats.load_probe(tmp_path / "p.pt")
        assert "\n" not in str(e.value), str(e.value)
        return str(e.value)

    sd = upstream_state(TINY_DIMS, TINY_TIME, PROJ, True)
    del sd["bottleneck_layers.4.0.conv2.norm.bias"]
    assert "1 missing keys: bottleneck_layers.4.0.conv2.norm.bias" in refused(sd)
    sd = upstream_state(TINY_DIMS, TINY_TIME, PROJ, True)
    sd["bottleneck_layers.0.0.extra.weight"] = torch.zeros(1)
    assert "1 unexpected keys: bottleneck_layers.0.0.extra.weight" in refused(sd)
    # the config says bottleneck_sequential, the keys have no `.0.` level: upstream's strict load fails too
    msg = refused(upstream_state(TINY_DIMS, TINY_TIME, PROJ, False), upstream_config(TINY_DIMS, PROJ, True))
    assert "missing keys: bottleneck_layers.0.0." in msg and "unexpected keys: bottleneck_layers.0." in msg
    # dims that do not fit the weights
    msg = refused(config=upstream_config(TINY_DIMS[:3] + [128] + TINY_DIMS[4:], PROJ, True))
    assert "shape mismatches" in msg and "bottleneck_layers.3.0.conv1.weight (16, 64, 1, 1) vs (16, 128, 1, 1)" in msg
    assert "missing keys: bottleneck_layers.3.0.shortcut.norm.bias" in msg
    for change, words in (({"save_timestep": [0, 10]}, "2 timesteps"),
                          ({"aggregation_kwargs": {"use_output_head": False}}, "no output head"),
                          ({"aggregation_kwargs": {"use_output_head": True, "output_head_act": False}}, "tanh"),
                          ({"aggregation_kwargs": {"use_output_head": True, "emb_size": 3}}, "emb_size")):
        assert words in refused(config={**upstream_config(TINY_DIMS, PROJ, True), **change})
    torch.save({"weights": torch.zeros(2)}, str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not a probe file"):
        formats.load_probe(tmp_path / "other.pt")


class NotATensor:
    pass


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickles_with_objects_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "the_pickle_ran"
    cases = {"object.pt": {"config": {"projection_dim": NotATensor()}, "aggregation_network": {}},
             "code.pt": {"config": {}, "aggregation_network": {"x": RunsCode(str(marker))}}}
    for name, obj in cases.items():
        torch.save(obj, str(tmp_path / name))
        with pytest.raises(CheckpointError, match="refused to load") as e:
            formats.load_probe(tmp_path / name)
        assert "\n" not in str(e.value)
        assert ("NotATensor" in str(e.value)) if name == "object.pt" else ("mkdir" in str(e.value))
    assert not marker.exists()


def test_upstream_probe_trains_innercontrol(tmp_path):
    """train.py --method innercontrol --probe <upstream .pt>: two steps on the tiny model, with an alignment loss."""
    world = tmp_path / "world"
    world.mkdir()
    make_world(world)
    write_upstream_probe(world / "depth.pt", sequential=True, seed=3)
    argv = base_argv(world, tmp_path / "out", "--method", "innercontrol", "--max-steps", "2",
                     "--probe", str(world / "depth.pt"))
    assert train.build_models(train.parse_args(argv)).probe.cfg.time_in_blocks is False
    train.main(argv)
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss_align"]) for r in log) and any(r["loss_align"] > 0 for r in log), log


# -- InnerControl's ControlNets: diffusers folders -------------------------------------------------------------

TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=64)


@pytest.mark.parametrize("safe", [True, False])
def test_diffusers_controlnet_folder_both_layouts(tmp_path, safe, monkeypatch):
    from diffusers import ControlNetModel
    ref = ControlNetModel(
        in_channels=4, conditioning_channels=3, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=32, conditioning_embedding_out_channels=(16, 32, 96, 256))
    randomize_(ref, seed=5).eval()
    ref.save_pretrained(tmp_path / "cn", safe_serialization=safe)
    weights = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    assert sorted(os.listdir(tmp_path / "cn")) == sorted(["config.json", weights])

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    net = formats.load_controlnet(tmp_path / "cn", unet_cfg=model.tiny().unet).eval()
    assert loads == ([] if safe else [True])  # the .bin goes through the restricted unpickler only
    assert net.config == TINY_UNET
    theirs = ref.state_dict()
    names = formats.controlnet_key_map(net.config, net.hint_block_channels)
    assert all(torch.equal(v, theirs[names[k]]) for k, v in net.state_dict().items())

    g = torch.Generator().manual_seed(2)
    x, ctx, hint = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g), torch.rand(2, 3, 64, 64)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = net(x, t, ctx, hint)
        down, mid = ref(x, t, ctx, hint, conditioning_scale=1.0, return_dict=False)
    theirs = list(down) + [mid]
    assert len(ours) == len(theirs) == 13
    abs_err = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    rel_err = max(max_rel_err(a, b) for a, b in zip(ours, theirs))
    print(f"diffusers ControlNet ({weights}): max abs diff {abs_err:.2e}, max rel {rel_err:.2e}")
    assert min(b.abs().max().item() for b in theirs) > 1e-3 and rel_err <= 1e-5
