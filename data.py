"""Data: (image, control map, caption) datasets, a seeded loader, and the shapes world.

Three parts, top to bottom:

1. `ControlDataset`: a folder in the Hugging Face "imagefolder" layout. `metadata.jsonl` holds one
   JSON object per line with `file_name` (the image), `text` (the caption) and a control column
   (`conditioning_file_name` unless told otherwise), all paths relative to the folder. Image and
   control are cropped and resized by one shared box, so they stay pixel-aligned whatever their
   sizes; a missing or corrupt file skips the sample (counted) instead of killing a long run.
2. `make_loader`: a DataLoader whose order is a pure function of (seed, epoch, step), so a run
   split over DDP ranks sees the same samples as one process with the whole batch, and a resumed
   run picks up at the exact batch it stopped at without loading the ones before.
3. The shapes world: `render_scene` ray-casts 1-3 spheres, boxes and cylinders on a ground plane
   (numpy, analytic intersections) and returns the image with its exact controls: normalised
   inverse depth (near = bright, min-max over the scene, as MiDaS/ControlNet depth maps look),
   soft edges (HED-like) and line art; `write_shapes_dataset` writes such scenes as an imagefolder
   dataset that part 1 reads. Captions name objects and colours, never positions, so the layout
   can only come from the control (InnerControl's question: does the model follow the control?).

Conventions: images come out as float (3, R, R) in [-1, 1] (what the VAE takes), controls as
float (3, R, R) in [0, 1] (what the ControlNet's hint takes). Stored line art is dark lines on a
white background, the convention of the LineDrawingModel annotator's output (METHOD.md's lineart
"label"); ControlNet v1.1's lineart model is fed its inverse, 1 - lineart (white lines on black).
"""
import functools
import json
import logging
import math
import os
import posixpath
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# imagefolder metadata


class Row(NamedTuple):
    """One metadata row: image path, caption, control path (None: computed by the annotator)."""
    file_name: str
    text: str
    control: Optional[str]
    line: int  # in metadata.jsonl, for error messages


