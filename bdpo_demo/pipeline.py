"""The demo end to end, each stage through the project's real code paths.

1. world   flawed renders of the 72 training prompts (world.split_specs) -> generic JSONL ->
           scorers_torch.preprocess (pixel-unshuffle latents, MiniLM text, the four demo scorers)
           -> shards/sft
2. base    bdpo_jax.train (label mode 'sft') from scratch -> runs/base
3. pairs   2 samples per training prompt from the base (JAX sampler + CFG) -> generic JSONL ->
           preprocess -> shards/pairs (scores, votes, majority labels)
4. dpo     one bdpo_jax.train run per entry of config.demo.runs, from the base checkpoint
5. eval    scorers_torch.evaluate.evaluate on held-out prompts: best-of-seeds win rates vs
           the base with 95% intervals and verdicts, chart, grid
With config.demo.train_seeds = N > 1 (--seeds N), stages 3-5 repeat for the training seeds
seed, seed + 1, ... from the one base; seed + i > seed writes under OUT/seed_<seed + i>/.
Outputs under OUT; OUT/summary.md and .json (bdpo_demo.report) hold the tables.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from bdpo_demo import measures, model, pairs, report, world
from bdpo_jax import train

SCORER_NAMES = tuple(measures.MEASURES)  # colour, shape, position, sharpness
GRID_LABELS = {"colour": "col", "shape": "shape", "position": "pos", "sharpness": "sharp"}
PLUGINS = "bdpo_demo.plugins"


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def parse_run(entry: str) -> tuple[str, dict[str, Any]]:
    """'name=mode[:scorer][-noref][-lora]' -> (name, {"mode", "scorer", "ref", "lora"})."""
    name, sep, spec = entry.partition("=")
    form = "'name=mode[:scorer][-noref][-lora]'"
    if not sep or not name or not spec:
        raise ValueError(f"config.demo.runs entry {entry!r} is not {form}")
    lora = spec.endswith("-lora")
    spec = spec.removesuffix("-lora")
    ref = not spec.endswith("-noref")
    spec = spec.removesuffix("-noref")
    mode, _, scorer = spec.partition(":")
    if mode == "single" and scorer not in SCORER_NAMES:
        raise ValueError(f"config.demo.runs entry {entry!r}: scorer must be one of {SCORER_NAMES}")
    return name, {"mode": mode, "scorer": scorer, "ref": ref, "lora": lora}


def preprocess(jsonl: str, out: str, fold: int, image_size: int, batch_size: int = 64) -> dict:
    """The real preprocessing CLI on a generic pair file of `image_size` px images (latents:
    pixels folded `fold` x `fold`); returns its manifest."""
    from scorers_torch import preprocess as cli

    return cli.main(
        [
            "--input", jsonl, "--format", "generic", "--out", out,
            "--base-model", "demo-world", "--text-encoder", "minilm",
            "--latent-encoder", model.latent_encoder_name(fold),
            "--scorers", ",".join(SCORER_NAMES),
            "--plugins", PLUGINS, "--resolution", str(image_size),
            "--tie-policy", "keep", "--batch-size", str(batch_size), "--device", "cpu",
        ]
    )  # fmt: skip


def train_config(
    config: ml_collections.ConfigDict,
    data_path: str,
    unet_config: str,
    seed: int | None = None,
    **fields: Any,
) -> ml_collections.ConfigDict:
    """A trainer config: the demo's shared fields plus `fields` ('section.name': value);
    `seed` (default config.demo.seed) seeds the trainer."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        del cfg["demo"]
    cfg.seed = int(config.demo.seed if seed is None else seed)
    cfg.model.unet_config = unet_config
    cfg.data.path = data_path
    for key, value in fields.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def dpo_config(
    config, name_spec: dict, data_path: str, unet_config: str, base: str, seed: int | None = None
):
    d = config.demo
    return train_config(
        config, data_path, unet_config, seed,
        **{
            "model.init_checkpoint": base, "label.mode": name_spec["mode"],
            "label.scorer": name_spec["scorer"], "dpo.beta": float(d.beta),
            "dpo.ref_update_every": int(d.ref_update_every) if name_spec["ref"] else 0,
            "optim.learning_rate": float(d.lora_lr if name_spec["lora"] else d.dpo_lr),
            "lora.rank": int(d.lora_rank) if name_spec["lora"] else 0,
            "optim.warmup_steps": int(d.dpo_warmup),
            "train.steps": int(d.dpo_steps), "train.global_batch_size": int(d.dpo_batch),
        },
    )  # fmt: skip


