"""Stable Diffusion 1.x around the UNet: CLIP tokenizer and text encoder, the VAE, the noise schedule,
and checkpoint loading.

Built from the published architectures, in plain PyTorch:
- CLIP ViT-L/14 text tower (Radford et al. 2021): 12 pre-LayerNorm transformer layers, quick-GELU,
  causal mask, final LayerNorm; the last hidden state is the UNet's context. Attribute names mirror
  transformers' CLIPTextModel, which is also what SD1.x single files store.
- The KL autoencoder of Latent Diffusion (Rombach et al. 2022), with the CompVis attribute names, so
  an original checkpoint loads with a plain load_state_dict.
- The DDPM schedule SD1.x was trained with ("scaled linear" betas, eps prediction).
- Loaders for the original single-file layout and the diffusers folder layout (the latter through an
  explicit key map), with pickles loaded only through torch.load(weights_only=True).
The UNet itself lives in unet.py.
"""
import gzip
import json
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from unet import (LeanConv2d, UNet, UNetConfig, Upsample, unet_config_from_diffusers, unet_config_from_state_dict,
                  unet_key_map)

ASSETS = Path(__file__).resolve().parent / "assets"

# -----------------------------------------------------------------------------
# configs


@dataclass
class VAEConfig:
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # 1 / std of SD's latents, so the diffusion sees ~unit variance


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
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)


def sd15():
    return SDConfig(UNetConfig(), VAEConfig(), TextConfig())


def tiny():
    """The SD1.5 architecture with small widths: the same blocks, keys and skip structure."""
    return SDConfig(
        UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=64, norm_groups=32),
        VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1),
        TextConfig(width=64, layers=2, heads=2, mlp_dim=128),
    )


def _config_from_dict(cls, d):
    # JSON turns tuples into lists; the configs use tuples so they compare equal to the presets
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def sd_config_from_dict(d):
    return SDConfig(_config_from_dict(UNetConfig, d["unet"]), _config_from_dict(VAEConfig, d["vae"]),
                    _config_from_dict(TextConfig, d["text"]))

