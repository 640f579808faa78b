"""Preference pairs -> scores, votes, VAE moments and text embeddings in ArrayRecord shards.

    python -m scorers_torch.preprocess --input 'pickapic/train-*.parquet' --format pickapic \
        --out shards/ --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 --text-encoder sd15 \
        --latent-encoder vae --scorers pickscore,hps,clip,aesthetic --resolution 512

Worker I of W takes the input pairs whose index i satisfies i % W == I; its shard s holds
positions [s*N, (s+1)*N) of that slice (N = --records-per-shard), so shard contents are
deterministic and a rerun skips finished shards. Writes shards, one sidecar JSON per shard,
the worker's manifest (bdpo_jax.schema.manifest_name) and empty_prompt.npz.

A mistake in the flags or the inputs (missing file, invalid JSONL line, missing field,
unknown scorer or encoder) stops the run with one line naming it and exit code 2
(`--debug` or BDPO_DEBUG=1 for the traceback); an undecodable image only skips its pair.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from bdpo_jax import schema
from scorers_torch import encoders, inputs, shard_writer
from scorers_torch.registry import import_plugins
from scorers_torch.scorers.base import build_scorers, parse_scorer_spec

PROG = "python -m scorers_torch.preprocess"
log = logging.getLogger("scorers_torch.preprocess")


class OutputFolderError(schema.UserError, ValueError):
    """`--out` holds shards written with other settings."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="comma-separated files or globs")
    p.add_argument("--format", choices=inputs.FORMATS, default="pickapic")
    p.add_argument("--out", required=True, help="output folder of shards and manifest")
    p.add_argument("--base-model", required=True, help="diffusers pipeline hub id or folder")
    p.add_argument("--vae", default=None, help="VAE hub id/folder (default: base model's vae/)")
    p.add_argument("--text-encoder", default="sd15", help="sd15 | sd21 | sdxl | plugin name")
    p.add_argument("--latent-encoder", default="vae", help="vae | identity | plugin name")
    p.add_argument("--scorers", default="pickscore,hps,clip,aesthetic")
    p.add_argument("--scorer-config", default=None, help="JSON: scorer name -> options")
    p.add_argument("--plugins", default="", help="comma-separated modules to import")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--flip-views", action="store_true", help="also store flipped images (V=2)")
    p.add_argument(
        "--tie-policy",
        choices=schema.TIE_POLICIES,
        default="drop",
        help="majority ties: drop, keep as label 0, or decide by the human label",
    )
    p.add_argument(
        "--human-ties",
        choices=("drop", "keep"),
        default=None,
        help="pairs whose human label is a tie (Pick-a-Pic label_0 = 0.5): dropped "
        "before scoring, as in the Diffusion-DPO authors' code (default for "
        "--format pickapic), or kept (default for --format generic)",
    )
    p.add_argument("--tie-tolerance", type=float, default=0.0)
    p.add_argument("--records-per-shard", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per scoring/encoding batch")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--worker-index", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="read only the first N input pairs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--decode-threads", type=int, default=4, help="threads decoding/resizing images")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the VAE and text encoders")  # fmt: skip
    args = p.parse_args(argv)
    if args.human_ties is None:
        args.human_ties = "drop" if args.format == "pickapic" else "keep"
    checks = [
        (args.resolution > 0, "--resolution must be > 0"),
        (args.records_per_shard > 0, "--records-per-shard must be > 0"),
        (args.batch_size > 0, "--batch-size must be > 0"),
        (args.decode_threads > 0, "--decode-threads must be > 0"),
        (args.num_workers > 0, "--num-workers must be > 0"),
        (0 <= args.worker_index < args.num_workers, "--worker-index must be in [0, --num-workers)"),
        (args.limit is None or args.limit >= 0, "--limit must be >= 0"),
        (args.tie_tolerance >= 0, "--tie-tolerance must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


def settings_of(args: argparse.Namespace, scorer_spec: dict) -> dict:
    """Everything that changes a record: finished shards made otherwise are not reused."""
    return {
        "format": args.format,
        "base_model": args.base_model,
        "vae": args.vae,
        "text_encoder": args.text_encoder,
        "latent_encoder": args.latent_encoder,
        "scorers": scorer_spec,
        "resolution": args.resolution,
        "views": 2 if args.flip_views else 1,
        "tie_policy": args.tie_policy,
        "tie_tolerance": args.tie_tolerance,
        "human_ties": args.human_ties,
        "dtype": args.dtype,
        "records_per_shard": args.records_per_shard,
        "num_workers": args.num_workers,
    }


def shard_positions(shard: int, slice_size: int, per_shard: int) -> list[int]:
    """[first, end) slice positions of `shard`."""
    return [shard * per_shard, min((shard + 1) * per_shard, slice_size)]


class Encoders:
    """Scorers and encoders, built on first use (scorers only when a shard is to be written)."""

    def __init__(self, args: argparse.Namespace, scorer_spec: dict, device: str):
        self.args, self.spec, self.device = args, scorer_spec, device
        self._scorers = self._latent = self._text = None
        # PIL decodes and resizes without the GIL, so threads run them in parallel
        self.pool = concurrent.futures.ThreadPoolExecutor(args.decode_threads)

    @property
    def scorers(self):
        if self._scorers is None:
            self._scorers = build_scorers(self.spec)
        return self._scorers

    @property
    def latent(self):
        if self._latent is None:
            a = self.args
            self._latent = encoders.LATENT_ENCODERS.build(
                a.latent_encoder, model=a.vae or a.base_model, device=self.device, dtype=a.dtype,
                batch_size=a.batch_size, resolution=a.resolution,
            )  # fmt: skip
        return self._latent

    @property
    def text(self):
        if self._text is None:
            a = self.args
            self._text = encoders.TEXT_ENCODERS.build(
                a.text_encoder, model=a.base_model, device=self.device, dtype=a.dtype,
                resolution=a.resolution,
            )  # fmt: skip
        return self._text


def _score(models: Encoders, good: list[tuple]) -> np.ndarray:
    """float32 [B, K, 2] scores of image 0 and image 1 by every scorer."""
    images = [g[1] for g in good] + [g[2] for g in good]
    prompts = [g[0].prompt for g in good] * 2
    # each distinct (prompt, pixels) is scored once: two identical images of a pair then get
    # bit-identical scores (a tie), whatever the batch position does to the float rounding
    unique_of: dict[tuple, int] = {}
    slot = [
        unique_of.setdefault((p, im.mode, im.size, hashlib.sha1(im.tobytes()).digest()), i)
        for i, (p, im) in enumerate(zip(prompts, images, strict=True))
    ]
    firsts = sorted(set(slot))
    rows = np.searchsorted(firsts, slot)
    per_scorer = []
    for name, scorer in models.scorers.items():
        s = np.asarray(
            scorer.score([images[i] for i in firsts], [prompts[i] for i in firsts]),
            dtype=np.float32,
        )
        if s.shape != (len(firsts),):
            raise ValueError(f"scorer {name!r} returned shape {s.shape}, expected ({len(firsts)},)")
        per_scorer.append(s[rows].reshape(2, len(good)).T)
    return np.stack(per_scorer, axis=1)


def process_batch(models: Encoders, batch: list[inputs.Pair], stats: dict) -> list[dict]:
    """Records of the kept pairs of `batch`; `stats` accumulates counts and per-pair arrays."""
    args, counts = models.args, stats["counts"]
    if args.human_ties == "drop":  # the authors drop human ties before anything else
        counts["dropped_human_ties"] += sum(pair.human_label == 0 for pair in batch)
        batch = [pair for pair in batch if pair.human_label != 0]
    good = inputs.decode_pairs(batch, counts, models.pool)
    if not good:
        return []
    scores_BxKx2 = _score(models, good)
    finite_B = np.isfinite(scores_BxKx2).all(axis=(1, 2))
    for (pair, *_), ok in zip(good, finite_B, strict=True):
        if not ok:
            counts["skipped"]["nonfinite_score"] = counts["skipped"].get("nonfinite_score", 0) + 1
            log.warning("skipping pair %s: a scorer returned a non-finite score", pair.pair_id)
    good = [g for g, ok in zip(good, finite_B, strict=True) if ok]
    scores_BxKx2 = scores_BxKx2[finite_B]
    if not good:
        return []
    human_B = np.array([g[0].human_label for g in good], np.float32)
    votes_BxK = schema.votes_from_scores(scores_BxKx2, args.tie_tolerance)
    majority_B, margin_B = schema.majority(votes_BxK)
    label_B, keep_B = schema.apply_tie_policy(majority_B, human_B, args.tie_policy)
    counts["scored"] += len(good)
    counts["ties"] += int((majority_B == 0).sum())
    counts["dropped_ties"] += int((~keep_B).sum())
    for key, value in (("scores", scores_BxKx2), ("votes", votes_BxK), ("majority", majority_B),
                       ("human_label", human_B), ("written", keep_B)):  # fmt: skip
        stats[key].extend(value.tolist())
    kept = [i for i in range(len(good)) if keep_B[i]]
    if not kept:
        return []
    pixels = list(
        models.pool.map(
            lambda image: encoders.preprocess_image(image, args.resolution, args.flip_views),
            [good[i][j] for j in (1, 2) for i in kept],
        )
    )
    n, v = len(kept), pixels[0].shape[0]
    moments = models.latent.encode(np.concatenate(pixels))  # [2 * n * V, 2, C, h, w]
    moments = moments.reshape(2, n, v, *moments.shape[1:])
    text = models.text.encode([good[i][0].prompt for i in kept])
    records = []
    for row, i in enumerate(kept):
        record = {
            "pair_id": good[i][0].pair_id,
            "prompt": good[i][0].prompt,
            "moments_0": moments[0, row],
            "moments_1": moments[1, row],
            "text_embeds": text["text_embeds"][row],
            "scores": scores_BxKx2[i],
            "votes": votes_BxK[i],
            "label": label_B[i],
            "margin": margin_B[i],
            "human_label": human_B[i],
        }
        if text.get("pooled_text_embeds") is not None:
            record["pooled_text_embeds"] = text["pooled_text_embeds"][row]
        if text.get("add_time_ids") is not None:
            record["add_time_ids"] = text["add_time_ids"][row]
        records.append(record)
    return records


def new_shard_stats(positions: list[int], settings: dict) -> dict:
    return {
        "positions": positions,
        "settings": settings,
        "counts": {"read": 0, "scored": 0, "skipped": {}, "ties": 0, "dropped_ties": 0,
                   "dropped_human_ties": 0},
        "scores": [], "votes": [], "majority": [], "human_label": [], "written": [],
    }  # fmt: skip


class _ShardJob:
    """One shard being written: pairs are scored and encoded a batch at a time."""

    def __init__(self, out: str, name: str, stats: dict, models: Encoders, bar):
        self.writer = shard_writer.ShardWriter(out, name)
        self.stats, self.models, self.bar, self.batch = stats, models, bar, []
        self.start = time.perf_counter()

    def add(self, pair: inputs.Pair) -> None:
        self.batch.append(pair)
        if len(self.batch) == self.models.args.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self.stats["counts"]["read"] += len(self.batch)
            for record in process_batch(self.models, self.batch, self.stats):
                self.writer.write(record)
            self.bar.update(len(self.batch))
            self.batch = []

    def finish(self) -> None:
        self.flush()
        self.stats["human_label"] = [
            None if math.isnan(h) else h for h in self.stats["human_label"]
        ]
        self.writer.commit(self.stats)
        seconds, read = time.perf_counter() - self.start, self.stats["counts"]["read"]
        log.info("%s: %d of %d pairs written, %.1f pairs/s", self.writer.name,
                 self.writer.num_records, read, read / max(seconds, 1e-9))  # fmt: skip


def _finished(out: str, name: str, positions: list[int], settings: dict) -> bool:
    if not shard_writer.shard_is_done(out, name):
        return False
    sidecar = shard_writer.read_sidecar(out, name)
    if sidecar.get("settings") != settings:
        raise OutputFolderError(
            f"{os.path.join(out, name)} was written with other settings "
            f"({sidecar.get('settings')}); use a new --out folder or delete its shards"
        )
    return sidecar.get("positions") == positions


def run(args: argparse.Namespace) -> dict:
    """Writes this worker's shards, manifest and empty_prompt.npz; returns the manifest."""
    import_plugins(args.plugins.split(","))
    files = inputs.expand_inputs([f for f in args.input.split(",") if f.strip()])
    spec = parse_scorer_spec(args.scorers, args.scorer_config)
    encoders.TEXT_ENCODERS.get(args.text_encoder, "--text-encoder")  # fail before any work
    encoders.LATENT_ENCODERS.get(args.latent_encoder, "--latent-encoder")
    settings = settings_of(args, spec)
    os.makedirs(args.out, exist_ok=True)
    for path in shard_writer.remove_stale_temps(args.out, args.worker_index):
        log.info("removed stale temp file %s", path)
    check_until = math.inf if args.limit is None else args.limit  # bad inputs fail before work
    total = inputs.count_pairs(files, args.format, check_until)
    if args.limit is not None:
        total = min(total, args.limit)
    w, i, per_shard = args.num_workers, args.worker_index, args.records_per_shard
    slice_size = len(range(i, total, w))
    num_shards = math.ceil(slice_size / per_shard)
    names = [schema.shard_name(i, s) for s in range(num_shards)]

    def positions_of(shard: int) -> list[int]:
        return shard_positions(shard, slice_size, per_shard)

    todo = {
        s for s in range(num_shards) if not _finished(args.out, names[s], positions_of(s), settings)
    }
    log.info(
        "worker %d/%d: %d pairs, %d shards, %d to write", i, w, slice_size, num_shards, len(todo)
    )

    def wanted(index: int) -> bool:
        return index % w == i and index < total and (index // w) // per_shard in todo

    models = Encoders(args, spec, encoders.resolve_device(args.device))
    todo_pairs = sum(positions_of(s)[1] - positions_of(s)[0] for s in todo)
    bar = tqdm(total=todo_pairs, unit="pair", desc=f"worker {i}", smoothing=0.05)
    current, job = None, None
    try:
        for pair in inputs.read_pairs(files, args.format, wanted=wanted, stop=total):
            shard = (pair.index // w) // per_shard
            if shard != current:
                if job is not None:
                    job.finish()
                current, stats = shard, new_shard_stats(positions_of(shard), settings)
                job = _ShardJob(args.out, names[shard], stats, models, bar)
            job.add(pair)
        if job is not None:
            job.finish()
            job = None
    except BaseException:
        if job is not None:
            job.writer.abort()  # an error (not a kill): remove the temp file now
        raise
    bar.close()
    models.pool.shutdown()
    sidecars = [shard_writer.read_sidecar(args.out, name) for name in names]
    empty = write_empty_prompt(args.out, models.text)
    moments = models.latent.encode(np.zeros((1, 3, args.resolution, args.resolution), np.float32))
    manifest = build_manifest(
        settings=settings,
        scorer_names=list(spec),
        versions=package_versions(),
        names=names,
        sidecars=sidecars,
        latent_shape=list(moments.shape[2:]),
        empty_prompt=empty,
        vae_scaling_factor=float(models.latent.scaling_factor),
        worker=(i, w),
    )
    path = os.path.join(args.out, schema.manifest_name(i, w))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)
    log.info("wrote %s: %s", path, manifest["counts"])
    return manifest


# --- manifest -----------------------------------------------------------------------------------

VERSIONED_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "open_clip_torch",
                      "pillow", "numpy", "array_record")  # fmt: skip


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_empty_prompt(out: str, text_encoder) -> dict[str, np.ndarray]:
    """Saves the text encoder's output for "" (conditioning dropout) as empty_prompt.npz."""
    encoded = text_encoder.encode([""])
    arrays = {"text_embeds": np.asarray(encoded["text_embeds"][0], np.float16)}
    if encoded.get("pooled_text_embeds") is not None:
        arrays["pooled_text_embeds"] = np.asarray(encoded["pooled_text_embeds"][0], np.float16)
    tmp = os.path.join(out, f"{schema.EMPTY_PROMPT_NAME}.{os.getpid()}.tmp.npz")  # workers race
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(out, schema.EMPTY_PROMPT_NAME))
    return arrays


def _sum_counts(sidecars: list[dict]) -> dict:
    summed = ("read", "scored", "ties", "dropped_ties", "dropped_human_ties")
    total = {key: 0 for key in summed} | {"written": 0, "skipped": {}}
    for sidecar in sidecars:
        counts = sidecar["counts"]
        for key in summed:
            total[key] += counts[key]
        total["written"] += sidecar["num_records"]
        for reason, n in counts["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    return total


def _agreement_table(names: list[str], votes_NxK, reference_N) -> dict:
    fraction_K, count = schema.agreement(votes_NxK, reference_N)
    table = {
        n: (None if math.isnan(f) else float(f)) for n, f in zip(names, fraction_K, strict=True)
    }
    return {"pairs": count, "per_scorer": table}


def build_manifest(*, settings, scorer_names, versions, names, sidecars, latent_shape,
                   empty_prompt, vae_scaling_factor, worker) -> dict:  # fmt: skip
    """The worker's manifest (fields read by bdpo_jax.data.read_manifest)."""
    k = len(scorer_names)
    scores_NxKx2 = np.array([x for s in sidecars for x in s["scores"]], np.float64).reshape(
        -1, k, 2
    )
    votes_NxK = np.array([x for s in sidecars for x in s["votes"]], np.int8).reshape(-1, k)
    majority_N = np.array([x for s in sidecars for x in s["majority"]], np.float64)
    human_N = np.array(
        [np.nan if x is None else x for s in sidecars for x in s["human_label"]], np.float64
    )
    written_N = np.array([x for s in sidecars for x in s["written"]], bool)
    kept_NxKx2 = scores_NxKx2[written_N]
    score_stats = {
        name: {
            "mean": float(kept_NxKx2[:, j].mean()) if len(kept_NxKx2) else 0.0,
            "std": float(kept_NxKx2[:, j].std()) if len(kept_NxKx2) else 1.0,
        }
        for j, name in enumerate(scorer_names)
    }
    majority_vs_human, n_human = schema.agreement(majority_N[:, None], human_N)
    text_embeds = empty_prompt["text_embeds"]
    pooled = empty_prompt.get("pooled_text_embeds")
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "scorer_names": scorer_names,
        "scorers": settings["scorers"],
        "package_versions": versions,
        "base_model": settings["base_model"],
        "vae": settings["vae"],
        "text_encoder": settings["text_encoder"],
        "latent_encoder": settings["latent_encoder"],
        "format": settings["format"],
        "dtype": settings["dtype"],
        "resolution": settings["resolution"],
        "views": settings["views"],
        "latent_shape": [int(x) for x in latent_shape],
        "text_shape": [int(x) for x in text_embeds.shape],
        "pooled_dim": None if pooled is None else int(pooled.shape[0]),
        "vae_scaling_factor": vae_scaling_factor,
        "score_stats": score_stats,
        "shards": [
            {"name": n, "num_records": int(s["num_records"])}
            for n, s in zip(names, sidecars, strict=True)
        ],
        "counts": _sum_counts(sidecars),
        "agreement": {
            "with_human": _agreement_table(scorer_names, votes_NxK, human_N),
            "with_majority": _agreement_table(scorer_names, votes_NxK, majority_N),
            "majority_with_human": {
                "pairs": n_human,
                "fraction": None if n_human == 0 else float(majority_vs_human[0]),
            },
        },
        "tie_policy": settings["tie_policy"],
        "tie_tolerance": settings["tie_tolerance"],
        "human_ties": settings["human_ties"],
        "records_per_shard": settings["records_per_shard"],
        "worker_index": worker[0],
        "num_workers": worker[1],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """The CLI: runs `run(parse_args(argv))`; a user error exits 2 with one line on stderr."""
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return schema.run_cli(PROG, lambda: run(parse_args(argv)), debug)


if __name__ == "__main__":
    main(sys.argv[1:])
