"""Diffusers UNet weights <-> Flax parameters, without torch or diffusers.

Reads a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, its
``.fp16`` variant, or a sharded ``*.safetensors.index.json``) from a local path or a Hugging Face
hub id (through the local hub cache, so it works offline once cached), and writes one back that
``diffusers.UNet2DConditionModel.from_pretrained`` loads.

Name mapping: a torch key ``down_blocks.0.attentions.1.proj_in.weight`` is the Flax path
``down_blocks_0/attentions_1/proj_in/kernel``: every ``.<digits>`` is folded into the previous
name with ``_``; ``weight`` is ``kernel`` for convs (OIHW <-> HWIO) and linears (transposed) and
``scale`` for norms (1-D). SD1.5's 1x1-conv ``proj_in``/``proj_out`` and SD2's linear ones need
no special case: the layout follows the tensor rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from bdpo_jax.models.unet import UNet2DConditionModel, abstract_unet_params, config_to_dict
from bdpo_jax.models.unet_config import UnsupportedConfigError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"
FP16_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.fp16.json"
CONFIG_NAME = "config.json"
# torch module names that end in _<digit> themselves (not a folded list index)
TORCH_NAMES_WITH_DIGITS = frozenset({"linear_1", "linear_2"})
DIFFUSERS_VERSION = "0.30.0"  # written into config.json; any 0.2x+ diffusers reads the folder


# ----------------------------------------------------------------------------- name mapping
def flax_path_to_torch(path: tuple[str, ...]) -> str:
    """('down_blocks_0', 'conv1', 'kernel') -> 'down_blocks.0.conv1.weight'"""
    parts = []
    for name in path[:-1]:
        head, sep, tail = name.rpartition("_")
        folded = sep and tail.isdigit() and name not in TORCH_NAMES_WITH_DIGITS
        parts.append(f"{head}.{tail}" if folded else name)
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join(parts + [leaf])


def torch_to_flax_array(value: np.ndarray, leaf: str) -> np.ndarray:
    """Torch layout -> Flax layout for one tensor (``leaf`` is the Flax leaf name)."""
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if leaf == "kernel" and value.ndim == 2:
        return np.transpose(value)  # (out, in) -> (in, out)
    return value


def flax_to_torch_array(value: np.ndarray, leaf: str) -> np.ndarray:
    """Flax layout -> torch layout for one tensor."""
    if leaf == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))  # HWIO -> OIHW
    if leaf == "kernel" and value.ndim == 2:
        return np.ascontiguousarray(np.transpose(value))
    return np.ascontiguousarray(value)


def _list_names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def torch_state_to_params(
    state: dict[str, np.ndarray], abstract_params: Any, dtype: jnp.dtype, source: str
) -> dict[str, Any]:
    """Maps a torch-named state dict onto the Flax tree of ``abstract_params`` (shape-checked).

    Returns host numpy arrays of ``dtype``.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    by_torch = {flax_path_to_torch(p): p for p in flat}
    missing = sorted(set(by_torch) - set(state))
    unexpected = sorted(set(state) - set(by_torch))
    if missing or unexpected:
        msg = [f"{source}: weights do not match the config"]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {_list_names(missing)}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {_list_names(unexpected)}")
        raise ValueError("; ".join(msg))
    out = {}
    for name, path in by_torch.items():
        value = torch_to_flax_array(state[name], path[-1])
        if value.shape != flat[path].shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {state[name].shape}, the config needs "
                f"{flax_to_torch_array(np.zeros(flat[path].shape, np.int8), path[-1]).shape}"
            )
        out[path] = value.astype(jnp.dtype(dtype), copy=False)
    return traverse_util.unflatten_dict(out)


