"""Checkpoint files: every layout the project reads and writes, and the names that map between them.

- Stable Diffusion 1.x (`load_sd`, `save_sd`): an original single file (.safetensors, or .ckpt/.pth read only
  through torch.load(weights_only=True)), with or without `model_ema.` copies, in any float dtype; or a
  diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/). The architecture is read from the
  checkpoint, so other SD1.x-family sizes load too. `save_sd` writes the original layout.
- A model folder (`MODEL_FOLDER`): what a training run leaves for sampling, sd.safetensors, controlnet.safetensors
  and probe.safetensors side by side in the layouts below; `load_sd` reads the folder, `bundled_controlnet` finds
  its ControlNet (or a diffusers pipeline folder's controlnet/).
- ControlNet (`load_controlnet`, `save_controlnet`, `export_diffusers`): lllyasviel's v1.x files, with or without
  the `control_model.` prefix, and diffusers ControlNetModel folders; written back in both layouts.
- The probe (`save_probe`, `load_probe`): .safetensors with its config in the metadata; upstream's torch files
  (InnerControl's released probes, Readout Guidance's heads) are read as they are and can be saved in ours.
- Reward models (`load_reward_model`): transformers-layout DPT folders, the annotators' original files.

Our modules carry the original (LDM / lllyasviel / annotator) attribute names, so those files load with plain
load_state_dict calls; the diffusers and transformers layouts go through explicit key maps generated from our own
module trees (`unet_key_map`, `vae_key_map`, `controlnet_key_map`). Every problem with a file is a CheckpointError
that names the file and says what was expected.
"""
import json
import os
import pickle
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import metrics
from controlnet import HINT_BLOCK_CHANNELS, ControlNet
from model import SDConfig, StableDiffusion, TextConfig, Tokenizer, VAE, VAEConfig
from probe import Probe, ProbeConfig
from reward import DPT, HED, DPTConfig, LineArt
from unet import UNet, UNetConfig, unet_layout


class CheckpointError(ValueError):
    """A file that is not what it was given as: names the file, what it holds and what was expected."""


# -----------------------------------------------------------------------------
# reading files

def first(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def torch_load(path):
    """What a torch pickle (.ckpt/.pt/.pth/.bin) holds, read through the restricted unpickler.

    A full pickle can run arbitrary code while loading; torch.load(weights_only=True) only rebuilds tensors
    and plain containers (dict, list, str, numbers...) and refuses anything else before it runs."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler met something other than tensors
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: refused to load: this pickle holds Python objects beyond tensors and plain containers"
            f"{f' ({found[1]})' if found else ''}, and unpickling them could run arbitrary code. "
            f"Convert the file to .safetensors with a tool you trust, then load that.") from None
    except Exception as e:
        raise CheckpointError(f"{path}: could not read this checkpoint: {str(e).splitlines()[0]}") from None


def load_state_dict(path):
    """A flat {name: tensor} from .safetensors, or from a .ckpt/.pt/.pth/.bin through the restricted unpickler.

    A full pickle can run arbitrary code while loading; torch.load(weights_only=True) only rebuilds tensors
    and plain containers and refuses anything else before it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a valid .safetensors file ({str(e).splitlines()[0]})") from None
    obj = torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning wraps the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def metadata(path):
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_json(p):
    return json.loads(Path(p).read_text(encoding="utf-8"))


def folder_weights(folder, stems):
    for stem in stems:
        for ext in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            p = Path(folder) / (stem + ext)
            if p.is_file():
                return p
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(s + '.safetensors' for s in stems)})")


