"""The floating-point dtypes a config field or CLI flag may name: one table, both spellings.

Configs use the numpy names (`config.model.param_dtype = "float32"`); CLIs also take the short
names of the PyTorch/diffusers world (`--dtype bf16`). Both map to the same jnp dtype.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from bdpo_jax import schema

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NAMES = (*DTYPES, *SHORT_NAMES)  # every accepted spelling


def canonical_name(name: str, field: str) -> str:
    """'fp16' -> 'float16' ('float16' -> 'float16'); an unknown name raises naming `field`."""
    canonical = SHORT_NAMES.get(name, name)
    if canonical not in DTYPES:
        raise schema.ConfigError(f"{field}={name!r}: expected one of {list(NAMES)}")
    return canonical


def dtype_from_name(name: str, field: str) -> Any:
    """The jnp dtype of `name` (either spelling); `field` names the config field or flag."""
    return DTYPES[canonical_name(name, field)]