def params_to_torch_state(params: Any, dtype: jnp.dtype | None = None) -> dict[str, np.ndarray]:
    """Flax parameters -> torch-named numpy state dict (optionally cast to ``dtype``)."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        arr = np.asarray(jax.device_get(value))
        if dtype is not None:
            arr = arr.astype(jnp.dtype(dtype))
        state[flax_path_to_torch(path)] = flax_to_torch_array(arr, path[-1])
    return state


# ----------------------------------------------------------------------------- files
def _resolve_folder(path_or_hub_id: str | os.PathLike, subfolder: str | None) -> Path:
    """A local folder, or the hub cache snapshot of a repo id (downloaded unless offline)."""
    local = Path(path_or_hub_id)
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: not a directory (path={path_or_hub_id!s}, subfolder={subfolder!r})"
            )
        return folder
    repo_id = str(path_or_hub_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise FileNotFoundError(f"{repo_id}: no such local folder, and not a hub id (org/name)")
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    # Fetch only what read_state_dict will read, in its order of preference (a repo's UNet folder
    # often also holds .bin, non-EMA and fp16 copies of several GB each).
    pattern_sets = [
        [CONFIG_NAME, WEIGHTS_NAME],
        [CONFIG_NAME, WEIGHTS_NAME + ".index.json", "diffusion_pytorch_model-*.safetensors"],
        [CONFIG_NAME, FP16_WEIGHTS_NAME],
        [CONFIG_NAME, FP16_INDEX_NAME, "diffusion_pytorch_model.fp16-*.safetensors"],
    ]
    folder = None
    for names in pattern_sets:
        try:
            snapshot = snapshot_download(repo_id, allow_patterns=[prefix + n for n in names])
        except Exception as e:  # offline and not cached, unknown repo, no network
            raise FileNotFoundError(
                f"{repo_id}: could not get it from the hub or the local hub cache ({e})"
            ) from e
        folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
        if folder.is_dir() and (folder / names[1]).exists():
            return folder
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"{repo_id}: snapshot has no subfolder {subfolder!r}")
    return folder  # read_state_dict names what is missing


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{file}: cannot read safetensors file (truncated or corrupt?): {e}"
        ) from e


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """Tensors of a diffusers model folder: single file, fp16 variant, or sharded index."""
    candidates = [
        WEIGHTS_NAME,
        WEIGHTS_NAME + ".index.json",
        FP16_WEIGHTS_NAME,
        FP16_INDEX_NAME,
    ]
    for name in candidates:
        file = folder / name
        if not file.exists():
            continue
        if not name.endswith(".json"):
            return _read_safetensors(file)
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{file}: not a safetensors index (needs 'weight_map'): {e}") from e
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_safetensors(folder / shard))
        return state
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"{folder}: no UNet weights; expected one of {candidates} (found: {found}). "
        "Pickled .bin weights are not read: convert them to safetensors with diffusers."
    )


def read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_NAME
    if not file.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; is this a diffusers UNet folder?")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: {e}") from e
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise UnsupportedConfigError(
            f"{file}: _class_name={cls!r}, expected 'UNet2DConditionModel'"
        )
    return config


def load_unet(
    path_or_hub_id: str | os.PathLike,
    subfolder: str | None = None,
    dtype: jnp.dtype = jnp.float32,
    **from_config_kwargs: Any,
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """Loads a diffusers UNet folder (local path or hub id) as (model, params).

    ``params`` are host numpy arrays (nothing is placed on a device), so a big model can go
    straight to its sharding with ``jax.device_put(params, shardings)``.

    ``dtype`` is the dtype of the returned parameters (and the model's ``param_dtype``);
    ``from_config_kwargs`` go to ``UNet2DConditionModel.from_config`` (``dtype`` there is named
    ``compute_dtype`` here and defaults to ``dtype``; ``remat``, ``attention``).
    """
    folder = _resolve_folder(path_or_hub_id, subfolder)
    config = read_config(folder)
    compute_dtype = from_config_kwargs.pop("compute_dtype", dtype)
    try:
        model = UNet2DConditionModel.from_config(
            config, param_dtype=dtype, dtype=compute_dtype, **from_config_kwargs
        )
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{folder / CONFIG_NAME}: {e}") from e
    abstract = abstract_unet_params(model)
    params = torch_state_to_params(read_state_dict(folder), abstract, dtype, str(folder))
    return model, params


def save_unet(
    model: UNet2DConditionModel,
    params: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: jnp.dtype | None = None,
) -> Path:
    """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers layout).

    ``dtype`` casts the tensors (e.g. jnp.float16 for a smaller export); default keeps them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_to_dict(model.config)
    config["_class_name"] = "UNet2DConditionModel"
    config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    state = params_to_torch_state(params, dtype)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
