"""Data: (image, control map, caption) datasets and a seeded, resumable loader.

1. `ControlDataset`: a folder in the Hugging Face "imagefolder" layout: `metadata.jsonl` holds one JSON object per
   line with `file_name` (the image), `text` (the caption) and a control column (`conditioning_file_name` unless told
   otherwise), paths relative to the folder. Image and control are brought to resolution x resolution together, so
   they stay pixel-aligned whatever their sizes: `resize="squash"` (the default, upstream's) resizes both straight to
   the square, aspect not kept (bicubic, antialiased); `resize="crop"` resizes the short side (bilinear) and crops a
   square by one shared box, centred or random. A missing or corrupt file skips the sample (counted), never the run.
2. `make_loader`: a DataLoader whose order is a pure function of (seed, epoch, step), so a run split over DDP ranks
   sees the samples of one process with the whole batch, and a resumed run picks up at the exact batch.

Images come out as float (3, R, R) in [-1, 1] (what the VAE takes), controls as float (3, R, R) in [0, 1] (what
the ControlNet's hint takes). The shapes world's renderer, which writes such datasets, is shapes_render.py.
"""
import functools
import json
import logging
import math
import os
import posixpath
import signal
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset that cannot be used as given: names the file (and line) and what is wrong with it."""

# -----------------------------------------------------------------------------
# imagefolder metadata


class Row(NamedTuple):
    """One metadata row: image path, caption, control path (None: computed by the annotator)."""
    file_name: str
    text: str
    control: Optional[str]
    line: int  # in metadata.jsonl, for error messages


def safe_relpath(value, column, where):
    """Normalise a metadata path and refuse one that would read outside the dataset folder: a metadata file is
    data, and data must not point the loader at /etc/passwd. The check is lexical (absolute paths, drive letters,
    `..` that climbs out); symlinks placed inside the folder by its owner are followed as usual."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {column} must be a non-empty relative path, got {value!r}")
    p = value.replace("\\", "/")  # metadata written on Windows
    if p.startswith("/") or os.path.isabs(value) or (len(p) >= 2 and p[1] == ":"):
        raise DataError(f"{where}: {column} {value!r} is an absolute path; make it relative to the dataset folder")
    p = posixpath.normpath(p)
    if p == "." or p == ".." or p.startswith("../"):
        raise DataError(f"{where}: {column} {value!r} escapes the dataset folder")
    return p


def read_metadata(root, control_column="conditioning_file_name"):
    """Parse root/metadata.jsonl into Rows; a malformed or unsafe row raises a DataError naming it."""
    path = os.path.join(os.fspath(root), "metadata.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{root}: no metadata.jsonl; expected an imagefolder dataset with one "
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
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            file_name = safe_relpath(row.get("file_name"), "file_name", where)
            text = row.get("text") or ""  # an absent caption trains the unconditional branch
            if not isinstance(text, str):
                raise DataError(f"{where}: text must be a string, got {text!r}")
            control = row.get(control_column)
            if control is not None:
                control = safe_relpath(control, control_column, where)
            rows.append(Row(file_name, text, control, line_no))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# -----------------------------------------------------------------------------
# pixels: any PIL mode -> float RGB in [0, 1], image and control cropped by one shared box


def crop_box(size, resolution, rng=None):
    """The training crop as fractions (x0, y0, x1, y1) of an image of `size` = (w, h): the shorter side resized to
    `resolution`, then a square, centred or at a whole-pixel offset drawn from `rng`. Fractions, so that the same
    box lands on the same content in a control map stored at another resolution."""
    w, h = size
    rw, rh = w * resolution / min(w, h), h * resolution / min(w, h)
    if rng is None:
        x0, y0 = (rw - resolution) / 2, (rh - resolution) / 2
    else:
        x0 = int(rng.integers(0, math.floor(rw - resolution + 1e-6) + 1))
        y0 = int(rng.integers(0, math.floor(rh - resolution + 1e-6) + 1))
    return x0 / rw, y0 / rh, (x0 + resolution) / rw, (y0 + resolution) / rh


RESIZE_MODES = ("squash", "crop")


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


def to_rgb01(img, box=None, size=None, resample=Image.BILINEAR):
    """Any PIL image -> float32 array (3, H, W) in [0, 1], optionally cropped to the fractional `box` and resized
    to `size` (a side, or (w, h); PIL's filters are area-aware when shrinking). 8-bit modes (L, RGB, RGBA, P, LA,
    1, CMYK, ...) go through PIL's RGB conversion (alpha dropped); high-bit-depth modes are resampled in float, so no
    precision is lost: I;16 (16-bit PNG depth maps) and I are scaled by the 16-bit range (value / 65535), F is taken
    as already in [0, 1]."""
    size = (size, size) if isinstance(size, int) else size
    pbox = None if box is None else (box[0] * img.width, box[1] * img.height,
                                     box[2] * img.width, box[3] * img.height)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float32)
        if img.mode != "F":
            a = a / 65535.0
        ch = Image.fromarray(np.ascontiguousarray(a))  # float32 2-d -> mode F
        if size is not None:
            ch = ch.resize(size, resample, box=pbox)
        a = np.clip(np.asarray(ch, dtype=np.float32), 0.0, 1.0)
        return np.repeat(a[None], 3, axis=0)
    if img.mode == "P":
        img = img.convert("RGBA")  # palette transparency is only honoured through RGBA
    if img.mode != "RGB":
        img = img.convert("RGB")
    if size is not None:
        img = img.resize(size, resample, box=pbox)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


# -----------------------------------------------------------------------------
# the dataset


