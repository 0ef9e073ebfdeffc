"""data.py: metadata parsing, aligned crops, PIL modes, path safety, bad files, the seeded sharded
resumable loader, and the shapes-world renderer."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import shapes_render

R = 16


def write_dataset(root, rows, images=None):
    """rows: metadata dicts; images: {relative path: PIL image or raw bytes}."""
    os.makedirs(root, exist_ok=True)
    for rel, img in (images or {}).items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(img, bytes):
            with open(path, "wb") as f:
                f.write(img)
        else:
            img.save(path)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(root)


def noise_image(seed, w, h, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def plain_dataset(root, n, w=24, h=20):
    """n noise images, each with the inverted image as its control."""
    images, rows = {}, []
    for i in range(n):
        img = noise_image(i, w + i % 3, h + i % 5)
        images[f"img/{i}.png"] = img
        images[f"ctl/{i}.png"] = Image.fromarray(255 - np.asarray(img))
        rows.append(dict(file_name=f"img/{i}.png", text=f"caption {i}", conditioning_file_name=f"ctl/{i}.png"))
    return write_dataset(root, rows, images)


# ----------------------------------------------------------------------------- metadata


def test_read_metadata(tmp_path):
    root = write_dataset(tmp_path, [
        dict(file_name="a.png", text="one", conditioning_file_name="c/a.png", depth="d/a.png"),
        "",
        dict(file_name="./sub/b.png", conditioning_file_name="c/b.png"),
    ])
    rows = data.read_metadata(root)
    assert [(r.file_name, r.text, r.control, r.line) for r in rows] == [
        ("a.png", "one", "c/a.png", 1), ("sub/b.png", "", "c/b.png", 3)]
    assert [r.control for r in data.read_metadata(root, "depth")] == ["d/a.png", None]
    write_dataset(tmp_path, [dict(file_name="a.png", text="x"), "{not json"])
    with pytest.raises(ValueError, match="line 2"):
        data.read_metadata(root)
    with pytest.raises(data.DataError, match="metadata.jsonl"):
        data.read_metadata(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", ["../x.png", "a/../../x.png", "/etc/passwd", "..\\x.png", "C:\\x.png", "", 3])
@pytest.mark.parametrize("column", ["file_name", "conditioning_file_name"])
def test_escaping_paths_are_refused(tmp_path, bad, column):
    row = dict(file_name="ok.png", text="t", conditioning_file_name="c.png")
    row[column] = bad
    root = write_dataset(tmp_path, [dict(file_name="fine/ok.png", text="t", conditioning_file_name="c.png"), row])
    with pytest.raises(ValueError, match=f"line 2: {column}"):
        data.ControlDataset(root, R)


def test_missing_control_column_needs_annotator(tmp_path):
    root = write_dataset(tmp_path, [dict(file_name="a.png", text="t")], {"a.png": noise_image(0, 20, 16)})
    with pytest.raises(ValueError, match="annotator"):
        data.ControlDataset(root, R)
    ds = data.ControlDataset(root, R, annotator=lambda x: 1 - x.mean(1, keepdim=True))
    s = ds[0]
    image01 = (s["image"] + 1) / 2
    assert s["control"].shape == (3, R, R)
    torch.testing.assert_close(s["control"], (1 - image01.mean(0, keepdim=True)).expand(3, R, R))


# ----------------------------------------------------------------------------- crops and modes


@pytest.mark.parametrize("random_crop", [False, True])
def test_image_and_control_cropped_identically(tmp_path, random_crop):
    root = plain_dataset(tmp_path, 4, w=40, h=18)
    ds = data.ControlDataset(root, R, random_crop=random_crop, resize="crop")
    crops = set()
    for i in range(4):
        for epoch in range(3):
            s = ds[(i, epoch, 7)]
            assert s["image"].shape == s["control"].shape == (3, R, R)
            assert s["image"].min() >= -1 and s["image"].max() <= 1
            image01 = (s["image"] + 1) / 2
            # the control is 255 - image: aligned crops agree up to PIL's 8-bit fixed-point rounding ...
            assert (s["control"] - (1 - image01)).abs().max() < 2.5 / 255
            # ... and a one-pixel misalignment would not (the check can fail)
            assert (s["control"][:, :, 1:] - (1 - image01[:, :, :-1])).abs().mean() > 0.05
            crops.add((i, image01.sum().item()))
    # random crops move with the epoch; centre crops do not; both are deterministic
    assert len(crops) == (4 * 3 if random_crop else 4)
    torch.testing.assert_close(ds[(2, 1, 7)]["image"], ds[(2, 1, 7)]["image"], rtol=0, atol=0)


@pytest.mark.parametrize("image_name, image_size", [("a.png", (120, 80)), ("a.jpg", (960, 640))])
def test_control_at_another_resolution_stays_aligned(tmp_path, image_name, image_size):
    """A control stored smaller than its image (and a big JPEG decoded at reduced scale) still
    lands on the same content: the crop box is shared as fractions of each picture."""
    def smooth(w, h):  # one continuous picture sampled at two resolutions
        y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        a = 0.5 + 0.5 * np.sin(9 * x + 2 * np.cos(7 * y)) * np.cos(5 * y)
        return Image.fromarray(np.round(a * 255).astype(np.uint8)).convert("RGB")
    root = write_dataset(tmp_path, [dict(file_name=image_name, text="", conditioning_file_name="b.png")],
                         {image_name: smooth(*image_size), "b.png": smooth(60, 40)})
    ds = data.ControlDataset(root, 32, random_crop=True, resize="crop")
    for epoch in range(4):
        s = ds[(0, epoch, 0)]
        img, ctl = (s["image"] + 1) / 2, s["control"]
        assert (img - ctl).abs().mean() < 0.02
        assert (img[:, :, 2:] - ctl[:, :, :-2]).abs().mean() > 0.05


def smooth_picture(w, h, mode="RGB"):
    """A smooth non-square picture (so that resampling filters and misalignment both show)."""
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    a = np.stack([0.5 + 0.5 * np.sin(9 * x + 2 * np.cos(7 * y)) * np.cos(5 * y), x * y, 1 - x], -1)
    return Image.fromarray(np.round(a * 255).astype(np.uint8)).convert(mode)


def pil01(img):
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("image_name", ["a.png", "a.jpg"])
def test_squash_is_pil_bicubic_resize(tmp_path, image_name):
    """resize="squash" (the default): image and control stretched to R x R by PIL's bicubic filter, as upstream's
    transforms do on PIL images; the aspect is not kept, nothing is cut, and a big JPEG is decoded in full."""
    image, control = smooth_picture(300, 130), Image.fromarray(255 - np.asarray(smooth_picture(150, 65)))
    root = write_dataset(tmp_path, [dict(file_name=image_name, text="", conditioning_file_name="c.png")],
                         {image_name: image, "c.png": control})
    s = data.ControlDataset(root, 32)[0]
    stored = Image.open(tmp_path / image_name)
    want_image = pil01(stored.convert("RGB").resize((32, 32), Image.BICUBIC))
    want_control = pil01(control.convert("RGB").resize((32, 32), Image.BICUBIC))
    assert (((s["image"] + 1) / 2 - want_image).abs().max() * 255).item() < 1e-3  # one 8-bit level: far inside
    assert ((s["control"] - want_control).abs().max() * 255).item() < 1e-3
    # aligned: the control (the inverted picture, stored at half size) lands on the image's content ...
    img01 = (s["image"] + 1) / 2
    assert (s["control"][1:] - (1 - img01[1:])).abs().mean() < 0.02
    # ... and a one-pixel shift would not
    assert (s["control"][1:, :, 1:] - (1 - img01[1:, :, :-1])).abs().mean() > 1.5 * \
        (s["control"][1:] - (1 - img01[1:])).abs().mean()
    # the whole picture is kept: the right edge of the stored image is the right edge of the sample
    assert (img01[2, :, -1] - want_image[2, :, -1]).abs().max() < 1e-6 and img01[2, :, -1].max() < 0.05


def test_crop_is_the_previous_behaviour(tmp_path):
    """resize="crop": the short side resized (bilinear) and the centre square cut, by one box shared by image
    and control, exactly as before resize existed."""
    image = smooth_picture(60, 26)
    root = write_dataset(tmp_path, [dict(file_name="a.png", text="", conditioning_file_name="c.png")],
                         {"a.png": image, "c.png": Image.fromarray(255 - np.asarray(image))})
    s = data.ControlDataset(root, R, resize="crop")[0]
    box = data.crop_box(image.size, R)  # the centre crop, (17 / 60 .. 43 / 60) of the width
    assert box == pytest.approx((17 / 60, 0.0, 43 / 60, 1.0))
    want = torch.from_numpy(np.asarray(image.resize((R, R), Image.BILINEAR, box=(17, 0, 43, 26)),
                                       dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close((s["image"] + 1) / 2, want, atol=1e-6, rtol=0)
    # roughly what a naive resize-then-centre-crop gives (a sanity check of the box, not of the rounding)
    naive = pil01(image.resize((round(60 * R / 26), R), Image.BILINEAR))[:, :, 10:10 + R]
    assert ((s["image"] + 1) / 2 - naive).abs().mean() < 0.03
    assert (s["control"] - (1 - (s["image"] + 1) / 2)).abs().max() < 2.5 / 255


@pytest.mark.parametrize("resize", data.RESIZE_MODES)
def test_16bit_control_keeps_precision_in_both_modes(tmp_path, resize):
    h, w = 14, 40  # non-square: squash stretches, crop cuts
    levels = np.round(np.linspace(0, 65535, w)).astype(np.uint16)
    ramp = np.tile(levels, (h, 1))
    root = write_dataset(tmp_path, [dict(file_name="a.png", text="", conditioning_file_name="d.png")],
                         {"a.png": noise_image(0, w, h), "d.png": Image.fromarray(ramp)})
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    c = data.ControlDataset(root, R, resize=resize)[0]["control"]
    f = Image.fromarray((ramp / 65535).astype(np.float32))
    want = f.resize((R, R), Image.BICUBIC) if resize == "squash" else \
        f.resize((R, R), Image.BILINEAR, box=tuple(v * s for v, s in zip(data.crop_box((w, h), R), (w, h, w, h))))
    want = torch.from_numpy(np.clip(np.asarray(want), 0, 1))
    torch.testing.assert_close(c, want.expand(3, R, R), atol=1e-6, rtol=0)
    assert (c * 255 - (c * 255).round()).abs().max() > 0.05  # not 8-bit levels


def test_resize_modes_refused(tmp_path):
    root = plain_dataset(tmp_path, 1)
    with pytest.raises(data.DataError, match="random_crop needs resize=.crop.") as e:
        data.ControlDataset(root, R, random_crop=True)
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="resize must be one of squash, crop"):
        data.ControlDataset(root, R, resize="stretch")


def test_squash_matches_torchvision(tmp_path):
    """Upstream's transform itself, where torchvision is installed."""
    try:
        from torchvision import transforms
    except Exception as e:  # noqa: BLE001 (missing, or broken against this torch)
        pytest.skip(f"torchvision not importable ({type(e).__name__}: {e}); the same check against PIL's bicubic "
                    "resize runs in test_squash_is_pil_bicubic_resize")
    image = smooth_picture(90, 37)
    root = write_dataset(tmp_path, [dict(file_name="a.png", text="", conditioning_file_name="a.png")],
                         {"a.png": image})
    s = data.ControlDataset(root, 24)[0]
    t = transforms.Compose([transforms.Resize((24, 24), interpolation=transforms.InterpolationMode.BICUBIC,
                                              antialias=True), transforms.ToTensor()])
    torch.testing.assert_close((s["image"] + 1) / 2, t(image.convert("RGB")), atol=1.01 / 255, rtol=0)
    torch.testing.assert_close(s["control"], t(image.convert("RGB")), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode, pixel, expected", [
    ("L", 128, (128 / 255,) * 3),
    ("RGB", (10, 200, 30), (10 / 255, 200 / 255, 30 / 255)),
    ("RGBA", (10, 200, 30, 0), (10 / 255, 200 / 255, 30 / 255)),
    ("LA", (77, 255), (77 / 255,) * 3),
    ("1", 1, (1.0,) * 3),
    ("I;16", 30000, (30000 / 65535,) * 3),
    ("I", 65535, (1.0,) * 3),
    ("F", 0.25, (0.25,) * 3),
])
def test_control_pil_modes(tmp_path, mode, pixel, expected):
    ctl = Image.new(mode, (30, 22), pixel)
    ext = "tiff" if mode in ("I", "F") else "png"
    root = write_dataset(tmp_path, [dict(file_name="a.png", text="", conditioning_file_name=f"c.{ext}")],
                         {"a.png": noise_image(0, 30, 22), f"c.{ext}": ctl})
    assert Image.open(tmp_path / f"c.{ext}").mode == mode
    c = data.ControlDataset(root, R)[0]["control"]
    assert c.shape == (3, R, R) and c.dtype == torch.float32
    torch.testing.assert_close(c, torch.tensor(expected, dtype=torch.float32)[:, None, None].expand(3, R, R),
                               atol=1e-6, rtol=0)