def load_into(module, tensors, dtype, device, what, path):
    """Strict load with a readable error, casting (e.g. fp16 file -> fp32 or bf16 module) on the way in."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        msg = [f"{path}: the {what} weights do not match the architecture read from the checkpoint:"]
        if missing:
            msg.append(f"{len(missing)} missing keys: {first(missing)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys: {first(unexpected)}")
        if shapes:
            msg.append(f"{len(shapes)} shape mismatches (file vs model): {'; '.join(shapes[:5])}")
        raise CheckpointError("\n  ".join(msg))
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    return module


# -----------------------------------------------------------------------------
# architectures from tensor shapes and from diffusers / transformers config.json files

def config_from_dict(cls, d):
    # JSON turns tuples into lists; the configs use tuples so they compare equal to the presets
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def sd_config_from_dict(d):
    return SDConfig(config_from_dict(UNetConfig, d["unet"]), config_from_dict(VAEConfig, d["vae"]),
                    config_from_dict(TextConfig, d["text"]))


def unet_config_from_state_dict(sd):
    """The UNet's architecture from LDM-layout tensor shapes (keys without the model.diffusion_model. prefix).
    Head count and norm groups leave no trace in the shapes; they keep the SD1.x values (8, 32)."""
    w = sd["input_blocks.0.0.weight"]
    mc = w.shape[0]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    downs = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in sd]
    num_res_blocks = downs[0] - 1 if downs else len(blocks) - 1
    mults, attention_levels = [], []
    for level in range(len(downs) + 1):
        first_block = 1 + level * (num_res_blocks + 1)
        mults.append(sd[f"input_blocks.{first_block}.0.out_layers.3.weight"].shape[0] // mc)
        if f"input_blocks.{first_block}.1.proj_in.weight" in sd:
            attention_levels.append(level)
    ctx = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    out_w = sd.get("out.2.weight")
    return UNetConfig(in_channels=w.shape[1], out_channels=out_w.shape[0] if out_w is not None else 4,
                      model_channels=mc, channel_mult=tuple(mults), num_res_blocks=num_res_blocks,
                      attention_levels=tuple(attention_levels), context_dim=ctx)


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


def unet_config_from_diffusers(c):
    """UNetConfig from a diffusers UNet2DConditionModel (or ControlNetModel) config.json dict."""
    problems = ["use_linear_projection=True"] if c.get("use_linear_projection") else []
    problems += [f"{k}={c[k]!r}" for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim",
                                          "time_cond_proj_dim") if c.get(k) is not None]
    tlpb = c.get("transformer_layers_per_block", 1)
    if set([tlpb] if isinstance(tlpb, int) else tlpb) != {1}:
        problems.append(f"transformer_layers_per_block={tlpb!r}")
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type={c['mid_block_type']!r}")
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    if not isinstance(heads, int) and len(set(heads)) != 1:
        problems.append(f"different head counts per level {heads}")
    if not isinstance(c.get("layers_per_block", 2), int):
        problems.append(f"layers_per_block={c['layers_per_block']!r}")
    if problems:
        raise CheckpointError(f"unsupported UNet config ({', '.join(problems)}): this code implements the SD1.x UNet")
    boc = list(c.get("block_out_channels", (320, 640, 1280, 1280)))
    down = c.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    return UNetConfig(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
                      model_channels=boc[0], channel_mult=tuple(b // boc[0] for b in boc),
                      num_res_blocks=c.get("layers_per_block", 2),
                      attention_levels=tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn")),
                      num_heads=heads if isinstance(heads, int) else heads[0],
                      context_dim=c.get("cross_attention_dim", 768), norm_groups=c.get("norm_num_groups", 32))


def unet_config_to_diffusers(cfg):
    """kwargs for diffusers' UNet2DConditionModel (also what its config.json holds)."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    up = ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)]
    return dict(sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
                block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads,  # diffusers' historical name for the head count
                norm_num_groups=cfg.norm_groups, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True,
                freq_shift=0, downsample_padding=1, center_input_sample=False, use_linear_projection=False)


def vae_config_from_diffusers(c):
    bo = c["block_out_channels"]
    return VAEConfig(in_channels=c.get("in_channels", 3), ch=bo[0], ch_mult=tuple(b // bo[0] for b in bo),
                     num_res_blocks=c.get("layers_per_block", 2), z_channels=c.get("latent_channels", 4),
                     norm_groups=c.get("norm_num_groups", 32), scaling_factor=c.get("scaling_factor", 0.18215))


def vae_config_to_diffusers(cfg):
    """kwargs for diffusers' AutoencoderKL."""
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.z_channels,
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scaling_factor)


def text_config_from_transformers(c):
    return TextConfig(vocab_size=c["vocab_size"], width=c["hidden_size"], layers=c["num_hidden_layers"],
                      heads=c["num_attention_heads"], max_len=c["max_position_embeddings"],
                      mlp_dim=c["intermediate_size"], act=c.get("hidden_act", "quick_gelu"))


