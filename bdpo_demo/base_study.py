"""Does the base draw? Stages 1-2 of the demo, then the base's mean score per measure.

    python -m bdpo_demo.base_study --out base_x0 [--samples 2] [--config.demo.x=v ...]

Renders and preprocesses the SFT data (stage 1), trains the base (stage 2, the same
`pipeline.stage_base` as `make demo`), samples `--samples` images per held-out evaluation
prompt with the demo's sampler and prints and writes (OUT/base_study.json) the base's mean
score per measure beside the flawed renders' (the issue 11 criterion: within 15%). The README's
table of base recipes was measured with it; each row is one set of `--config.` overrides.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from bdpo_demo import measures, model, pipeline, report, world
from bdpo_demo.__main__ import apply_override, check_out
from bdpo_jax import schema

PROG = "python -m bdpo_demo.base_study"


def sample_means(config, base: str, samples: int) -> dict[str, float]:
    """Mean score per measure of `samples` base images per held-out evaluation prompt."""
    from scorers_torch.encoders import TEXT_ENCODERS

    prompts = [p for p in pipeline.eval_prompts(config) for _ in range(samples)]
    first = 1000 * (int(config.demo.seed) + 1)  # apart from the evaluation's seed * 1000 + i
    seeds = [first + i for i in range(len(prompts))]
    generator = pipeline.make_generator(base, config, TEXT_ENCODERS.build("minilm"))
    images = [np.asarray(im, np.float32) / 255.0 for im in generator.generate(prompts, seeds)]
    specs = [world.parse_prompt(p) for p in prompts]
    return {
        name: float(np.mean([fn(im, spec) for im, spec in zip(images, specs, strict=True)]))
        for name, fn in measures.MEASURES.items()
    }


def study(config, out: str, samples: int) -> dict:
    """Stages 1-2 into OUT, then the base's means vs the flawed renders'; OUT/base_study.json."""
    from bdpo_demo import plugins  # noqa: F401  (registers scorers, 'minilm', the latent encoder)

    os.makedirs(out, exist_ok=True)
    unet_config = model.write_unet_config(
        os.path.join(out, "unet_config.json"), tuple(config.demo.channels)
    )
    t0 = time.perf_counter()
    pipeline.stage_world(config, out)
    base = pipeline.stage_base(config, out, unet_config)
    train_s = time.perf_counter() - t0
    prompts = pipeline.eval_prompts(config)
    means = report.render_means(
        prompts, float(config.demo.flaw_rate), samples, int(config.demo.seed)
    )
    means["base_samples"] = sample_means(config, base, samples)
    result = {
        "samples_per_prompt": samples,
        "held_out_prompts": len(prompts),
        "stages_1_2_seconds": round(train_s, 1),
        "base_vs_renders": report.base_vs_renders(means),
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

    def run() -> dict:
        args, overrides = p.parse_known_args(argv)
        from configs import demo, demo_ci

        if args.samples < 1:
            raise schema.UserError(f"--samples {args.samples}: need at least one image")
        config = (demo_ci if args.ci else demo).get_config()
        for item in overrides:
            apply_override(config, item)
        check_out(args.out)
        result = study(config, args.out, args.samples)
        print(report.base_table(result), flush=True)
        return result

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    main()
