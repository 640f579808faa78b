"""How each DPO run changed the base's images, image by image (a demo output folder's scores).

Every model of an evaluation samples each (prompt, seed) from the same starting noise, so a
run's image can be set against the base's image of the same prompt and seed. Per run and
measure: the share of images that score higher than the base's, the share that score lower,
and the mean change. Win rates (best of the seeds per prompt) say who wins; this says what the
run did to the images, e.g. whether it sharpened most of them and what that cost in shape.

    python -m bdpo_demo.changes demo_seeds3   # every training seed of that output folder
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pandas as pd

from bdpo_demo import report
from bdpo_jax import schema

PROG = "python -m bdpo_demo.changes"
BASE = "base"


def paired_changes(scores: pd.DataFrame, base: str = BASE) -> dict[str, dict[str, dict]]:
    """{run: {measure: {"higher", "lower", "mean_change", "images"}}} from an evaluation's
    scores (columns model, prompt_id, seed, metric, score), each run's image against the
    base's of the same prompt and seed; images the base lacks are left out."""
    wide = scores.pivot_table(
        index=["model", "prompt_id", "seed"], columns="metric", values="score", aggfunc="first"
    )
    if base not in wide.index.get_level_values("model"):
        raise ValueError(f"no images of the base model {base!r} among the scores")
    base_scores = wide.loc[base]
    metrics = list(dict.fromkeys(scores["metric"]))  # the evaluation's order
    out: dict[str, dict[str, dict]] = {}
    for run in dict.fromkeys(scores["model"]):
        if run == base:
            continue
        delta = (wide.loc[run] - base_scores).dropna(how="all")
        out[run] = {
            metric: {
                "higher": float((delta[metric] > 0).mean()),
                "lower": float((delta[metric] < 0).mean()),
                "mean_change": float(delta[metric].mean()),
                "images": int(delta[metric].notna().sum()),
            }
            for metric in metrics
        }
    return out


def changes_table(changes: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per run, each cell 'higher % / lower % (mean change)'."""
    metrics = list(next(iter(changes.values())))
    rows = [
        f"| {run} | "
        + " | ".join(
            f"{100 * c['higher']:.0f} / {100 * c['lower']:.0f} ({c['mean_change']:+.3g})"
            for c in (cells[m] for m in metrics)
        )
        + " |"
        for run, cells in changes.items()
    ]
    title = "| run: images higher / lower than the base's (%) (mean change) | "
    head = [title + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    return "\n".join(head + rows)


def seed_scores(out: str) -> dict[int, str]:
    """{training seed: its eval/scores.parquet} of a `python -m bdpo_demo` output folder."""
    summary_path = os.path.join(out, "summary.json")
    if not os.path.isfile(summary_path):
        raise schema.UserError(
            f"{summary_path} is missing (not a python -m bdpo_demo --out folder?)"
        )
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except json.JSONDecodeError as error:
        raise schema.UserError(f"{summary_path}: not JSON ({error})") from None
    missing = [k for k in ("seed", "train_seeds") if k not in summary]
    if missing:
        raise schema.UserError(f"{summary_path} has no field {missing[0]!r} (not a demo summary?)")
    paths = {}
    for seed in summary["train_seeds"]:
        folder = report.seed_folder(out, int(summary["seed"]), int(seed))
        path = os.path.join(folder, "eval", "scores.parquet")
        if not os.path.isfile(path):
            raise schema.UserError(f"{path} is missing (training seed {seed} of {summary_path})")
        paths[int(seed)] = path
    return paths


def main(argv: list[str] | None = None) -> dict[int, Any]:
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    parser = schema.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("out", help="a python -m bdpo_demo --out folder")

    def run() -> dict[int, Any]:
        args = parser.parse_args(argv)
        result = {}
        for seed, path in seed_scores(args.out).items():
            result[seed] = paired_changes(pd.read_parquet(path))
            print(f"\ntraining seed {seed} ({path})\n\n{changes_table(result[seed])}", flush=True)
        return result

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    main()
