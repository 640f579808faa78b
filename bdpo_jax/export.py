"""Export a trainer checkpoint to a diffusers UNet folder or a complete diffusers pipeline.

    python -m bdpo_jax.export --workdir W [--step N] [--base BASE] --out OUT \
        [--dtype fp32|fp16|bf16] [--lora | --merge] [--force] [--debug]

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

A LoRA run (config.lora.rank > 0: its checkpoints hold adapters) exports with --lora, a
diffusers LoRA folder OUT/pytorch_lora_weights.safetensors for `pipe.load_lora_weights(OUT)`
(peft key names, rank and alpha in the file's metadata; see bdpo_jax.lora), or with --merge, the
UNet with W + alpha / rank * A @ B as above (the frozen base is rebuilt from the run's
config.json: config.model.init_checkpoint, pretrained or unet_config with the seed).
"""

from __future__ import annotations

import functools
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

from bdpo_jax import checkpointing, lora, schema, train_state
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


def _replace_atomically(tmp: Path, out: Path) -> None:
    """Moves the finished `tmp` folder to `out` (an existing `out` is replaced)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _run_config(workdir: Path) -> dict[str, Any]:
    path = workdir / checkpointing.CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def lora_base_params(run_config: dict[str, Any], unet_config: dict[str, Any]) -> Any:
    """A LoRA run's frozen base as the trainer built it (host float32 arrays, rounded to the
    run's compute dtype as trained): config.model.init_checkpoint's params, the pretrained
    UNet, or the random init of config.model.unet_config with config.seed."""
    from bdpo_jax.models import UNet2DConditionModel, init_unet_params, load_unet

    model_cfg = run_config.get("model", {})
    compute = dtypes.dtype_from_name(model_cfg.get("compute_dtype", "float32"), "compute_dtype")
    if model_cfg.get("init_checkpoint"):
        source = "config.model.init_checkpoint"
        try:
            params = checkpointing.restore_params(model_cfg["init_checkpoint"], source=source)
        except checkpointing.CheckpointError as error:
            raise ExportError(str(error)) from error
    elif model_cfg.get("unet_config"):
        param_dtype = dtypes.dtype_from_name(model_cfg.get("param_dtype", "float32"), "dtype")
        model = UNet2DConditionModel.from_config(unet_config, param_dtype=param_dtype)
        key = train_state.unet_init_key(jax.random.PRNGKey(int(run_config.get("seed", 0))))
        # jitted like the trainer's init (a concrete call may round the fan-in scaling differently)
        params = jax.jit(functools.partial(init_unet_params, model))(key)
    elif model_cfg.get("pretrained"):
        _, params = load_unet(model_cfg["pretrained"], subfolder=model_cfg.get("subfolder") or None)
    else:
        raise ExportError("config.json names no base UNet (config.model.pretrained/unet_config)")
    return jax.tree.map(lambda x: np.asarray(jnp.asarray(x).astype(compute), np.float32), params)


def unet_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, Any]:
    """(step, the full UNet params as host arrays) of any trainer run: a full fine-tuning run's
    params, or a LoRA run's adapters merged into its frozen base (what `--merge` writes)."""
    workdir = Path(workdir)
    step, params = restore_params(workdir, step)
    run_config = _run_config(workdir)
    lora_cfg = run_config.get("lora") or {}
    rank = int(lora_cfg.get("rank", 0))
    if not rank:
        return step, params
    unet_config = json.loads((workdir / checkpointing.UNET_CONFIG_FILE).read_text())
    alpha = float(lora_cfg.get("alpha", 0.0)) or float(rank)
    return step, _merged(run_config, unet_config, params, alpha / rank)


def _merged(run_config: dict[str, Any], unet_config: dict[str, Any], adapters, scale) -> Any:
    """A LoRA run's adapters merged into its frozen base, as host arrays."""
    base_params = lora_base_params(run_config, unet_config)
    return jax.tree.map(np.asarray, lora.merge(base_params, adapters, scale))