def spread_prompts(count: int, specs: list[world.Spec] | None = None) -> list[str]:
    """`count` prompts of `specs` (default: the whole world) spread evenly over their order."""
    specs = world.all_specs() if specs is None else specs
    idx = np.linspace(0, len(specs) - 1, min(count, len(specs))).round().astype(int)
    return [specs[i].prompt for i in idx]


def eval_prompts(config) -> list[str]:
    """config.demo.eval_prompts held-out prompts (0 = all 108), spread over the held-out set."""
    heldout = world.split_specs()[1]
    return spread_prompts(int(config.demo.eval_prompts) or len(heldout), heldout)


def train_seeds(config) -> list[int]:
    """The training seeds: config.demo.seed + 0 .. train_seeds - 1."""
    return [int(config.demo.seed) + i for i in range(max(1, int(config.demo.train_seeds)))]


def seed_dir(out: str, config, seed: int) -> str:
    """Where one training seed's pairs, DPO runs and evaluation go (report.seed_folder)."""
    return report.seed_folder(out, int(config.demo.seed), seed)


def make_generator(workdir: str, config, text_encoder) -> Any:
    from bdpo_demo.generator import JaxGenerator

    d = config.demo
    return JaxGenerator(
        workdir, text_encoder=text_encoder, scheduler=config.sample.scheduler,
        steps=int(d.sample_steps), guidance=float(d.guidance), batch_size=int(d.sample_batch),
        use_karras_sigmas=bool(config.sample.use_karras_sigmas),
    )  # fmt: skip


