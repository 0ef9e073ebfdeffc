"""ControlNet for Stable Diffusion 1.x (Zhang et al. 2023, arXiv 2302.05543), in plain PyTorch.

A trainable copy of the UNet's encoder and middle block reads the noisy latent plus an encoded control
image (the "hint": depth, edges, line art) and hands 12 + 1 residuals to the frozen UNet, one per skip
connection and one for the middle block. Every residual leaves through a 1x1 "zero convolution",
initialised to zero, so a new ControlNet starts as an exact no-op and training grows the control in
from there (sec. 3.1).

The blocks are unet.py's own; attribute names mirror lllyasviel's ControlNet v1.1 files
(`input_hint_block.*`, `input_blocks.*`, `zero_convs.*`, `middle_block.*`, `middle_block_out.*`), so those
load with a plain load_state_dict (formats.py reads them, and diffusers folders, and writes both).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from unet import UNetConfig, make_block, run_block, timestep_embedding, unet_layout

HINT_BLOCK_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # ControlNet v1.x hint encoder widths


def zero_conv(ch):
    return nn.Sequential(nn.Conv2d(ch, ch, 1))  # a Sequential, so the key is `zero_convs.N.0.weight`


class ControlNet(nn.Module):
    def __init__(self, cfg: UNetConfig, hint_channels=3, hint_block_channels=HINT_BLOCK_CHANNELS):
        super().__init__()
        self.config, self.hint_channels, self.hint_block_channels = cfg, hint_channels, tuple(hint_block_channels)
        mc, ed = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ed), nn.SiLU(), nn.Linear(ed, ed))
        # the hint encoder: 3x3 convs with SiLU, stride 2 at every second one (512 px -> 64 in SD1.5's three
        # steps), then a zero conv to the UNet's width
        layers, c = [], hint_channels
        for i, nxt in enumerate(self.hint_block_channels):
            layers += [nn.Conv2d(c, nxt, 3, padding=1, stride=2 if i % 2 == 0 and i > 0 else 1), nn.SiLU()]
            c = nxt
        self.input_hint_block = nn.Sequential(*layers, nn.Conv2d(c, mc, 3, padding=1))
        inputs, middle, _ = unet_layout(cfg)
        self.input_blocks = nn.ModuleList([make_block(b, cfg) for b in inputs])
        self.zero_convs = nn.ModuleList([zero_conv(b[-1][-1]) for b in inputs])  # each block's output width
        self.middle_block = make_block(middle, cfg)
        self.middle_block_out = zero_conv(middle[-1][2])
        self.grad_checkpointing = False
        # The hint encoder is new (not copied from the UNet). PyTorch's default conv init shrinks the signal at
        # every layer, and after 7 convs the encoded hint hardly depends on the control: a new ControlNet then
        # learns to ignore its control for thousands of steps. He init (He et al. 2015) keeps it alive.
        for conv in self.input_hint_block[:-1]:
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        for p in nn.ModuleList([self.input_hint_block[-1], *self.zero_convs, self.middle_block_out]).parameters():
            nn.init.zeros_(p)

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

    def forward(self, x, t, context, hint, scale=1.0):
        """13 residuals for the UNet: one per skip connection (12 for SD1.5), then the middle block's.

        x (B, C, h, w) noisy latents; t a number or (B,); hint (B or 1, hint_channels, 8h, 8w), the control
        image in [0, 1] (one row is shared by the whole batch)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(self.time_embed[0].weight.dtype))
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        h, outs = x, []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h, _ = run_block(block, h, emb, context, grad_checkpointing=ckpt)
            if i == 0:  # the encoded hint joins right after conv_in (sec. 3.2); its image-sized maps are the
                # largest activations of the ControlNet, hence checkpointed too
                h = h + (checkpoint(self.input_hint_block, hint, use_reentrant=False) if ckpt
                         else self.input_hint_block(hint))
            outs.append(zero(h))
        h, _ = run_block(self.middle_block, h, emb, context, grad_checkpointing=ckpt)
        outs.append(self.middle_block_out(h))
        return outs if scale == 1.0 else [o * scale for o in outs]
