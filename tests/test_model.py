"""model.py against the references: transformers' CLIPTokenizer / CLIPTextModel, diffusers' AutoencoderKL and
DDPMScheduler, and diffusers' own single-file converters for the checkpoint names. Random weights only."""
import json
import pickle
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import save_file

import model
from model import CheckpointError
from util import max_rel_err, randomize_

TOL = 1e-4

# -----------------------------------------------------------------------------
# tokenizer

PROMPTS = [
    "a photo of a cat", "A Photo Of A CAT", "", " ", "   leading and trailing   ", "tabs\tand\nnewlines\r\nhere",
    "multiple     spaces   between words", "hello, world!", "what's up? it's 5 o'clock, y'all", "don't won't can't I'm we've they'll he'd",
    "!!!???...", "a.b.c", "(parentheses) [brackets] {braces}", "quotes \"double\" and 'single'", "email@example.com",
    "http://example.com/path?query=1&x=2", "#hashtag @mention $100 50% 3*4=12", "1234567890", "3.14159 and 2,718",
    "version 1.2.3-beta", "année café naïve résumé", "Ünïcödé ÀÉÎÕÜ", "straße groß", "日本語のテキスト", "中文字符测试",
    "한국어 텍스트", "русский текст", "ελληνικά", "عربى", "עברית", "हिन्दी", "emoji 😀🎉🐱 fun", "👨‍👩‍👧‍👦 family",
    "flags 🇫🇷🇯🇵", "math ∑∫√∞ ≤ ≥", "arrows → ← ↑ ↓", "currency € £ ¥ ₹", "dash – — and ellipsis …",
    "curly “quotes” and ‘apostrophes’", "e\u0301 combining accent", "\u00a0non-breaking\u2003spaces\u3000wide",
    "zero\u200bwidth", "tab\there", "mixed123numbers456and789letters", "CamelCaseWords and snake_case_words",
    "a " * 100, "an extremely detailed photograph of a majestic lion " * 10, "x" * 300, "word " * 76, "word " * 75,
    "1 2 3 4 5 6 7 8 9 0 " * 10, "<|endoftext|> inside a prompt", "masterpiece, best quality, ultra-detailed, 8k, (cinematic lighting:1.2)",
    "a red circle on a blue square", "depth map of a room", "line art of a house, white background",
]


def write_clip_files(folder):
    vocab, merges = model.clip_vocab_from_bpe_gz()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def test_clip_vocab_layout():
    vocab, merges = model.clip_vocab_from_bpe_gz()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512
    tok = model.Tokenizer.from_bpe_gz()
    assert tok("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_tokenizer_matches_transformers(tmp_path):
    from transformers import CLIPTokenizer
    assert len(PROMPTS) >= 50
    vocab_json, merges_txt = write_clip_files(tmp_path)
    ref = CLIPTokenizer.from_pretrained(str(tmp_path))
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref.save_pretrained(str(tmp_path / "saved"))  # transformers 5 writes tokenizer.json, no vocab.json/merges.txt
    ours = (model.Tokenizer.from_bpe_gz(), model.Tokenizer.from_files(vocab_json, merges_txt),
            model.Tokenizer.from_folder(tmp_path / "saved"))
    for tok in ours:
        ids = tok(PROMPTS)
        assert ids.shape == (len(PROMPTS), 77)
        for p, a, b in zip(PROMPTS, ids, expected):
            assert a.tolist() == b.tolist(), f"prompt {p!r}"
    # long prompts: truncated with EOS kept last; the untruncated count says so
    tok = model.Tokenizer.from_bpe_gz()
    assert tok.count_tokens("word " * 100) == 102
    assert tok(["word " * 100])[0, -1].item() == 49407 and tok(["word " * 100])[0, -2].item() != 49407


def test_word_level_tokenizer(tmp_path):
    tok = model.Tokenizer.word_level(["a", "red", "blue", "circle", "square", "on"])
    ids = tok(["A red circle, on a blue square.", "a green circle"])
    assert ids.shape == (2, 77)
    bos, eos = tok.bos_id, tok.eos_id
    assert ids[0, :9].tolist() == [bos] + [tok.tok.token_to_id(w) for w in "a red circle on a blue square".split()] + [eos]
    assert (ids[0, 9:] == eos).all()
    assert ids[1, 2].item() == tok.tok.token_to_id("<unk>")
    tok.save(tmp_path / "tok.json")
    again = model.Tokenizer.load(tmp_path / "tok.json")
    assert torch.equal(again(["a red circle", "blue square on a red circle"]), tok(["a red circle", "blue square on a red circle"]))
    assert again.kind == "word_level" and again.vocab_size == tok.vocab_size == 9

# -----------------------------------------------------------------------------
# text encoder


def hf_text_model(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**model.text_config_to_transformers(cfg))).eval()


