"""The demo end to end, each stage through the project's real code paths.

1. world   flawed renders of the 180 world prompts -> generic JSONL -> scorers_torch.preprocess
           (identity latents, MiniLM text, the four demo scorers) -> shards/sft
2. base    bdpo_jax.train (label mode 'sft') from scratch -> runs/base
3. pairs   2 samples per prompt from the base (JAX DDIM + CFG) -> generic JSONL -> preprocess
           -> shards/pairs (scores, votes, majority labels)
4. dpo     one bdpo_jax.train run per entry of config.demo.runs, from the base checkpoint
5. eval    scorers_torch.evaluate.evaluate: best-of-seeds win rates vs the base, chart, grid
Outputs under OUT; OUT/summary.md holds the win-rate table, the seed and the time per stage.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from bdpo_demo import model, pairs, world
from bdpo_jax import train

SCORER_NAMES = ("colour", "shape", "position", "sharpness")
PLUGINS = "bdpo_demo.plugins"


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def parse_run(entry: str) -> tuple[str, dict[str, Any]]:
    """'name=mode[:scorer][-noref]' -> (name, {"mode", "scorer", "ref"})."""
    name, sep, spec = entry.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"config.demo.runs entry {entry!r} is not 'name=mode[:scorer][-noref]'")
    ref = not spec.endswith("-noref")
    spec = spec.removesuffix("-noref")
    mode, _, scorer = spec.partition(":")
    if mode == "single" and scorer not in SCORER_NAMES:
        raise ValueError(f"config.demo.runs entry {entry!r}: scorer must be one of {SCORER_NAMES}")
    return name, {"mode": mode, "scorer": scorer, "ref": ref}


def preprocess(jsonl: str, out: str, batch_size: int = 64) -> dict:
    """The real preprocessing CLI on a generic pair file; returns its manifest."""
    from scorers_torch import preprocess as cli

    return cli.main(
        [
            "--input", jsonl, "--format", "generic", "--out", out,
            "--base-model", "demo-world", "--text-encoder", "minilm",
            "--latent-encoder", "identity", "--scorers", ",".join(SCORER_NAMES),
            "--plugins", PLUGINS, "--resolution", str(world.IMAGE_SIZE),
            "--tie-policy", "keep", "--batch-size", str(batch_size), "--device", "cpu",
        ]
    )  # fmt: skip


def train_config(
    config: ml_collections.ConfigDict, data_path: str, unet_config: str, **fields: Any
) -> ml_collections.ConfigDict:
    """A trainer config: the demo's shared fields plus `fields` ('section.name': value)."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        del cfg["demo"]
    cfg.seed = int(config.demo.seed)
    cfg.model.unet_config = unet_config
    cfg.data.path = data_path
    for key, value in fields.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def dpo_config(config, name_spec: dict, data_path: str, unet_config: str, base: str):
    d = config.demo
    return train_config(
        config, data_path, unet_config,
        **{
            "model.init_checkpoint": base, "label.mode": name_spec["mode"],
            "label.scorer": name_spec["scorer"], "dpo.beta": float(d.beta),
            "dpo.ref_update_every": int(d.ref_update_every) if name_spec["ref"] else 0,
            "optim.learning_rate": float(d.dpo_lr), "optim.warmup_steps": int(d.dpo_warmup),
            "train.steps": int(d.dpo_steps), "train.global_batch_size": int(d.dpo_batch),
        },
    )  # fmt: skip


def spread_prompts(count: int) -> list[str]:
    """`count` world prompts spread evenly over the world's fixed order."""
    specs = world.all_specs()
    idx = np.linspace(0, len(specs) - 1, min(count, len(specs))).round().astype(int)
    return [specs[i].prompt for i in idx]


def make_generator(workdir: str, config, text_encoder) -> Any:
    from bdpo_demo.generator import JaxGenerator

    d = config.demo
    return JaxGenerator(
        workdir, text_encoder=text_encoder, scheduler=config.sample.scheduler,
        steps=int(d.sample_steps), guidance=float(d.guidance), batch_size=int(d.sample_batch),
    )  # fmt: skip


