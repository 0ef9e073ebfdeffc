"""tools/multigen.py: MultiGen-20M's parquet shards (as Hugging Face datasets stores images: {bytes, path}) become an
imagefolder that data.ControlDataset reads, pixels unchanged."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoded(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_parquet_shards_become_an_imagefolder(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    g = np.random.default_rng(0)
    images = [g.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(5)]
    depths = [g.integers(0, 256, (24, 32), dtype=np.uint8) for _ in range(5)]
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "raw" / "data").mkdir(parents=True)
    for shard, rows in enumerate(([0, 1, 2], [3, 4])):  # two shards, as the datasets are split
        table = pa.table({
            "image": pa.array([{"bytes": encoded(images[i], "JPEG" if i == 1 else "PNG"), "path": None} for i in rows],
                              cell),
            "control_depth": pa.array([{"bytes": encoded(depths[i], "PNG"), "path": f"{i}.png"} for i in rows], cell),
            "text": [f"caption {i}" for i in rows]})
        pq.write_table(table, tmp_path / "raw" / "data" / f"train-{shard:05d}-of-00002.parquet")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "multigen.py"), str(tmp_path / "raw"),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ds = data.ControlDataset(tmp_path / "out", 24)  # reads conditioning_file_name: the depth maps
    assert len(ds) == 5 and ds.rows[1].file_name.endswith(".jpg") and ds.rows[0].text == "caption 0"
    for i in (0, 3, 4):  # PNGs come through byte for byte, so the pixels are the originals
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / ds.rows[i].file_name)), images[i])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / ds.rows[i].control)), depths[i])
    item = ds[2]
    assert item["image"].shape == (3, 24, 24) and item["control"].shape == (3, 24, 24)
    assert torch.allclose(item["control"][0], item["control"][1])  # a grey depth map, repeated to RGB
    # a folder with no parquet is refused with one line
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "multigen.py"), str(tmp_path / "out"),
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no .parquet files" in r.stderr and "Traceback" not in r.stderr