def text_state_for_hf(ours):
    # transformers 5 names CLIPTextModel's tensors without the text_model. level the single files use
    return {k[len("text_model."):]: v for k, v in ours.state_dict().items()}


def check_text_parity(cfg, ids):
    ours = randomize_(model.TextEncoder(cfg), seed=1).eval()
    ref = hf_text_model(cfg)
    ref.load_state_dict(text_state_for_hf(ours), strict=True)
    with torch.no_grad():
        a, b = ours(ids), ref(input_ids=ids).last_hidden_state
    err = max_rel_err(a, b)
    print(f"text encoder {cfg.width}w: max rel err {err:.2e}")
    assert err <= TOL
    return err


def test_text_encoder_parity_tiny():
    cfg = model.tiny().text
    ids = model.Tokenizer.from_bpe_gz()(["a photo of a cat", "an astronaut riding a horse on the moon, 4k"])
    check_text_parity(cfg, ids)


@pytest.mark.slow
def test_text_encoder_parity_sd15():
    ids = model.Tokenizer.from_bpe_gz()(["a photo of a cat", "an astronaut riding a horse on the moon, 4k"])
    check_text_parity(model.sd15().text, ids)


def test_text_encoder_is_causal():
    enc = randomize_(model.TextEncoder(model.tiny().text)).eval()
    ids = torch.randint(0, 49408, (1, 77))
    ids2 = ids.clone()
    ids2[0, 40:] = 7
    with torch.no_grad():
        a, b = enc(ids), enc(ids2)
    assert torch.allclose(a[:, :40], b[:, :40], atol=1e-6) and not torch.allclose(a[:, 40:], b[:, 40:])

# -----------------------------------------------------------------------------
# VAE


def hf_vae(cfg):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**model.vae_config_to_diffusers(cfg)).eval()


def vae_state_for_diffusers(ours):
    """Our VAE weights under diffusers names, through the explicit key map (1x1-conv attention -> linear)."""
    key_map = model.vae_key_map(ours.cfg)
    out = {}
    for k, v in ours.state_dict().items():
        out[key_map[k]] = v[:, :, 0, 0] if ".attentions." in key_map[k] and v.ndim == 4 else v
    return out