def text_config_to_transformers(cfg):
    """kwargs for transformers' CLIPTextConfig."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_len,
                intermediate_size=cfg.mlp_dim, hidden_act=cfg.act)


# -----------------------------------------------------------------------------
# key maps: ours (the original names) -> diffusers, generated from our own module trees

RES_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def map_layer_key(rest, kind, prefix):
    """Inside one layer: ResBlock names differ, transformer names are shared, down/up convs are `.conv`."""
    if kind == "res":
        head, _, tail = rest.rpartition(".")  # e.g. in_layers.0 . weight
        return f"{prefix}.{RES_NAMES[head]}.{tail}"
    if kind in ("down", "up"):
        return f"{prefix}.{rest.replace('op.', 'conv.')}"
    return f"{prefix}.{rest}"


def state_dict_keys(module_cls, *args):
    with torch.device("meta"):
        return list(module_cls(*args).state_dict().keys())


def encoder_key_map(cfg, names):
    """Names of the time embedding, input blocks and middle block (shared by the UNet and the ControlNet)."""
    inputs, middle, _ = unet_layout(cfg)
    per = cfg.num_res_blocks + 1
    out = {}
    for k in names:
        parts = k.split(".")
        if parts[0] == "time_embed":
            out[k] = f"time_embedding.linear_{1 if parts[1] == '0' else 2}.{parts[2]}"
        elif parts[0] == "input_blocks":
            n, j, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            if n == 0:
                out[k] = f"conv_in.{rest}"
                continue
            level, i, kind = (n - 1) // per, (n - 1) % per, inputs[n][j][0]
            prefix = {"res": f"down_blocks.{level}.resnets.{i}", "attn": f"down_blocks.{level}.attentions.{i}",
                      "down": f"down_blocks.{level}.downsamplers.0"}[kind]
            out[k] = map_layer_key(rest, kind, prefix)
        elif parts[0] == "middle_block":
            j, rest = int(parts[1]), ".".join(parts[2:])
            kind = middle[j][0]
            prefix = "mid_block.attentions.0" if kind == "attn" else f"mid_block.resnets.{j // 2}"
            out[k] = map_layer_key(rest, kind, prefix)
    return out


def unet_key_map(cfg):
    """ours (LDM name) -> diffusers UNet2DConditionModel name, for every state_dict key."""
    _, _, outputs = unet_layout(cfg)
    per = cfg.num_res_blocks + 1
    names = state_dict_keys(UNet, cfg)
    out = encoder_key_map(cfg, names)
    for k in names:
        parts = k.split(".")
        if parts[0] == "output_blocks":
            n, j, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            level, i, kind = n // per, n % per, outputs[n][j][0]
            prefix = {"res": f"up_blocks.{level}.resnets.{i}", "attn": f"up_blocks.{level}.attentions.{i}",
                      "up": f"up_blocks.{level}.upsamplers.0"}[kind]
            out[k] = map_layer_key(rest, kind, prefix)
        elif parts[0] == "out":
            out[k] = f"{'conv_norm_out' if parts[1] == '0' else 'conv_out'}.{parts[2]}"
    assert len(out) == len(names) and len(set(out.values())) == len(out)
    return out


def vae_key_map(cfg):
    """ours (LDM name) -> diffusers AutoencoderKL name."""
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
    out = {}
    for k in state_dict_keys(VAE, cfg):
        d = k
        for pattern, repl in rules:
            d = re.sub(pattern, repl, d)
        out[k] = d
    return out


def controlnet_key_map(cfg, hint_block_channels=HINT_BLOCK_CHANNELS):
    """ours (lllyasviel name) -> diffusers ControlNetModel name, for every state_dict key."""
    names = state_dict_keys(ControlNet, cfg, 3, hint_block_channels)
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


def from_diffusers_names(state, key_map, path):
    """diffusers-named tensors -> our names, through the inverse of an explicit ours -> diffusers map."""
    inverse = {d: o for o, d in key_map.items()}
    unexpected = [k for k in state if k not in inverse]
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys for this architecture: {first(unexpected)}")
    return {inverse[k]: v for k, v in state.items()}


# -----------------------------------------------------------------------------
# Stable Diffusion 1.x

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
# buffers LDM stores next to the weights (its own copy of the noise schedule); recomputed here
LDM_SCHEDULE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}
EXPECTED_SD = ("a Stable Diffusion 1.x checkpoint: a single file with model.diffusion_model.*, first_stage_model.* "
               "and cond_stage_model.transformer.* keys, or a diffusers folder with unet/, vae/ and text_encoder/")


def describe(keys):
    """What a set of keys looks like, for error messages."""
    keys = list(keys)
    has = lambda *subs: any(any(s in k for s in subs) for k in keys)  # noqa: E731
    starts = lambda *ps: any(k.startswith(ps) for k in keys)  # noqa: E731
    if starts("control_model.") or has("input_hint_block.", "zero_convs.", "middle_block_out."):
        return "a ControlNet checkpoint (control_model.* / input_hint_block.* keys): pass it as --controlnet"
    if starts(VAE_PREFIX, "encoder.conv_in.", "decoder.conv_in.", "quant_conv.") \
            and not starts(UNET_PREFIX, "input_blocks."):
        return "a VAE-only checkpoint (encoder.* / decoder.* keys)"
    if starts("input_blocks.", "middle_block.", "output_blocks."):
        return "a bare UNet state dict (input_blocks.* keys without the model.diffusion_model. prefix)"
    if starts("down_blocks.", "mid_block.", "up_blocks."):
        return "a diffusers-layout model file (down_blocks.* keys); pass the whole diffusers folder instead"
    if has("text_model.", "embeddings.token_embedding"):
        return "a text-encoder-only checkpoint"
    return f"an unrecognised checkpoint (keys like {first(keys, 3)})"


def split_original(state, path):
    """Original single-file state dict -> {"unet": ..., "vae": ..., "text": ...} with the prefixes stripped."""
    kind = describe(state)
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
        warnings.warn(f"{path}: ignoring {len(unknown)} keys outside the UNet/VAE/text encoder: {first(unknown)}")
    # older files store the CLIP tower without transformers' text_model. level, and a position_ids buffer
    parts["text"] = {(k if k.startswith("text_model.") else "text_model." + k): v
                     for k, v in parts["text"].items() if not k.endswith("position_ids")}
    parts["vae"] = {k: v for k, v in parts["vae"].items() if not k.startswith("loss.")}  # LDM's training loss
    for name, what in (("vae", "VAE (first_stage_model.*)"), ("text", "text encoder (cond_stage_model.transformer.*)")):
        if not parts[name]:
            raise CheckpointError(f"{path}: has no {what} weights; expected {EXPECTED_SD}")
    return parts


def tokenizer_from_folder(folder):
    """A diffusers tokenizer/ folder: vocab.json + merges.txt, or the tokenizer.json that transformers 5 writes
    instead (only its BPE vocabulary and merges are used; the pipeline around them is CLIP's, model.Tokenizer.clip)."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        return Tokenizer.clip(read_json(folder / "vocab.json"), merges)
    bpe = read_json(folder / "tokenizer.json")["model"]
    return Tokenizer.clip(bpe["vocab"], [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in bpe["merges"]])


def read_diffusers_folder(path):
    """A diffusers pipeline folder -> (SDConfig, parts in our names, tokenizer or None)."""
    if not (path / "unet").is_dir():
        what = read_json(path / "config.json").get("_class_name", "unknown model") if (path / "config.json").is_file() \
            else "no unet/ subfolder"
        raise CheckpointError(f"{path}: this looks like a diffusers folder of a single model ({what}); "
                              f"expected {EXPECTED_SD}")
    for sub in ("unet", "vae", "text_encoder"):
        if not (path / sub / "config.json").is_file():
            raise CheckpointError(f"{path}: missing {sub}/config.json; expected {EXPECTED_SD}")
    unet_json = read_json(path / "unet" / "config.json")
    if unet_json.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{path / 'unet'}: this is a {unet_json['_class_name']}; expected a UNet2DConditionModel")
    try:
        unet_cfg = unet_config_from_diffusers(unet_json)
    except CheckpointError as e:
        raise CheckpointError(f"{path / 'unet' / 'config.json'}: {e}") from None
    cfg = SDConfig(unet_cfg, vae_config_from_diffusers(read_json(path / "vae" / "config.json")),
                   text_config_from_transformers(read_json(path / "text_encoder" / "config.json")))
    parts = {}
    f = folder_weights(path / "unet", ["diffusion_pytorch_model"])
    parts["unet"] = from_diffusers_names(load_state_dict(f), unet_key_map(cfg.unet), f)
    f = folder_weights(path / "vae", ["diffusion_pytorch_model"])
    # VAE folders saved by diffusers < 0.14 (the SD1.5 release among them) name the attention query/key/value/proj_attn
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    vae_state = {}
    for k, v in load_state_dict(f).items():
        if ".attentions." in k:
            k = next((k.replace(o, n) for o, n in legacy.items() if o in k), k)
        vae_state[k] = v
    vae_state = from_diffusers_names(vae_state, vae_key_map(cfg.vae), f)
    # diffusers holds the VAE attention's 1x1 convs as linear layers
    parts["vae"] = {k: v[:, :, None, None] if k.split(".")[-2] in ("q", "k", "v", "proj_out") and k.endswith("weight")
                    and v.ndim == 2 else v for k, v in vae_state.items()}
    f = folder_weights(path / "text_encoder", ["model", "pytorch_model"])
    # transformers >= 5 saves CLIPTextModel without the text_model. level; older versions with it
    parts["text"] = {(k if k.startswith("text_model.") else "text_model." + k): v
                     for k, v in load_state_dict(f).items() if not k.endswith("position_ids")}
    tok_dir = path / "tokenizer"
    has_tokenizer = (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()
    return cfg, parts, tokenizer_from_folder(tok_dir) if has_tokenizer else None  # None: the bundled CLIP BPE


# A model folder: the files of one trained model, side by side.
MODEL_FOLDER = {"sd": "sd.safetensors", "controlnet": "controlnet.safetensors", "probe": "probe.safetensors"}


def bundled_controlnet(weights):
    """The ControlNet that comes with an SD1.x `weights` path: a model folder's controlnet.safetensors or a
    diffusers pipeline folder's controlnet/ subfolder; None when there is none."""
    for candidate in (Path(weights) / MODEL_FOLDER["controlnet"], Path(weights) / "controlnet"):
        if candidate.exists():
            return str(candidate)
    return None


def load_sd(path, dtype=torch.float32, device="cpu"):
    """Stable Diffusion 1.x from an original single file (.safetensors/.ckpt), a diffusers folder or a model folder.

    The architecture comes from the checkpoint: a folder's config.json files, our own files' metadata, or
    else the tensor shapes of a single file."""
    path = Path(path)
    if (path / MODEL_FOLDER["sd"]).is_file():
        path = path / MODEL_FOLDER["sd"]
    if path.is_dir():
        cfg, parts, tokenizer = read_diffusers_folder(path)
    else:
        parts = split_original(load_state_dict(path), path)
        meta = metadata(path)
        try:
            cfg = sd_config_from_dict(json.loads(meta["sd_config"])) if "sd_config" in meta \
                else SDConfig(unet_config_from_state_dict(parts["unet"]), vae_config_from_state_dict(parts["vae"]),
                              text_config_from_state_dict(parts["text"]))
        except KeyError as e:
            raise CheckpointError(f"{path}: cannot read the architecture from the tensor shapes, no {e} key; "
                                  f"expected {EXPECTED_SD}") from None
        tokenizer = Tokenizer.from_json(meta["tokenizer"]) if "tokenizer" in meta else None
    if tokenizer is not None:
        tokenizer.max_len = cfg.text.max_len
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        sd = StableDiffusion(cfg, tokenizer)
    load_into(sd.unet, parts["unet"], dtype, device, "UNet", path)
    load_into(sd.vae, parts["vae"], dtype, device, "VAE", path)
    load_into(sd.text_encoder, parts["text"], dtype, device, "text encoder", path)
    sd.schedule = sd.schedule.__class__().to(device)  # a buffer computed at construction: rebuilt off the meta device
    return sd


def save_sd(sd, path):
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


# -----------------------------------------------------------------------------
# ControlNet

CONTROLNET_PREFIX = "control_model."  # how lllyasviel's files name the ControlNet inside the full model
CONTROLNET_ROOTS = ("time_embed.", "input_hint_block.", "input_blocks.", "zero_convs.", "middle_block.",
                    "middle_block_out.")


def controlnet_config_from_state_dict(sd):
    """(UNetConfig, hint_channels, hint_block_channels) from lllyasviel-layout ControlNet tensor shapes."""
    cfg = unet_config_from_state_dict({**sd, "out.2.weight": torch.empty(4, 1, 1, 1)})  # a ControlNet has no out
    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    widths = tuple(sd[f"input_hint_block.{j}.weight"].shape[0] for j in convs[:-1])
    return cfg, sd["input_hint_block.0.weight"].shape[1], widths


def read_controlnet_folder(path):
    """(state dict in our names, UNetConfig, hint_channels, hint_block_channels) of a ControlNetModel folder."""
    weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
               if (path / n).exists()]
    if not (path / "config.json").exists() or not weights:
        raise CheckpointError(f"{path}: not a diffusers ControlNetModel folder (needs config.json and "
                              "diffusion_pytorch_model.safetensors)")
    c = read_json(path / "config.json")
    if c.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{path}: holds a {c['_class_name']}, expected a ControlNetModel")
    if c.get("global_pool_conditions"):
        raise CheckpointError(f"{path}: global_pool_conditions (the shuffle ControlNet) is not supported")
    try:
        cfg = unet_config_from_diffusers(c)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    widths = c.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    hint_block_channels = tuple(w for w in widths for _ in (0, 1))[:-1]  # (16, 32) -> (16, 16, 32)
    state = from_diffusers_names(load_state_dict(weights[0]), controlnet_key_map(cfg, hint_block_channels), weights[0])
    if c.get("controlnet_conditioning_channel_order", "rgb") == "bgr":  # same net, fed RGB: flip the first conv
        state["input_hint_block.0.weight"] = state["input_hint_block.0.weight"].flip(1)
    return state, cfg, c.get("conditioning_channels", 3), hint_block_channels


def read_controlnet_file(path):
    """(state dict, UNetConfig, hint_channels, hint_block_channels) of an lllyasviel-layout file.

    lllyasviel's v1.1 .pth files hold the ControlNet under `control_model.`; re-packs often drop the prefix;
    v1.0 files hold the whole model (`model.diffusion_model.` etc.) beside `control_model.`. Everything outside
    the ControlNet is left out."""
    raw = load_state_dict(path)
    if any(k.startswith(CONTROLNET_PREFIX) for k in raw):
        state = {k[len(CONTROLNET_PREFIX):]: v for k, v in raw.items() if k.startswith(CONTROLNET_PREFIX)}
    elif any(k.startswith(UNET_PREFIX) for k in raw):
        raise CheckpointError(f"{path}: looks like a full Stable Diffusion checkpoint (model.diffusion_model.* "
                              "keys), expected a ControlNet (control_model.* or input_hint_block.* keys)")
    else:
        state = {k: v for k, v in raw.items() if k.startswith(CONTROLNET_ROOTS)}
    if "input_hint_block.0.weight" not in state:
        hint = " (a diffusers ControlNetModel file: pass its folder)" if "controlnet_cond_embedding.conv_in.weight" \
            in raw else ""
        raise CheckpointError(f"{path}: not a ControlNet{hint}: no input_hint_block.* or control_model.* keys; "
                              f"found e.g. {first(raw)}")
    if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state.items()):
        raise CheckpointError(f"{path}: linear proj_in (an SD2.x ControlNet); this code implements SD1.x")
    meta = metadata(path)
    if "controlnet_config" in meta:  # one of ours: head count and norm groups leave no trace in the shapes
        c = json.loads(meta["controlnet_config"])
        return state, config_from_dict(UNetConfig, c["unet"]), c["hint_channels"], tuple(c["hint_block_channels"])
    return (state, *controlnet_config_from_state_dict(state))


