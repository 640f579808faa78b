"""Per-device memory plan of a DPO run, from `jax.eval_shape` only (nothing is allocated).

    python -m bdpo_jax.memory_plan --model sd15 --mesh 1,8 --batch 128 --accum 4 --latent 64
    python -m bdpo_jax.memory_plan --model sdxl --mesh 1,8 --batch 64 --accum 8 --latent 128 \
        --optimizer adafactor --json plan.json

Rows: params, ref_params, optimizer state (each sharded by bdpo_jax.sharding's rules on the given
(data, fsdp) mesh shape: no devices needed), gradients (same sharding as params) and an
activation estimate: the residuals the policy's forward saves for the backward pass, traced with
the per-device micro-batch of 2 x (batch / devices / accum) images (jax's saved_residuals),
and, as a separate row, the same without gradient checkpointing (an upper bound). With remat,
XLA's real peak also holds one block's recomputed intermediates and temporaries: treat the total
as a floor and leave headroom.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bdpo_jax import optim, schema, sharding
from bdpo_jax.models import dtypes, presets

PROG = "python -m bdpo_jax.memory_plan"
_TEXT_SHAPES = {"sd15": (77, 768), "sd21": (77, 1024), "sdxl": (77, 2048)}
_LATENT_SIZES = {"sd15": 64, "sd21": 96, "sdxl": 128}  # 512, 768 and 1024 px


class _MeshShape(NamedTuple):
    shape: dict[str, int]


def _leaf_bytes_per_device(abstract: Any, mesh_shape: _MeshShape, rules, min_size: int) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        spec = sharding.spec_for(
            sharding.path_to_str(path), tuple(leaf.shape), rules, mesh_shape, min_size
        )
        n = int(np.prod(leaf.shape, dtype=np.int64))
        for name in spec:
            if name is not None:
                n //= mesh_shape.shape[name]
        total += n * jnp.dtype(leaf.dtype).itemsize
    return total


def _residual_bytes(model, abstract_params, x, t, text, added) -> int:
    """Bytes the vjp of one forward saves (intermediates only, not params or inputs)."""

    def f(p, x, t, text, added):
        return model.apply({"params": p}, x, t, text, added_cond_kwargs=added)

    from jax._src.ad_checkpoint import saved_residuals  # no public equivalent yet

    res = saved_residuals(f, abstract_params, x, t, text, added)
    return int(
        sum(
            np.prod(a.shape, dtype=np.int64) * a.dtype.itemsize
            for a, src in res
            if not src.startswith("from the argument")
        )
    )


@functools.lru_cache(maxsize=8)
def _abstract_model(model_name: str, compute_dtype: str, remat: bool):
    """(model, abstract params) of a real config, traced once per process."""
    from bdpo_jax.models import UNet2DConditionModel, init_unet_params

    dtype = dtypes.dtype_from_name(compute_dtype, "compute_dtype")
    model = UNet2DConditionModel.from_config(
        presets.real_unet_config(model_name), param_dtype=jnp.float32, dtype=dtype, remat=remat
    )
    abstract = jax.eval_shape(lambda: init_unet_params(model, jax.random.PRNGKey(0)))
    return model, abstract


def memory_plan(
    model_name: str,
    *,
    mesh_shape: tuple[int, int],
    global_batch: int,
    grad_accum: int,
    latent_size: int,
    optimizer: str = "adamw",
    compute_dtype: str = "bfloat16",
    remat: bool = True,
    rules=(),
    fsdp_min_size: int = 2**18,
    activations: bool = True,
) -> dict[str, Any]:
    """The plan as a dict of bytes per device (and the inputs that produced it)."""
    from bdpo_jax.models import UNet2DConditionModel

    unet_cfg = presets.real_unet_config(model_name)
    dtype = dtypes.dtype_from_name(compute_dtype, "compute_dtype")
    ms = _MeshShape(dict(zip(sharding.BATCH_AXES, (int(n) for n in mesh_shape), strict=True)))
    n_dev = int(np.prod(list(ms.shape.values())))
    if global_batch % (n_dev * grad_accum):
        raise schema.ConfigError(
            f"--batch {global_batch}: not divisible by {n_dev} devices (--mesh) x --accum "
            f"{grad_accum}"
        )
    pairs = global_batch // (n_dev * grad_accum)
    model, abstract_params = _abstract_model(model_name, compute_dtype, remat)
    ocfg = ml_collections.ConfigDict(
        dict(
            optimizer=optimizer,
            learning_rate=1e-8,
            scale_lr=False,
            warmup_steps=0,
            schedule="constant",
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            grad_clip_norm=1.0,
            adafactor_decay_rate=0.8,
            adafactor_clip_threshold=1.0,
        )
    )
    tx, _ = optim.make_optimizer(ocfg, 1, 1)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    p_bytes = _leaf_bytes_per_device(abstract_params, ms, rules, fsdp_min_size)
    o_bytes = _leaf_bytes_per_device(abstract_opt, ms, rules, fsdp_min_size)

    c = int(unet_cfg["in_channels"])
    x = jax.ShapeDtypeStruct((2 * pairs, c, latent_size, latent_size), jnp.float32)
    t = jax.ShapeDtypeStruct((2 * pairs,), jnp.int32)
    text = jax.ShapeDtypeStruct((2 * pairs, *_TEXT_SHAPES[model_name]), jnp.float32)
    added = None
    if unet_cfg.get("addition_embed_type") == "text_time":
        added = {
            "text_embeds": jax.ShapeDtypeStruct(
                (2 * pairs, presets.sdxl_pooled_dim(unet_cfg)), jnp.float32
            ),
            "time_ids": jax.ShapeDtypeStruct((2 * pairs, 6), jnp.float32),
        }
    act = _residual_bytes(model, abstract_params, x, t, text, added) if activations else 0
    act_no_remat = act
    if (
        remat and activations
    ):  # the upper bound: every intermediate saved (no gradient checkpointing)
        plain = UNet2DConditionModel.from_config(unet_cfg, param_dtype=jnp.float32, dtype=dtype)
        act_no_remat = _residual_bytes(plain, abstract_params, x, t, text, added)
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_params)))
    rows = {
        "params": p_bytes,
        "ref_params": p_bytes,
        "opt_state": o_bytes,
        "grads": p_bytes * (2 if grad_accum > 1 else 1),  # + the accumulator
        "activations": act,
    }
    rows["total"] = sum(rows.values())
    rows["activations_without_remat"] = act_no_remat  # not in the total
    return {
        "model": model_name,
        "num_params": n_params,
        "mesh": list(mesh_shape),
        "global_batch": global_batch,
        "grad_accum": grad_accum,
        "pairs_per_device_micro": pairs,
        "latent_size": latent_size,
        "optimizer": optimizer,
        "compute_dtype": compute_dtype,
        "remat": remat,
        "bytes_per_device": rows,
    }


def format_table(plans: list[dict[str, Any]]) -> str:
    rows = list(plans[0]["bytes_per_device"])
    head = ["item"] + [
        f"{p['model']} {p['mesh']} b{p['global_batch']}/acc{p['grad_accum']}" for p in plans
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(
            " | ".join([r] + [f"{p['bytes_per_device'][r] / 2**30:.2f} GiB" for p in plans])
        )
    return "\n".join(lines)


def parse_mesh(text: str) -> tuple[int, int]:
    """'1,8' -> (1, 8): the (data, fsdp) mesh shape of --mesh."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise schema.ConfigError(
            f"--mesh {text!r}: expected two positive integers 'data,fsdp', e.g. 1,8"
        )
    return int(parts[0]), int(parts[1])