def check_vae_parity(cfg, size):
    ours = randomize_(model.VAE(cfg), seed=2).eval()
    ref = hf_vae(cfg)
    ref.load_state_dict(vae_state_for_diffusers(ours), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    z = torch.randn(2, cfg.z_channels, size // 8, size // 8, generator=g)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        post = ref.encode(x).latent_dist
        img, ref_img = ours.decode(z), ref.decode(z).sample
    errs = max_rel_err(mean, post.mean), max_rel_err(logvar, post.logvar), max_rel_err(img, ref_img)
    print(f"VAE ch={cfg.ch} {size}px: encode mean {errs[0]:.2e}, logvar {errs[1]:.2e}, decode {errs[2]:.2e}")
    assert mean.shape == (2, cfg.z_channels, size // 8, size // 8) and img.shape == x.shape
    assert max(errs) <= TOL
    return errs


def test_vae_parity_tiny():
    check_vae_parity(model.tiny().vae, 64)


@pytest.mark.slow
def test_vae_parity_sd15():
    check_vae_parity(model.sd15().vae, 256)


def test_vae_latents_scaling():
    vae = randomize_(model.VAE(model.tiny().vae)).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert torch.allclose(vae.encode_latents(x, sample=False), mean * 0.18215)
        z1 = vae.encode_latents(x, generator=torch.Generator().manual_seed(0))
        z2 = vae.encode_latents(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(z1, z2) and not torch.allclose(z1, mean * 0.18215)
        assert torch.allclose(vae.decode_latents(mean * 0.18215), vae.decode(mean), atol=1e-5)


def test_vae_decode_gradient_checkpointing():
    vae = randomize_(model.VAE(model.tiny().vae))
    z = torch.randn(1, 4, 4, 4, requires_grad=True)
    vae.decode(z).square().mean().backward()
    g0 = z.grad.clone()
    z.grad = None
    vae.decoder.gradient_checkpointing = True
    vae.decode(z).square().mean().backward()
    assert torch.allclose(z.grad, g0, atol=1e-6)

# -----------------------------------------------------------------------------
# noise schedule


def test_noise_schedule_matches_diffusers():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = model.NoiseSchedule()
    assert torch.allclose(sched.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 920, 999])
    x_t = sched.add_noise(x0, eps, t)
    assert (x_t - ref.add_noise(x0, eps, t)).abs().max() < 1e-5
    # the one-step estimate inverts the forward process up to float32 rounding, even at t = 999
    assert (sched.x0_from_eps(x_t, eps, t) - x0).abs().max() < 1e-4
    assert (sched.eps_from_x0(x_t, x0, t) - eps).abs().max() < 1e-4
    # a cast of the whole model must not cast the schedule
    assert sched.to(torch.bfloat16).alphas_cumprod.dtype == torch.float64

# -----------------------------------------------------------------------------
# compile


def test_compile_fullgraph():
    cfg = model.tiny()
    enc = randomize_(model.TextEncoder(cfg.text)).eval()
    vae = randomize_(model.VAE(cfg.vae)).eval()
    ids = torch.randint(0, 49408, (2, 77))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch._dynamo.reset()
        assert torch.allclose(torch.compile(enc, fullgraph=True, backend="eager")(ids), enc(ids), atol=1e-5)
        assert torch.allclose(torch.compile(vae.decode, fullgraph=True, backend="eager")(z), vae.decode(z), atol=1e-5)

def test_autocast_and_channels_last():
    cfg = model.tiny()
    enc = randomize_(model.TextEncoder(cfg.text)).eval()
    vae = randomize_(model.VAE(cfg.vae)).eval()
    ids = torch.randint(0, 49408, (2, 77))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = enc(ids), vae.encode(x)[0], vae.decode(z)
        cl = vae.encode(x.to(memory_format=torch.channels_last))[0], vae.decode(z.to(memory_format=torch.channels_last))
        assert max_rel_err(cl[0], ref[1]) < 1e-5 and max_rel_err(cl[1], ref[2]) < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(ids), vae.encode(x)[0], vae.decode(z)
    for a, b in zip(low, ref):
        assert a.dtype == torch.bfloat16 or a.dtype == torch.float32
        assert torch.isfinite(a).all() and max_rel_err(a, b) < 0.1

# -----------------------------------------------------------------------------
# checkpoints


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
    from unet import unet_config_to_diffusers, unet_key_map
    unet = UNet2DConditionModel(**unet_config_to_diffusers(sd.config.unet))
    km = unet_key_map(sd.config.unet)
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
    model.save_sd(tiny_sd, single)
    a, b = model.load_sd(single), model.load_sd(pipe_folder[0])
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
    assert_same_weights(model.load_sd(folder), tiny_sd)


def test_original_names_through_diffusers_converters(tiny_sd, pipe_folder, tmp_path):
    """The single-file names are checked against diffusers' own LDM converters, independently of our maps."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from safetensors.torch import load_file
    from unet import unet_config_to_diffusers
    path = tmp_path / "sd.safetensors"
    model.save_sd(tiny_sd, path)
    ckpt = load_file(str(path))
    expected = pipe_folder[1]
    cfg = tiny_sd.config
    pairs = [
        ("unet", convert_ldm_unet_checkpoint(ckpt, unet_config_to_diffusers(cfg.unet))),
        ("vae", convert_ldm_vae_checkpoint(ckpt, model.vae_config_to_diffusers(cfg.vae))),
        ("text", {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}),
    ]
    for name, converted in pairs:
        ref = expected[name]
        assert converted.keys() == ref.keys(), (name, sorted(set(converted) ^ set(ref))[:5])
        for k in ref:
            assert torch.equal(converted[k], ref[k]), (name, k)


def original_state(sd, dtype=None, ema=False):
    out = {}
    for prefix, m in ((model.UNET_PREFIX, sd.unet), (model.VAE_PREFIX, sd.vae), (model.TEXT_PREFIX, sd.text_encoder)):
        for k, v in m.state_dict().items():
            out[prefix + k] = v.to(dtype) if dtype else v.clone()
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["alphas_cumprod"] = model.NoiseSchedule().alphas_cumprod.float()
    if ema:  # LDM's flattened EMA names; they must be ignored, not loaded
        out.update({"model_ema." + k[len(model.UNET_PREFIX):].replace(".", ""): torch.zeros_like(v)
                    for k, v in out.items() if k.startswith(model.UNET_PREFIX)})
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
        sd = model.load_sd(path, dtype=dtype)
        assert sd.config == expected_cfg
        for k, v in state(sd).items():
            assert v.dtype == dtype and torch.equal(v, ref[k].half().to(dtype)), k


def test_config_from_sd15_shapes():
    with torch.device("meta"):
        sd = model.StableDiffusion(model.sd15())
    parts = {"unet": sd.unet.state_dict(), "vae": sd.vae.state_dict(), "text": sd.text_encoder.state_dict()}
    assert model.config_from_state_dicts(parts) == model.sd15()


def test_word_level_tokenizer_travels_in_metadata(tmp_path):
    cfg = model.tiny()
    cfg.text.vocab_size = 16
    tok = model.Tokenizer.word_level(["red", "green", "circle"])
    sd = model.StableDiffusion(cfg, tok)
    model.save_sd(sd, tmp_path / "shapes.safetensors")
    again = model.load_sd(tmp_path / "shapes.safetensors")
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
            model.load_sd(path)
        msg = str(e.value)
        assert str(path) in msg and ".safetensors" in msg and "refused" in msg
        assert not marker.exists()


def test_wrong_kind_of_checkpoint(tiny_sd, tmp_path):
    vae_only = {model.VAE_PREFIX + k: v for k, v in tiny_sd.vae.state_dict().items()}
    save_file(vae_only, tmp_path / "vae.safetensors")
    save_file({k[len(model.VAE_PREFIX):]: v for k, v in vae_only.items()}, tmp_path / "vae_bare.safetensors")
    control = {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
               "control_model.zero_convs.0.0.weight": torch.zeros(32, 32, 1, 1),
               "control_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}
    save_file(control, tmp_path / "control.safetensors")
    save_file({k.removeprefix("control_model."): v for k, v in control.items()}, tmp_path / "control_bare.safetensors")
    for name, what in (("vae", "VAE-only"), ("vae_bare", "VAE-only"), ("control", "ControlNet"), ("control_bare", "ControlNet")):
        with pytest.raises(CheckpointError) as e:
            model.load_sd(tmp_path / f"{name}.safetensors")
        msg = str(e.value)
        assert f"{name}.safetensors" in msg and what in msg and "expected" in msg and "model.diffusion_model." in msg


def test_wrong_kind_of_folder(tmp_path):
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(CheckpointError, match="cn: this looks like a diffusers folder of a single model .ControlNetModel.; expected"):
        model.load_sd(tmp_path / "cn")


def test_missing_and_unexpected_keys_are_listed(tiny_sd, tmp_path):
    sd = original_state(tiny_sd)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    for k in [k for k in sd if k.startswith("model.diffusion_model.output_blocks.2.")]:
        del sd[k]
    path = tmp_path / "broken.safetensors"
    save_file(sd, path, metadata={"sd_config": json.dumps(asdict(tiny_sd.config))})
    with pytest.raises(CheckpointError) as e:
        model.load_sd(path)
    msg = str(e.value)
    assert "broken.safetensors" in msg and "UNet" in msg
    assert "missing keys: output_blocks.2." in msg and "1 unexpected keys: extra.weight" in msg
