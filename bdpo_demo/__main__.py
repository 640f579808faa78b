"""python -m bdpo_demo --out demo_out [--ci] [--seed S] [--seeds N] [--config.demo.x=v ...]

Runs the whole CPU demo (see bdpo_demo/pipeline.py); `--ci` uses configs/demo_ci.py. `--seeds
N` trains the base once, then repeats the on-policy pairs, the DPO runs and the evaluation for
the training seeds S .. S + N - 1 and reports each cell's mean, range and verdict count. A bad
flag or an unwritable --out is one line on stderr and exit code 2 (--debug: the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from bdpo_demo import model, pipeline
from bdpo_jax import schema

PROG = "python -m bdpo_demo"


def parse_value(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def apply_override(config, item: str) -> None:
    """`--config.a.b=v`: config.a.b = v cast to the field's type; a mistake is a UserError."""
    key, sep, value = item.removeprefix("--config.").partition("=")
    if not item.startswith("--config.") or not sep:
        raise schema.UserError(
            f"unknown argument {item!r} (overrides look like --config.demo.seed=3)"
        )
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        if part not in node or not hasattr(node[part], "items"):
            raise schema.UserError(f"--config.{key}: no such config field")
        node = node[part]
    if leaf not in node or hasattr(node[leaf], "items"):
        raise schema.UserError(f"--config.{key}: no such config field")
    if node[leaf] is None:
        node[leaf] = value
        return
    if isinstance(node[leaf], bool):  # bool("false") would be True
        flag = BOOL_WORDS.get(value.strip().lower())
        if flag is None:
            raise schema.UserError(f"--config.{key}={value}: expected true or false")
        node[leaf] = flag
        return
    try:
        node[leaf] = type(node[leaf])(parse_value(value))
    except (TypeError, ValueError) as error:
        raise schema.UserError(
            f"--config.{key}={value}: expected a {type(node[leaf]).__name__} ({error})"
        ) from None


def check_unet(config) -> None:
    """config.demo's UNet fields (channels, pixel_fold, plain_levels, image_size) build a UNet;
    a mistake is a UserError naming them."""
    try:
        model.unet_config_for(config.demo)
    except ValueError as error:
        raise schema.UserError(
            f"--config.demo.channels / pixel_fold / plain_levels / image_size: {error}"
        ) from None


def check_out(out: str) -> None:
    """--out must be a folder this process can create and write into."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise schema.UserError(f"--out {out}: cannot write there ({error.strerror})") from None


def main(argv: list[str] | None = None) -> dict:
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    p = schema.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--ci", action="store_true", help="the CI size (configs/demo_ci.py)")
    p.add_argument("--seed", type=int, default=None, help="config.demo.seed")
    p.add_argument("--seeds", type=int, default=None, help="config.demo.train_seeds (>= 1)")

    def run() -> dict:
        args, overrides = p.parse_known_args(argv)
        from configs import demo, demo_ci

        config = (demo_ci if args.ci else demo).get_config()
        if args.seed is not None:
            config.demo.seed = args.seed
        if args.seeds is not None:
            if args.seeds < 1:
                raise schema.UserError(f"--seeds {args.seeds}: need at least one training seed")
            config.demo.train_seeds = args.seeds
        for item in overrides:
            apply_override(config, item)
        check_unet(config)
        check_out(args.out)
        logging.basicConfig(level=logging.WARNING)
        return pipeline.run(config, args.out)

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    main()