def main(argv: list[str] | None = None) -> None:
    """The CLI; a user error is one line on stderr and exit code 2 (run_cli)."""
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    parser = schema.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", nargs="+", default=["sd15", "sdxl"], choices=presets.REAL_CONFIGS
    )
    parser.add_argument("--mesh", default="1,8", help="data,fsdp mesh shape")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument(
        "--latent", type=int, default=0, help="latent side (0: 64 SD1.5, 96 SD2.1, 128 SDXL)"
    )
    parser.add_argument("--optimizer", default="", choices=("", "adamw", "adafactor"))
    parser.add_argument("--no-remat", action="store_true")
    parser.add_argument("--json", default="")

    def run() -> None:
        args = parser.parse_args(argv)
        mesh = parse_mesh(args.mesh)
        if args.batch < 1 or args.accum < 1:
            raise schema.ConfigError(f"--batch {args.batch}, --accum {args.accum}: must be >= 1")
        plans = []
        for name in args.model:
            latent = args.latent or _LATENT_SIZES[name]
            opt = args.optimizer or ("adafactor" if name == "sdxl" else "adamw")
            plans.append(
                memory_plan(
                    name,
                    mesh_shape=mesh,
                    global_batch=args.batch,
                    grad_accum=args.accum,
                    latent_size=latent,
                    optimizer=opt,
                    remat=not args.no_remat,
                )
            )
        print(format_table(plans))
        if args.json:
            try:
                with open(args.json, "w") as f:
                    json.dump(plans, f, indent=2)
            except OSError as error:
                raise schema.ConfigError(
                    f"--json {args.json}: cannot write: {error.strerror}"
                ) from error
        else:
            json.dump(plans, sys.stdout, indent=1)

    schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    main()