def test_palette_and_16bit_content(tmp_path):
    pal = Image.new("P", (20, 20))
    pal.putpalette([0, 0, 0, 250, 20, 5] + [0] * 762)
    pal.paste(1, (0, 0, 20, 10))  # top half palette entry 1
    levels = np.linspace(0, 65535, 20).round().astype(np.uint16)
    ramp = Image.fromarray(np.tile(levels, (20, 1)))  # I;16
    root = write_dataset(tmp_path, [dict(file_name="a.png", text="", conditioning_file_name="p.png"),
                                    dict(file_name="a.png", text="", conditioning_file_name="r.png")],
                         {"a.png": noise_image(0, 20, 20), "p.png": pal, "r.png": ramp})
    ds = data.ControlDataset(root, 20)
    p = ds[0]["control"]
    torch.testing.assert_close(p[:, 2, 5], torch.tensor([250, 20, 5]) / 255.0)
    torch.testing.assert_close(p[:, 17, 5], torch.zeros(3))
    r = ds[1]["control"]
    torch.testing.assert_close(r[0, 3], torch.from_numpy(levels / 65535).float(), atol=1e-6, rtol=0)  # 8-bit: 2e-3 off


# ----------------------------------------------------------------------------- bad data


def bad_dataset(root):
    root = plain_dataset(root, 8)
    with open(os.path.join(root, "img/1.png"), "wb") as f:
        f.write(b"definitely not a png")
    full = open(os.path.join(root, "img/2.png"), "rb").read()
    with open(os.path.join(root, "img/2.png"), "wb") as f:
        f.write(full[: len(full) // 2])  # truncated
    os.remove(os.path.join(root, "img/3.png"))
    os.remove(os.path.join(root, "ctl/4.png"))
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_skipped_and_counted(tmp_path, num_workers):
    ds = data.ControlDataset(bad_dataset(tmp_path), R)
    batches = list(data.make_loader(ds, 3, seed=0, num_workers=num_workers, drop_last=False, epochs=1))
    assert sum(b["skipped"] for b in batches) == 4  # counted in the batches, even from worker processes
    got = sorted(i for b in batches for i in b["index"].tolist())
    assert got == [0, 5, 6, 7]
    for b in batches:
        assert b["image"].shape == (len(b["text"]), 3, R, R) == b["control"].shape
    if num_workers == 0:
        assert ds.skipped == 4


# ----------------------------------------------------------------------------- the loader


def indices(loader, steps):
    out = []
    for b, _ in zip(loader, range(steps)):
        out.append(b["index"].tolist())
    return out


def test_loader_order_fixed_by_seed(tmp_path):
    ds = data.ControlDataset(plain_dataset(tmp_path, 12), R)
    a = indices(data.make_loader(ds, 4, seed=3, num_workers=0), 9)
    assert a == indices(data.make_loader(ds, 4, seed=3, num_workers=0), 9)
    assert a != indices(data.make_loader(ds, 4, seed=4, num_workers=0), 9)
    for e in range(3):  # each epoch is a permutation, and epochs are reshuffled
        assert sorted(sum(a[3 * e:3 * e + 3], [])) == list(range(12))
    assert a[0:3] != a[3:6]
    # creating and running a loader leaves the global RNG alone (resumed runs draw the same noise)
    torch.manual_seed(0)
    indices(data.make_loader(ds, 4, seed=3, num_workers=0), 2)
    x = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(x, torch.rand(1))


def test_ddp_shards_match_one_process(tmp_path):
    ds = data.ControlDataset(plain_dataset(tmp_path, 10, w=30, h=20), R, random_crop=True, resize="crop")
    one = list(zip(data.make_loader(ds, 4, seed=1, num_workers=0), range(7)))
    ranks = [list(zip(data.make_loader(ds, 2, seed=1, num_workers=0, rank=r, world_size=2), range(7)))
             for r in range(2)]
    for k in range(7):
        full = one[k][0]
        parts = [ranks[r][k][0] for r in range(2)]
        assert torch.equal(full["index"], torch.cat([p["index"] for p in parts]))
        assert torch.equal(full["image"], torch.cat([p["image"] for p in parts]))  # same crops too
        assert full["text"] == parts[0]["text"] + parts[1]["text"]
    assert set(parts[0]["index"].tolist()).isdisjoint(parts[1]["index"].tolist())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_data_position(tmp_path, num_workers):
    ds = data.ControlDataset(plain_dataset(tmp_path, 10, w=30, h=20), R, random_crop=True, resize="crop")
    run = list(zip(data.make_loader(ds, 3, seed=5, num_workers=0), range(8)))  # 3 batches per epoch
    for k in (2, 4):  # resume inside an epoch, crossing into the next
        resumed = list(zip(data.make_loader(ds, 3, seed=5, num_workers=num_workers, start_step=k), range(8 - k)))
        for (a, _), (b, _) in zip(run[k:], resumed):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    # the skipped batches are not even loaded
    counting = CountingDataset(ds.root, R, random_crop=True, resize="crop")
    next(iter(data.make_loader(counting, 3, seed=5, num_workers=0, start_step=50)))
    assert len(counting.calls) == 3 and all(epoch == 50 // 3 for _, epoch, _ in counting.calls)


class CountingDataset(data.ControlDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __getitem__(self, key):
        self.calls.append(key)
        return super().__getitem__(key)


def test_loader_rejects_too_small_dataset(tmp_path):
    ds = data.ControlDataset(plain_dataset(tmp_path, 3), R)
    with pytest.raises(ValueError, match="global batch"):
        data.make_loader(ds, 2, seed=0, num_workers=0, world_size=2)
    assert len(data.make_loader(ds, 2, seed=0, num_workers=0, world_size=2, drop_last=False, epochs=1)) == 1


# ----------------------------------------------------------------------------- the shapes world


def test_render_is_deterministic():
    a, b, c = shapes_render.render_scene(7), shapes_render.render_scene(7), shapes_render.render_scene(8)
    for k in ("image", "depth", "hed", "lineart", "ids"):
        assert np.array_equal(a[k], b[k])
    assert a["text"] == b["text"]
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8
    for k in ("depth", "hed", "lineart"):
        assert a[k].shape == (64, 64) and a[k].dtype == np.uint8
    assert shapes_render.render_scene((1, 2), size=32)["image"].shape == (32, 32, 3)


@pytest.mark.parametrize("seed", range(6))
def test_render_sanity(seed):
    s = shapes_render.render_scene(seed)
    ids, depth = s["ids"], s["depth"].astype(int)
    # caption: every word in the vocabulary, one phrase per object, nothing about position
    words = s["text"].split()
    assert set(words) <= set(shapes_render.SHAPES_VOCAB)
    assert s["text"].count(" and ") == len(s["objects"]) - 1
    for o in s["objects"]:
        assert f"{o['colour']} {o['shape']}" in s["text"]
        assert (ids == s["objects"].index(o) + 1).sum() > 0  # every named object is visible
    # depth: normalised over the scene; an object is nearer (brighter) than the ground behind it,
    # seen just above its top silhouette
    assert depth.max() == 255 and depth.min() == 0
    m = (ids[2:-1] > 0) & (ids[3:] == ids[2:-1]) & (ids[1:-2] <= 0) & (ids[:-3] <= 0)
    i, j = np.nonzero(m)
    i = i + 2
    assert len(i) > 0 and (depth[i + 1, j] > depth[i - 2, j]).all()
    assert depth[ids == -1].max(initial=0) == 0  # the sky is infinitely far
    # edges: soft edges bright and line art dark along every object/background boundary; sparse
    bg = ids <= 0
    edge = np.zeros_like(bg)
    edge[:, :-1] |= bg[:, :-1] != bg[:, 1:]
    edge[:-1] |= bg[:-1] != bg[1:]
    assert edge.sum() > 0
    assert np.percentile(s["hed"][edge], 5) > 128
    darkest = np.min([np.roll(s["lineart"], (di, dj), (0, 1)) for di in (-1, 0, 1) for dj in (-1, 0, 1)], 0)
    assert darkest[edge].max() < 128
    assert s["hed"].mean() < 0.4 * 255 and (s["lineart"] == 255).mean() > 0.6


def test_shapes_dataset_reads_back(tmp_path):
    shapes_render.write_shapes_dataset(tmp_path, 5, seed=3, size=32, control="hed")
    rows = [json.loads(line) for line in open(tmp_path / "metadata.jsonl")]
    assert len(rows) == 5 and rows[0]["conditioning_file_name"] == rows[0]["hed_file_name"]
    scene = shapes_render.render_scene((3, 4), size=32)
    assert rows[4]["text"] == scene["text"]
    for column, key in (("conditioning_file_name", "hed"), ("depth_file_name", "depth"),
                        ("lineart_file_name", "lineart")):
        s = data.ControlDataset(tmp_path, 32, control_column=column)[4]
        torch.testing.assert_close(s["control"], torch.from_numpy(scene[key] / 255.0).float().expand(3, 32, 32))
        torch.testing.assert_close((s["image"] + 1) / 2, torch.from_numpy(scene["image"] / 255.0).float()
                                   .permute(2, 0, 1), atol=1e-6, rtol=0)
