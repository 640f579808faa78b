"""python -m bdpo_jax.demo --out demo_out [--ci] [--seed N] [--config.demo.x=v ...]

Runs the whole CPU demo (see bdpo_jax/demo/pipeline.py); `--ci` uses configs/demo_ci.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# XLA:CPU's YNNPACK fusions are slower than XLA's own loops for the demo's small UNet (a
# forward+backward of 32 images at 32x32 on 2 cores: 1.44 s with them, 1.01 s without); the
# flag only concerns the CPU backend and must be set before jax is imported
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type="
    ).strip()

from bdpo_jax.demo import pipeline  # noqa: E402


def parse_value(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bdpo_jax.demo", description=__doc__)
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--ci", action="store_true", help="the CI size (configs/demo_ci.py)")
    p.add_argument("--seed", type=int, default=None, help="config.demo.seed")
    args, overrides = p.parse_known_args(argv)
    from configs import demo, demo_ci

    config = (demo_ci if args.ci else demo).get_config()
    if args.seed is not None:
        config.demo.seed = args.seed
    for item in overrides:
        key, sep, value = item.removeprefix("--config.").partition("=")
        if not item.startswith("--config.") or not sep:
            p.error(f"unknown argument {item!r} (overrides look like --config.demo.seed=3)")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            p.error(f"--config.{key}: no such config field")
        node[leaf] = type(node[leaf])(parse_value(value)) if node[leaf] is not None else value
    logging.basicConfig(level=logging.WARNING)
    return pipeline.run(config, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