# -----------------------------------------------------------------------------
# tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of everything else
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, in GPT-2's order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # bytes that would print as whitespace/control characters move above 255
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_from_bpe_gz(path=ASSETS / "bpe_simple_vocab_16e6.txt.gz"):
    """CLIP's 49,408-entry vocabulary and merge list, built from its merge file the way CLIP does:
    256 byte characters, the same with the end-of-word marker, one entry per merge, then BOS/EOS."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


class Tokenizer:
    """Prompts -> (B, 77) ids: BOS + tokens + EOS, truncated to 77 keeping EOS, padded with EOS (as SD1.x).

    Wraps a `tokenizers` pipeline: CLIP's byte-level BPE for real checkpoints, or a word-level
    vocabulary for small synthetic caption sets. Either serializes to one JSON string.
    """

    def __init__(self, tok: tokenizers.Tokenizer, max_len=77):
        self.tok, self.max_len = tok, max_len
        self.bos_id, self.eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
        self.pad_id = self.eos_id  # SD1.x pads with EOS, and its text encoder sees the padding (no mask)
        self.vocab_size = tok.get_vocab_size()
        self.kind = "word_level" if isinstance(tok.model, tokenizers.models.WordLevel) else "clip_bpe"

    @classmethod
    def from_bpe_gz(cls, path=ASSETS / "bpe_simple_vocab_16e6.txt.gz", max_len=77):
        return cls._clip(*clip_vocab_from_bpe_gz(path), max_len=max_len)

    @classmethod
    def from_files(cls, vocab_json, merges_txt):
        """A diffusers folder's tokenizer/vocab.json + tokenizer/merges.txt."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(l.split()) for l in lines if l.strip() and not l.startswith("#version")]
        return cls._clip(vocab, merges)

    @classmethod
    def from_folder(cls, folder):
        """A diffusers tokenizer/ folder: vocab.json + merges.txt, or the tokenizer.json that transformers 5
        writes instead (only its BPE vocabulary and merges are used; the pipeline is CLIP's, built here)."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt")
        bpe = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        return cls._clip(bpe["vocab"], [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in bpe["merges"]])

    @classmethod
    def _clip(cls, vocab, merges, max_len=77):
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=EOS))
        # CLIP's cleaning without ftfy: unicode composition, whitespace collapsed, lower case
        tok.normalizer = tokenizers.normalizers.Sequence([
            tokenizers.normalizers.NFC(),
            tokenizers.normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
            tokenizers.normalizers.Lowercase()])
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(CLIP_PATTERN), behavior="removed", invert=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = tokenizers.decoders.ByteLevel()
        return cls._finish(tok, max_len)

    @classmethod
    def word_level(cls, words, max_len=77):
        """A closed caption vocabulary: one id per word, plus BOS/EOS (EOS doubles as padding) and <unk>."""
        words = list(dict.fromkeys(w.lower() for w in words))
        vocab = {BOS: 0, EOS: 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.NFC(), tokenizers.normalizers.Lowercase()])
        # words are runs of letters and digits; punctuation is dropped rather than mapped to <unk>
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(
            tokenizers.Regex(r"[\p{L}\p{N}]+"), behavior="removed", invert=True)
        return cls._finish(tok, max_len)

    @classmethod
    def _finish(cls, tok, max_len):
        tok.add_special_tokens([tokenizers.AddedToken(BOS, special=True), tokenizers.AddedToken(EOS, special=True)])
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
        return cls(tok, max_len)

    def to_json(self):
        return self.tok.to_str()

    @classmethod
    def from_json(cls, s):
        return cls(tokenizers.Tokenizer.from_str(s))

    def save(self, path):
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path):
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def count_tokens(self, prompt):
        """Length with BOS and EOS, before truncation: more than max_len means the prompt gets cut."""
        return len(self.tok.encode(prompt).ids)

    def __call__(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.full((len(prompts), self.max_len), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.tok.encode_batch(list(prompts))):
            ids = enc.ids
            if len(ids) > self.max_len:
                ids = ids[:self.max_len - 1] + [self.eos_id]
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
        # causal mask: CLIP's text tower was trained with masked self-attention (Radford et al. 2021, sec. 2.4)
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
# VAE: the KL-regularised autoencoder of Latent Diffusion (f=8, 4 latent channels)


def Normalize(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in, groups), LeanConv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Normalize(c_out, groups), LeanConv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = LeanConv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v, proj_out are 1x1 convs as in LDM."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = Normalize(c, groups)
        self.q, self.k, self.v, self.proj_out = (LeanConv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = LeanConv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only, then a stride-2 conv


def _mid(c, groups):
    return nn.ModuleDict(dict(block_1=ResnetBlock(c, c, groups), attn_1=AttnBlock(c, groups),
                              block_2=ResnetBlock(c, c, groups)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        self.conv_in = LeanConv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, c_out in enumerate(chs):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(c if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks))
            if i != len(chs) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
            c = c_out
        self.mid = _mid(c, g)
        self.norm_out = Normalize(c, g)
        self.conv_out = LeanConv2d(c, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        c = chs[-1]
        self.conv_in = LeanConv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, g)
        # up[i] is the level at resolution i (as in LDM), so it is built deepest first and run in reverse
        levels = []
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
        self.conv_out = LeanConv2d(c, cfg.in_channels, 3, padding=1)
        self.gradient_checkpointing = False  # the reward loss backpropagates through a 512 px decode

    @staticmethod
    def _level(level, h):
        for block in level.block:
            h = block(h)
        return level.upsample(h) if hasattr(level, "upsample") else h

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(self._level, level, h, use_reentrant=False)
            else:
                h = self._level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = LeanConv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = LeanConv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """x in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior, unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's clamp, keeps exp() finite

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x, generator=None, sample=True):
        mean, logvar = self.encode(x)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
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
        a, s = self.coefs(t, x_t)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t, x0, t):
        a, s = self.coefs(t, x_t)
        return (x_t - a * x0) / s

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

# -----------------------------------------------------------------------------
# checkpoints

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
# buffers LDM stores next to the weights (its own copy of the noise schedule); recomputed here
LDM_SCHEDULE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}


class CheckpointError(ValueError):
    pass


