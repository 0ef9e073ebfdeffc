"""Stable Diffusion 1.x around the UNet: the CLIP tokenizer and text encoder, the VAE, the noise schedule.

Built from the published architectures, in plain PyTorch:
- CLIP ViT-L/14's text tower (Radford et al. 2021): 12 pre-LayerNorm transformer layers, quick-GELU,
  causal mask, final LayerNorm; its last hidden state is the UNet's context. Attribute names mirror
  transformers' CLIPTextModel, which is also what SD1.x single files store.
- The KL autoencoder of Latent Diffusion (Rombach et al. 2022) with the CompVis attribute names, so an
  original checkpoint loads with a plain load_state_dict.
- The DDPM schedule SD1.x was trained with ("scaled linear" betas, eps prediction).
The UNet is in unet.py; reading and writing checkpoint files is formats.py's job (`formats.load_sd`).
"""
import gzip
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from unet import UNet, UNetConfig, Upsample

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class VAEConfig:
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)    # one level per entry; every level but the last halves the size
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # 1 / std of SD's latents, so the diffusion sees ~unit variance

    @property
    def factor(self):  # image side / latent side (8 for SD)
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TextConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_len: int = 77
    mlp_dim: int = 3072
    act: str = "quick_gelu"


@dataclass
class SDConfig:  # the defaults are SD1.5's
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)


def tiny():
    """The SD1.5 architecture at small widths: the same blocks, keys and skip structure."""
    return SDConfig(UNetConfig(model_channels=32, context_dim=64), VAEConfig(ch=32, num_res_blocks=1),
                    TextConfig(width=64, layers=2, heads=2, mlp_dim=128))

# -----------------------------------------------------------------------------
# tokenizer


BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of everything else
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_alphabet():
    """One printable character per byte value: the alphabet byte-level BPE works in (GPT-2's table, which
    CLIP's vocabulary starts with). Bytes that print as themselves keep their character and come first; the
    68 that would not (controls, space, DEL, no-break space, soft hyphen) get U+0100, U+0101, ... in turn."""
    visible = [b for b in range(256) if 33 <= b <= 126 or (161 <= b <= 255 and b != 173)]
    hidden = [b for b in range(256) if b not in visible]
    return {**{b: chr(b) for b in visible}, **{b: chr(256 + i) for i, b in enumerate(hidden)}}


class Tokenizer:
    """Prompts -> (B, 77) ids: BOS + tokens + EOS, cut to 77 keeping the EOS, padded with EOS (as SD1.x). Wraps a
    `tokenizers` pipeline: CLIP's byte-level BPE, or a word-level vocabulary for small synthetic caption sets."""

    def __init__(self, tok: tokenizers.Tokenizer, max_len=77):
        self.tok, self.max_len = tok, max_len
        self.bos_id, self.eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
        self.pad_id = self.eos_id  # SD1.x pads with EOS, and its text encoder sees the padding (no mask)
        self.vocab_size = tok.get_vocab_size()
        self.kind = "word_level" if isinstance(tok.model, tokenizers.models.WordLevel) else "clip_bpe"

    @classmethod
    def from_bpe_gz(cls, path=ASSETS / "bpe_simple_vocab_16e6.txt.gz", max_len=77):
        """CLIP's tokenizer from its merge file, the vocabulary built as CLIP builds it: the 256 byte characters,
        the same with the end-of-word marker, one entry per merge (lines 2 .. 48,895), then BOS and EOS."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
        chars = list(byte_alphabet().values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls.clip({t: i for i, t in enumerate(tokens)}, merges, max_len)

    @classmethod
    def clip(cls, vocab, merges, max_len=77):
        """CLIP's pipeline around a BPE vocabulary and merge list."""
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=EOS))
        # CLIP's text cleaning without ftfy: unicode composition, whitespace collapsed, lower case
        tok.normalizer = tokenizers.normalizers.Sequence([
            tokenizers.normalizers.NFC(), tokenizers.normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
            tokenizers.normalizers.Lowercase()])
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(CLIP_PATTERN), behavior="removed", invert=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = tokenizers.decoders.ByteLevel()
        return cls.with_bos_eos(tok, max_len)

    @classmethod
    def word_level(cls, words, max_len=77):
        """A closed caption vocabulary: one id per word, plus BOS/EOS (EOS doubles as padding) and <unk>."""
        words = list(dict.fromkeys(w.lower() for w in words))
        vocab = {BOS: 0, EOS: 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.NFC(),
                                                          tokenizers.normalizers.Lowercase()])
        # words are runs of letters and digits; punctuation is dropped rather than mapped to <unk>
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(
            tokenizers.Regex(r"[\p{L}\p{N}]+"), behavior="removed", invert=True)
        return cls.with_bos_eos(tok, max_len)

    @classmethod
    def with_bos_eos(cls, tok, max_len):
        tok.add_special_tokens([tokenizers.AddedToken(BOS, special=True), tokenizers.AddedToken(EOS, special=True)])
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
        return cls(tok, max_len)

    def to_json(self):
        return self.tok.to_str()

    @classmethod
    def from_json(cls, s, max_len=77):
        return cls(tokenizers.Tokenizer.from_str(s), max_len)

    def count_tokens(self, prompt):
        """Length with BOS and EOS, before cutting: more than max_len means the prompt gets cut."""
        return len(self.tok.encode(prompt).ids)

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = torch.full((len(prompts), self.max_len), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.tok.encode_batch(prompts)):
            ids = enc.ids if len(enc.ids) <= self.max_len else enc.ids[:self.max_len - 1] + [self.eos_id]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

