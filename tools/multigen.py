"""Convert MultiGen-20M (the Hugging Face datasets ControlNet++ and InnerControl train and evaluate on) to the
imagefolder layout train.py and eval.py read.

    pip install pyarrow        # the one extra dependency, for this tool only
    huggingface-cli download limingcv/MultiGen-20M_depth_eval --repo-type dataset --local-dir raw/depth_eval
    python tools/multigen.py raw/depth_eval data/depth-val

The datasets are parquet shards (`data/*.parquet`) whose image columns (`image`, `control_depth`, `hed`, `lineart`,
...) hold each image's encoded file as {bytes, path}, beside a `text` column. Each image column is written out as
it is stored (no re-encoding) into a folder of its own name; metadata.jsonl gets `file_name` (the `image` column),
`text`, `<column>_file_name` for every other image column, and `conditioning_file_name` = the depth map's
(`control_depth`) when there is one. metadata.jsonl is written last, so a folder that has it is complete.
"""
import argparse
import glob
import json
import os
import sys

from tqdm import tqdm

EXTENSIONS = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"RIFF": ".webp", b"GIF8": ".gif", b"BM": ".bmp"}


def extension(blob, path=None):
    """The file type of an encoded image, from its first bytes (or the stored path's suffix)."""
    ext = next((e for magic, e in EXTENSIONS.items() if blob.startswith(magic)), None)
    return ext or (os.path.splitext(path)[1] if path else "") or ".png"


def shards(source):
    files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True)) if os.path.isdir(source) \
        else [source]
    if not files or not all(f.endswith(".parquet") and os.path.isfile(f) for f in files):
        raise SystemExit(f"multigen.py: error: {source}: no .parquet files (give a downloaded dataset folder or a shard)")
    return files


def convert(sources, out, image_column="image", text_column="text", limit=None):
    """Write every row of the parquet shards under `sources` into `out`; returns the number of rows written."""
    try:
        import pyarrow.parquet as pq  # optional: only this converter reads parquet
    except ImportError:
        raise SystemExit("multigen.py: error: reading parquet needs pyarrow: pip install pyarrow") from None
    files = [f for s in sources for f in shards(s)]
    schema = pq.ParquetFile(files[0]).schema_arrow
    images = [f.name for f in schema if str(f.type).startswith("struct") and "bytes" in str(f.type)]
    if image_column not in images or text_column not in schema.names:
        raise SystemExit(f"multigen.py: error: {files[0]}: expected an image column {image_column!r} and a text "
                         f"column {text_column!r}; found columns {', '.join(schema.names)}")
    for name in images:
        os.makedirs(os.path.join(out, "images" if name == image_column else name), exist_ok=True)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    bar, rows = tqdm(total=min(total, limit or total), desc="convert", unit="row", dynamic_ncols=True), []
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=images + [text_column]):
            for record in batch.to_pylist():
                if limit is not None and len(rows) >= limit:
                    break
                row, i = {"text": record[text_column] or ""}, len(rows)
                for name in images:
                    cell = record[name]
                    if not cell or not cell.get("bytes"):
                        continue  # a row without this image: the loader skips or annotates it
                    folder = "images" if name == image_column else name
                    rel = f"{folder}/{i:07d}{extension(cell['bytes'], cell.get('path'))}"
                    with open(os.path.join(out, rel), "wb") as fh:
                        fh.write(cell["bytes"])
                    row["file_name" if name == image_column else f"{name}_file_name"] = rel
                if "control_depth_file_name" in row:
                    row["conditioning_file_name"] = row["control_depth_file_name"]
                rows.append(row)
                bar.update(1)
    bar.close()
    with open(os.path.join(out, "metadata.jsonl.tmp"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(os.path.join(out, "metadata.jsonl.tmp"), os.path.join(out, "metadata.jsonl"))
    return len(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", nargs="+", help="downloaded dataset folders or .parquet shards")
    p.add_argument("out", help="the imagefolder to write")
    p.add_argument("--max", type=int, help="the first N rows only")
    args = p.parse_args(argv)
    n = convert(args.sources, args.out, limit=args.max)
    print(f"wrote {n} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
