"""The shapes world's data: procedural 3D scenes with exact controls, written as an imagefolder dataset.

`render_scene` ray-casts 1-3 spheres, boxes and cylinders on a ground plane (numpy, analytic intersections) and
returns the image with its exact controls: normalised inverse depth (near = bright, min-max over the scene, as
MiDaS / ControlNet depth maps look), soft edges (HED-like) and line art (dark lines on white). `write_shapes_dataset`
writes such scenes in the layout data.ControlDataset reads. Captions name objects and colours, never positions, so
the layout can only come from the control (InnerControl's question: does the model follow the control?).
"""
import json
import math
import multiprocessing
import os

import numpy as np
from PIL import Image

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
    row["ids_file_name"] = f"ids/{i:06d}.png"  # which surface each pixel shows: 0 sky, 1 ground, k + 1 object k
    Image.fromarray((scene["ids"] + 1).astype(np.uint8)).save(os.path.join(root, row["ids_file_name"]),
                                                               compress_level=1)
    row["conditioning_file_name"] = row[f"{control}_file_name"]
    row["seed"] = [seed, i]
    return row


def write_shapes_dataset(root, n, seed, size=64, control="depth", num_workers=0):
    """Render scenes (seed, 0) .. (seed, n-1) into `root` as an imagefolder dataset.

    Writes images/, depth/, hed/, lineart/, ids/ PNGs (8-bit; line art dark on white; ids: 0 sky, 1 ground, k + 1
    object k) and metadata.jsonl with columns file_name, text, depth_file_name, hed_file_name, lineart_file_name,
    ids_file_name, conditioning_file_name (= the `control` one's) and seed. metadata.jsonl is written last, through
    a temporary file, so a folder that has it is complete. num_workers > 0 renders in that many processes. Returns
    the metadata path."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    root = os.fspath(root)
    for sub in ("images", "ids", *CONTROLS):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    jobs = [(root, seed, i, size, control) for i in range(n)]
    if num_workers > 0:
        with multiprocessing.Pool(num_workers) as pool:
            rows = pool.map(_write_scene, jobs, chunksize=max(1, n // (8 * num_workers)))
    else:
        rows = [_write_scene(job) for job in jobs]
    path = os.path.join(root, "metadata.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    return path
