"""Preprocessing throughput (pairs/s) of `python -m scorers_torch.preprocess` with tiny models.

Writes a Pick-a-Pic-schema parquet of N pairs of JPEGs (--image-size px, random shapes), builds
a tiny random VAE, CLIP text encoder and CLIP scorer (two metrics: cosine and clipscore), and
times the whole CLI in-process per configuration. Also times the CPU-only part per pair (JPEG
decode of both images + resize/crop at --cpu-resolution), which bounds throughput on a GPU
machine when the models themselves are fast.

    python bench/preprocess.py [--pairs 96] [--image-size 512] [--cpu-resolution 512]

Writes bench/results/preprocess.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scorers_torch import encoders, inputs, preprocess  # noqa: E402
from tests.scorer_fixtures import tiny_hf_clip  # noqa: E402
from tests.tiny_pipeline import build_clip_tokenizer, build_tiny_text_encoder, build_tiny_vae  # noqa: E402


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    image = PIL.Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = rng.integers(0, size - 8, 2)
        x1, y1 = x0 + rng.integers(4, size // 2), y0 + rng.integers(4, size // 2)
        draw.ellipse([int(x0), int(y0), int(x1), int(y1)], fill=tuple(rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_world(folder: str, pairs: int, image_size: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    rows = [
        {"caption": f"a picture of shapes number {i}", "jpg_0": _jpeg(rng, image_size),
         "jpg_1": _jpeg(rng, image_size), "label_0": 1.0, "label_1": 0.0}
        for i in range(pairs)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "pairs.parquet"))
    base = os.path.join(folder, "base")
    build_clip_tokenizer(os.path.join(folder, "src")).save_pretrained(
        os.path.join(base, "tokenizer")
    )
    build_tiny_text_encoder(seed=0).save_pretrained(os.path.join(base, "text_encoder"))
    build_tiny_vae(seed=0).save_pretrained(os.path.join(base, "vae"))
    clip = str(tiny_hf_clip(__import__("pathlib").Path(folder) / "clip"))
    config = os.path.join(folder, "scorers.json")
    with open(config, "w") as f:
        json.dump(
            {
                "clip": {"backend": "transformers", "model": clip, "device": "cpu"},
                "clipscore": {"scorer": "clip", "backend": "transformers", "model": clip,
                              "mode": "clipscore", "device": "cpu"},
            },
            f,
        )  # fmt: skip
    return {"input": os.path.join(folder, "pairs.parquet"), "base": base, "config": config}


def time_cli(world: dict, out: str, latent: str, resolution: int, flip: bool, batch: int) -> dict:
    argv = [
        "--input", world["input"], "--format", "pickapic", "--out", out,
        "--base-model", world["base"], "--text-encoder", "sd15", "--latent-encoder", latent,
        "--scorers", "clip,clipscore", "--scorer-config", world["config"],
        "--resolution", str(resolution), "--batch-size", str(batch), "--device", "cpu",
        "--tie-policy", "keep", "--records-per-shard", "1000",
    ] + (["--flip-views"] if flip else [])  # fmt: skip
    real_process, busy = preprocess.process_batch, [0.0]

    def timed_process(*a, **kw):  # time spent scoring + encoding, model loading excluded
        t = time.perf_counter()
        try:
            return real_process(*a, **kw)
        finally:
            busy[0] += time.perf_counter() - t

    preprocess.process_batch = timed_process
    start = time.perf_counter()
    try:
        manifest = preprocess.run(preprocess.parse_args(argv))
    finally:
        preprocess.process_batch = real_process
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    n = manifest["counts"]["read"]
    return {
        "latent_encoder": latent,
        "resolution": resolution,
        "views": 2 if flip else 1,
        "batch_size": batch,
        "pairs": n,
        "seconds": seconds,
        "pairs_per_s": n / seconds,
        "batches_seconds": busy[0],
        "steady_pairs_per_s": n / busy[0],
    }


def time_cpu_stage(world: dict, resolution: int) -> dict:
    """JPEG decode of both images + resize/crop of both, per pair (single thread)."""
    pairs = list(inputs.read_pairs([world["input"]], "pickapic"))
    start = time.perf_counter()
    for pair in pairs:
        for source in (pair.image_0, pair.image_1):
            encoders.preprocess_image(inputs.decode_image(source), resolution, flip_views=False)
    seconds = time.perf_counter() - start
    return {"resolution": resolution, "pairs": len(pairs), "pairs_per_s": len(pairs) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--cpu-resolution", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as folder:
        world = make_world(folder, args.pairs, args.image_size)
        runs = [
            time_cli(world, os.path.join(folder, "out"), latent, res, flip, 16)
            for latent, res, flip in (
                ("vae", 64, False),
                ("vae", 64, True),
                ("identity", 64, False),
            )
        ]
        cpu = time_cpu_stage(world, args.cpu_resolution)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
            "device": "cpu",
        },  # fmt: skip
        "image_size": args.image_size,
        "models": "tiny random VAE (16/32 ch), CLIP text encoder (hidden 32), CLIP scorer x2",
        "cli_runs": runs,
        "cpu_decode_resize": cpu,
    }
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "preprocess.json"), "w") as f:
        json.dump(result, f, indent=2)
    head = ("latent", "res", "V", "batch", "pairs", "s", "pairs/s", "steady pairs/s")
    print(" ".join(f"{h:>9}" for h in head[:-1]), f"{head[-1]:>15}")
    for r in runs:
        cells = [r["latent_encoder"], r["resolution"], r["views"], r["batch_size"], r["pairs"]]
        cells += [f"{r['seconds']:.2f}", f"{r['pairs_per_s']:.1f}"]
        print(" ".join(f"{c:>9}" for c in cells), f"{r['steady_pairs_per_s']:>15.1f}")
    print(
        f"CPU stage (decode 2 x {args.image_size}px JPEG + resize/crop to "
        f"{cpu['resolution']}), one thread: {cpu['pairs_per_s']:.1f} pairs/s"
    )


if __name__ == "__main__":
    main()