def _timed(timings: dict, name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return result


def write_unet_config(config, out: str) -> str:
    """OUT/unet_config.json of config.demo's UNet (image size, channels, pixel fold, plain
    levels)."""
    path = os.path.join(out, "unet_config.json")
    return model.write_unet_config(path, model.unet_config_for(config.demo))


def stage_world(config, out: str) -> dict:
    d = config.demo
    rate = float(d.flaw_rate)
    rates = world.FlawRates(colour=rate, shape=rate, position=rate, blur=rate)
    jsonl = pairs.write_sft_file(
        os.path.join(out, "data", "sft"), int(d.sft_per_prompt), rates, int(d.seed),
        world.split_specs()[0], int(d.image_size),
    )  # fmt: skip
    return preprocess(
        jsonl, os.path.join(out, "shards", "sft"), int(d.pixel_fold), int(d.image_size)
    )


def stage_base(config, out: str, unet_config: str) -> str:
    d = config.demo
    cfg = train_config(
        config, os.path.join(out, "shards", "sft"), unet_config,
        **{
            "label.mode": "sft", "optim.learning_rate": float(d.base_lr),
            "optim.warmup_steps": int(d.base_warmup), "optim.schedule": str(d.base_schedule),
            "train.steps": int(d.base_steps),
            "train.global_batch_size": int(d.base_batch),
            "diffusion.snr_gamma": float(d.base_snr_gamma),
            "diffusion.snr_weighting": str(d.base_snr_weighting),
            "diffusion.loss_type": str(d.base_loss_type),
            "diffusion.huber_c": float(d.base_huber_c),
            "diffusion.timestep_sampling": str(d.base_timestep_sampling),
            "diffusion.timestep_uniform_share": float(d.base_timestep_uniform_share),
        },
    )  # fmt: skip
    workdir = os.path.join(out, "runs", "base")
    train.train_and_evaluate(cfg, workdir)
    return workdir


def stage_pairs(config, out: str, base: str, text_encoder, seed: int) -> dict:
    """On-policy pairs for training seed `seed` into OUT/data/pairs and OUT/shards/pairs."""
    d = config.demo
    train_specs = world.split_specs()[0]
    count = int(d.pair_prompts) or len(train_specs)
    prompts = spread_prompts(count, train_specs) * int(d.pairs_per_prompt)
    first = 1_000_000 + 1000 * seed  # disjoint from the evaluation seeds
    seeds = [first + 2 * i for i in range(len(prompts))]
    generator = make_generator(base, config, text_encoder)
    images = generator.generate(prompts * 2, seeds + [s + 1 for s in seeds])
    n = len(prompts)
    jsonl = pairs.write_pair_file(
        os.path.join(out, "data", "pairs"), prompts, images[:n], images[n:], "pairs.jsonl"
    )
    return preprocess(
        jsonl, os.path.join(out, "shards", "pairs"), int(d.pixel_fold), int(d.image_size)
    )


def stage_dpo(
    config, out: str, unet_config: str, base: str, timings: dict, seed: int, tag: str = ""
) -> dict[str, str]:
    workdirs = {}
    for entry in config.demo.runs:
        name, spec = parse_run(entry)
        banner(f"stage 4: DPO run {name!r} ({entry}), training seed {seed}")
        cfg = dpo_config(
            config, spec, os.path.join(out, "shards", "pairs"), unet_config, base, seed
        )
        workdirs[name] = os.path.join(out, "runs", name)
        _timed(
            timings,
            f"dpo:{name}{tag}",
            lambda c=cfg, w=workdirs[name]: train.train_and_evaluate(c, w),
        )
    return workdirs


def grid_models(config) -> list[str]:
    """The grid's columns: the base, BalancedDPO (majority with reference updates) and every
    single-scorer run, in config.demo.runs order."""
    names = []
    for entry in config.demo.runs:
        name, spec = parse_run(entry)
        if spec["lora"]:
            continue
        if (spec["mode"] == "majority" and spec["ref"]) or spec["mode"] == "single":
            names.append(name)
    return ["base", *names]


def stage_eval(config, eval_dir: str, workdirs: dict[str, str], text_encoder, share_from=""):
    """Best-of-seeds evaluation of {"base": ..., run: ...} on the held-out prompts into
    `eval_dir`; `share_from` (an earlier eval folder of the same base) lends its base images,
    so extra training seeds do not sample the base again."""
    from scorers_torch.evaluate import evaluate
    from scorers_torch.generate import image_path
    from scorers_torch.scorers.base import build_scorers

    d = config.demo
    prompts = eval_prompts(config)
    seeds = [int(d.seed) * 1000 + i for i in range(int(d.eval_seeds))]
    if share_from:
        for i in range(len(prompts)):
            for seed in seeds:
                src = image_path(Path(share_from), "base", f"{i:05d}", seed)
                dst = image_path(Path(eval_dir), "base", f"{i:05d}", seed)
                if src.exists() and not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
    models = {name: make_generator(w, config, text_encoder) for name, w in workdirs.items()}
    scorers = build_scorers({name: {} for name in SCORER_NAMES})
    return evaluate(
        models, prompts, scorers, eval_dir, seeds=int(d.eval_seeds), base_seed=seeds[0],
        reference="base", grid_prompts=int(d.grid_prompts), bootstrap=int(d.bootstrap),
        grid_models=[m for m in grid_models(config) if m in models],
        grid_cell_size=int(d.grid_scale) * int(d.image_size), grid_labels=GRID_LABELS,
    )  # fmt: skip


def evaluate_seeds(
    config, out: str, base: str, workdirs: dict[int, dict[str, str]], text_encoder, timings
) -> dict[int, Any]:
    """stage 5 for every training seed (`workdirs`: seed -> run name -> workdir); returns
    seed -> EvalResults. The base's images are sampled once (first seed's folder)."""
    results, first = {}, ""
    for seed, runs in workdirs.items():
        eval_dir = os.path.join(seed_dir(out, config, seed), "eval")
        tag = "" if not first else f" (seed {seed})"
        banner(f"stage 5: evaluation{tag} (best of seeds, win rates vs base)")
        results[seed] = _timed(
            timings,
            f"5 eval{tag}",
            lambda e=eval_dir, r=runs, f=first: stage_eval(
                config, e, {"base": base, **r}, text_encoder, f
            ),
        )
        first = first or eval_dir
    return results


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
    unet_config = write_unet_config(config, out)
    text_encoder = TEXT_ENCODERS.build("minilm")

    banner("stage 1: world -> flawed renders -> preprocessing CLI -> shards/sft")
    sft_manifest = _timed(timings, "1 world + preprocess", lambda: stage_world(config, out))
    banner("stage 2: base model (SFT from scratch through bdpo_jax.train)")
    base = _timed(timings, "2 base SFT", lambda: stage_base(config, out, unet_config))
    pair_manifests, workdirs = {}, {}
    for i, seed in enumerate(train_seeds(config)):
        folder, tag = seed_dir(out, config, seed), "" if i == 0 else f" (seed {seed})"
        banner(f"stage 3: on-policy pairs from the base, training seed {seed} -> shards/pairs")
        pair_manifests[seed] = _timed(
            timings,
            f"3 pairs{tag}",
            lambda f=folder, s=seed: stage_pairs(config, f, base, text_encoder, s),
        )
        workdirs[seed] = stage_dpo(config, folder, unet_config, base, timings, seed, tag)
    results = evaluate_seeds(config, out, base, workdirs, text_encoder, timings)
    timings["total"] = time.perf_counter() - t0
    summary = report.build_summary(
        config, results, list(workdirs[train_seeds(config)[0]]), eval_prompts(config),
        sft_manifest, pair_manifests, timings,
    )  # fmt: skip
    report.write_summary(out, config, summary, results)
    banner("win rate (%) vs base, best of seeds")
    print(report.winrate_table(summary), flush=True)
    print(f"\nwall time {timings['total']:.0f} s; summary: {os.path.join(out, 'summary.md')}")
    return summary