def load_controlnet(path, unet_cfg=None, dtype=torch.float32, device="cpu"):
    """A ControlNet from an lllyasviel v1.x file (.pth/.ckpt/.safetensors, with or without the `control_model.`
    prefix), one of ours, or a diffusers ControlNetModel folder.

    The architecture comes from the file; given the UNet's config, a ControlNet that does not fit it is refused,
    and the head count and norm groups (not visible in the shapes) are taken from it."""
    path = Path(path)
    state, cfg, hint_channels, hint_block_channels = (read_controlnet_folder if path.is_dir()
                                                      else read_controlnet_file)(path)
    if unet_cfg is not None:  # the residuals must match the UNet's skips one for one
        keys = ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "context_dim", "in_channels")
        bad = [f"{k} {getattr(cfg, k)} vs {getattr(unet_cfg, k)}" for k in keys
               if getattr(cfg, k) != getattr(unet_cfg, k)]
        if bad:
            raise CheckpointError(f"{path}: this ControlNet does not fit the UNet (ControlNet vs UNet: "
                                  f"{'; '.join(bad)}); use a ControlNet made for this base model")
        cfg = UNetConfig(**{**asdict(cfg), "num_heads": unet_cfg.num_heads, "norm_groups": unet_cfg.norm_groups})
    with torch.device("meta"):
        net = ControlNet(cfg, hint_channels, hint_block_channels)
    return load_into(net, state, dtype, device, "ControlNet", path)