# -----------------------------------------------------------------------------
# text encoder: the CLIP ViT-L/14 text tower


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # causal: CLIP's text tower was trained with masked self-attention (Radford et al. 2021, sec. 2.4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # the GELU approximation CLIP was trained with


class CLIPLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(cfg.width, cfg.mlp_dim), fc2=nn.Linear(cfg.mlp_dim, cfg.width)))
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.act = {"quick_gelu": quick_gelu, "gelu": F.gelu}[cfg.act]

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
                                          position_embedding=nn.Embedding(cfg.max_len, cfg.width))),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers)))),
            final_layer_norm=nn.LayerNorm(cfg.width)))

    def forward(self, ids):
        """ids (B, L) -> last hidden state (B, L, width), after the final LayerNorm (SD1.x's context)."""
        m = self.text_model
        x = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding.weight[:ids.shape[1]]
        for layer in m.encoder.layers:
            x = layer(x)
        return m.final_layer_norm(x)

# -----------------------------------------------------------------------------
# VAE: the KL-regularised autoencoder of Latent Diffusion (f = 8, 4 latent channels for SD)


def Normalize(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Normalize(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v and proj_out are 1x1 convs, as in LDM."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = Normalize(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only, then a stride-2 conv


def middle(c, groups):
    return nn.Sequential(OrderedDict(block_1=ResnetBlock(c, c, groups), attn_1=AttnBlock(c, groups),
                                     block_2=ResnetBlock(c, c, groups)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, c = nn.ModuleList(), cfg.ch
        for i, c_out in enumerate(chs):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(c_out if j else c, c_out, g) for j in range(cfg.num_res_blocks))
            if i != len(chs) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
            c = c_out
        self.mid = middle(c, g)
        self.norm_out = Normalize(c, g)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        c = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = middle(c, g)
        levels = []  # up[i] is the level at resolution i (as in LDM): built deepest first, run in reverse
        for i in reversed(range(len(chs))):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(c if j == 0 else chs[i], chs[i], g)
                                        for j in range(cfg.num_res_blocks + 1))
            if i != 0:
                level.upsample = Upsample(chs[i])
            levels.insert(0, level)
            c = chs[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c, g)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        self.grad_checkpointing = False  # the reward loss back-propagates through a 512 px decode

    @staticmethod
    def run_level(level, h):
        for block in level.block:
            h = block(h)
        return level.upsample(h) if hasattr(level, "upsample") else h

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(self.up):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(self.run_level, level, h, use_reentrant=False)
            else:
                h = self.run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """x in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior, unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's clamp, keeps exp() finite

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x, noise=None):
        """Scaled latents for the diffusion: the posterior mean, or a sample of it with standard normal `noise`."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        return z * self.cfg.scaling_factor

    def decode_latents(self, z):
        return self.decode(z / self.cfg.scaling_factor)

# -----------------------------------------------------------------------------
# noise schedule (DDPM, Ho et al. 2020, with SD's "scaled linear" betas)


class NoiseSchedule(nn.Module):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with betas linear in sqrt space from 0.00085 to 0.012."""

    def __init__(self, num_steps=1000, beta_start=0.00085, beta_end=0.012):
        super().__init__()
        self.num_steps = num_steps
        # float64 as LDM computes it: abar_999 is ~0.0047, where float32 rounding starts to matter
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0), persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the schedule with the model; only the device should follow
        device = fn(torch.zeros((), dtype=torch.float64, device=self.alphas_cumprod.device)).device
        self.alphas_cumprod = self.alphas_cumprod.to(device=device, dtype=torch.float64)
        return self

    def coefs(self, t, x):
        """sqrt(abar_t), sqrt(1 - abar_t) for timesteps t (B,), shaped to broadcast against x."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        abar = self.alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
        return abar.sqrt().to(x.dtype), (1 - abar).sqrt().to(x.dtype)

    def add_noise(self, x0, eps, t):
        a, s = self.coefs(t, x0)
        return a * x0 + s * eps

    def x0_from_eps(self, x_t, eps, t):
        """The one-step clean estimate x0_hat (ControlNet++ eq. 5): add_noise solved for x0."""
        a, s = self.coefs(t, x_t)
        return (x_t - s * eps) / a

# -----------------------------------------------------------------------------
# the whole model


class StableDiffusion(nn.Module):
    def __init__(self, config: SDConfig, tokenizer=None):
        super().__init__()
        self.config = config
        if tokenizer is None and config.text.vocab_size == 49408:
            tokenizer = Tokenizer.from_bpe_gz(max_len=config.text.max_len)  # SD1.x's tokenizer is CLIP's
        self.tokenizer = tokenizer
        self.text_encoder = TextEncoder(config.text)
        self.unet = UNet(config.unet)
        self.vae = VAE(config.vae)
        self.schedule = NoiseSchedule()

    @torch.no_grad()  # the text encoder is frozen in every method here
    def encode_prompt(self, prompts):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass one to StableDiffusion(..., tokenizer=...)")
        ids = self.tokenizer(prompts).to(self.text_encoder.text_model.final_layer_norm.weight.device)
        return self.text_encoder(ids)