class ControlDataset(torch.utils.data.Dataset):
    """(image, control, caption) samples of an imagefolder dataset, at resolution^2.

    resize "squash": image and control resized straight to R x R with PIL's bicubic filter (antialiased), as
    upstream's training and evaluation transforms do (torchvision's Resize((R, R), BICUBIC) on PIL images, which is
    PIL's resize); a non-square picture is stretched. resize "crop": the short side resized to R (bilinear), then a
    square crop, centred or (random_crop) drawn per (seed, epoch, index); random_crop needs "crop".

    dataset[i] -> dict(image (3,R,R) in [-1,1], control (3,R,R) in [0,1], text, index), or None when a file is
    missing or unreadable (collate drops and counts those). The loader indexes with (index, epoch, seed) keys, which
    make the random crop a pure function of them. A row without a control gets annotator(image01 (1,3,R,R)), which
    returns (1,C,R,R), (C,R,R) or (R,R) in [0,1], C = 1 or 3. control_column None: no controls (control None)."""

    def __init__(self, root, resolution, control_column="conditioning_file_name", random_crop=False,
                 annotator=None, seed=0, resize="squash"):
        if resize not in RESIZE_MODES:
            raise DataError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        if random_crop and resize != "crop":
            raise DataError(f'random_crop needs resize="crop" (resize="{resize}" keeps the whole picture)')
        self.root, self.resolution, self.resize = os.fspath(root), int(resolution), resize
        self.control_column, self.random_crop = control_column, random_crop
        self.annotator, self.seed = annotator, seed
        self.rows = read_metadata(self.root, control_column)
        missing = [r.line for r in self.rows if r.control is None]
        if missing and annotator is None and control_column is not None:
            raise DataError(f"{self.root}/metadata.jsonl: {len(missing)} row(s) (first at line {missing[0]}) "
                            f"have no {control_column!r}; pass an annotator to compute the control on the fly "
                            "or choose another control column")
        self.skipped = 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        index, epoch, seed = key if isinstance(key, tuple) else (key, 0, self.seed)
        row, R = self.rows[index], self.resolution
        path = os.path.join(self.root, row.file_name)
        crop = self.resize == "crop"
        try:
            # squash decodes JPEGs in full, as upstream does (a reduced-scale decode changes the pixels)
            image = open_image(path, R if crop else None)
            control = None
            if row.control is not None:
                path = os.path.join(self.root, row.control)
                control = open_image(path, R if crop else None)
            if crop:
                rng = np.random.default_rng((seed, epoch, index)) if self.random_crop else None
                box, resample = crop_box(image.size, R, rng), Image.BILINEAR
            else:
                box, resample = None, Image.BICUBIC
            image01 = to_rgb01(image, box, R, resample)
            control01 = None if control is None else to_rgb01(control, box, R, resample)
        except Exception as e:  # any failure to read one file costs one sample, never the run
            self.skipped += 1
            log.warning("skipping sample %d (metadata line %d): %s: %s", index, row.line, path, e)
            return None
        image01 = torch.from_numpy(image01)
        if control01 is not None or self.control_column is None:
            control01 = None if control01 is None else torch.from_numpy(control01)
        else:
            control01 = self.annotate(image01)
        return dict(image=image01 * 2 - 1, control=control01, text=row.text, index=index)

    @torch.no_grad()
    def annotate(self, image01):
        c = torch.as_tensor(self.annotator(image01[None])).float()
        c = c.reshape(-1, *c.shape[-2:])
        return c.expand(3, -1, -1).clone() if c.shape[0] == 1 else c


def collate(samples, resolution):
    """Stack the samples that loaded; `skipped` counts the others (in the batch, because with worker processes the
    dataset's own counter lives in them). An empty batch (all skipped) holds (0, 3, R, R) tensors."""
    kept = [s for s in samples if s is not None]

    def stack(key):
        if not kept:
            return torch.empty(0, 3, resolution, resolution)
        return torch.stack([s[key] for s in kept])

    no_controls = kept and kept[0]["control"] is None
    return dict(
        image=stack("image"), control=None if no_controls else stack("control"),
        text=[s["text"] for s in kept],
        index=torch.tensor([s["index"] for s in kept], dtype=torch.long),
        skipped=len(samples) - len(kept),
    )


# -----------------------------------------------------------------------------
# the loader: order = f(seed, epoch), sharded over ranks, resumable at any step


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each global batch, as (index, epoch, seed) keys.

    Epoch e visits the samples in the order permutation(seed + e); rank r takes slice r of each global batch, so
    world_size processes with batch b see exactly the samples (and crops) of one process with batch world_size * b.
    Step s is global batch s % per_epoch of epoch s // per_epoch: starting at `start_step` skips the earlier batches
    by arithmetic, without loading them. Runs forever unless `epochs` is given."""

    def __init__(self, n, batch_size, seed, rank=0, world_size=1, start_step=0, drop_last=True,
                 epochs=None, shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.start_step, self.epochs, self.shuffle = start_step, epochs, shuffle
        g = batch_size * world_size  # global batches in one pass over the n samples
        self.per_epoch = n // g if drop_last else -(-n // g)
        if self.per_epoch == 0:
            raise DataError(f"{n} samples make no full global batch of {batch_size} x {world_size}; "
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
    """A DataLoader over a ControlDataset in ShardedBatchSampler's order; batch_size is per rank, start_step counts
    its batches (micro-batches when accumulating). Its own torch.Generator keeps it from drawing on the global RNG
    (which would shift the noise of a resumed run)."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_step, drop_last,
                                  epochs, shuffle)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        collate_fn=functools.partial(collate, resolution=dataset.resolution),
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_ctrl_c if num_workers > 0 else None)


def ignore_ctrl_c(worker_id):
    """In a loader's worker process. A Ctrl-C in the terminal reaches every process of the job; the training loop
    finishes its step before it stops (train.StopSignals), and that step may still need batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
