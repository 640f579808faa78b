"""Does the base draw? Stages 1-2 of the demo, then the base's mean score per measure.

    python -m bdpo_demo.base_study --out base_x0 [--samples 2] [--config.demo.x=v ...]

    python -m bdpo_demo.base_study --out DIR --base demo_out/runs/base   # an existing base

Renders and preprocesses the SFT data (stage 1), trains the base (stage 2, the same
`pipeline.stage_base` as `make demo`; `--base WORKDIR` skips both and studies that trained
base), samples `--samples` images per held-out evaluation prompt with the demo's sampler and
prints and writes (OUT/base_study.json) the base's mean score per measure beside the flawed
renders' (the issue 11 criterion: within 15%). It also asks the base for its one-call x0
estimate of clean renders noised to a few timesteps (`x0_errors`): a base that cannot draw an
edge even from a nearly clean input shows it there. The README's table of base recipes was
measured with it; each row is one set of `--config.` overrides.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from bdpo_demo import measures, model, pipeline, report, world
from bdpo_demo.__main__ import apply_override, check_out
from bdpo_jax import checkpointing, schema

PROG = "python -m bdpo_demo.base_study"
PROBE_TIMESTEPS = (10, 50, 124, 249, 499)  # 124: the last step of 8 trailing (no Karras)


def sample_means(config, generator, samples: int) -> dict[str, float]:
    """Mean score per measure of `samples` base images (`generator`: the base's
    `pipeline.make_generator`) per held-out evaluation prompt."""
    prompts = [p for p in pipeline.eval_prompts(config) for _ in range(samples)]
    first = 1000 * (int(config.demo.seed) + 1)  # apart from the evaluation's seed * 1000 + i
    seeds = [first + i for i in range(len(prompts))]
    images = [np.asarray(im, np.float32) / 255.0 for im in generator.generate(prompts, seeds)]
    specs = [world.parse_prompt(p) for p in prompts]
    return {
        name: float(np.mean([fn(im, spec) for im, spec in zip(images, specs, strict=True)]))
        for name, fn in measures.MEASURES.items()
    }


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
    renders = np.stack([world.render(s) for s in specs])  # [N, 32, 32, 3] in [0, 1]
    x0 = model.pixel_unshuffle(renders.transpose(0, 3, 1, 2) * 2.0 - 1.0) * generator.scaling
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
        unet_config = model.write_unet_config(
            os.path.join(out, "unet_config.json"), tuple(config.demo.channels)
        )
        pipeline.stage_world(config, out)
        base = pipeline.stage_base(config, out, unet_config)
    train_s = time.perf_counter() - t0
    prompts = pipeline.eval_prompts(config)
    means = report.render_means(
        prompts, float(config.demo.flaw_rate), samples, int(config.demo.seed)
    )
    generator = pipeline.make_generator(base, config, TEXT_ENCODERS.build("minilm"))
    means["base_samples"] = sample_means(config, generator, samples)
    result = {
        "base": base,
        "samples_per_prompt": samples,
        "held_out_prompts": len(prompts),
        "stages_1_2_seconds": round(train_s, 1),
        "base_vs_renders": report.base_vs_renders(means),
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
        if args.base and not os.path.isfile(os.path.join(args.base, checkpointing.CONFIG_FILE)):
            raise schema.UserError(f"--base {args.base}: not a trained workdir (no config.json)")
        check_out(args.out)
        result = study(config, args.out, args.samples, args.base)
        print(report.base_table(result), flush=True)
        print("\n" + x0_table(result["x0_errors"]), flush=True)
        return result

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    main()