def _first(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_state_dict(path):
    """A flat {name: tensor} from .safetensors, or from a .ckpt/.pt/.pth/.bin through the restricted unpickler.

    A full pickle can run arbitrary code while loading; torch.load(weights_only=True) only rebuilds
    tensors and plain containers and refuses anything else before it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler met something other than tensors
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: refused to load: this pickle holds Python objects beyond tensors"
            f"{f' ({found[1]})' if found else ''}, and unpickling them could run arbitrary code. "
            f"Convert the file to .safetensors with a tool you trust, then load that.") from None
    except Exception as e:
        raise CheckpointError(f"{path}: could not read this checkpoint: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning wraps the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _safetensors_metadata(path):
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _describe(keys):
    """What a set of keys looks like, for error messages."""
    keys = list(keys)
    has = lambda *subs: any(any(s in k for s in subs) for k in keys)  # noqa: E731
    starts = lambda *ps: any(k.startswith(ps) for k in keys)  # noqa: E731
    if starts("control_model.") or has("input_hint_block.", "zero_convs.", "middle_block_out."):
        return "a ControlNet checkpoint (control_model.* / input_hint_block.* / zero_convs.* keys); load it with controlnet.load_controlnet"
    if starts(VAE_PREFIX, "encoder.conv_in.", "decoder.conv_in.", "quant_conv.") and not starts(UNET_PREFIX, "input_blocks."):
        return "a VAE-only checkpoint (encoder.* / decoder.* keys)"
    if starts("input_blocks.", "middle_block.", "output_blocks."):
        return "a bare UNet state dict (input_blocks.* keys without the model.diffusion_model. prefix)"
    if starts("down_blocks.", "mid_block.", "up_blocks."):
        return "a diffusers-layout model file (down_blocks.* keys); pass the whole diffusers folder instead"
    if has("text_model.", "embeddings.token_embedding"):
        return "a text-encoder-only checkpoint"
    return f"an unrecognised checkpoint (keys like {_first(keys, 3)})"


EXPECTED_SD = ("a Stable Diffusion 1.x checkpoint: a single file with model.diffusion_model.*, first_stage_model.* "
               "and cond_stage_model.transformer.* keys, or a diffusers folder with unet/, vae/ and text_encoder/")


def split_original(state, path):
    """Original single-file state dict -> {"unet": ..., "vae": ..., "text": ...} with prefixes stripped."""
    kind = _describe(state)
    if kind.startswith("a ControlNet") or not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(f"{path}: this looks like {kind}; expected {EXPECTED_SD}")
    parts, unknown = {n: {} for n in PREFIXES}, []
    for k, v in state.items():
        name = next((n for n, p in PREFIXES.items() if k.startswith(p)), None)
        if name is not None:
            parts[name][k[len(PREFIXES[name]):]] = v
        elif not (k.startswith("model_ema.") or k in LDM_SCHEDULE_KEYS):  # EMA copies are not used
            unknown.append(k)
    if unknown:
        warnings.warn(f"{path}: ignoring {len(unknown)} keys outside the UNet/VAE/text encoder: {_first(unknown)}")
    # older files store the CLIP tower without transformers' text_model. level, and a position_ids buffer
    parts["text"] = {(k if k.startswith("text_model.") else "text_model." + k): v
                     for k, v in parts["text"].items() if not k.endswith("position_ids")}
    parts["vae"] = {k: v for k, v in parts["vae"].items() if not k.startswith("loss.")}  # LDM training loss
    for name, what in (("vae", "VAE (first_stage_model.*)"), ("text", "text encoder (cond_stage_model.transformer.*)")):
        if not parts[name]:
            raise CheckpointError(f"{path}: has no {what} weights; expected {EXPECTED_SD}")
    return parts


def vae_config_from_state_dict(sd):
    """VAEConfig from LDM-layout VAE tensor shapes (norm groups and scaling factor are not in the shapes)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    blocks = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")}
    return VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1], ch=ch,
                     ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels),
                     num_res_blocks=len(blocks), z_channels=sd["post_quant_conv.weight"].shape[0])


def text_config_from_state_dict(sd):
    """TextConfig from CLIP tensor shapes. Head count is not in the shapes: CLIP uses 64-wide heads."""
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    return TextConfig(vocab_size=vocab, width=width, layers=len(layers), heads=max(1, width // 64),
                      max_len=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                      mlp_dim=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])


def config_from_state_dicts(parts):
    return SDConfig(unet_config_from_state_dict(parts["unet"]), vae_config_from_state_dict(parts["vae"]),
                    text_config_from_state_dict(parts["text"]))