def safe_relpath(value, column, where):
    """Normalise a metadata path and refuse one that would read outside the dataset folder.

    The check is lexical (absolute paths, drive letters, `..` that climbs out after normalising):
    a metadata file is data, and data must not be able to point the loader at /etc/passwd.
    Symlinks placed inside the folder by its owner are followed as usual."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {column} must be a non-empty relative path, got {value!r}")
    p = value.replace("\\", "/")  # metadata written on Windows
    if p.startswith("/") or os.path.isabs(value) or (len(p) >= 2 and p[1] == ":"):
        raise ValueError(f"{where}: {column} {value!r} is an absolute path; "
                         "paths must be relative to the dataset folder")
    p = posixpath.normpath(p)
    if p == "." or p == ".." or p.startswith("../"):
        raise ValueError(f"{where}: {column} {value!r} escapes the dataset folder")
    return p


def read_metadata(root, control_column="conditioning_file_name"):
    """Parse root/metadata.jsonl into Rows; a malformed or unsafe row raises ValueError naming it."""
    path = os.path.join(os.fspath(root), "metadata.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root}: no metadata.jsonl; expected an imagefolder dataset with one "
                                f"JSON object per line holding file_name, text and {control_column}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            file_name = safe_relpath(row.get("file_name"), "file_name", where)
            text = row.get("text") or ""  # an absent caption trains the unconditional branch
            if not isinstance(text, str):
                raise ValueError(f"{where}: text must be a string, got {text!r}")
            control = row.get(control_column)
            if control is not None:
                control = safe_relpath(control, control_column, where)
            rows.append(Row(file_name, text, control, line_no))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# -----------------------------------------------------------------------------
# pixels: any PIL mode -> float RGB in [0, 1], image and control cropped by one shared box


def crop_box(size, resolution, rng=None):
    """The training crop as fractions (x0, y0, x1, y1) of an image of `size` = (w, h).

    Resize the shorter side to `resolution`, then take a resolution x resolution square: centred,
    or at a whole-pixel offset drawn from `rng`. Fractions rather than pixels so the same box lands
    on the same content in a control map stored at another resolution."""
    w, h = size
    rw, rh = w * resolution / min(w, h), h * resolution / min(w, h)
    if rng is None:
        x0, y0 = (rw - resolution) / 2, (rh - resolution) / 2
    else:
        x0 = int(rng.integers(0, math.floor(rw - resolution + 1e-6) + 1))
        y0 = int(rng.integers(0, math.floor(rh - resolution + 1e-6) + 1))
    return x0 / rw, y0 / rh, (x0 + resolution) / rw, (y0 + resolution) / rh


def open_image(path, resolution=None):
    """Open and fully decode an image file (raises on a missing, truncated or unreadable file)."""
    with Image.open(path) as img:
        if resolution and img.format == "JPEG":
            # let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the crop: big
            # photos then cost a fraction of a full decode
            w, h = img.size
            s = resolution / min(w, h)
            img.draft(img.mode, (math.ceil(w * s), math.ceil(h * s)))
        img.load()
        return img


def to_rgb01(img, box=None, resolution=None):
    """Any PIL image -> float32 array (3, H, W) in [0, 1], optionally cropped to the fractional
    `box` and resized to resolution x resolution (bilinear, area-aware when shrinking, as PIL does).

    8-bit modes (L, RGB, RGBA, P, LA, 1, CMYK, ...) go through PIL's RGB conversion (alpha dropped).
    High-bit-depth modes are resampled in float so no precision is lost: I;16 (16-bit PNG depth
    maps) and I are scaled by the 16-bit range (value / 65535); F is taken as already in [0, 1]."""
    size = None if resolution is None else (resolution, resolution)
    pbox = None if box is None else (box[0] * img.width, box[1] * img.height,
                                     box[2] * img.width, box[3] * img.height)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float32)
        if img.mode != "F":
            a = a / 65535.0
        ch = Image.fromarray(np.ascontiguousarray(a))  # float32 2-d -> mode F
        if size is not None:
            ch = ch.resize(size, Image.BILINEAR, box=pbox)
        a = np.clip(np.asarray(ch, dtype=np.float32), 0.0, 1.0)
        return np.repeat(a[None], 3, axis=0)
    if img.mode == "P":
        img = img.convert("RGBA")  # palette transparency is only honoured through RGBA
    if img.mode != "RGB":
        img = img.convert("RGB")
    if size is not None:
        img = img.resize(size, Image.BILINEAR, box=pbox)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


# -----------------------------------------------------------------------------
# the dataset


class ControlDataset(torch.utils.data.Dataset):
    """(image, control, caption) samples of an imagefolder dataset, cropped to resolution^2.

    dataset[i] -> dict(image (3,R,R) in [-1,1], control (3,R,R) in [0,1], text, index), or None when
    the image or control file is missing or unreadable (the loader's collate drops and counts those;
    `self.skipped` counts them in this process). The loader indexes with (index, epoch, seed) keys,
    which make the random crop a pure function of those three numbers (plain int: epoch 0, seed
    `self.seed`). When a row has no control, `annotator` computes it from the cropped image: it is
    called as annotator(image01 (1,3,R,R) in [0,1]) and must return (1,C,R,R), (C,R,R) or (R,R) in
    [0,1] with C = 1 or 3.
    """

    def __init__(self, root, resolution, control_column="conditioning_file_name", random_crop=False,
                 annotator=None, seed=0):
        self.root, self.resolution = os.fspath(root), int(resolution)
        self.control_column, self.random_crop = control_column, random_crop
        self.annotator, self.seed = annotator, seed
        self.rows = read_metadata(self.root, control_column)
        missing = [r.line for r in self.rows if r.control is None]
        if missing and annotator is None:
            raise ValueError(f"{self.root}/metadata.jsonl: {len(missing)} row(s) (first at line {missing[0]}) "
                             f"have no {control_column!r}; pass an annotator to compute the control on the fly "
                             "or choose another control column")
        self.skipped = 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        index, epoch, seed = key if isinstance(key, tuple) else (key, 0, self.seed)
        row, R = self.rows[index], self.resolution
        path = os.path.join(self.root, row.file_name)
        try:
            image = open_image(path, R)
            control = None
            if row.control is not None:
                path = os.path.join(self.root, row.control)
                control = open_image(path, R)
            rng = np.random.default_rng((seed, epoch, index)) if self.random_crop else None
            box = crop_box(image.size, R, rng)
            image01 = to_rgb01(image, box, R)
            control01 = None if control is None else to_rgb01(control, box, R)
        except Exception as e:  # any failure to read one file costs one sample, never the run
            self.skipped += 1
            log.warning("skipping sample %d (metadata line %d): %s: %s", index, row.line, path, e)
            return None
        image01 = torch.from_numpy(image01)
        control01 = self.annotate(image01) if control01 is None else torch.from_numpy(control01)
        return dict(image=image01 * 2 - 1, control=control01, text=row.text, index=index)

    @torch.no_grad()
    def annotate(self, image01):
        c = torch.as_tensor(self.annotator(image01[None])).float()
        c = c.reshape(-1, *c.shape[-2:])
        return c.expand(3, -1, -1).clone() if c.shape[0] == 1 else c


def collate(samples, resolution):
    """Stack the samples that loaded; `skipped` says how many of this batch did not. The count
    travels in the batch because with worker processes the dataset's own counter lives in them.
    A batch may come out empty (all skipped): image and control are then (0, 3, R, R)."""
    kept = [s for s in samples if s is not None]
    empty = torch.empty(0, 3, resolution, resolution)
    return dict(
        image=torch.stack([s["image"] for s in kept]) if kept else empty,
        control=torch.stack([s["control"] for s in kept]) if kept else empty.clone(),
        text=[s["text"] for s in kept],
        index=torch.tensor([s["index"] for s in kept], dtype=torch.long),
        skipped=len(samples) - len(kept),
    )


# -----------------------------------------------------------------------------
# the loader: order = f(seed, epoch), sharded over ranks, resumable at any step


def batches_per_epoch(n, batch_size, world_size=1, drop_last=True):
    """Global batches (batch_size * world_size samples each) in one pass over n samples."""
    g = batch_size * world_size
    return n // g if drop_last else -(-n // g)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each global batch, as (index, epoch, seed) keys.

    Epoch e visits the samples in the order permutation(seed + e). Global batch k of that order is
    split into world_size consecutive slices and rank r takes slice r, so world_size processes with
    batch b see exactly the samples (and crops) of one process with batch world_size * b. Step s is
    global batch s % per_epoch of epoch s // per_epoch, so starting at `start_step` skips the
    earlier batches by arithmetic, without loading them. Runs forever unless `epochs` is given.
    """

    def __init__(self, n, batch_size, seed, rank=0, world_size=1, start_step=0, drop_last=True,
                 epochs=None, shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.start_step, self.epochs, self.shuffle = start_step, epochs, shuffle
        self.per_epoch = batches_per_epoch(n, batch_size, world_size, drop_last)
        if self.per_epoch == 0:
            raise ValueError(f"{n} samples make no full global batch of {batch_size} x {world_size}; "
                             "use a smaller batch or drop_last=False")

    def order(self, epoch):
        return np.random.default_rng(self.seed + epoch).permutation(self.n) if self.shuffle else np.arange(self.n)

    def __len__(self):
        if self.epochs is None:
            raise TypeError("this sampler runs forever (epochs=None)")
        return max(0, self.epochs * self.per_epoch - self.start_step)

    def __iter__(self):
        g, b = self.batch_size * self.world_size, self.batch_size
        step, epoch, order = self.start_step, None, None
        while self.epochs is None or step < self.epochs * self.per_epoch:
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.order(e)
            mine = order[k * g:(k + 1) * g][self.rank * b:(self.rank + 1) * b]
            yield [(int(i), epoch, self.seed) for i in mine]
            step += 1


def make_loader(dataset, batch_size, seed, num_workers, rank=0, world_size=1, start_step=0, drop_last=True,
                epochs=None, shuffle=True):
    """A DataLoader over `dataset` (a ControlDataset) with ShardedBatchSampler's order.

    batch_size is per rank; start_step counts the batches this loader yields (micro-batches when
    accumulating gradients); epochs=None loops forever. Batches are collate()'s dicts. The loader
    gets its own torch.Generator so creating an iterator never draws from the global RNG (which
    would shift the noise of a resumed run)."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_step, drop_last,
                                  epochs, shuffle)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        collate_fn=functools.partial(collate, resolution=dataset.resolution),
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if num_workers > 0 else None)


# -----------------------------------------------------------------------------
# the shapes world: procedural 3D scenes with exact controls

COLOURS = {  # albedo, roughly sRGB
    "red": (0.85, 0.16, 0.13), "orange": (0.95, 0.52, 0.12), "yellow": (0.95, 0.83, 0.18),
    "green": (0.22, 0.68, 0.25), "cyan": (0.18, 0.72, 0.82), "blue": (0.16, 0.32, 0.88),
    "purple": (0.56, 0.26, 0.78), "pink": (0.96, 0.52, 0.72),
}
SHAPES = ("sphere", "box", "cylinder")
SHAPES_VOCAB = ["a", "an", "and", *COLOURS, *SHAPES]  # every word a caption can use

GROUND = np.array([0.62, 0.60, 0.55], np.float32)
HORIZON = np.array([0.86, 0.89, 0.93], np.float32)
ZENITH = np.array([0.40, 0.60, 0.90], np.float32)
EPS = 1e-4


def _dot(a, b):
    return np.einsum("...i,...i->...", a, b)  # much faster than (a * b).sum(-1) over a length-3 axis


def _normalize(v):
    return v / np.sqrt(_dot(v, v))[..., None]


class Sphere:
    """Resting on the ground: centre (x, r, z)."""

    def __init__(self, x, z, size):
        self.r = size
        self.c = np.array([x, size, z], np.float32)
        self.footprint = size

    def intersect(self, o, d):
        oc = o - self.c
        b = _dot(oc, d)
        disc = b * b - (_dot(oc, oc) - self.r ** 2)
        t = -b - np.sqrt(np.maximum(disc, 0))  # near root: rays start outside every object
        return np.where((disc > 0) & (t > EPS), t, np.inf)

    def normal(self, p):
        return (p - self.c) / self.r


class Box:
    """Half extents (hx, hy, hz), standing on the ground, turned by `yaw` about the vertical."""

    def __init__(self, x, z, size, aspect, yaw):
        self.h = np.array([size * aspect[0], size * aspect[1], size * aspect[2]], np.float32)
        self.c = np.array([x, self.h[1], z], np.float32)
        cy, sy = math.cos(yaw), math.sin(yaw)
        self.rot = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], np.float32)  # local -> world
        self.footprint = float(np.hypot(self.h[0], self.h[2]))

    def intersect(self, o, d):
        ol, dl = (o - self.c) @ self.rot, d @ self.rot  # world -> local (rot is orthonormal)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dl
            t1, t2 = (-self.h - ol) * inv, (self.h - ol) * inv
        tnear = np.minimum(t1, t2).max(-1)
        tfar = np.maximum(t1, t2).min(-1)
        return np.where((tnear <= tfar) & (tnear > EPS), tnear, np.inf)  # slab test

    def normal(self, p):
        q = (p - self.c) @ self.rot / self.h  # the hit face is the axis where |q| reaches 1
        axis = np.abs(q).argmax(-1)
        n = np.zeros_like(q)
        rows = np.arange(len(q))
        n[rows, axis] = np.sign(q[rows, axis])
        return n @ self.rot.T


class Cylinder:
    """Vertical, base on the ground at (x, 0, z), radius r, height `height`, capped on top."""

    def __init__(self, x, z, size, height):
        self.r, self.height = size, height
        self.c = np.array([x, 0.0, z], np.float32)
        self.footprint = size

    def intersect(self, o, d):
        ox, oy, oz = (o - self.c).T
        dx, dy, dz = d.T
        a = dx * dx + dz * dz
        b = ox * dx + oz * dz
        disc = b * b - a * (ox * ox + oz * oz - self.r ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
            ys = oy + ts * dy
            side = np.where((disc > 0) & (ts > EPS) & (ys >= 0) & (ys <= self.height), ts, np.inf)
            tc = (self.height - oy) / dy
            cx, cz = ox + tc * dx, oz + tc * dz
            cap = np.where((tc > EPS) & (cx * cx + cz * cz <= self.r ** 2), tc, np.inf)
        return np.minimum(side, cap)

    def normal(self, p):
        q = p - self.c
        on_cap = q[:, 1] >= self.height - 1e-3
        radial = q * np.array([1, 0, 1], np.float32) / self.r
        return np.where(on_cap[:, None], np.array([0, 1, 0], np.float32), radial)


def _sample_objects(rng):
    """1-3 objects with distinct (shape, colour), non-overlapping footprints in a 4 x 4 square."""
    n = int(rng.integers(1, 4))
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    picks = [combos[i] for i in rng.choice(len(combos), n, replace=False)]
    objects = []
    for shape, colour in picks:
        for _ in range(100):
            x, z = rng.uniform(-2.0, 2.0, 2)
            if shape == "sphere":
                obj = Sphere(x, z, rng.uniform(0.45, 0.9))
            elif shape == "box":
                obj = Box(x, z, rng.uniform(0.4, 0.7), rng.uniform(0.7, 1.3, 3), rng.uniform(0, math.pi / 2))
            else:
                obj = Cylinder(x, z, rng.uniform(0.3, 0.6), rng.uniform(0.6, 1.6))
            if all(math.hypot(x - o.c[0], z - o.c[2]) > obj.footprint + o.footprint + 0.1 for o in objects):
                break
        else:
            return None
        obj.shape, obj.colour = shape, colour
        objects.append(obj)
    return objects


def _shift(a, di, dj):
    """a shifted by (di, dj) with edge replication (for neighbour comparisons and blurs)."""
    h, w = a.shape[:2]
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    return p[1 + di:1 + di + h, 1 + dj:1 + dj + w]


def _boundaries(ids, normals):
    """1 on both sides of a pixel pair that belongs to two surfaces or bends sharply between them
    (silhouettes, contacts, box edges, cylinder rims)."""
    b = np.zeros(ids.shape, bool)
    for lo, hi in (((slice(None, -1),), (slice(1, None),)),
                   ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
        e = (ids[lo] != ids[hi]) | (_dot(normals[lo], normals[hi]) < 0.9)
        b[lo] |= e
        b[hi] |= e
    return b


def _blur(a, sigma):
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(a, r, mode="edge")
    h, w = a.shape
    a = sum(k[i] * p[i:i + h, r:r + w] for i in range(2 * r + 1))  # vertical pass
    p = np.pad(a, r, mode="edge")
    return sum(k[j] * p[r:r + h, j:j + w] for j in range(2 * r + 1))  # horizontal pass


def _pool(a, s):
    """Average s x s blocks: supersampled -> output resolution."""
    h, w = a.shape[0] // s, a.shape[1] // s
    return a.reshape(h, s, w, s, *a.shape[2:]).mean((1, 3))


def render_scene(seed, size=64, supersample=2):
    """Render one scene, deterministic in `seed` (an int or a tuple of ints).

    Returns dict(image (S,S,3) uint8, depth (S,S) uint8: inverse depth normalised to 0..255 over
    the scene, near = bright, sky 0; hed (S,S) uint8: soft edges, white on black; lineart (S,S)
    uint8: dark lines on white; ids (S,S) int8: -1 sky, 0 ground, k object k (at each pixel's
    first subsample); text: the caption; objects: list of dict(shape, colour, x, z, size)).
    Each pixel averages supersample^2 rays; the light direction varies across those rays so
    shadows get a soft penumbra at no extra cost.
    """
    rng = np.random.default_rng(seed)
    s2 = size * supersample
    for _ in range(100):
        objects = _sample_objects(rng)
        if objects is None:
            continue
        # camera on a circle around the objects, looking slightly down at them
        az, el = rng.uniform(-math.pi, math.pi), math.radians(rng.uniform(18, 35))
        dist, fov = rng.uniform(5.5, 7.0), math.radians(rng.uniform(38, 46))
        target = np.array([*rng.uniform(-0.3, 0.3, 1), 0.5, *rng.uniform(-0.3, 0.3, 1)], np.float32)
        eye = target + dist * np.array([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)],
                                       np.float32)
        laz, lel = rng.uniform(-math.pi, math.pi), math.radians(rng.uniform(35, 65))
        light = np.array([math.sin(laz) * math.cos(lel), math.sin(lel), math.cos(laz) * math.cos(lel)], np.float32)
        out = _render(objects, eye, target, fov, light, size, supersample)
        counts = np.bincount((out["ids_sub"] + 1).ravel(), minlength=len(objects) + 2)[2:]
        if counts.min() >= 0.01 * s2 * s2:  # every named object is visible
            break
    else:
        raise RuntimeError(f"no valid scene for seed {seed} in 100 tries")
    del out["ids_sub"]
    out["text"] = " and ".join(f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape}" for o in objects)
    out["objects"] = [dict(shape=o.shape, colour=o.colour, x=float(o.c[0]), z=float(o.c[2]),
                           size=float(o.footprint)) for o in objects]
    return out


def _render(objects, eye, target, fov, light, size, ss):
    s2 = size * ss
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, [0, 1, 0]).astype(np.float32)
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    u = (np.arange(s2, dtype=np.float32) + 0.5) / s2 * 2 - 1
    py, px = np.meshgrid(-u, u, indexing="ij")
    half = math.tan(fov / 2)
    d = fwd + (px * half)[..., None] * right + (py * half)[..., None] * up
    d = _normalize(d.astype(np.float32)).reshape(-1, 3)
    o = eye[None]

    # primary rays: ground plane y = 0, then each object, keep the nearest
    with np.errstate(divide="ignore"):
        t = np.where(d[:, 1] < 0, -eye[1] / d[:, 1], np.inf).astype(np.float32)
    ids = np.where(np.isfinite(t), 0, -1).astype(np.int8)
    for k, obj in enumerate(objects, 1):
        tk = obj.intersect(o, d)
        closer = tk < t
        t, ids = np.where(closer, tk, t), np.where(closer, k, ids).astype(np.int8)

    hit = ids >= 0
    p = o + np.where(hit, t, 0)[:, None] * d
    n = np.zeros_like(d)
    n[:, 1] = 1.0  # ground (and, harmlessly, the sky)
    albedo = np.tile(GROUND, (len(d), 1))
    for k, obj in enumerate(objects, 1):
        m = ids == k
        n[m] = obj.normal(p[m])
        albedo[m] = COLOURS[obj.colour]

    # shadow rays; each of the ss x ss subsamples of a pixel sees a slightly different light
    # direction (a small area light), so averaging them gives soft shadow edges
    a = np.cross(light, [0, 0, 1] if abs(light[2]) < 0.9 else [1, 0, 0])
    a /= np.linalg.norm(a)
    b = np.cross(light, a)
    sub = np.arange(s2) % ss
    jx, jy = np.meshgrid((sub + 0.5) / ss - 0.5, (sub + 0.5) / ss - 0.5, indexing="ij")
    ldir = light + 0.08 * (jx[..., None] * a + jy[..., None] * b)
    ldir = _normalize(ldir.astype(np.float32)).reshape(-1, 3)
    lit = np.ones(len(d), np.float32)
    idx = np.flatnonzero(hit & (_dot(n, ldir) > 0))
    so, sd = p[idx] + 1e-3 * n[idx], ldir[idx]
    for obj in objects:
        lit[idx[np.isfinite(obj.intersect(so, sd))]] = 0.0

    # shading: hemisphere ambient + Lambert + a little specular, fog toward the horizon
    ndl = np.maximum(_dot(n, ldir), 0) * lit
    colour = albedo * (0.28 + 0.14 * n[:, 1:2] + 0.75 * ndl[:, None])
    h = _normalize(ldir - d)
    spec = np.where(ids > 0, 0.3 * np.maximum(_dot(n, h), 0) ** 40 * lit, 0)
    colour = colour + spec[:, None]
    fog = 1 - np.exp(-np.maximum(np.where(hit, t, 0) - 6.0, 0) / 18.0)
    colour = colour * (1 - fog[:, None]) + HORIZON * fog[:, None]
    sky = HORIZON + (ZENITH - HORIZON) * np.clip(d[:, 1:2] * 3.0 + 0.1, 0, 1)
    colour = np.where(hit[:, None], colour, sky).reshape(s2, s2, 3)

    # depth along the view axis; the control is inverse depth (MiDaS convention), sky = 0
    z = np.where(hit, t * _dot(d, fwd), np.inf).reshape(s2, s2)
    inv = _pool(1.0 / z, ss)
    inv = (inv - inv.min()) / max(inv.max() - inv.min(), 1e-12)

    # edges: silhouettes and creases from the geometry (sky counts as ground, so the horizon,
    # infinitely far, draws no line); line art thin and dark on white, soft edges blurred and
    # joined by the image's colour discontinuities (shadow borders), as an HED map responds to
    ids2, n2 = ids.reshape(s2, s2), n.reshape(s2, s2, 3)
    lines = _pool(_boundaries(np.maximum(ids2, 0), n2).astype(np.float32), ss)
    image = _pool(colour, ss)
    gy, gx = _shift(image, 1, 0) - _shift(image, -1, 0), _shift(image, 0, 1) - _shift(image, 0, -1)
    grad = np.sqrt((gx ** 2 + gy ** 2).sum(-1)) / 2
    soft = np.maximum(lines, np.clip((grad - 0.04) / 0.2, 0, 1))
    hed = np.clip(_blur(soft, 0.8 * size / 64) * 2.0, 0, 1)

    u8 = lambda x: np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return dict(image=u8(image), depth=u8(inv), hed=u8(hed), lineart=u8(1 - np.clip(lines * 1.5, 0, 1)),
                ids=ids2[::ss, ::ss].copy(), ids_sub=ids2)


CONTROLS = ("depth", "hed", "lineart")


def _write_scene(job):
    root, seed, i, size, control = job
    scene = render_scene((seed, i), size)
    row = dict(file_name=f"images/{i:06d}.png", text=scene["text"])
    Image.fromarray(scene["image"]).save(os.path.join(root, row["file_name"]), compress_level=1)
    for c in CONTROLS:
        row[f"{c}_file_name"] = f"{c}/{i:06d}.png"
        Image.fromarray(scene[c]).save(os.path.join(root, row[f"{c}_file_name"]), compress_level=1)
    row["conditioning_file_name"] = row[f"{control}_file_name"]
    row["seed"] = [seed, i]
    return row


def write_shapes_dataset(root, n, seed, size=64, control="depth", num_workers=0):
    """Render scenes (seed, 0) .. (seed, n-1) into `root` as an imagefolder dataset.

    Writes images/, depth/, hed/, lineart/ PNGs (8-bit; line art dark on white) and metadata.jsonl
    with columns file_name, text, depth_file_name, hed_file_name, lineart_file_name,
    conditioning_file_name (= the `control` one's) and seed. metadata.jsonl is written last,
    through a temporary file, so a folder that has it is complete. num_workers > 0 renders in
    that many processes. Returns the metadata path."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    root = os.fspath(root)
    for sub in ("images", *CONTROLS):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    jobs = [(root, seed, i, size, control) for i in range(n)]
    if num_workers > 0:
        import multiprocessing
        with multiprocessing.Pool(num_workers) as pool:
            rows = pool.map(_write_scene, jobs, chunksize=max(1, n // (8 * num_workers)))
    else:
        rows = [_write_scene(job) for job in jobs]
    path = os.path.join(root, "metadata.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    return path
