"""Export a trainer checkpoint to a diffusers UNet folder or a complete diffusers pipeline.

    python -m bdpo_jax.export --workdir W [--step N] [--base BASE] --out OUT \
        [--dtype fp32|fp16|bf16] [--force] [--debug]

Reads W/unet_config.json and the params of the Orbax checkpoint W/checkpoints/<step>/state (the
latest step unless --step; only "params" is read, not the reference or optimizer state). When
BASE is a diffusers pipeline (a local folder or hub id with model_index.json) OUT is that
pipeline with the new UNet in OUT/unet and every other component copied, so
`diffusers.DiffusionPipeline.from_pretrained(OUT)` runs it; without BASE (or with a BASE that is
not a pipeline) OUT is a UNet folder for `UNet2DConditionModel.from_pretrained(OUT)`. The export
is written to a temporary folder beside OUT, verified tensor by tensor against the checkpoint
(re-read from the written safetensors), and only then renamed to OUT. A user's mistake (a
missing workdir or checkpoint, a bad --step or --dtype, an existing OUT without --force) is one
line on stderr and exit code 2; --debug (or BDPO_DEBUG=1) shows its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdpo_jax import checkpointing, schema
from bdpo_jax.models import dtypes

log = logging.getLogger("bdpo_jax.export")

PROG = "python -m bdpo_jax.export"
EXPORT_INFO_NAME = "bdpo_export.json"  # OUT/bdpo_export.json: workdir, step, dtype, base
# UNet config fields that must agree with the base pipeline's UNet for the pipeline to work
_MUST_MATCH = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type")


class ExportError(schema.UserError):
    """A problem with the export's inputs or its verification (the message names the culprit)."""


def restore_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, Any]:
    """(step, params as a tree of numpy arrays) of the trainer checkpoint; latest if step None."""
    try:
        found, _ = checkpointing.find_checkpoint(workdir, step, source="--workdir")
        params = checkpointing.restore_params(workdir, step=found, source="--workdir")
    except checkpointing.CheckpointError as error:
        raise ExportError(str(error)) from error
    return found, params


def _check_tree_matches(params: Any, expected: Any, config_path: Path) -> None:
    """Same paths and shapes as the model built from unet_config.json, else a clear error."""
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name}: {items[:5]}{' ...' if len(items) > 5 else ''}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if items
        )
        raise ExportError(f"checkpoint params do not fit the model of {config_path}: {detail}")


def resolve_base(base: str) -> Path:
    """A local folder, or a hub id resolved through the hub cache (offline works when cached)."""
    if os.path.isdir(base):
        return Path(base)
    if os.path.exists(base):
        raise ExportError(f"--base {base}: not a folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise ExportError(f"--base {base}: not a local folder nor a loadable hub id: {e}") from e


def _copy_pipeline_without_unet(base: Path, dest: Path) -> None:
    for entry in base.iterdir():
        if entry.name == "unet" or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, symlinks=False)
        else:
            shutil.copy2(entry, dest / entry.name)


def _check_base_unet(base: Path, unet_config: dict[str, Any]) -> None:
    path = base / "unet" / "config.json"
    if not path.is_file():
        raise ExportError(f"--base {base}: pipeline has no unet/config.json")
    base_config = json.loads(path.read_text())
    diffs = [
        f"{k}: base {base_config.get(k)!r} vs checkpoint {unet_config.get(k)!r}"
        for k in _MUST_MATCH
        if base_config.get(k) != unet_config.get(k)
    ]
    if diffs:
        raise ExportError(f"--base {base}: its UNet does not fit the checkpoint's: {diffs}")


def verify_unet_folder(unet_dir: Path, params: Any, dtype: Any) -> int:
    """Re-reads the written UNet and compares every tensor with the checkpoint params cast to
    `dtype` (exact equality); returns the number of tensors checked."""
    from bdpo_jax.models import load_unet

    _, written = load_unet(str(unet_dir), dtype=dtype)
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(written)}
    if set(want) != set(got):
        raise ExportError(
            f"verification failed: written tensors differ in names: "
            f"missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
        )
    for name, value in want.items():
        expected = np.asarray(jnp.asarray(value).astype(dtype)).astype(np.float32)
        actual = np.asarray(got[name]).astype(np.float32)
        if expected.shape != actual.shape or not np.array_equal(expected, actual):
            raise ExportError(f"verification failed: tensor {name} differs from the checkpoint")
    return len(want)


def export(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    step: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
) -> Path:
    """Exports checkpoint `step` (latest if None) of `workdir` to `out`; returns `out`."""
    from bdpo_jax.models import UNet2DConditionModel, init_unet_params, save_unet

    if dtype not in dtypes.NAMES:
        raise ExportError(f"--dtype {dtype}: choose one of {list(dtypes.NAMES)}")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"--out {out} exists; pass --force to overwrite it")
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ExportError(f"--workdir {workdir}: no such folder")
    config_path = workdir / checkpointing.UNET_CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(
            f"--workdir {workdir}: no {checkpointing.UNET_CONFIG_FILE} (written by the trainer)"
        )
    unet_config = json.loads(config_path.read_text())
    base_dir = resolve_base(base) if base else None
    is_pipeline = base_dir is not None and (base_dir / "model_index.json").is_file()
    if base_dir is not None and not is_pipeline:
        log.warning("--base %s has no model_index.json: exporting the UNet folder only", base)
    if is_pipeline:
        _check_base_unet(base_dir, unet_config)

    step, params = restore_params(workdir, step)
    log.info("restored params of step %d from %s", step, workdir)
    model = UNet2DConditionModel.from_config(unet_config)
    expected = jax.eval_shape(lambda r: init_unet_params(model, r), jax.random.key(0))
    _check_tree_matches(params, expected, config_path)
    jdtype = dtypes.dtype_from_name(dtype, "--dtype")
    cast = jax.tree.map(lambda x: jnp.asarray(x).astype(jdtype), params)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        unet_dir = tmp / "unet" if is_pipeline else tmp
        if is_pipeline:
            _copy_pipeline_without_unet(base_dir, tmp)
        save_unet(model, cast, str(unet_dir))
        n = verify_unet_folder(unet_dir, params, jdtype)
        info = {"workdir": str(workdir.absolute()), "step": step, "dtype": dtype, "base": base}
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    kind = "pipeline" if is_pipeline else "UNet folder"
    log.info("wrote %s %s (step %d, %s, %d tensors verified)", kind, out, step, dtype, n)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 on success; a user error is one line on stderr and exit code 2 (run_cli)."""
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    parser = schema.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="trainer workdir (holds checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--base", default=None, help="base pipeline folder or hub id")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="fp32", choices=dtypes.NAMES, help="saved dtype")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")

    def run() -> int:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax INFO and metadata warnings
        out = export(
            args.workdir,
            args.out,
            base=args.base,
            step=args.step,
            dtype=args.dtype,
            force=args.force,
        )
        print(f"exported to {out}")
        return 0

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    sys.exit(main())