def _write_lora_folder(folder: Path, adapters: Any, rank: int, alpha: float, dtype: Any) -> int:
    """OUT/pytorch_lora_weights.safetensors, re-read and compared; returns the tensor count."""
    from safetensors.numpy import load_file, save_file

    state = lora.to_diffusers_state(adapters, dtype)
    file = folder / lora.LORA_WEIGHT_NAME
    save_file(state, str(file), metadata=lora.diffusers_metadata(adapters, rank, alpha))
    written = load_file(str(file))
    if set(written) != set(state) or not all(
        np.array_equal(written[k].astype(np.float32), v.astype(np.float32))
        for k, v in state.items()
    ):
        raise ExportError(f"verification failed: {file} differs from the checkpoint's adapters")
    return len(state)


def export(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    step: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
    lora_folder: bool = False,
    merge: bool = False,
) -> Path:
    """Exports checkpoint `step` (latest if None) of `workdir` to `out`; returns `out`.

    A LoRA run needs `lora_folder` (--lora: a diffusers LoRA folder) or `merge` (--merge: the
    merged UNet, or pipeline with `base`).
    """
    from bdpo_jax.models import UNet2DConditionModel, init_unet_params, save_unet

    if dtype not in dtypes.NAMES:
        raise ExportError(f"--dtype {dtype}: choose one of {list(dtypes.NAMES)}")
    if lora_folder and merge:
        raise ExportError("--lora and --merge: choose one")
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
    run_config = _run_config(workdir)
    lora_cfg = run_config.get("lora") or {}
    rank = int(lora_cfg.get("rank", 0))
    if rank and not (lora_folder or merge):
        raise ExportError(
            f"--workdir {workdir}: a LoRA run (config.lora.rank={rank}) holds adapters: pass "
            "--lora (a diffusers LoRA folder) or --merge (the merged UNet)"
        )
    if (lora_folder or merge) and not rank:
        flag = "--lora" if lora_folder else "--merge"
        raise ExportError(f"{flag}: --workdir {workdir} is not a LoRA run (config.lora.rank=0)")
    if lora_folder and base:
        raise ExportError("--base: a --lora folder holds the adapters only; drop --base")
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
    jdtype = dtypes.dtype_from_name(dtype, "--dtype")
    alpha = float(lora_cfg.get("alpha", 0.0)) or float(rank)
    if rank:
        try:
            found_rank = lora.check_adapters(params, expected)
        except ValueError as error:
            raise ExportError(f"checkpoint adapters do not fit {config_path}: {error}") from error
        if found_rank != rank:
            raise ExportError(f"checkpoint adapters have rank {found_rank}, config.json {rank}")
    if merge:
        params = _merged(run_config, unet_config, params, alpha / rank)
    if not lora_folder:
        _check_tree_matches(params, expected, config_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if lora_folder:
            n = _write_lora_folder(tmp, params, rank, alpha, jdtype)
            kind = "LoRA folder"
        else:
            unet_dir = tmp / "unet" if is_pipeline else tmp
            if is_pipeline:
                _copy_pipeline_without_unet(base_dir, tmp)
            cast = jax.tree.map(lambda x: jnp.asarray(x).astype(jdtype), params)
            save_unet(model, cast, str(unet_dir))
            n = verify_unet_folder(unet_dir, params, jdtype)
            kind = "pipeline" if is_pipeline else "UNet folder"
        info = {"workdir": str(workdir.absolute()), "step": step, "dtype": dtype, "base": base}
        if rank:
            info.update(
                lora_rank=rank, lora_alpha=alpha, lora_export="lora" if lora_folder else "merge"
            )
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        _replace_atomically(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="LoRA run: a diffusers LoRA folder")
    mode.add_argument("--merge", action="store_true", help="LoRA run: the merged UNet")

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
            lora_folder=args.lora,
            merge=args.merge,
        )
        print(f"exported to {out}")
        return 0

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    sys.exit(main())
