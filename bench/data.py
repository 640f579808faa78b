"""Grain read + decode throughput of SD1.5-sized training records.

Writes N records (moments 2x4x64x64 fp16 per image with V=1, text 77x768 fp16, K=4 scores)
to a temp folder as ArrayRecord shards, then times `bdpo_jax.data.make_dataset` batches
(batch 16) in-process and with Grain worker processes. Target: >= 2,000 records/s.

    python bench/data.py [--records 2000] [--batches 100] [--runs 0:0,0:2,1:0,2:0]

Shards are written uncompressed (what scorers_torch.preprocess should write: random access
then costs a copy, not a decompression) and with ArrayRecord's default compression.

Writes bench/results/data.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdpo_jax import data, schema  # noqa: E402
from configs.default import get_config  # noqa: E402

LATENT, TEXT, K = (4, 64, 64), (77, 768), 4


def write_shards(folder: str, num_records: int, options: str, per_shard: int = 500) -> int:
    """SD1.5-sized random records in shards of `per_shard`; returns bytes per record."""
    rng = np.random.default_rng(0)
    shards, size = [], 0
    for shard in range(0, num_records, per_shard):
        name = schema.shard_name(0, shard // per_shard)
        writer = ArrayRecordWriter(os.path.join(folder, name), options)
        count = min(per_shard, num_records - shard)
        for i in range(count):
            scores = rng.normal(size=(K, 2))
            votes_1xK = schema.votes_from_scores(scores[None])
            label_1, margin_1 = schema.majority(votes_1xK)
            encoded = schema.encode_record(
                {
                    "pair_id": f"p{shard + i}",
                    "prompt": "a photo of a cat",
                    "moments_0": rng.normal(size=(1, 2, *LATENT)).astype(np.float16),
                    "moments_1": rng.normal(size=(1, 2, *LATENT)).astype(np.float16),
                    "text_embeds": rng.normal(size=TEXT).astype(np.float16),
                    "scores": scores,
                    "votes": votes_1xK[0],
                    "label": label_1[0],
                    "margin": margin_1[0],
                    "human_label": 1.0,
                }
            )
            size = len(encoded)
            writer.write(encoded)
        writer.close()
        shards.append({"name": name, "num_records": count})
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "scorer_names": [f"s{k}" for k in range(K)],
        "latent_shape": list(LATENT),
        "text_shape": list(TEXT),
        "pooled_dim": None,
        "views": 1,
        "vae_scaling_factor": 0.18215,
        "score_stats": {f"s{k}": {"mean": 0.0, "std": 1.0} for k in range(K)},
        "shards": shards,
    }
    with open(os.path.join(folder, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    np.savez(os.path.join(folder, schema.EMPTY_PROMPT_NAME), text_embeds=np.zeros(TEXT))
    return size


def time_pipeline(
    folder: str, workers: int, threads: int, batch: int, batches: int, warmup: int
) -> dict:
    config = get_config().data
    config.path, config.drop_tied_labels = folder, False
    config.num_workers, config.read_threads = workers, threads
    dataset, _ = data.make_dataset(config, global_batch_size=batch, seed=0, label_mode="majority")
    iterator = iter(dataset)
    start = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return {
        "workers": workers,
        "read_threads": threads,
        "batch": batch,
        "batches": batches,
        "seconds": seconds,
        "records_per_s": batches * batch / seconds,
        "startup_s": first,
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--runs",
        default="0:0,0:2,1:0,2:0",
        help="comma-separated workers:read_threads pipelines to time",
    )
    parser.add_argument(
        "--writer-options",
        default="group_size:1,uncompressed;group_size:1",
        help="';'-separated ArrayRecordWriter option strings to write the shards with",
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs = []
    for options in args.writer_options.split(";"):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            record_bytes = write_shards(folder, args.records, options)
            print(
                f"[{options}] wrote {args.records} records ({record_bytes / 2**10:.0f} KiB each) "
                f"in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
            for spec in args.runs.split(","):
                workers, threads = (int(x) for x in spec.split(":"))
                run = time_pipeline(folder, workers, threads, args.batch, args.batches, args.warmup)
                run["writer_options"] = options
                print(
                    f"  workers={workers} read_threads={threads}: "
                    f"{run['records_per_s']:.0f} records/s",
                    flush=True,
                )
                runs.append(run)
    result = {
        "records": args.records,
        "record_kib": record_bytes / 2**10,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": platform.platform(),
        "target_records_per_s": 2000,
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"\nGrain read+decode, SD1.5 records ({record_bytes / 2**10:.0f} KiB), "
        f"batch {args.batch}, load avg before {load_before[0]:.1f}"
    )
    header = f"{'writer options':<28} {'workers':>7} {'threads':>7} {'records/s':>10} {'load':>5}"
    print(header)
    for run in runs:
        print(
            f"{run['writer_options']:<28} {run['workers']:>7} {run['read_threads']:>7} "
            f"{run['records_per_s']:>10.0f} {run['load_average']:>5.1f}"
        )


if __name__ == "__main__":
    main()
