"""UNet: parity with diffusers' UNet2DConditionModel (same random weights), at any latent size; decoder features."""
import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

import formats
import fused
import unet as U
from util import max_rel_err, randomize_

TINY = U.UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=64)
ODD = U.UNetConfig(in_channels=5, out_channels=3, model_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1,
                   attention_levels=(1, 2), num_heads=4, context_dim=48, norm_groups=16)


def reference(ours, cfg):
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel(**formats.unet_config_to_diffusers(cfg)).eval()
    km = formats.unet_key_map(cfg)
    ref.load_state_dict({km[k]: v for k, v in ours.state_dict().items()}, strict=True)
    return ref


def inputs(cfg, size, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    t = torch.tensor([7, 913][:batch])
    return x, t, ctx


def random_control(ours, x, t, ctx, seed=1):
    """13 residuals shaped like the skip connections and the middle output, by running the encoder."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    h, emb = x, ours.time_embedding(t, x.shape[0])
    for block in ours.input_blocks:
        h, _ = block(h, emb, ctx)
        shapes.append(h.shape)
    shapes.append(ours.middle_block(h, emb, ctx)[0].shape)
    return [torch.randn(s, generator=g) for s in shapes]


def check_parity(cfg, size, control, fast=False):
    ours = randomize_(U.UNet(cfg)).eval()
    ref = reference(ours, cfg)
    if fast:  # the layers fused.py swaps in (GEMM convs, upsample phases, token transformers) at the real widths
        fused.install(ours)
    x, t, ctx = inputs(cfg, size)
    with torch.no_grad():
        res = random_control(ours, x, t, ctx) if control else None
        eps = ours(x, t, ctx, control=res)
        kw = dict(down_block_additional_residuals=tuple(res[:-1]), mid_block_additional_residual=res[-1]) if control else {}
        want = ref(x, t, ctx, **kw).sample
    err = max_rel_err(eps, want)
    print(f"unet parity {cfg.model_channels}ch control={control}: {err:.2e}")
    assert eps.shape == want.shape
    assert err <= 1e-4
    return err


def test_key_map_is_one_to_one():
    from diffusers import UNet2DConditionModel
    km = formats.unet_key_map(TINY)
    ours = U.UNet(TINY).state_dict()
    theirs = UNet2DConditionModel(**formats.unet_config_to_diffusers(TINY)).state_dict()
    assert set(km) == set(ours)
    assert set(km.values()) == set(theirs)
    assert len(set(km.values())) == len(km)
    for k, v in km.items():
        assert ours[k].shape == theirs[v].shape, k


@pytest.mark.parametrize("control", [False, True])
def test_parity_tiny(control):
    check_parity(TINY, 16, control)


def test_parity_other_layout():
    # another SD1.x-family shape: 3 levels, 1 ResBlock per level, attention on levels 1-2 only, 4 heads
    check_parity(ODD, 16, control=True)


@pytest.mark.parametrize("cfg,size", [(TINY, (9, 11)), (TINY, (5, 6)), (ODD, (7, 10))])
def test_parity_at_sizes_the_downsampling_does_not_divide(cfg, size):
    # latent sides that are no multiple of 2^levels (image sides a multiple of 8 but not of 64 in SD1.5): the
    # decoder's upsamplings land on the skips' sizes, as diffusers' do
    check_parity(cfg, size, control=True)


@pytest.mark.slow
@pytest.mark.parametrize("control", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_parity_sd15(control, fast):
    check_parity(U.UNetConfig(), 64, control, fast)


def test_state_dict_uses_checkpoint_names():
    sd = randomize_(U.UNet(TINY)).state_dict()
    attn1 = "input_blocks.1.1.transformer_blocks.0.attn1."
    assert {attn1 + f"to_{n}.weight" for n in "qkv"} <= set(sd)
    assert {"out.2.weight", "input_blocks.1.0.out_layers.3.weight", "output_blocks.2.1.conv.weight"} <= set(sd)
    again = U.UNet(TINY)  # through safetensors and back, bit for bit
    again.load_state_dict(st_load(st_save(sd)))
    assert all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())


def test_configs_round_trip():
    for cfg in (TINY, ODD, U.UNetConfig()):
        assert formats.unet_config_from_diffusers(formats.unet_config_to_diffusers(cfg)) == cfg
        with torch.device("meta"):
            sd = U.UNet(cfg).state_dict()
        got = formats.unet_config_from_state_dict(sd)
        # head count and group count leave no trace in the shapes
        assert got == U.UNetConfig(**{**cfg.__dict__, "num_heads": 8, "norm_groups": 32})


def test_unsupported_diffusers_config_is_refused():
    c = formats.unet_config_to_diffusers(TINY)
    with pytest.raises(formats.CheckpointError, match="use_linear_projection"):
        formats.unet_config_from_diffusers({**c, "use_linear_projection": True})
    with pytest.raises(formats.CheckpointError, match="addition_embed_type"):
        formats.unet_config_from_diffusers({**c, "addition_embed_type": "text_time"})


def test_decoder_features_match_reference_attn1():
    ours = randomize_(U.UNet(TINY)).eval()
    ref = reference(ours, TINY)
    x, t, ctx = inputs(TINY, 16)
    got = []  # the reference's attn1 outputs, recorded with hooks (test-side only)
    hooks = [blk.attentions[i].transformer_blocks[0].attn1.register_forward_hook(lambda m, a, o: got.append(o))
             for blk in ref.up_blocks if hasattr(blk, "attentions") for i in range(len(blk.attentions))]
    with torch.no_grad():
        eps, feats = ours(x, t, ctx, return_features=True)
        plain = ours(x, t, ctx)
        ref(x, t, ctx)
    for h in hooks:
        h.remove()
    assert torch.equal(eps, plain)
    mc = TINY.model_channels
    assert [f.shape[1] for f in feats.maps] == [4 * mc] * 3 + [2 * mc] * 3 + [mc] * 3
    assert [f.shape[-1] for f in feats.maps] == [4] * 3 + [8] * 3 + [16] * 3
    assert all(f.shape[0] == 2 for f in feats.maps)
    assert len(got) == 9
    for f, r in zip(feats.maps, got):
        B, C, h, w = f.shape
        assert max_rel_err(f, r.reshape(B, h, w, C).permute(0, 3, 1, 2)) <= 1e-4
    assert feats.time_emb.shape == (2, TINY.time_embed_dim)
    assert torch.allclose(feats.time_emb, ours.time_embedding(t, 2))


def test_timestep_forms_agree():
    ours = randomize_(U.UNet(TINY)).eval()
    x, _, ctx = inputs(TINY, 16)
    with torch.no_grad():
        a = ours(x, 500, ctx)
        b = ours(x, torch.tensor(500), ctx)
        c = ours(x, torch.tensor([500, 500]), ctx)
        d = ours(x, torch.tensor([7, 500]), ctx)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, d)


def test_channels_last_same_output():
    ours = randomize_(U.UNet(TINY)).eval()
    x, t, ctx = inputs(TINY, 16)
    with torch.no_grad():
        want = ours(x, t, ctx)
        ours = ours.to(memory_format=torch.channels_last)
        got = ours(x.to(memory_format=torch.channels_last), t, ctx)
    assert max_rel_err(got, want) <= 1e-5


def test_bf16_autocast_runs_and_is_close():
    ours = randomize_(U.UNet(TINY)).eval()
    x, t, ctx = inputs(TINY, 16)
    with torch.no_grad():
        want = ours(x, t, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, feats = ours(x, t, ctx, return_features=True)
    assert torch.isfinite(got.float()).all()
    assert max_rel_err(got, want) <= 0.1
    assert (got.float() - want).abs().mean() <= 0.02 * want.abs().mean()


def test_compiles_fullgraph():
    ours = randomize_(U.UNet(TINY)).eval()
    x, t, ctx = inputs(TINY, 16)
    with torch.no_grad():
        res = random_control(ours, x, t, ctx)
        want, want_f = ours(x, t, ctx, control=res, return_features=True)
        compiled = torch.compile(ours, backend="eager", fullgraph=True)
        got, got_f = compiled(x, t, ctx, control=res, return_features=True)
    assert max_rel_err(got, want) <= 1e-5
    assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(got_f.maps, want_f.maps))


def test_gradients_reach_every_projection():
    ours = randomize_(U.UNet(TINY))
    x, t, ctx = inputs(TINY, 16)
    ours(x, t, ctx).square().mean().backward()
    attn = ours.input_blocks[1][1].transformer_blocks[0]
    for p in (attn.attn1.to_q, attn.attn1.to_k, attn.attn1.to_v, attn.attn2.to_k, ours.out[2]):
        assert p.weight.grad is not None and p.weight.grad.abs().sum() > 0
