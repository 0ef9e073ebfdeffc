"""ControlNet for Stable Diffusion 1.x (Zhang et al. 2023, arXiv 2302.05543), in plain PyTorch.

A trainable copy of the UNet's encoder and middle block reads the noisy latent plus an encoded
control image (the "hint": depth, edges, line art) and hands 12 + 1 residuals to the frozen UNet,
one per skip connection and one for the middle block. Every residual leaves through a 1x1 "zero
convolution", initialised to zero, so a new ControlNet starts as an exact no-op and training grows
the control in from there (sec. 3.1).

The blocks are unet.py's own; attribute names mirror lllyasviel's ControlNet v1.1 files
(`input_hint_block.*`, `input_blocks.*`, `zero_convs.*`, `middle_block.*`, `middle_block_out.*`, with
or without the `control_model.` prefix), so those load with a plain load_state_dict; diffusers
ControlNetModel folders go through `controlnet_key_map`. Both layouts can be written back out.
`guided_eps` is one classifier-free-guided prediction of ControlNet + UNet, the sampler's inner step.
"""
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from unet import (Conv2d, UNetConfig, add_rows, as_timesteps, encoder_key_map, make_block, meta_state_dict_keys,
                  run_block, timestep_embedding, unet_config_from_diffusers, unet_config_from_state_dict,
                  unet_config_to_diffusers, unet_layout)

HINT_BLOCK_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # ControlNet v1.x hint encoder widths
ROOTS = ("time_embed.", "input_hint_block.", "input_blocks.", "zero_convs.", "middle_block.", "middle_block_out.")
PREFIX = "control_model."  # how lllyasviel's files name the ControlNet inside the full model


def zero_conv(ch):
    return nn.Sequential(Conv2d(ch, ch, 1))  # a Sequential so the key is `zero_convs.N.0.weight`


class ControlNet(nn.Module):
    def __init__(self, cfg: UNetConfig, hint_channels=3, hint_block_channels=HINT_BLOCK_CHANNELS):
        super().__init__()
        self.config, self.hint_channels, self.hint_block_channels = cfg, hint_channels, tuple(hint_block_channels)
        mc, ed = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ed), nn.SiLU(), nn.Linear(ed, ed))
        # hint encoder: 3x3 convs with SiLU, stride 2 at every second one (512 px -> 64 for
        # SD1.5's three steps), then a zero conv to the UNet's width
        layers, c = [], hint_channels
        for i, nxt in enumerate(self.hint_block_channels):
            layers += [Conv2d(c, nxt, 3, padding=1, stride=2 if i % 2 == 0 and i > 0 else 1), nn.SiLU()]
            c = nxt
        layers.append(Conv2d(c, mc, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)
        inputs, middle, _ = unet_layout(cfg)
        self.input_blocks = nn.ModuleList([make_block(b, cfg) for b in inputs])
        self.zero_convs = nn.ModuleList([zero_conv(b[-1][-1]) for b in inputs])  # each block's output width
        self.middle_block = make_block(middle, cfg)
        self.middle_block_out = zero_conv(middle[-1][2])
        self.grad_checkpointing = False
        # The hint encoder is new (not copied from the UNet). PyTorch's default conv init shrinks the signal
        # at every layer, and after 7 convs the encoded hint hardly depends on the control at all: a new
        # ControlNet then learns to ignore its control for thousands of steps. He init (He et al. 2015)
        # keeps the control's variation alive up to the zero conv.
        for conv in self.input_hint_block[:-1]:
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        for conv in [self.input_hint_block[-1], *[z[0] for z in self.zero_convs], self.middle_block_out[0]]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_unet(cls, unet, hint_channels=3, hint_block_channels=HINT_BLOCK_CHANNELS):
        """A new ControlNet: the encoder and middle block copied from the UNet, zero convs at zero."""
        p = next(unet.parameters())
        net = cls(unet.config, hint_channels, hint_block_channels).to(device=p.device, dtype=p.dtype)
        copied = {k: v for k, v in unet.state_dict().items() if k.startswith(("time_embed.", "input_blocks.",
                                                                               "middle_block."))}
        missing, unexpected = net.load_state_dict(copied, strict=False)
        assert not unexpected and all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))
                                      for k in missing), (missing, unexpected)
        return net

    def encode_hint(self, hint, checkpoint=False):
        # NHWC: these few-channel convs on image-sized maps run ~1.4x faster that way on CPU
        hint = hint.contiguous(memory_format=torch.channels_last)
        if checkpoint:  # its image-sized activations are the largest of the ControlNet
            return torch.utils.checkpoint.checkpoint(self.input_hint_block, hint, use_reentrant=False)
        return self.input_hint_block(hint)

    def forward(self, x, t, context, hint, scale=1.0):
        """13 residuals for the UNet: one per skip connection (12 for SD1.5), then the middle block's.

        x (B, C, h, w) noisy latents; hint (B or 1, hint_channels, 8h, 8w), the control image in [0, 1].
        context may hold several prompts per latent, as in UNet.forward (the rows grow at the first
        cross-attention; the first residuals then have B rows, and the UNet repeats them to match).
        """
        emb = self.time_embed(timestep_embedding(as_timesteps(t, x.shape[0], x.device), self.config.model_channels)
                              .to(self.time_embed[0].weight.dtype))
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        h, outs = x, []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = run_block(block, h, emb, context, checkpoint=ckpt)
            if i == 0:  # the encoded hint joins right after conv_in (sec. 3.2)
                h = add_rows(h, self.encode_hint(hint, ckpt))
            outs.append(zero(h))
        h = run_block(self.middle_block, h, emb, context, checkpoint=ckpt)
        outs.append(self.middle_block_out(h))
        return outs if scale == 1.0 else [o * scale for o in outs]


