"""Device, dtype, batching and checkpoint loading shared by the scorers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown scorer dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"scorer batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def score_in_batches(
    score_batch: Callable[[Sequence[Any], Sequence[str]], torch.Tensor],
    images: Sequence[Any],
    prompts: Sequence[str],
    batch_size: int,
) -> np.ndarray:
    """Calls `score_batch` on consecutive chunks under no_grad; float32 [N] on the host."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            values = score_batch(images[start:stop], prompts[start:stop])
            out.append(values.float().cpu().numpy().reshape(-1))
    if not out:
        return np.zeros((0,), np.float32)
    return np.concatenate(out).astype(np.float32)


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Loads a .pt/.pth/.bin/.safetensors state dict onto the CPU (checkpoints saved on CUDA
    load too); unwraps {'state_dict': ...} and a DataParallel 'module.' prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def l2_normalize(x_NxD: torch.Tensor) -> torch.Tensor:
    return x_NxD / x_NxD.norm(dim=-1, keepdim=True)
