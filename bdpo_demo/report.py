"""The demo's summary: OUT/summary.json (for scripts) and OUT/summary.md (for people).

Per cell (run vs base on one measure) and per training seed: the win rate, its 95% Wilson
interval, the tie share and the verdict (scorers_torch.winrate's rule); over the seeds: the
mean win rate, its range and the verdict count ("win 3/3"). Beside them, the mean score per
measure of perfect renders, of flawed renders like the base's training data, of the base's
samples and of every run's samples, all on the held-out evaluation prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bdpo_demo import measures, pairs, world
from scorers_torch import eval_report, winrate

SCORER_NAMES = tuple(measures.MEASURES)  # colour, shape, position, sharpness
CELL_FIELDS = ("n", "wins", "ties", "losses", "win", "win_low", "win_high", "tie", "loss",
               "decisive_share", "decisive_low", "decisive_high", "verdict")  # fmt: skip
# fields of summary.json that do not depend on timing or on the output folder
TABLE_KEYS = ("train_seeds", "eval", "sft_counts", "pair_counts", "winrates_vs_base",
              "mean_scores", "base_vs_renders")  # fmt: skip
# a base "draws like its training data" on a measure when its samples' mean is within this
# relative distance of the flawed renders' mean (issue 11's criterion)
BASE_TOLERANCE = 0.15


def seed_folder(out: str, first_seed: int, seed: int) -> str:
    """The output folder of one training seed's pairs, DPO runs and evaluation: OUT for the
    first seed (the layout of a one-seed run), OUT/seed_<seed> for the others."""
    return out if seed == first_seed else os.path.join(out, f"seed_{seed}")


def cell_dict(result: winrate.PairResult) -> dict[str, Any]:
    """One cell of one seed as plain JSON values (rates as fractions)."""
    low, high = result.win_interval
    d_low, d_high = result.decisive_interval
    values = (result.n, result.wins, result.ties, result.losses, result.win_rate, low, high,
              result.tie_rate, result.loss_rate, result.decisive_share, d_low, d_high,
              result.verdict)  # fmt: skip
    return dict(zip(CELL_FIELDS, values, strict=True))


def render_means(
    prompts: Sequence[str], flaw_rate: float, per_prompt: int, seed: int, size: int
) -> dict:
    """Mean score per measure of perfect renders (one per prompt) and of flawed renders
    (`per_prompt` per prompt, drawn like the SFT data), both at `size` px, scored by the demo
    scorers."""
    from bdpo_demo import plugins  # noqa: F401  (registers the demo scorers)
    from scorers_torch.scorers.base import build_scorers

    scorers = build_scorers({name: {} for name in SCORER_NAMES})
    specs = [world.parse_prompt(p) for p in prompts]
    rates = world.FlawRates(flaw_rate, flaw_rate, flaw_rate, flaw_rate)
    rng = np.random.default_rng(seed)
    flawed = [world.render_flawed(s, rates, rng, size) for s in specs for _ in range(per_prompt)]
    images = {
        "clean_renders": ([pairs.to_pil(world.render(s, size=size)) for s in specs], list(prompts)),
        "flawed_renders": (
            [pairs.to_pil(x) for x in flawed],
            [p for p in prompts for _ in range(per_prompt)],
        ),
    }
    return {
        kind: {m: float(np.mean(scorers[m].score(*images[kind]))) for m in SCORER_NAMES}
        for kind in images
    }


def base_vs_renders(means: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per measure: the flawed renders' and the base samples' means, the base's relative
    difference (base - renders) / |renders| and whether it lies within BASE_TOLERANCE."""
    out = {}
    for m in SCORER_NAMES:
        renders, base = means["flawed_renders"][m], means["base_samples"][m]
        relative = (base - renders) / abs(renders)
        out[m] = {
            "flawed_renders": renders,
            "base_samples": base,
            "relative_difference": relative,
            "within_tolerance": bool(abs(relative) <= BASE_TOLERANCE),
        }
    return out