@torch.no_grad()
def guided_eps(unet, controlnet, x, t, context, hint, guidance, control_scale=1.0):
    """One classifier-free-guided noise prediction (Ho & Salimans 2022, eq. 6): eps_u + w (eps_c - eps_u).

    x (B, C, h, w) latents; t a timestep (number or 0-d tensor) or (B,); context [uncond; cond] (2B rows);
    hint (B or 1 rows). Both halves go through the ControlNet and the UNet as one batch. They share
    the latents, the timestep and the hint, so the hint encoder, the time embedding and everything
    before the first cross-attention run once per latent, not once per half (see UNet.forward).
    """
    control = controlnet(x, t, context, hint, scale=control_scale) if controlnet is not None else None
    eps_uncond, eps_cond = unet(x, t, context, control=control).chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


# -----------------------------------------------------------------------------
# names, configs, files

def controlnet_key_map(cfg: UNetConfig, hint_block_channels=HINT_BLOCK_CHANNELS):
    """ours (LDM name) -> diffusers ControlNetModel name, for every state_dict key."""
    names = meta_state_dict_keys(ControlNet, cfg, 3, hint_block_channels)
    out = encoder_key_map(cfg, names)
    last = len(hint_block_channels)  # index of the zero conv among the hint encoder's convs
    for k in names:
        parts = k.split(".")
        if parts[0] == "input_hint_block":
            j = int(parts[1]) // 2
            new = "conv_in" if j == 0 else ("conv_out" if j == last else f"blocks.{j - 1}")
            out[k] = f"controlnet_cond_embedding.{new}.{parts[2]}"
        elif parts[0] == "zero_convs":
            out[k] = f"controlnet_down_blocks.{parts[1]}.{parts[3]}"
        elif parts[0] == "middle_block_out":
            out[k] = f"controlnet_mid_block.{parts[2]}"
    assert len(out) == len(names) and len(set(out.values())) == len(out)
    return out


def config_from_state_dict(sd):
    """(UNetConfig, hint_channels, hint_block_channels) from LDM-layout ControlNet tensor shapes."""
    probe = dict(sd)
    probe.setdefault("out.2.weight", torch.empty(4, 1, 1, 1))  # a ControlNet has no output conv
    cfg = unet_config_from_state_dict(probe)
    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    widths = tuple(sd[f"input_hint_block.{j}.weight"].shape[0] for j in convs[:-1])
    return cfg, sd["input_hint_block.0.weight"].shape[1], widths


def check_fits(cfg, unet_cfg, path):
    """A ControlNet's residuals must match the UNet's skips one for one."""
    from model import CheckpointError
    keys = ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "context_dim", "in_channels")
    bad = [f"{k} {getattr(cfg, k)} vs {getattr(unet_cfg, k)}" for k in keys if getattr(cfg, k) != getattr(unet_cfg, k)]
    if bad:
        raise CheckpointError(f"{path}: this ControlNet does not fit the UNet (ControlNet vs UNet: {'; '.join(bad)}); "
                              "use a ControlNet made for this base model")


def read_diffusers_folder(path):
    """(state dict in our names, UNetConfig, hint_channels, hint_block_channels) of a ControlNetModel folder."""
    from model import CheckpointError, _first, load_state_dict
    weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
               if (path / n).exists()]
    if not (path / "config.json").exists() or not weights:
        raise CheckpointError(f"{path}: not a diffusers ControlNetModel folder (needs config.json and "
                              "diffusion_pytorch_model.safetensors)")
    c = json.loads((path / "config.json").read_text())
    if c.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{path}: holds a {c['_class_name']}, expected a ControlNetModel")
    if c.get("global_pool_conditions"):
        raise CheckpointError(f"{path}: global_pool_conditions (the shuffle ControlNet) is not supported")
    try:
        cfg = unet_config_from_diffusers(c)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    hint_channels = c.get("conditioning_channels", 3)
    widths = c.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    hint_block_channels = tuple(w for w in widths for _ in (0, 1))[:-1]  # (16, 32) -> (16, 16, 32)
    inverse = {v: k for k, v in controlnet_key_map(cfg, hint_block_channels).items()}
    raw = load_state_dict(weights[0])
    unknown = [k for k in raw if k not in inverse]
    if unknown:
        raise CheckpointError(f"{weights[0]}: {len(unknown)} unexpected keys for a ControlNetModel: {_first(unknown)}")
    state = {inverse[k]: v for k, v in raw.items()}
    if c.get("controlnet_conditioning_channel_order", "rgb") == "bgr":  # same net, fed RGB: flip the first conv
        state["input_hint_block.0.weight"] = state["input_hint_block.0.weight"].flip(1)
    return state, cfg, hint_channels, hint_block_channels


