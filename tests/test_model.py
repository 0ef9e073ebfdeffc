"""model.py against the references: transformers' CLIPTokenizer / CLIPTextModel, diffusers' AutoencoderKL and
DDPMScheduler. Random weights only."""
import gzip
import json

import pytest
import torch

import formats
import model
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


def clip_vocab():
    """CLIP's vocabulary and merges as the shared data README describes them, built here with transformers' own
    byte table (an independent check of model.byte_alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    with gzip.open(model.ASSETS / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:48895]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_files(folder):
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def test_byte_alphabet_is_gpt2s_table():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    ours, theirs = model.byte_alphabet(), bytes_to_unicode()
    assert list(ours.items()) == list(theirs.items())  # the same pairs in the same order (the vocabulary's)


def test_clip_vocab_layout():
    vocab, merges = clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert model.Tokenizer.from_bpe_gz().tok.get_vocab() == vocab
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
    ours = (model.Tokenizer.from_bpe_gz(), formats.tokenizer_from_folder(tmp_path),
            formats.tokenizer_from_folder(tmp_path / "saved"))
    for tok in ours:
        ids = tok(PROMPTS)
        assert ids.shape == (len(PROMPTS), 77)
        for p, a, b in zip(PROMPTS, ids, expected):
            assert a.tolist() == b.tolist(), f"prompt {p!r}"
    # long prompts: truncated with EOS kept last; the untruncated count says so
    tok = model.Tokenizer.from_bpe_gz()
    assert tok.count_tokens("word " * 100) == 102
    assert tok(["word " * 100])[0, -1].item() == 49407 and tok(["word " * 100])[0, -2].item() != 49407


def test_word_level_tokenizer():
    tok = model.Tokenizer.word_level(["a", "red", "blue", "circle", "square", "on"])
    ids = tok(["A red circle, on a blue square.", "a green circle"])
    assert ids.shape == (2, 77)
    bos, eos = tok.bos_id, tok.eos_id
    assert ids[0, :9].tolist() == [bos] + [tok.tok.token_to_id(w) for w in "a red circle on a blue square".split()] + [eos]
    assert (ids[0, 9:] == eos).all()
    assert ids[1, 2].item() == tok.tok.token_to_id("<unk>")
    again = model.Tokenizer.from_json(tok.to_json())
    assert torch.equal(again(["a red circle", "blue square on a red circle"]), tok(["a red circle", "blue square on a red circle"]))
    assert again.kind == "word_level" and again.vocab_size == tok.vocab_size == 9

# -----------------------------------------------------------------------------
# text encoder


def hf_text_model(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**formats.text_config_to_transformers(cfg))).eval()


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
    check_text_parity(model.SDConfig().text, ids)


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
    return AutoencoderKL(**formats.vae_config_to_diffusers(cfg)).eval()


def vae_state_for_diffusers(ours):
    """Our VAE weights under diffusers names, through the explicit key map (1x1-conv attention -> linear)."""
    key_map = formats.vae_key_map(ours.cfg)
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
    check_vae_parity(model.SDConfig().vae, 256)


def test_vae_latents_scaling():
    vae = randomize_(model.VAE(model.tiny().vae)).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert torch.allclose(vae.encode_latents(x), mean * 0.18215)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
        z = vae.encode_latents(x, noise)
        assert torch.allclose(z, (mean + (0.5 * logvar).exp() * noise) * 0.18215)
        assert torch.allclose(vae.decode_latents(mean * 0.18215), vae.decode(mean), atol=1e-5)


def test_vae_decode_gradient_checkpointing():
    vae = randomize_(model.VAE(model.tiny().vae))
    z = torch.randn(1, 4, 4, 4, requires_grad=True)
    vae.decode(z).square().mean().backward()
    g0 = z.grad.clone()
    z.grad = None
    vae.decoder.grad_checkpointing = True
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
