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
"""
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from unet import (Conv2d, UNetConfig, as_timesteps, encoder_key_map, make_block, meta_state_dict_keys,
                  timestep_embedding, unet_config_from_diffusers, unet_config_from_state_dict,
                  unet_config_to_diffusers, unet_layout)

HINT_CHANNELS = (16, 32, 96, 256)  # the hint encoder's widths (ControlNet v1.x, diffusers' default)
ROOTS = ("time_embed.", "input_hint_block.", "input_blocks.", "zero_convs.", "middle_block.", "middle_block_out.")
PREFIX = "control_model."


def zero_conv(ch):
    return nn.Sequential(Conv2d(ch, ch, 1))  # a Sequential so the key is `zero_convs.N.0.weight`


class ControlNet(nn.Module):
    def __init__(self, cfg: UNetConfig, hint_in=3, hint_channels=HINT_CHANNELS):
        super().__init__()
        self.config, self.hint_in, self.hint_channels = cfg, hint_in, tuple(hint_channels)
        mc, ed = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ed), nn.SiLU(), nn.Linear(ed, ed))
        # hint encoder: the image-sized control down to latent size (three stride-2 steps), SiLU
        # between 3x3 convs, a last (zero) conv to the UNet's width
        layers, c = [Conv2d(hint_in, hint_channels[0], 3, padding=1), nn.SiLU()], hint_channels[0]
        for nxt in hint_channels[1:]:
            layers += [Conv2d(c, c, 3, padding=1), nn.SiLU(), Conv2d(c, nxt, 3, padding=1, stride=2), nn.SiLU()]
            c = nxt
        layers.append(Conv2d(c, mc, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)
        inputs, middle, _ = unet_layout(cfg)
        self.input_blocks = nn.ModuleList([make_block(b, cfg) for b in inputs])
        self.zero_convs = nn.ModuleList([zero_conv(b[-1][-1]) for b in inputs])  # each block's output width
        self.middle_block = make_block(middle, cfg)
        self.middle_block_out = zero_conv(middle[-1][2])
        self.grad_checkpointing = False
        for m in [self.input_hint_block[-1], *self.zero_convs, self.middle_block_out]:
            nn.init.zeros_(m.weight if isinstance(m, nn.Conv2d) else m[0].weight)
            nn.init.zeros_(m.bias if isinstance(m, nn.Conv2d) else m[0].bias)

    @classmethod
    def from_unet(cls, unet, hint_in=3, hint_channels=HINT_CHANNELS):
        """A new ControlNet: the encoder and middle block copied from the UNet, zero convs at zero."""
        net = cls(unet.config, hint_in, hint_channels).to(next(unet.parameters()).device)
        own = unet.state_dict()
        copied = {k: v for k, v in own.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
        missing, unexpected = net.load_state_dict(copied, strict=False)
        assert not unexpected and all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))
                                      for k in missing), (missing, unexpected)
        return net

    def forward(self, x, t, context, hint, scale=1.0):
        """-> 13 residuals: one per UNet skip connection (12 for SD1.5), then the middle block's."""
        emb = self.time_embed(timestep_embedding(as_timesteps(t, x.shape[0], x.device), self.config.model_channels)
                              .to(self.time_embed[0].weight.dtype))
        guided_hint = self.input_hint_block(hint.to(memory_format=torch.channels_last))
        if guided_hint.shape[0] != x.shape[0]:  # hints shared by several copies of the batch (guidance)
            guided_hint = guided_hint.repeat(x.shape[0] // guided_hint.shape[0], 1, 1, 1)
        h = x.to(memory_format=torch.channels_last)
        outs = []
        for i, (block, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if i == 0:
                h = h + guided_hint  # the hint joins right after conv_in (sec. 3.2)
            outs.append(zc(h))
        h = self._run(self.middle_block, h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs if scale == 1.0 else [o * scale for o in outs]

    def _run(self, block, h, emb, context):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)


# -----------------------------------------------------------------------------
# names, configs, files

def controlnet_key_map(cfg: UNetConfig, hint_channels=HINT_CHANNELS):
    """ours (LDM name) -> diffusers ControlNetModel name, for every state_dict key."""
    names = meta_state_dict_keys(ControlNet, cfg, 3, hint_channels)
    out = encoder_key_map(cfg, names)
    n_hint = 2 * len(hint_channels) - 1  # convs before the last one
    for k in names:
        parts = k.split(".")
        if parts[0] == "input_hint_block":
            j = int(parts[1]) // 2
            new = "conv_in" if j == 0 else ("conv_out" if j == n_hint else f"blocks.{j - 1}")
            out[k] = f"controlnet_cond_embedding.{new}.{parts[2]}"
        elif parts[0] == "zero_convs":
            out[k] = f"controlnet_down_blocks.{parts[1]}.{parts[3]}"
        elif parts[0] == "middle_block_out":
            out[k] = f"controlnet_mid_block.{parts[2]}"
    assert len(out) == len(names) and len(set(out.values())) == len(out)
    return out


def config_from_state_dict(sd):
    """(UNetConfig, hint_in, hint_channels) from LDM-layout ControlNet tensor shapes."""
    probe = dict(sd)
    probe.setdefault("out.2.weight", torch.empty(4, 1, 1, 1))  # a ControlNet has no output conv
    cfg = unet_config_from_state_dict(probe)
    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    widths = [sd[f"input_hint_block.{j}.weight"].shape[0] for j in convs[:-1]]
    return cfg, sd["input_hint_block.0.weight"].shape[1], tuple(widths[0::2])


def _check_fits(cfg, unet_cfg, path):
    from model import CheckpointError
    keys = ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "context_dim", "in_channels")
    bad = [f"{k} {getattr(cfg, k)} vs {getattr(unet_cfg, k)}" for k in keys if getattr(cfg, k) != getattr(unet_cfg, k)]
    if bad:
        raise CheckpointError(f"{path}: this ControlNet does not fit the UNet ({'; '.join(bad)}); "
                              "use a ControlNet made for this base model")


def load_controlnet(path, unet_cfg=None, dtype=torch.float32, device="cpu"):
    """A ControlNet from an lllyasviel v1.x file (.pth/.ckpt/.safetensors, with or without the
    `control_model.` prefix), one of ours, or a diffusers ControlNetModel folder."""
    from model import CheckpointError, _first, _safetensors_metadata, load_state_dict
    path = Path(path)
    if path.is_dir():
        cfg_path = path / "config.json"
        weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                   if (path / n).exists()]
        if not cfg_path.exists() or not weights:
            raise CheckpointError(f"{path}: not a diffusers ControlNetModel folder (needs config.json and "
                                  "diffusion_pytorch_model.safetensors)")
        c = json.loads(cfg_path.read_text())
        if c.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{path}: holds a {c['_class_name']}, expected a ControlNetModel")
        cfg = unet_config_from_diffusers(c)
        hint_in = c.get("conditioning_channels", 3)
        hint_channels = tuple(c.get("conditioning_embedding_out_channels", HINT_CHANNELS))
        inverse = {v: k for k, v in controlnet_key_map(cfg, hint_channels).items()}
        raw = load_state_dict(weights[0])
        unknown = [k for k in raw if k not in inverse]
        if unknown:
            raise CheckpointError(f"{weights[0]}: {len(unknown)} unexpected keys for a ControlNetModel: {_first(unknown)}")
        state = {inverse[k]: v for k, v in raw.items()}
    else:
        raw = load_state_dict(path)
        if any(k.startswith("model.diffusion_model.") for k in raw):
            raise CheckpointError(f"{path}: looks like a full Stable Diffusion checkpoint (model.diffusion_model.* "
                                  "keys), expected a ControlNet (control_model.* or input_hint_block.* keys)")
        state = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
        state = {k: v for k, v in state.items() if k.startswith(ROOTS)}
        if "input_hint_block.0.weight" not in state:
            raise CheckpointError(f"{path}: not a ControlNet (no input_hint_block.* or control_model.* keys; "
                                  f"found e.g. {_first(raw)})")
        meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
        if "controlnet_config" in meta:
            c = json.loads(meta["controlnet_config"])
            cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c["unet"].items()})
            hint_in, hint_channels = c["hint_in"], tuple(c["hint_channels"])
        else:
            cfg, hint_in, hint_channels = config_from_state_dict(state)
    if unet_cfg is not None:
        _check_fits(cfg, unet_cfg, path)
        cfg = UNetConfig(**{**asdict(cfg), "num_heads": unet_cfg.num_heads, "norm_groups": unet_cfg.norm_groups})
    with torch.device("meta"):
        net = ControlNet(cfg, hint_in, hint_channels)
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match a ControlNet of its own shapes: {len(missing)} missing "
                              f"({_first(missing)}), {len(unexpected)} unexpected ({_first(unexpected)})")
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return net