def _timed(timings: dict, name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return result


def stage_world(config, out: str) -> dict:
    d = config.demo
    rate = float(d.flaw_rate)
    rates = world.FlawRates(colour=rate, shape=rate, position=rate, blur=rate)
    jsonl = pairs.write_sft_file(os.path.join(out, "data", "sft"), int(d.sft_per_prompt), rates,
                                 int(d.seed))  # fmt: skip
    return preprocess(jsonl, os.path.join(out, "shards", "sft"))


def stage_base(config, out: str, unet_config: str) -> str:
    d = config.demo
    cfg = train_config(
        config, os.path.join(out, "shards", "sft"), unet_config,
        **{
            "label.mode": "sft", "optim.learning_rate": float(d.base_lr),
            "optim.warmup_steps": int(d.base_warmup), "train.steps": int(d.base_steps),
            "train.global_batch_size": int(d.base_batch),
        },
    )  # fmt: skip
    workdir = os.path.join(out, "runs", "base")
    train.train_and_evaluate(cfg, workdir)
    return workdir


def stage_pairs(config, out: str, base: str, text_encoder) -> dict:
    d = config.demo
    count = int(d.pair_prompts) or len(world.all_specs())
    prompts = spread_prompts(count) * int(d.pairs_per_prompt)
    first = 1_000_000 + 1000 * int(d.seed)  # disjoint from the evaluation seeds
    seeds = [first + 2 * i for i in range(len(prompts))]
    generator = make_generator(base, config, text_encoder)
    images = generator.generate(prompts * 2, seeds + [s + 1 for s in seeds])
    n = len(prompts)
    jsonl = pairs.write_pair_file(
        os.path.join(out, "data", "pairs"), prompts, images[:n], images[n:], "pairs.jsonl"
    )
    return preprocess(jsonl, os.path.join(out, "shards", "pairs"))


def stage_dpo(config, out: str, unet_config: str, base: str, timings: dict) -> dict[str, str]:
    workdirs = {}
    for entry in config.demo.runs:
        name, spec = parse_run(entry)
        banner(f"stage 4: DPO run {name!r} ({entry})")
        cfg = dpo_config(config, spec, os.path.join(out, "shards", "pairs"), unet_config, base)
        workdirs[name] = os.path.join(out, "runs", name)
        _timed(
            timings, f"dpo:{name}", lambda c=cfg, w=workdirs[name]: train.train_and_evaluate(c, w)
        )
    return workdirs


def stage_eval(config, out: str, workdirs: dict[str, str], text_encoder):
    from scorers_torch.evaluate import evaluate
    from scorers_torch.scorers.base import build_scorers

    d = config.demo
    models = {name: make_generator(w, config, text_encoder) for name, w in workdirs.items()}
    scorers = build_scorers({name: {} for name in SCORER_NAMES})
    return evaluate(
        models, spread_prompts(int(d.eval_prompts)), scorers, os.path.join(out, "eval"),
        seeds=int(d.eval_seeds), base_seed=int(d.seed) * 1000, reference="base",
        grid_prompts=int(d.grid_prompts),
    )  # fmt: skip


def winrate_table(results, runs: list[str]) -> str:
    """Markdown: run x metric win rate (%) vs the base, ties in brackets."""
    by = {(p.model_a, p.metric): p for p in results.pairs if p.model_b == "base"}
    lines = [
        "| run vs base | " + " | ".join(SCORER_NAMES) + " |",
        "|---" * (len(SCORER_NAMES) + 1) + "|",
    ]
    for run in runs:
        cells = []
        for metric in SCORER_NAMES:
            p = by[run, metric]
            cells.append(f"{100 * p.win_rate:.1f} ({100 * p.tie_rate:.0f})")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(
    config: ml_collections.ConfigDict, out: str, *, compilation_cache: bool = True
) -> dict[str, Any]:
    """Runs every stage into OUT; returns the summary (also OUT/summary.json and .md).

    `compilation_cache`: keep XLA executables in OUT/jax_cache (a global JAX setting), so
    runs whose step compiles to the same program, and reruns, skip compilation.
    """
    from bdpo_demo import plugins  # noqa: F401  (registers scorers and 'minilm')
    from scorers_torch.encoders import TEXT_ENCODERS

    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    if compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    timings: dict[str, float] = {}
    unet_config = model.write_unet_config(
        os.path.join(out, "unet_config.json"), tuple(config.demo.channels)
    )
    text_encoder = TEXT_ENCODERS.build("minilm")

    banner("stage 1: world -> flawed renders -> preprocessing CLI -> shards/sft")
    sft_manifest = _timed(timings, "1 world + preprocess", lambda: stage_world(config, out))
    banner("stage 2: base model (SFT from scratch through bdpo_jax.train)")
    base = _timed(timings, "2 base SFT", lambda: stage_base(config, out, unet_config))
    banner("stage 3: on-policy pairs from the base -> preprocessing CLI -> shards/pairs")
    pair_manifest = _timed(timings, "3 pairs", lambda: stage_pairs(config, out, base, text_encoder))
    workdirs = stage_dpo(config, out, unet_config, base, timings)
    banner("stage 5: evaluation (best of seeds, win rates vs base)")
    results = _timed(
        timings,
        "5 eval",
        lambda: stage_eval(config, out, {"base": base, **workdirs}, text_encoder),
    )
    timings["total"] = time.perf_counter() - t0
    table = winrate_table(results, list(workdirs))
    summary = {
        "seed": int(config.demo.seed),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "sft_counts": sft_manifest["counts"],
        "pair_counts": pair_manifest["counts"],
        "pair_agreement_with_majority": pair_manifest["agreement"]["with_majority"],
        "winrates_vs_base": {
            f"{p.model_a}/{p.metric}": {"win": p.win_rate, "tie": p.tie_rate, "n": p.n}
            for p in results.pairs
            if p.model_b == "base"
        },
        "files": {k: str(v) for k, v in results.files.items()},
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_summary_md(out, config, table, summary, results)
    banner("win rate (%) vs base, best of seeds (ties in brackets)")
    print(table, flush=True)
    print(f"\nwall time {timings['total']:.0f} s; summary: {os.path.join(out, 'summary.md')}")
    return summary


def write_summary_md(out: str, config, table: str, summary: dict, results) -> None:
    d = config.demo
    lines = [
        "# BalancedDPO CPU demo",
        "",
        f"seed {summary['seed']}; {d.eval_prompts} prompts x {d.eval_seeds} seeds; "
        f"best-of-seeds win rate (%) vs the base, strictly greater; ties (%) in brackets.",
        "",
        table,
        "",
        "## Mean scores",
        "",
        results.files["means_md"].read_text(encoding="utf-8"),
        "## On-policy pairs",
        "",
        f"counts: {json.dumps(summary['pair_counts'])}",
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
        "",
    ]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