def save_controlnet(net, path):
    """The original (lllyasviel) layout as .safetensors, which A1111 and ComfyUI load; our config travels in the
    metadata (head count and norm groups leave no trace in the shapes)."""
    tensors = {CONTROLNET_PREFIX + k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
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


# -----------------------------------------------------------------------------
# the probe and the reward models

def save_probe(probe, path):
    """Our layout: .safetensors with the ProbeConfig (time_in_blocks included) as JSON in the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in probe.state_dict().items()}
    save_file(tensors, str(path), metadata={"probe_config": json.dumps(asdict(probe.cfg))})


def load_probe(path, dtype=torch.float32, device="cpu"):
    """A probe from one of our .safetensors files, or from a torch file in upstream's format (InnerControl's
    released "align models", Readout Guidance's heads: see read_upstream_probe), read as it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        cfg, state = read_upstream_probe(path)
        with torch.device("meta"):
            probe = Probe(cfg)
        return load_into(probe, state, dtype, device, "probe", path)
    meta = metadata(path)
    if "probe_config" not in meta:
        raise CheckpointError(f"{path}: not a probe file (a .safetensors with probe_config in its metadata, or "
                              "InnerControl's .pt); train one with `python train.py --stage probe`")
    with torch.device("meta"):
        probe = Probe(config_from_dict(ProbeConfig, json.loads(meta["probe_config"])))
    return load_into(probe, load_state_dict(path), dtype, device, "probe", path)


# Upstream's probe files (InnerControl's train/helpers.py load_aggregation_network, which comes from Readout Guidance
# and Diffusion Hyperfeatures) are torch pickles of a dict: "config" (the training config: projection_dim, dims,
# save_timestep, num_timesteps, aggregation_kwargs, ...) and "aggregation_network" (the state dict), sometimes with
# "step" and "optimizer_state_dict" beside them. Their network is the one in probe.py under other names: a block's
# convs carry their GroupNorm as `.norm`, its time layer is `emb_layers`, the head is `output_head`. Bottleneck width
# is projection_dim // 4. With bottleneck_sequential=True (upstream's default) every block sits inside a one-element
# Sequential (an extra `.0.` in its keys) that calls it without the timestep; the file still holds its emb_layers.
UPSTREAM_BLOCK_NAMES = {"conv1": "conv1", "norm1": "conv1.norm", "conv2": "conv2", "norm2": "conv2.norm",
                        "conv3": "conv3", "norm3": "conv3.norm", "time_proj": "emb_layers",
                        "shortcut.0": "shortcut", "shortcut.1": "shortcut.norm"}
UPSTREAM_AGGREGATION_KWARGS = {"use_output_head", "output_head_channels", "output_head_act", "bottleneck_sequential",
                               "num_norm_groups"}


def upstream_probe_key_map(cfg):
    """ours -> upstream name, for every key of Probe(cfg); the `.0.` level follows cfg.time_in_blocks."""
    out = {}
    for k in state_dict_keys(Probe, cfg):
        module, _, tail = k.rpartition(".")  # e.g. blocks.3.shortcut.1 . weight
        if k == "mixing_logits":
            out[k] = "mixing_weights"
        elif module.startswith("head."):
            out[k] = f"output_head.{module[len('head.'):]}.{tail}"
        else:
            _, i, name = module.split(".", 2)
            wrap = "" if cfg.time_in_blocks else ".0"
            out[k] = f"bottleneck_layers.{i}{wrap}.{UPSTREAM_BLOCK_NAMES[name]}.{tail}"
    return out


def read_upstream_probe(path):
    """(ProbeConfig, state dict in our names) of a probe file in upstream's format. Sizes come from the config
    (dims, projection_dim, aggregation_kwargs) and the time embedding width from emb_layers' shape (upstream builds
    1280 for SD1.5); the names must match one to one and the shapes must fit, else a one-line CheckpointError."""
    obj = torch_load(path)
    if not (isinstance(obj, dict) and isinstance(obj.get("config"), dict)
            and isinstance(obj.get("aggregation_network"), dict)):
        found = f"keys {first(map(str, obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: not a probe file: expected a dict with `config` and `aggregation_network` "
                              f"(upstream's format) or one of our .safetensors probes; found {found}")
    c, raw = obj["config"], obj["aggregation_network"]
    agg = c.get("aggregation_kwargs") or {}
    problems = [f"unknown aggregation_kwargs {sorted(set(agg) - UPSTREAM_AGGREGATION_KWARGS)}"] \
        if set(agg) - UPSTREAM_AGGREGATION_KWARGS else []
    if not agg.get("use_output_head", False):
        problems.append("no output head (use_output_head is off: it makes features, not a control map)")
    if not agg.get("output_head_act", True):
        problems.append("no final tanh (output_head_act=False); this probe's output is tanh'd")
    if len(c.get("save_timestep", [0])) != 1:
        problems.append(f"features of {len(c['save_timestep'])} timesteps at once (save_timestep); ours read one")
    if not isinstance(c.get("dims"), (list, tuple)) or not isinstance(c.get("projection_dim"), int):
        problems.append("config lacks dims / projection_dim")
    if problems:
        raise CheckpointError(f"{path}: unsupported probe: {'; '.join(problems)}")
    emb = next((v for k, v in raw.items() if k.endswith("emb_layers.weight") and isinstance(v, torch.Tensor)), None)
    cfg = ProbeConfig(feature_channels=tuple(int(d) for d in c["dims"]),
                      time_dim=emb.shape[1] if emb is not None else ProbeConfig.time_dim,
                      bottleneck_dim=c["projection_dim"] // 4, proj_dim=c["projection_dim"],
                      out_channels=agg.get("output_head_channels", 3), norm_groups=agg.get("num_norm_groups", 32),
                      time_in_blocks=not agg.get("bottleneck_sequential", True))
    names = upstream_probe_key_map(cfg)
    with torch.device("meta"):
        expected = Probe(cfg).state_dict()
    missing = [names[k] for k in expected if names[k] not in raw]
    unexpected = [k for k in raw if k not in set(names.values())]
    state = {k: raw[names[k]] for k in expected if names[k] in raw}
    shapes = [f"{names[k]} {tuple(getattr(v, 'shape', ()))} vs {tuple(expected[k].shape)}"
              for k, v in state.items() if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        msg = [f"{len(missing)} missing keys: {first(missing)}"] if missing else []
        msg += [f"{len(unexpected)} unexpected keys: {first(unexpected)}"] if unexpected else []
        msg += [f"{len(shapes)} shape mismatches (file vs config): {'; '.join(shapes[:3])}"] if shapes else []
        raise CheckpointError(f"{path}: the aggregation_network weights do not match its config (dims "
                              f"{list(cfg.feature_channels)}, projection_dim {cfg.proj_dim}, bottleneck_sequential "
                              f"{not cfg.time_in_blocks}): {'; '.join(msg)}")
    return cfg, state


def load_dpt(path, dtype=torch.float32, device="cpu"):
    """A transformers-layout DPTForDepthEstimation folder (config.json + model.safetensors or pytorch_model.bin),
    e.g. Intel/dpt-hybrid-midas or Intel/dpt-large; `path` may also name the weights file inside it."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{path}: a DPT model is a folder with config.json and model.safetensors "
                              "(e.g. Intel/dpt-hybrid-midas)")
    weights = folder_weights(folder, ["model", "pytorch_model"]) if Path(path).is_dir() else Path(path)
    net = DPT(DPTConfig.from_dict(read_json(folder / "config.json")))
    return load_into(net, load_state_dict(weights), dtype, device, "DPT", weights)


def load_reward_model(control_type, path, dtype=torch.float32, device="cpu"):
    """The frozen reward model (or evaluator) of a control type: a DPT folder for depth, ControlNetHED.pth for
    hed, sk_model.pth (or informative-drawings' model.pth) for lineart; .safetensors re-packs work too."""
    if control_type == "depth":
        net = load_dpt(path, dtype, device)
    elif control_type == "hed":
        net = load_into(HED(), load_state_dict(path), dtype, device, "HED", path)
    elif control_type == "lineart":
        state = load_state_dict(path)
        net = LineArt(len({k.split(".")[1] for k in state if k.startswith("model2.")}))
        net = load_into(net, state, dtype, device, "LineArt", path)
    else:
        raise ValueError(f"unknown control type {control_type!r}, expected depth, hed or lineart")
    return net.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# the evaluation networks: the FID Inception and CLIP

def load_inception(path, device="cpu"):
    """The FID Inception from pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release of TensorFlow's
    2015-12-05 graph; a pickle, read through torch.load(weights_only=True)) or a .safetensors of the same tensors."""
    # training's batch counter may or may not be in the file; inference never reads it
    state = {k: v for k, v in load_state_dict(path).items() if not k.endswith(".num_batches_tracked")}
    with torch.device("meta"):
        net = metrics.FIDInception()
    return load_into(net, state, torch.float32, device, "FID Inception", path).eval().requires_grad_(False)


def clip_config_from_transformers(c: dict):
    """CLIPConfig from a transformers CLIPModel config.json (missing keys take transformers' defaults)."""
    # configs written by transformers 4 may also carry *_config_dict, whose entries take precedence
    t = {**(c.get("text_config") or {}), **(c.get("text_config_dict") or {})}
    v = {**(c.get("vision_config") or {}), **(c.get("vision_config_dict") or {})}
    text = text_config_from_transformers({
        "vocab_size": t.get("vocab_size", 49408), "hidden_size": t.get("hidden_size", 512),
        "num_hidden_layers": t.get("num_hidden_layers", 12), "num_attention_heads": t.get("num_attention_heads", 8),
        "max_position_embeddings": t.get("max_position_embeddings", 77),
        "intermediate_size": t.get("intermediate_size", 2048), "hidden_act": t.get("hidden_act", "quick_gelu")})
    vision = metrics.VisionConfig(width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
                                  heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
                                  patch=v.get("patch_size", 32), image_size=v.get("image_size", 224),
                                  act=v.get("hidden_act", "quick_gelu"))
    return metrics.CLIPConfig(text, vision, c.get("projection_dim", 512), t.get("eos_token_id", 49407))


def clip_config_to_transformers(cfg):
    """kwargs for transformers' CLIPConfig (tests and export)."""
    return dict(text_config=dict(text_config_to_transformers(cfg.text), eos_token_id=cfg.eos_token_id),
                vision_config=dict(hidden_size=cfg.vision.width, num_hidden_layers=cfg.vision.layers,
                                   num_attention_heads=cfg.vision.heads, intermediate_size=cfg.vision.mlp_dim,
                                   patch_size=cfg.vision.patch, image_size=cfg.vision.image_size,
                                   hidden_act=cfg.vision.act),
                projection_dim=cfg.projection_dim)


def load_clip(folder, dtype=torch.float32, device="cpu"):
    """CLIP from a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin,
    the latter through torch.load(weights_only=True)), e.g. openai/clip-vit-base-patch16. Its tokenizer
    (vocab.json + merges.txt or tokenizer.json) rides along as .tokenizer, else CLIP's own from assets/."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; expected a transformers CLIPModel folder")
    cfg = clip_config_from_transformers(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    state = load_state_dict(folder_weights(folder, ["model", "pytorch_model"]))
    state = {k: v for k, v in state.items() if k != "logit_scale" and not k.endswith(".position_ids")}
    with torch.device("meta"):
        net = metrics.CLIP(cfg)
    net = load_into(net, state, dtype, device, "CLIP", folder).eval().requires_grad_(False)
    has_tok = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    net.tokenizer = tokenizer_from_folder(folder) if has_tok else Tokenizer.from_bpe_gz()
    return net
