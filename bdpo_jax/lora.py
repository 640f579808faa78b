"""LoRA adapters on a frozen UNet: which kernels, their initialisation, the merge, diffusers names.

config.lora.rank = r > 0 trains, for each targeted Dense kernel W [in, out] of the frozen base,
two factors A [in, r] and B [r, out] (Flax layout), and the UNet runs with the merged kernel

    W' = W + (alpha / r) * A @ B

computed inside the jitted step (the Flax model is untouched; gradients flow to A and B only).
The adapters are a small tree that mirrors the base's module paths down to the targeted layer:
``{"down_blocks_0": {... {"to_q": {"lora_A": [in, r], "lora_B": [r, out]}}}}``. Initialisation
follows peft: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the
adapted model equals the base at step 0.

Targets use diffusers module names and peft's rule: a layer is targeted when its dotted name
equals a target or ends with "." + target ("to_q", "to_out.0", "ff.net.0.proj", ...). In
diffusers' file (``pytorch_lora_weights.safetensors``, see `to_diffusers_state`) the factors are
torch Linear weights: ``unet.<module>.lora_A.weight`` = A.T [r, in] and ``lora_B.weight`` = B.T
[out, r]; rank and alpha go in the safetensors metadata ``lora_adapter_metadata`` (JSON of
peft's LoraConfig fields, prefixed "unet."), which diffusers reads (checked with 0.42).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bdpo_jax.models.weights import flax_path_to_torch
from bdpo_jax.schema import ConfigError

Params = Mapping[str, Any]
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' training scripts' default
FF_TARGETS = ("ff.net.0.proj", "ff.net.2")  # the feed-forward (GEGLU in, linear out)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
UNET_PREFIX = "unet"  # diffusers' StableDiffusionLoraLoaderMixin.unet_name
A, B = "lora_A", "lora_B"  # leaf names of one adapted layer


class LoraSpec(NamedTuple):
    """rank r, alpha (scale = alpha / r) and the diffusers module-name targets."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def spec_from_config(lora_config: Any) -> LoraSpec | None:
    """config.lora -> LoraSpec, or None for full fine-tuning (rank 0)."""
    rank = int(lora_config.rank)
    if rank == 0:
        return None
    if rank < 0:
        raise ConfigError(f"config.lora.rank must be >= 0 (0 = full fine-tuning), got {rank}")
    alpha = float(lora_config.alpha) or float(rank)
    if alpha <= 0:
        raise ConfigError(f"config.lora.alpha must be > 0 (0 = rank), got {lora_config.alpha}")
    targets = tuple(str(t) for t in lora_config.targets)
    if lora_config.include_ff:
        targets += tuple(t for t in FF_TARGETS if t not in targets)
    if not targets:
        raise ConfigError("config.lora.targets is empty: name the layers to adapt, e.g. to_q")
    return LoraSpec(rank, alpha, targets)


def module_name(path: Sequence[str]) -> str:
    """Flax path of a kernel ('down_blocks_0', ..., 'to_out_0', 'kernel') -> diffusers module
    name 'down_blocks.0....to_out.0'."""
    return flax_path_to_torch(tuple(path)).rsplit(".", 1)[0]


def target_paths(base: Params, spec: LoraSpec) -> list[tuple[str, ...]]:
    """Paths of the base's 2-D Dense kernels that `spec` targets (errors if none matches a
    target, or a target names a conv)."""
    flat = traverse_util.flatten_dict(base)
    found, used = [], set()
    for path, leaf in flat.items():
        if path[-1] != "kernel":
            continue
        name = module_name(path)
        hits = [t for t in spec.targets if name == t or name.endswith("." + t)]
        if not hits:
            continue
        if len(leaf.shape) != 2:
            raise ConfigError(
                f"config.lora.targets: {name} ({hits[0]!r}) is a conv, not a linear layer"
            )
        found.append(path)
        used.update(hits)
    unused = [t for t in spec.targets if t not in used]
    if unused:
        raise ConfigError(f"config.lora.targets {unused}: no linear layer of the UNet is named so")
    return sorted(found)


def abstract_adapters(base: Params, spec: LoraSpec, dtype: Any) -> Params:
    """The adapter tree's shapes (jax.ShapeDtypeStruct leaves)."""
    flat = traverse_util.flatten_dict(base)
    out = {}
    for path in target_paths(base, spec):
        d_in, d_out = flat[path].shape
        out[path[:-1] + (A,)] = jax.ShapeDtypeStruct((d_in, spec.rank), dtype)
        out[path[:-1] + (B,)] = jax.ShapeDtypeStruct((spec.rank, d_out), dtype)
    return traverse_util.unflatten_dict(out)