def save_controlnet(net, path, prefix=PREFIX):
    """The original (lllyasviel) layout as .safetensors, which A1111 and ComfyUI load; our config
    travels in the metadata (head count and norm groups leave no trace in the shapes)."""
    tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "pt", "controlnet_config": json.dumps(
        {"unet": asdict(net.config), "hint_in": net.hint_in, "hint_channels": list(net.hint_channels)})}
    save_file(tensors, str(path), metadata=meta)


def controlnet_config_to_diffusers(net):
    """kwargs for diffusers' ControlNetModel (also what its config.json holds)."""
    c = unet_config_to_diffusers(net.config)
    for k in ("out_channels", "up_block_types", "sample_size", "center_input_sample"):  # UNet-only fields
        c.pop(k, None)
    c.update(_class_name="ControlNetModel", conditioning_channels=net.hint_in,
             conditioning_embedding_out_channels=list(net.hint_channels), controlnet_conditioning_channel_order="rgb",
             global_pool_conditions=False)
    return c


def export_diffusers(net, folder):
    """A diffusers ControlNetModel folder: config.json + diffusion_pytorch_model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    c = controlnet_config_to_diffusers(net)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    names = controlnet_key_map(net.config, net.hint_channels)
    tensors = {names[k]: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def guided_eps(unet, controlnet, x, t, context, hint, guidance, control_scale=1.0):
    """One classifier-free-guided noise prediction (Ho & Salimans 2022): the unconditional and
    conditional halves in one batched forward of the ControlNet and the UNet. context is
    [uncond; cond] (2B rows); the hint (B rows) is encoded once and shared by both halves."""
    x2 = torch.cat([x, x])
    residuals = controlnet(x2, t, context, hint, scale=control_scale) if controlnet is not None else None
    eps_uncond, eps_cond = unet(x2, t, context, control=residuals).chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)