def vae_key_map(cfg: VAEConfig):
    """ours (LDM name) -> diffusers AutoencoderKL name, generated from our own module tree."""
    n = len(cfg.ch_mult)
    rules = [
        (r"^encoder\.down\.(\d+)\.block\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets."),  # reversed
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0."),
        (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.norm\.", lambda m: ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v)\.", lambda m: f".mid_block.attentions.0.to_{m[1]}."),
        (r"\.mid\.attn_1\.proj_out\.", lambda m: ".mid_block.attentions.0.to_out.0."),
        (r"\.nin_shortcut\.", lambda m: ".conv_shortcut."),
        (r"\.norm_out\.", lambda m: ".conv_norm_out."),
    ]
    with torch.device("meta"):
        keys = VAE(cfg).state_dict().keys()
    out = {}
    for k in keys:
        d = k
        for pattern, repl in rules:
            d = re.sub(pattern, repl, d)
        out[k] = d
    return out


def vae_config_from_diffusers(c: dict):
    bo = c["block_out_channels"]
    return VAEConfig(in_channels=c.get("in_channels", 3), ch=bo[0], ch_mult=tuple(b // bo[0] for b in bo),
                     num_res_blocks=c.get("layers_per_block", 2), z_channels=c.get("latent_channels", 4),
                     norm_groups=c.get("norm_num_groups", 32), scaling_factor=c.get("scaling_factor", 0.18215))


def vae_config_to_diffusers(cfg: VAEConfig):
    """kwargs for diffusers' AutoencoderKL (tests and export)."""
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.z_channels,
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scaling_factor)


def text_config_from_transformers(c: dict):
    return TextConfig(vocab_size=c["vocab_size"], width=c["hidden_size"], layers=c["num_hidden_layers"],
                      heads=c["num_attention_heads"], max_len=c["max_position_embeddings"],
                      mlp_dim=c["intermediate_size"], act=c.get("hidden_act", "quick_gelu"))


def text_config_to_transformers(cfg: TextConfig):
    """kwargs for transformers' CLIPTextConfig (tests and export)."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_len,
                intermediate_size=cfg.mlp_dim, hidden_act=cfg.act)


def _from_diffusers_names(state, key_map, path):
    """diffusers-named tensors -> our names, through the inverse of an explicit ours -> diffusers map."""
    inverse = {d: o for o, d in key_map.items()}
    out, unexpected = {}, []
    for k, v in state.items():
        if k in inverse:
            out[inverse[k]] = v
        else:
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys for this architecture: {_first(unexpected)}")
    return out


def _folder_weights(folder, stems):
    for stem in stems:
        for ext in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            p = Path(folder) / (stem + ext)
            if p.is_file():
                return p
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(s + '.safetensors' for s in stems)})")


def _read_json(p):
    return json.loads(Path(p).read_text(encoding="utf-8"))


def read_diffusers_folder(path):
    """A diffusers pipeline folder -> (SDConfig, parts in our names, tokenizer)."""
    path = Path(path)
    if not (path / "unet").is_dir():
        what = _read_json(path / "config.json").get("_class_name", "unknown model") if (path / "config.json").is_file() else "no unet/ subfolder"
        raise CheckpointError(f"{path}: this looks like a diffusers folder of a single model ({what}); expected {EXPECTED_SD}")
    for sub in ("unet", "vae", "text_encoder"):
        if not (path / sub / "config.json").is_file():
            raise CheckpointError(f"{path}: missing {sub}/config.json; expected {EXPECTED_SD}")
    unet_json = _read_json(path / "unet" / "config.json")
    if unet_json.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{path / 'unet'}: this is a {unet_json['_class_name']}; expected a UNet2DConditionModel")
    try:
        unet_cfg = unet_config_from_diffusers(unet_json)
    except ValueError as e:
        raise CheckpointError(f"{path / 'unet' / 'config.json'}: {e}") from None
    cfg = SDConfig(unet_cfg, vae_config_from_diffusers(_read_json(path / "vae" / "config.json")),
                   text_config_from_transformers(_read_json(path / "text_encoder" / "config.json")))
    parts = {}
    f = _folder_weights(path / "unet", ["diffusion_pytorch_model"])
    parts["unet"] = _from_diffusers_names(load_state_dict(f), unet_key_map(cfg.unet), f)
    f = _folder_weights(path / "vae", ["diffusion_pytorch_model"])
    # VAE folders saved by diffusers < 0.14 (the SD1.5 release among them) name the attention
    # query/key/value/proj_attn
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    vae_state = {}
    for k, v in load_state_dict(f).items():
        if ".attentions." in k:
            k = next((k.replace(o, n) for o, n in legacy.items() if o in k), k)
        vae_state[k] = v
    parts["vae"] = _from_diffusers_names(vae_state, vae_key_map(cfg.vae), f)
    parts["vae"] = {k: v[:, :, None, None] if k.split(".")[-2] in ("q", "k", "v", "proj_out") and k.endswith("weight") and v.ndim == 2 else v
                    for k, v in parts["vae"].items()}  # diffusers uses linear layers for the 1x1 convs
    f = _folder_weights(path / "text_encoder", ["model", "pytorch_model"])
    # transformers >= 5 saves CLIPTextModel without the text_model. level; older versions with it
    parts["text"] = {(k if k.startswith("text_model.") else "text_model." + k): v
                     for k, v in load_state_dict(f).items() if not k.endswith("position_ids")}
    tok_dir = path / "tokenizer"
    has_tokenizer = (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()
    tokenizer = Tokenizer.from_folder(tok_dir) if has_tokenizer else None  # None: the bundled CLIP BPE
    return cfg, parts, tokenizer


def _load_into(module, tensors, dtype, device, what, path):
    """Strict load with a readable error, casting (e.g. fp16 file -> fp32/bf16 module) on the way in."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        msg = [f"{path}: the {what} weights do not match the architecture read from the checkpoint:"]
        if missing:
            msg.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if shapes:
            msg.append(f"{len(shapes)} shape mismatches (file vs model): {'; '.join(shapes[:5])}")
        raise CheckpointError("\n  ".join(msg))
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    module.load_state_dict(cast, strict=True, assign=True)