def init_adapters(key: jax.Array, base: Params, spec: LoraSpec, dtype: Any) -> Params:
    """peft's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0."""
    flat = traverse_util.flatten_dict(abstract_adapters(base, spec, dtype))
    out = {}
    for i, (path, leaf) in enumerate(sorted(flat.items())):
        if path[-1] == A:
            bound = 1.0 / math.sqrt(leaf.shape[0])
            k = jax.random.fold_in(key, i)
            out[path] = jax.random.uniform(k, leaf.shape, leaf.dtype, -bound, bound)
        else:
            out[path] = jnp.zeros(leaf.shape, leaf.dtype)
    return traverse_util.unflatten_dict(out)


def merge(base: Params, adapters: Params, scale: float, shardings: Params | None = None) -> Params:
    """The base with every adapted kernel W replaced by W + scale * A @ B (in fp32, cast back to
    W's dtype); untouched leaves are the base's own arrays. Differentiable in `adapters`.

    shardings (the base's, inside jit): each merged kernel is constrained to its W's sharding,
    so the policy's and the reference's kernels are laid out (and reduced) as the base's.
    """
    flat = dict(traverse_util.flatten_dict(base))
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    for path, ab in traverse_util.flatten_dict(adapters, is_leaf=_is_layer).items():
        kpath = path + ("kernel",)
        w = flat[kpath]
        delta = jnp.matmul(ab[A].astype(jnp.float32), ab[B].astype(jnp.float32))
        merged = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
        if kpath in flat_shardings:
            merged = jax.lax.with_sharding_constraint(merged, flat_shardings[kpath])
        flat[kpath] = merged
    return traverse_util.unflatten_dict(flat)


def _is_layer(_: Any, x: Any) -> bool:
    return isinstance(x, Mapping) and set(x) == {A, B}


def check_adapters(adapters: Params, base: Params) -> int:
    """Every adapted layer is a 2-D kernel of `base` with matching in/out sizes, and all ranks
    agree; returns the rank (ValueError naming the layer otherwise)."""
    flat = traverse_util.flatten_dict(base)
    ranks = set()
    for path, ab in traverse_util.flatten_dict(adapters, is_leaf=_is_layer).items():
        name = "/".join(path)
        w = flat.get(path + ("kernel",))
        if w is None or len(w.shape) != 2:
            raise ValueError(f"adapter {name}: the UNet has no linear layer there")
        a, b = np.shape(ab[A]), np.shape(ab[B])
        if a[0] != w.shape[0] or b[1] != w.shape[1] or a[1] != b[0]:
            raise ValueError(f"adapter {name}: A {a} and B {b} do not fit the kernel {w.shape}")
        ranks.add(a[1])
    if len(ranks) != 1:
        raise ValueError(f"adapters have ranks {sorted(ranks)}: expected one rank")
    return ranks.pop()


def count(adapters: Params) -> int:
    """Number of adapter parameters (works on abstract trees)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def to_diffusers_state(adapters: Params, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Adapters -> diffusers/peft UNet LoRA state dict
    (``unet.<module>.lora_A.weight`` [r, in], ``unet.<module>.lora_B.weight`` [out, r])."""
    state = {}
    for path, ab in traverse_util.flatten_dict(adapters, is_leaf=_is_layer).items():
        name = module_name(path + ("kernel",))
        for leaf in (A, B):
            value = np.asarray(jax.device_get(ab[leaf])).astype(dtype).T
            state[f"{UNET_PREFIX}.{name}.{leaf}.weight"] = np.ascontiguousarray(value)
    return state


def diffusers_metadata(adapters: Params, spec_rank: int, alpha: float) -> dict[str, str]:
    """The safetensors metadata diffusers reads back into peft's LoraConfig: rank, alpha and the
    adapted modules (full names), prefixed "unet." as `save_lora_weights` writes them."""
    modules = sorted(
        module_name(p + ("kernel",))
        for p in traverse_util.flatten_dict(adapters, is_leaf=_is_layer)
    )
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    config = {"r": int(spec_rank), "lora_alpha": alpha, "target_modules": modules}
    packed = {f"{UNET_PREFIX}.{k}": v for k, v in config.items()}
    return {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
