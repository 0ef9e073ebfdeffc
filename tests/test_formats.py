"""formats.py: Stable Diffusion checkpoints in every layout it reads (original single files in any dtype, with EMA
copies, diffusers folders, legacy names), checked against diffusers' own converters; refusals of wrong files."""
import json
import pickle
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import save_file

import formats
import model
from formats import CheckpointError
from test_model import PROMPTS, hf_text_model, hf_vae, text_state_for_hf, vae_state_for_diffusers, write_clip_files
from util import randomize_



@pytest.fixture(scope="module")
def tiny_sd():
    sd = model.StableDiffusion(model.tiny(), model.Tokenizer.from_bpe_gz())
    for i, m in enumerate((sd.unet, sd.vae, sd.text_encoder)):
        randomize_(m, seed=10 + i)
    return sd


def state(sd):
    return {f"{n}.{k}": v for n in ("unet", "vae", "text_encoder") for k, v in getattr(sd, n).state_dict().items()}


def assert_same_weights(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def save_diffusers_folder(sd, folder):
    """Our weights copied into the reference models, saved with their own save_pretrained."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**formats.unet_config_to_diffusers(sd.config.unet))
    km = formats.unet_key_map(sd.config.unet)
    unet.load_state_dict({km[k]: v for k, v in sd.unet.state_dict().items()}, strict=True)
    unet.save_pretrained(folder / "unet")
    vae = hf_vae(sd.config.vae)
    vae.load_state_dict(vae_state_for_diffusers(sd.vae), strict=True)
    vae.save_pretrained(folder / "vae")
    text = hf_text_model(sd.config.text)
    text.load_state_dict(text_state_for_hf(sd.text_encoder), strict=True)
    text.save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    write_clip_files(folder / "tokenizer")
    return {"unet": unet.state_dict(), "vae": vae.state_dict(), "text": text.state_dict()}


@pytest.fixture(scope="module")
def pipe_folder(tiny_sd, tmp_path_factory):
    """(folder, the reference models' own state dicts) for tiny_sd saved in the diffusers layout."""
    folder = tmp_path_factory.mktemp("pipe")
    return folder, save_diffusers_folder(tiny_sd, folder)


def test_single_file_and_diffusers_folder_load_the_same(tiny_sd, pipe_folder, tmp_path):
    single = tmp_path / "sd.safetensors"
    formats.save_sd(tiny_sd, single)
    a, b = formats.load_sd(single), formats.load_sd(pipe_folder[0])
    assert a.config == b.config == tiny_sd.config
    assert_same_weights(a, tiny_sd)
    assert_same_weights(b, tiny_sd)
    assert torch.equal(a.tokenizer(PROMPTS[:5]), b.tokenizer(PROMPTS[:5]))
    with torch.no_grad():
        assert torch.equal(a.encode_prompt(["a cat"]), tiny_sd.encode_prompt(["a cat"]))


def test_diffusers_folder_legacy_vae_names(tiny_sd, pipe_folder, tmp_path):
    """VAE folders saved by old diffusers (SD1.5's own) name the attention query/key/value/proj_attn."""
    import shutil
    from safetensors.torch import load_file
    folder = tmp_path / "pipe"
    shutil.copytree(pipe_folder[0], folder)
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(str(f)).items():
        for new, old in new_to_old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, f)
    assert_same_weights(formats.load_sd(folder), tiny_sd)


def test_original_names_through_diffusers_converters(tiny_sd, pipe_folder, tmp_path):
    """The single-file names are checked against diffusers' own LDM converters, independently of our maps."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from safetensors.torch import load_file
    path = tmp_path / "sd.safetensors"
    formats.save_sd(tiny_sd, path)
    ckpt = load_file(str(path))
    expected = pipe_folder[1]
    cfg = tiny_sd.config
    pairs = [
        ("unet", convert_ldm_unet_checkpoint(ckpt, formats.unet_config_to_diffusers(cfg.unet))),
        ("vae", convert_ldm_vae_checkpoint(ckpt, formats.vae_config_to_diffusers(cfg.vae))),
        ("text", {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}),
    ]
    for name, converted in pairs:
        ref = expected[name]
        assert converted.keys() == ref.keys(), (name, sorted(set(converted) ^ set(ref))[:5])
        for k in ref:
            assert torch.equal(converted[k], ref[k]), (name, k)


def original_state(sd, dtype=None, ema=False):
    out = {}
    for prefix, m in ((formats.UNET_PREFIX, sd.unet), (formats.VAE_PREFIX, sd.vae), (formats.TEXT_PREFIX, sd.text_encoder)):
        for k, v in m.state_dict().items():
            out[prefix + k] = v.to(dtype) if dtype else v.clone()
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["alphas_cumprod"] = model.NoiseSchedule().alphas_cumprod.float()
    if ema:  # LDM's flattened EMA names; they must be ignored, not loaded
        out.update({"model_ema." + k[len(formats.UNET_PREFIX):].replace(".", ""): torch.zeros_like(v)
                    for k, v in out.items() if k.startswith(formats.UNET_PREFIX)})
        out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0)
    return out


def test_fp16_ckpt_with_ema_and_no_metadata(tiny_sd, tmp_path):
    """An original-style fp16 .ckpt (Lightning-wrapped, EMA copies, no config): architecture read from
    shapes, weights cast into fp32 or bf16 modules."""
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": original_state(tiny_sd, torch.float16, ema=True), "global_step": 1}, path)
    expected_cfg = replace(tiny_sd.config, text=replace(tiny_sd.config.text, heads=1))  # 64-wide heads assumed
    ref = state(tiny_sd)
    for dtype in (torch.float32, torch.bfloat16):
        sd = formats.load_sd(path, dtype=dtype)
        assert sd.config == expected_cfg
        for k, v in state(sd).items():
            assert v.dtype == dtype and torch.equal(v, ref[k].half().to(dtype)), k


def test_config_from_sd15_shapes():
    with torch.device("meta"):
        sd = model.StableDiffusion(model.SDConfig())
    assert formats.unet_config_from_state_dict(sd.unet.state_dict()) == model.SDConfig().unet
    assert formats.vae_config_from_state_dict(sd.vae.state_dict()) == model.SDConfig().vae
    assert formats.text_config_from_state_dict(sd.text_encoder.state_dict()) == model.SDConfig().text


def test_word_level_tokenizer_travels_in_metadata(tmp_path):
    cfg = model.tiny()
    cfg.text.vocab_size = 16
    tok = model.Tokenizer.word_level(["red", "green", "circle"])
    sd = model.StableDiffusion(cfg, tok)
    formats.save_sd(sd, tmp_path / "shapes.safetensors")
    again = formats.load_sd(tmp_path / "shapes.safetensors")
    assert again.tokenizer.kind == "word_level" and torch.equal(again.tokenizer(["red circle"]), tok(["red circle"]))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": RunsCode(str(marker))}
    raw = {"state_dict": {"model.diffusion_model.x": 0.0}, "payload": RunsCode(str(marker))}  # a plain pickle
    for path, write in ((tmp_path / "evil.ckpt", lambda p: torch.save(evil, p)),
                        (tmp_path / "evil_raw.pth", lambda p: p.write_bytes(pickle.dumps(raw, protocol=2)))):
        write(path)
        with pytest.raises(CheckpointError) as e:
            formats.load_sd(path)
        msg = str(e.value)
        assert str(path) in msg and ".safetensors" in msg and "refused" in msg
        assert not marker.exists()


def test_wrong_kind_of_checkpoint(tiny_sd, tmp_path):
    vae_only = {formats.VAE_PREFIX + k: v for k, v in tiny_sd.vae.state_dict().items()}
    save_file(vae_only, tmp_path / "vae.safetensors")
    save_file({k[len(formats.VAE_PREFIX):]: v for k, v in vae_only.items()}, tmp_path / "vae_bare.safetensors")
    control = {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
               "control_model.zero_convs.0.0.weight": torch.zeros(32, 32, 1, 1),
               "control_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}
    save_file(control, tmp_path / "control.safetensors")
    save_file({k.removeprefix("control_model."): v for k, v in control.items()}, tmp_path / "control_bare.safetensors")
    for name, what in (("vae", "VAE-only"), ("vae_bare", "VAE-only"), ("control", "ControlNet"), ("control_bare", "ControlNet")):
        with pytest.raises(CheckpointError) as e:
            formats.load_sd(tmp_path / f"{name}.safetensors")
        msg = str(e.value)
        assert f"{name}.safetensors" in msg and what in msg and "expected" in msg and "model.diffusion_model." in msg


def test_wrong_kind_of_folder(tmp_path):
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(CheckpointError, match="cn: this looks like a diffusers folder of a single model .ControlNetModel.; expected"):
        formats.load_sd(tmp_path / "cn")


def test_missing_and_unexpected_keys_are_listed(tiny_sd, tmp_path):
    sd = original_state(tiny_sd)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    for k in [k for k in sd if k.startswith("model.diffusion_model.output_blocks.2.")]:
        del sd[k]
    path = tmp_path / "broken.safetensors"
    save_file(sd, path, metadata={"sd_config": json.dumps(asdict(tiny_sd.config))})
    with pytest.raises(CheckpointError) as e:
        formats.load_sd(path)
    msg = str(e.value)
    assert "broken.safetensors" in msg and "UNet" in msg
    assert "missing keys: output_blocks.2." in msg and "1 unexpected keys: extra.weight" in msg