def read_original_file(path):
    """(state dict, UNetConfig, hint_channels, hint_block_channels) of an lllyasviel-layout file.

    lllyasviel's v1.1 .pth files hold the ControlNet under `control_model.`; re-packs often drop the
    prefix; v1.0 files hold the whole model (`model.diffusion_model.` etc.) beside `control_model.`.
    Everything outside the ControlNet is left out.
    """
    from model import CheckpointError, _first, _safetensors_metadata, load_state_dict
    raw = load_state_dict(path)
    if any(k.startswith(PREFIX) for k in raw):
        state = {k[len(PREFIX):]: v for k, v in raw.items() if k.startswith(PREFIX)}
    elif any(k.startswith("model.diffusion_model.") for k in raw):
        raise CheckpointError(f"{path}: looks like a full Stable Diffusion checkpoint (model.diffusion_model.* "
                              "keys), expected a ControlNet (control_model.* or input_hint_block.* keys)")
    else:
        state = {k: v for k, v in raw.items() if k.startswith(ROOTS)}
    if "input_hint_block.0.weight" not in state:
        hint = " (a diffusers ControlNetModel file: pass its folder)" if "controlnet_cond_embedding.conv_in.weight" \
            in raw else ""
        raise CheckpointError(f"{path}: not a ControlNet{hint}: no input_hint_block.* or control_model.* keys; "
                              f"found e.g. {_first(raw)}")
    if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state.items()):
        raise CheckpointError(f"{path}: linear proj_in (an SD2.x ControlNet); this code implements SD1.x")
    meta = _safetensors_metadata(path)
    if "controlnet_config" in meta:  # one of ours: head count and norm groups leave no trace in the shapes
        c = json.loads(meta["controlnet_config"])
        cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c["unet"].items()})
        return state, cfg, c["hint_channels"], tuple(c["hint_block_channels"])
    return (state, *config_from_state_dict(state))


def load_controlnet(path, unet_cfg=None, dtype=torch.float32, device="cpu"):
    """A ControlNet from an lllyasviel v1.x file (.pth/.ckpt/.safetensors, with or without the
    `control_model.` prefix), one of ours, or a diffusers ControlNetModel folder.

    The architecture comes from the file; given the UNet's config, a ControlNet that does not fit it
    is refused, and the head count and norm groups (not visible in the shapes) are taken from it.
    """
    from model import CheckpointError, _first
    path = Path(path)
    reader = read_diffusers_folder if path.is_dir() else read_original_file
    state, cfg, hint_channels, hint_block_channels = reader(path)
    if unet_cfg is not None:
        check_fits(cfg, unet_cfg, path)
        cfg = UNetConfig(**{**asdict(cfg), "num_heads": unet_cfg.num_heads, "norm_groups": unet_cfg.norm_groups})
    with torch.device("meta"):
        net = ControlNet(cfg, hint_channels, hint_block_channels)
    expected = net.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}: does not match a ControlNet of its own shapes: {len(missing)} missing "
                              f"({_first(missing)}), {len(unexpected)} unexpected ({_first(unexpected)}), "
                              f"{len(shapes)} of another shape ({_first(shapes)})")
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return net


def save_controlnet(net, path, prefix=PREFIX):
    """The original (lllyasviel) layout as .safetensors, which A1111 and ComfyUI load; our config
    travels in the metadata (head count and norm groups leave no trace in the shapes)."""
    tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "pt", "controlnet_config": json.dumps(
        {"unet": asdict(net.config), "hint_channels": net.hint_channels,
         "hint_block_channels": list(net.hint_block_channels)})}
    save_file(tensors, str(path), metadata=meta)


def controlnet_config_to_diffusers(net):
    """kwargs for diffusers' ControlNetModel (also what its config.json holds, with _class_name)."""
    hb = net.hint_block_channels
    if len(hb) % 2 == 0 or any(hb[i] != hb[i + 1] for i in range(0, len(hb) - 1, 2)):
        raise ValueError(f"hint encoder widths {hb} have no diffusers equivalent (it needs pairs: a, a, b, b, ..., z)")
    c = unet_config_to_diffusers(net.config)
    for k in ("out_channels", "up_block_types", "sample_size", "center_input_sample"):  # UNet-only fields
        c.pop(k, None)
    c.update(conditioning_channels=net.hint_channels, conditioning_embedding_out_channels=list(hb[0::2]),
             controlnet_conditioning_channel_order="rgb", global_pool_conditions=False)
    return c


def export_diffusers(net, folder):
    """A diffusers ControlNetModel folder: config.json + diffusion_pytorch_model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "ControlNetModel", **controlnet_config_to_diffusers(net)}, f, indent=2)
    names = controlnet_key_map(net.config, net.hint_block_channels)
    tensors = {names[k]: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