def build_summary(
    config,
    results: Mapping[int, Any],
    runs: Sequence[str],
    prompts: Sequence[str],
    sft_manifest: Mapping[str, Any],
    pair_manifests: Mapping[int, Mapping[str, Any]],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """summary.json's content; `results`: training seed -> EvalResults (in seed order)."""
    d = config.demo
    seeds = list(results)
    per_seed = {
        seed: [p for p in results[seed].pairs if p.model_b == "base" and p.model_a in runs]
        for seed in seeds
    }
    cells = {}
    for s in winrate.summarize_seeds([per_seed[seed] for seed in seeds]):
        by_seed = {
            str(seed): cell_dict(next(p for p in per_seed[seed] if (p.model_a, p.metric) ==
                                      (s.model_a, s.metric)))
            for seed in seeds
        }  # fmt: skip
        low, high = s.win_range
        cells[f"{s.model_a}/{s.metric}"] = {
            "run": s.model_a, "metric": s.metric, "per_seed": by_seed,
            "mean_win": s.mean_win_rate, "min_win": low, "max_win": high,
            "verdicts": s.verdict_counts, "verdict_text": s.verdict_text(),
        }  # fmt: skip

    def sample_means(seed: int, model: str) -> dict[str, float]:
        found = {r.metric: r.mean_all for r in results[seed].means if r.model == model}
        return {m: found[m] for m in SCORER_NAMES}

    means = render_means(
        prompts, float(d.flaw_rate), int(d.eval_seeds), int(d.seed), int(d.image_size)
    )
    means["base_samples"] = sample_means(seeds[0], "base")
    means["runs"] = {}
    for run in runs:
        values = {str(seed): sample_means(seed, run) for seed in seeds}
        mean = {m: float(np.mean([v[m] for v in values.values()])) for m in SCORER_NAMES}
        means["runs"][run] = {"per_seed": values, "mean": mean}
    return {
        "seed": int(d.seed),
        "train_seeds": seeds,
        "eval": {
            "held_out_prompts": len(prompts),
            "images_per_prompt": int(d.eval_seeds),
            "win_rule": "best of seeds per prompt, strictly greater; ties reported apart",
            "verdict_rule": eval_report.VERDICT_NOTE,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "sft_counts": sft_manifest["counts"],
        "pair_counts": {str(s): m["counts"] for s, m in pair_manifests.items()},
        "pair_agreement_with_majority": {
            str(s): m["agreement"]["with_majority"] for s, m in pair_manifests.items()
        },
        "winrates_vs_base": cells,
        "mean_scores": means,
        "base_vs_renders": base_vs_renders(means),
        "files": {k: str(v) for k, v in results[seeds[0]].files.items()},
        "eval_dirs": {str(s): str(results[s].files["results"].parent) for s in seeds},
    }


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _runs(summary: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(c["run"] for c in summary["winrates_vs_base"].values()))


def seed_table(summary: Mapping[str, Any], seed: int) -> str:
    """Run x measure table of one training seed: win % [interval] (tie %) verdict."""
    cells = summary["winrates_vs_base"]
    rows = []
    for run in _runs(summary):
        row = [run]
        for m in SCORER_NAMES:
            c = cells[f"{run}/{m}"]["per_seed"][str(seed)]
            result = winrate.PairResult(run, "base", m, c["n"], c["wins"], c["ties"], c["losses"])
            row.append(eval_report.cell_text(result))
        rows.append(row)
    return _markdown(["run vs base", *SCORER_NAMES], rows)


def winrate_table(summary: Mapping[str, Any]) -> str:
    """One seed: `seed_table`; several: mean win % [min, max] and the verdict count."""
    seeds = summary["train_seeds"]
    if len(seeds) == 1:
        return seed_table(summary, seeds[0])
    cells = summary["winrates_vs_base"]
    rows = []
    for run in _runs(summary):
        row = [run]
        for m in SCORER_NAMES:
            c = cells[f"{run}/{m}"]
            row.append(
                f"{100 * c['mean_win']:.1f} [{100 * c['min_win']:.1f}, {100 * c['max_win']:.1f}]"
                f" {c['verdict_text']}"
            )
        rows.append(row)
    return _markdown(["run vs base", *SCORER_NAMES], rows)


def means_table(summary: Mapping[str, Any]) -> str:
    """Mean score per measure over all images: renders, base samples, runs (mean of seeds)."""
    means = summary["mean_scores"]
    named = [
        ("perfect renders", means["clean_renders"]),
        ("flawed renders (like the SFT data)", means["flawed_renders"]),
        ("base samples", means["base_samples"]),
    ] + [(f"{run} samples", v["mean"]) for run, v in means["runs"].items()]
    rows = [[name, *[f"{values[m]:.4g}" for m in SCORER_NAMES]] for name, values in named]
    return _markdown(["images", *SCORER_NAMES], rows)


def base_table(summary: Mapping[str, Any]) -> str:
    """Flawed renders vs base samples per measure: means, relative difference, verdict."""
    rows = []
    for m, c in summary["base_vs_renders"].items():
        verdict = "within" if c["within_tolerance"] else "**outside**"
        rows.append([m, f"{c['flawed_renders']:.4g}", f"{c['base_samples']:.4g}",
                     f"{100 * c['relative_difference']:+.1f}%", verdict])  # fmt: skip
    header = ["measure", "flawed renders", "base samples", "base vs renders",
              f"within {100 * BASE_TOLERANCE:.0f}%"]  # fmt: skip
    return _markdown(header, rows)


def write_summary(out: str, config, summary: Mapping[str, Any], results: Mapping) -> None:
    """OUT/summary.json and OUT/summary.md."""
    d = config.demo
    seeds = summary["train_seeds"]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    several = len(seeds) > 1
    lines = [
        "# BalancedDPO CPU demo",
        "",
        f"seed {summary['seed']}; training seeds {seeds} (one base); "
        f"{summary['eval']['held_out_prompts']} held-out prompts x {d.eval_seeds} images; "
        "best-of-seeds win rate (%) vs the base, strictly greater.",
        "",
        "## Win rate vs base" + (f" over {len(seeds)} training seeds" if several else ""),
        "",
        winrate_table(summary),
        "",
        (
            "Cell: mean win % over the training seeds [lowest, highest] and how many seeds "
            "gave each verdict ('win 3/3'); per-seed tables below. In those: "
            if several
            else ""
        )
        + eval_report.VERDICT_NOTE,
        "",
    ]
    if several:
        for seed in seeds:
            lines += [f"### Training seed {seed}", "", seed_table(summary, seed), ""]
    lines += [
        "## Does the base draw like its training data? (held-out prompts)",
        "",
        base_table(summary),
        "",
        "## Mean score per measure (all images of the held-out prompts)",
        "",
        means_table(summary),
        "",
        "## On-policy pairs",
        "",
        *[f"- seed {s}: counts {json.dumps(c)}" for s, c in summary["pair_counts"].items()],
        "",
        "agreement of each scorer's vote with the majority: "
        + json.dumps(summary["pair_agreement_with_majority"]),
        "",
        "## Wall time per stage (s)",
        "",
        *[f"- {k}: {v:.1f}" for k, v in summary["timings_s"].items()],
        "",
        "## Files",
        "",
        *[f"- {k}: {v}" for k, v in summary["files"].items()],
        *[f"- eval, training seed {s}: {v}" for s, v in summary["eval_dirs"].items()],
        "",
    ]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))


def tables(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a summary that must repeat exactly on a rerun (no timings, no paths)."""
    return {k: summary[k] for k in TABLE_KEYS}