def load_sd(path, dtype=torch.float32, device="cpu"):
    """Stable Diffusion 1.x from an original single file (.safetensors/.ckpt) or a diffusers folder.

    The architecture comes from the checkpoint: a folder's config.json files, our own files' metadata,
    or else the tensor shapes of a single file.
    """
    path = Path(path)
    if path.is_dir():
        cfg, parts, tokenizer = read_diffusers_folder(path)
    else:
        parts = split_original(load_state_dict(path), path)
        meta = _safetensors_metadata(path)
        try:
            cfg = sd_config_from_dict(json.loads(meta["sd_config"])) if "sd_config" in meta else config_from_state_dicts(parts)
        except KeyError as e:
            raise CheckpointError(f"{path}: cannot read the architecture from the tensor shapes, no {e} key; "
                                  f"expected {EXPECTED_SD}") from None
        tokenizer = Tokenizer.from_json(meta["tokenizer"]) if "tokenizer" in meta else None
    if tokenizer is not None:
        tokenizer.max_len = cfg.text.max_len
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        sd = StableDiffusion(cfg, tokenizer)
    _load_into(sd.unet, parts["unet"], dtype, device, "UNet", path)
    _load_into(sd.vae, parts["vae"], dtype, device, "VAE", path)
    _load_into(sd.text_encoder, parts["text"], dtype, device, "text encoder", path)
    sd.schedule = NoiseSchedule().to(device)
    left = [n for n, t in list(sd.named_parameters()) + list(sd.named_buffers()) if t.is_meta]
    assert not left, f"tensors left uninitialised after loading: {_first(left)}"
    return sd


def save_sd(sd: StableDiffusion, path):
    """The original single-file layout (.safetensors), with the config (and a non-CLIP tokenizer) in the metadata."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: save_sd writes .safetensors only")
    tensors = {}
    for prefix, module in ((UNET_PREFIX, sd.unet), (VAE_PREFIX, sd.vae), (TEXT_PREFIX, sd.text_encoder)):
        tensors.update({prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    meta = {"format": "pt", "sd_config": json.dumps(asdict(sd.config))}
    if sd.tokenizer is not None and sd.tokenizer.kind != "clip_bpe":
        meta["tokenizer"] = sd.tokenizer.to_json()
    save_file(tensors, str(path), metadata=meta)
