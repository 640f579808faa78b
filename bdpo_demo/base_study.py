"""Does the base draw? Stages 1-2 of the demo, then the base's mean score per measure.

    python -m bdpo_demo.base_study --out base_x0 [--samples 2] [--config.demo.x=v ...]

    python -m bdpo_demo.base_study --out DIR --base demo_out/runs/base   # an existing base

Renders and preprocesses the SFT data (stage 1), trains the base (stage 2, the same
`pipeline.stage_base` as `make demo`; `--base WORKDIR` skips both and studies that trained
base), samples `--samples` images per held-out evaluation prompt with the demo's sampler and
prints and writes (OUT/base_study.json) the base's mean score per measure beside the flawed
renders' (the issue 11 criterion: within 15%) with their standard errors over prompts, and
draws 16 of its samples with their scores (OUT/base_samples.png). It also asks the base for
its one-call x0 estimate of clean renders noised to a few timesteps (`x0_errors`): a base that
cannot draw an edge even from a nearly clean input shows it there. The README's table of base
recipes was measured with it; each row is one set of `--config.` overrides. `python -m
bdpo_demo.base_curve` draws several such studies against their SFT steps.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from bdpo_demo import measures, model, pipeline, report, world
from bdpo_demo.__main__ import apply_override, check_out, check_unet
from bdpo_jax import checkpointing, grids, schema

PROG = "python -m bdpo_demo.base_study"
PROBE_TIMESTEPS = (10, 50, 124, 249, 499)  # 124: the last step of 8 trailing (no Karras)
SAMPLE_GRID_FILE = "base_samples.png"  # OUT/: base samples with their scores
GRID_PROMPTS = 16
GRID_SCALE = 4
BORDER_PX = 2  # the image's outer ring that `border_distance` reads
OFF_BACKGROUND = 0.1  # RGB distance of that ring from the background: the base lost it


def sample_scores(config, generator, samples: int) -> tuple[list[str], np.ndarray, dict]:
    """(prompts, images [N, H, W, 3] in [0, 1], {measure: [N] scores}) of `samples` base
    images (`generator`: the base's `pipeline.make_generator`) per held-out evaluation
    prompt."""
    prompts = [p for p in pipeline.eval_prompts(config) for _ in range(samples)]
    first = 1000 * (int(config.demo.seed) + 1)  # apart from the evaluation's seed * 1000 + i
    seeds = [first + i for i in range(len(prompts))]
    images = np.stack(
        [np.asarray(im, np.float32) / 255.0 for im in generator.generate(prompts, seeds)]
    )
    specs = [world.parse_prompt(p) for p in prompts]
    scores = {
        name: np.array([fn(im, spec) for im, spec in zip(images, specs, strict=True)])
        for name, fn in measures.MEASURES.items()
    }
    return prompts, images, scores


def prompt_standard_errors(prompts, scores) -> dict[str, float]:
    """Per measure, the standard error of the mean score over prompts: the sample standard
    deviation of the per-prompt means / sqrt(prompts). A prompt's images share it, so the
    prompt, not the image, is the independent unit."""
    _, index, counts = np.unique(np.asarray(prompts), return_inverse=True, return_counts=True)
    out = {}
    for m, values in scores.items():
        per_prompt = np.bincount(index, weights=np.asarray(values, np.float64)) / counts
        sd = float(np.std(per_prompt, ddof=1)) if len(counts) > 1 else float("nan")
        out[m] = sd / np.sqrt(len(counts))
    return out


def sft_steps(base: str) -> int:
    """The SFT optimiser steps of a trained base (its config.json's train.steps)."""
    with open(os.path.join(base, checkpointing.CONFIG_FILE)) as f:
        return int(json.load(f)["train"]["steps"])


def border_distance(image_HxWx3: np.ndarray, spec: world.Spec) -> float:
    """Mean RGB distance of the image's outer BORDER_PX pixels from the prompt's background
    (objects barely reach it: perfect renders score at most 0.02, flawed ones 0.05; uniform
    noise scores ~0.5: an image drawn over its background lies far above OFF_BACKGROUND)."""
    ring = np.ones(image_HxWx3.shape[:2], bool)
    ring[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = False
    background = np.asarray(world.BACKGROUNDS[spec.background])
    return float(np.linalg.norm(image_HxWx3[ring] - background, axis=-1).mean())


def by_background(prompts, images_NxHxWx3, scores) -> dict[str, dict[str, float]]:
    """Per background colour of the prompt: images, mean score per measure and the share of
    images off their background (`border_distance` > OFF_BACKGROUND). Means over all
    backgrounds can hide a base that draws only noise on one of them."""
    specs = [world.parse_prompt(p) for p in prompts]
    names = np.array([s.background for s in specs])
    off = np.array([border_distance(im, s) for im, s in zip(images_NxHxWx3, specs, strict=True)])
    rows = {}
    for name in world.BACKGROUNDS:
        mask = names == name
        if mask.any():
            rows[name] = {"images": int(mask.sum())}
            rows[name].update({m: float(np.mean(v[mask])) for m, v in scores.items()})
            rows[name]["off_background"] = float(np.mean(off[mask] > OFF_BACKGROUND))
    return rows


def background_table(rows: dict[str, dict[str, float]]) -> str:
    """`by_background` as a markdown table."""
    measures_ = list(measures.MEASURES)
    lines = [
        "| background | images | " + " | ".join(measures_) + " | off background |",
        "|---" * (len(measures_) + 3) + "|",
    ]
    for name, row in rows.items():
        cells = [f"{row[m]:.3f}" for m in measures_]
        lines.append(f"| {name} | {row['images']} | " + " | ".join(cells)
                     + f" | {100 * row['off_background']:.0f}% |")  # fmt: skip
    return "\n".join(lines)


def write_sample_grid(path: str, prompts, images_NxHxWx3, scores, samples: int) -> None:
    """The first image of GRID_PROMPTS held-out prompts spread evenly over their list
    (colours, shapes and backgrounds mixed), enlarged GRID_SCALE x without smoothing, each
    with its prompt and scores."""
    count = len(prompts) // samples
    spread = np.unique(np.linspace(0, count - 1, min(GRID_PROMPTS, count)).round().astype(int))
    picks = [int(i) * samples for i in spread]
    captions = [
        f"{prompts[i].removeprefix('a ')}: "
        + " ".join(f"{pipeline.GRID_LABELS[name]} {scores[name][i]:.2f}" for name in scores)
        for i in picks
    ]
    grids.write_grid(images_NxHxWx3[picks], captions, path, ncols=4, upscale=GRID_SCALE)


def x0_errors(generator, timesteps=PROBE_TIMESTEPS, seed: int = 0) -> dict[str, dict]:
    """Per timestep t, the base's x0 estimate (`generator`: its JaxGenerator; one conditional
    UNet call, no guidance) of the clean renders of the 72 training prompts noised to t,
    against the renders: its mse, the mse of the rescaled noisy input x_t / sqrt(abar_t)
    itself, and the estimates' mean sharpness (the renders': `clean_sharpness`). A denoiser
    that uses its input has an error below the input's at small t."""
    import jax
    import jax.numpy as jnp

    from bdpo_jax import schedules

    unet, params = generator.unet()
    sched = generator.schedule
    schedule = schedules.make_schedule(
        sched.num_train_timesteps, sched.beta_schedule, sched.beta_start, sched.beta_end
    )
    specs = world.split_specs()[0]
    size = generator.image_size  # the world's side the base draws
    renders = np.stack([world.render(s, size=size) for s in specs])  # [N, size, size, 3]
    fold = model.fold_of(int(generator.unet_cfg["in_channels"]))
    x0 = model.images_to_latents(renders.transpose(0, 3, 1, 2) * 2.0 - 1.0, fold)
    x0 = x0 * generator.scaling
    text = generator.text_encoder.encode([s.prompt for s in specs])["text_embeds"]
    text = jnp.asarray(np.asarray(text, np.float32))
    apply = jax.jit(lambda x, t: unet.apply({"params": params}, x, t, text))

    def sharpness(x_NxCxHxW: np.ndarray) -> float:
        images = generator.pixels(x_NxCxHxW)
        scores = [measures.sharpness_score(i, s) for i, s in zip(images, specs, strict=True)]
        return float(np.mean(scores))

    out = {"clean_sharpness": sharpness(x0)}
    rng = np.random.default_rng(seed)
    for t in timesteps:
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        t_B = jnp.full((len(specs),), t, jnp.int32)
        x_t = schedules.add_noise(schedule, jnp.asarray(x0), jnp.asarray(eps), t_B)
        x0_hat = schedules.predicted_x0(
            schedule, x_t, apply(x_t, t_B.astype(jnp.float32)), t_B, sched.prediction_type
        )
        abar = float(schedule.alphas_cumprod_T[t])
        out[str(t)] = {
            "x0_estimate_mse": float(np.mean((np.asarray(x0_hat) - x0) ** 2)),
            "noisy_input_mse": float(np.mean((np.asarray(x_t) / np.sqrt(abar) - x0) ** 2)),
            "x0_estimate_sharpness": sharpness(np.asarray(x0_hat)),
        }
    return out


def x0_table(errors: dict) -> str:
    """`x0_errors` as a markdown table, one row per timestep."""
    rows = [
        f"| {t} | {e['x0_estimate_mse']:.4f} | {e['noisy_input_mse']:.4f} | "
        f"{e['x0_estimate_sharpness']:.3f} |"
        for t, e in errors.items()
        if t != "clean_sharpness"
    ]
    head = [
        f"x0 estimate of clean training renders (their sharpness {errors['clean_sharpness']:.3f})",
        "",
        "| t | x0 estimate mse | noisy input mse | x0 estimate sharpness |",
        "|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def study(config, out: str, samples: int, base: str = "") -> dict:
    """Stages 1-2 into OUT (or `base`, an existing trained base), then the base's means vs the
    flawed renders' and its x0 estimates; OUT/base_study.json."""
    from bdpo_demo import plugins  # noqa: F401  (registers scorers, 'minilm', the latent encoder)
    from scorers_torch.encoders import TEXT_ENCODERS

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    if not base:
        unet_config = pipeline.write_unet_config(config, out)
        pipeline.stage_world(config, out)
        base = pipeline.stage_base(config, out, unet_config)
    train_s = time.perf_counter() - t0
    prompts = pipeline.eval_prompts(config)
    generator = pipeline.make_generator(base, config, TEXT_ENCODERS.build("minilm"))
    # renders at the side the base draws (a --base's own, whatever config.demo.image_size says)
    means = report.render_means(
        prompts, float(config.demo.flaw_rate), samples, int(config.demo.seed),
        generator.image_size,
    )  # fmt: skip
    sample_prompts, images, scores = sample_scores(config, generator, samples)
    means["base_samples"] = {name: float(np.mean(v)) for name, v in scores.items()}
    write_sample_grid(os.path.join(out, SAMPLE_GRID_FILE), sample_prompts, images, scores, samples)
    result = {
        "base": base,
        "sft_steps": sft_steps(base),
        "samples_per_prompt": samples,
        "held_out_prompts": len(prompts),
        "stages_1_2_seconds": round(train_s, 1),
        "base_vs_renders": report.base_vs_renders(means),
        "base_standard_errors": prompt_standard_errors(sample_prompts, scores),
        "by_background": by_background(sample_prompts, images, scores),
        "x0_errors": x0_errors(generator),
    }
    with open(os.path.join(out, "base_study.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv: list[str] | None = None) -> dict:
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    p = schema.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--out", required=True, help="output folder (shards, runs/base, JSON)")
    p.add_argument("--ci", action="store_true", help="the CI size (configs/demo_ci.py)")
    p.add_argument("--samples", type=int, default=2, help="base images per held-out prompt")
    p.add_argument(
        "--base", default="", help="study this trained base (a workdir) instead of training one"
    )

    def run() -> dict:
        args, overrides = p.parse_known_args(argv)
        from configs import demo, demo_ci

        if args.samples < 1:
            raise schema.UserError(f"--samples {args.samples}: need at least one image")
        config = (demo_ci if args.ci else demo).get_config()
        for item in overrides:
            apply_override(config, item)
        check_unet(config)
        if args.base and not os.path.isfile(os.path.join(args.base, checkpointing.CONFIG_FILE)):
            raise schema.UserError(f"--base {args.base}: not a trained workdir (no config.json)")
        check_out(args.out)
        result = study(config, args.out, args.samples, args.base)
        print(report.base_table(result), flush=True)
        print("\nBase samples per background\n\n" + background_table(result["by_background"]))
        print("\n" + x0_table(result["x0_errors"]), flush=True)
        return result

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    main()
