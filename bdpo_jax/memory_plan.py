"""Per-device memory plan of a DPO run, from `jax.eval_shape` only (nothing is allocated).

    python -m bdpo_jax.memory_plan --model sd15 --mesh 1,8 --batch 128 --accum 4 --latent 64
    python -m bdpo_jax.memory_plan --model sdxl --mesh 1,8 --batch 64 --accum 8 --latent 128 \
        --optimizer adafactor --json plan.json
    python -m bdpo_jax.memory_plan --model sdxl --lora-rank 64 --mesh 1,1 --batch 8 --accum 8

Rows: params, ref_params, optimizer state (each sharded by bdpo_jax.sharding's rules on the given
(data, fsdp) mesh shape: no devices needed), the gradient accumulator, the matched forward's
cast params, and backward_peak: the peak of one micro-batch's forward and backward, from the
jaxpr of the policy's vjp at the per-device micro-batch of 2 x (batch / devices / accum) images,
run in program order with elementwise chains fused (bdpo_jax.jaxpr_memory). It holds at once
the saved activations still needed, the gradients of the skip connections that wait for their
down block, the re-run layer (nn.remat per resnet and per transformer layer, diffusers' grain)
and the parameter gradients written so far. The total (`plan_total`) is the sum of TOTAL_ROWS.
Rows shown beside it, parts of backward_peak and not added again: grads (one micro-batch's
gradient), activations (what the policy's forward saves for the backward, jax's
saved_residuals), remat_recompute (the largest checkpointed layer's own residuals: Chen et al.
2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174, sec. 3) and
activations_without_remat (everything saved without checkpointing, an upper bound).

Checked against XLA's programs (bench/memory.py; GiB per device, plan / XLA): configs/sd15.py
on 8 H100s (compiled without a GPU) 22.22 / 23.32 (matched forward off: 20.62 / 21.53);
configs/sdxl.py on 8 H100s (FSDP, matched forward off) 23.48 / 27.55 (0.85: the values live at
XLA's peak, its dump's live-range file, add up to 23.96; the rest is how its buffer assignment
packs them); one device's share of each (off) 20.62 / 21.69 and 31.00 / 32.07;
on 8 fake CPU devices (`--backend cpu`, below) SD1.5 29.70 / 30.97 and SDXL 44.45 / 39.94.
The 8-device figures hold because each checkpointed layer's weight gradients are computed
before the next layer's backward (models/remat.py): without that XLA deferred them to the
gradient all-reduces and held 40.88 GiB for SD1.5. `--backend cpu` plans XLA:CPU's program,
which runs bf16 ops in f32 and keeps f32 values for the backward (each element counted at 4
bytes at least; XLA:CPU keeps part of SDXL's in bf16, which only its compile decides).

LoRA (--lora-rank r, config.lora.rank): the frozen base is held once, in the compute dtype
(row base_params); params, ref_params, optimizer state and gradients are the adapters' (tiny);
merged_kernels are the policy's W + scale A B of the adapted layers, which the step computes
before the forward and keeps until the backward (compute dtype, sharded as the base; part of
backward_peak, whose jaxpr is the LoRA step's: merge, forward, vjp w.r.t. the adapters). Each plan
says whether its total fits one GPU of 24, 40 and 80 GB (GiB, keeping FIT_HEADROOM free).
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
from flax import traverse_util

from bdpo_jax import jaxpr_memory, lora, optim, schema, sharding
from bdpo_jax.models import dtypes, presets

PROG = "python -m bdpo_jax.memory_plan"
_TEXT_SHAPES = {"sd15": (77, 768), "sd21": (77, 1024), "sdxl": (77, 2048)}
_LATENT_SIZES = {"sd15": 64, "sd21": 96, "sdxl": 128}  # 512, 768 and 1024 px
GPU_SIZES_GB = (24, 40, 80)  # one GPU's memory in GiB (RTX 4090 / A100-40 / A100-80, H100)
FIT_HEADROOM = 0.1  # share of a GPU kept free for XLA temporaries, the CUDA context, fragmentation
# bytes per element, at least, of what the backward holds, per XLA backend: GPUs (and TPUs) run
# bf16/fp16 dots, convolutions and elementwise ops in that dtype; XLA:CPU's float normalization
# runs them in f32 and keeps most of what the backward needs in f32 (all of it counted so: an
# upper bound where it keeps part in bf16, as for SDXL; bench/memory.py)
BACKEND_MIN_ITEMSIZE = {"gpu": 1, "cpu": 4}


class _MeshShape(NamedTuple):
    shape: dict[str, int]


def _one_leaf_bytes(path: Any, leaf: Any, mesh_shape: _MeshShape, rules, min_size: int) -> int:
    """Bytes of one (params-tree) leaf on each device, sharded by bdpo_jax.sharding's rules."""
    spec = sharding.spec_for(
        sharding.path_to_str(path), tuple(leaf.shape), rules, mesh_shape, min_size
    )
    n = int(np.prod(leaf.shape, dtype=np.int64))
    for name in spec:
        if name is not None:
            n //= mesh_shape.shape[name]
    return n * jnp.dtype(leaf.dtype).itemsize


def _leaf_bytes_per_device(abstract: Any, mesh_shape: _MeshShape, rules, min_size: int) -> int:
    return sum(
        _one_leaf_bytes(path, leaf, mesh_shape, rules, min_size)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    )


def _held_bytes(residuals, min_itemsize: int) -> int:
    """Bytes of jax's saved residuals, intermediates only (not params or inputs), each element
    counted at no fewer than `min_itemsize` bytes (BACKEND_MIN_ITEMSIZE)."""
    return sum(
        jaxpr_memory.array_bytes(a, min_itemsize)
        for a, src in residuals
        if not src.startswith("from the argument")
    )


def _residual_bytes(model, abstract_params, x, t, text, added, min_itemsize: int) -> int:
    """Bytes the vjp of one forward saves (intermediates only, not params or inputs)."""

    def f(p, x, t, text, added):
        return model.apply({"params": p}, x, t, text, added_cond_kwargs=added)

    from jax._src.ad_checkpoint import saved_residuals  # no public equivalent yet

    return _held_bytes(saved_residuals(f, abstract_params, x, t, text, added), min_itemsize)


def _remat_eqns(jaxpr) -> list:
    """The remat (jax.checkpoint) equations of a jaxpr, searched through nested calls."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "remat2":
            found.append(eqn)
            continue
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)  # a ClosedJaxpr (jit, custom_vjp) or None
            if inner is not None and hasattr(inner, "eqns"):
                found.extend(_remat_eqns(inner))
    return found


def _remat_recompute_bytes(model, abstract_params, x, t, text, added, min_itemsize: int) -> int:
    """The largest checkpointed layer's residuals: what the backward holds after re-running that
    layer (each remat equation of the forward's jaxpr is one nn.remat layer; params excluded)."""
    from jax.extend import core as jex_core

    def f(p, x, t, text, added):
        return model.apply({"params": p}, x, t, text, added_cond_kwargs=added)

    from jax._src.ad_checkpoint import saved_residuals  # no public equivalent yet

    closed = jax.make_jaxpr(f)(abstract_params, x, t, text, added)
    largest = 0
    for eqn in _remat_eqns(closed.jaxpr):
        block = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(eqn.params["jaxpr"], []))
        args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
        largest = max(largest, _held_bytes(saved_residuals(block, *args), min_itemsize))
    return largest


def _backward_peak_bytes(
    model, params_of, trained, frozen, x, t, text, added, min_itemsize: int, shard: tuple
) -> int:
    """Peak bytes of one micro-batch's forward and backward (jaxpr_memory, program order): the
    saved activations still needed, skip connections' gradients, the re-run layer and the
    gradients written so far. The forward runs on `params_of(trained, frozen)`; `trained` is
    differentiated (its gradients counted as sharded on the device: `shard`, the arguments of
    _one_leaf_bytes after the leaf), `frozen` is not. Inputs (params, batch) are not counted."""

    def forward(trained, frozen, x, t, text, added):
        params = params_of(trained, frozen)
        return model.apply({"params": params}, x, t, text, added_cond_kwargs=added)

    out = jax.eval_shape(forward, trained, frozen, x, t, text, added)

    def step(trained, frozen, x, t, text, added, d_out):
        _, vjp = jax.vjp(lambda p: forward(p, frozen, x, t, text, added), trained)
        return vjp(d_out)[0]

    closed = jax.make_jaxpr(step)(trained, frozen, x, t, text, added, out)
    paths = jax.tree_util.tree_flatten_with_path(trained)[0]
    held = {
        v: _one_leaf_bytes(path, leaf, *shard)
        for v, (path, leaf) in zip(closed.jaxpr.outvars, paths, strict=True)
    }
    return jaxpr_memory.peak_bytes(
        closed, lambda v: held[v] if v in held else jaxpr_memory.value_bytes(v, min_itemsize)
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
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = lora.ATTENTION_TARGETS,
    matched_forward: bool = True,
    backend: str = "gpu",
) -> dict[str, Any]:
    """The plan as a dict of bytes per device (and the inputs that produced it); lora_rank > 0
    plans a LoRA run on `lora_targets`; `backend` is the XLA backend whose program it describes
    (BACKEND_MIN_ITEMSIZE; see the module docstring)."""
    from bdpo_jax.models import UNet2DConditionModel

    if backend not in BACKEND_MIN_ITEMSIZE:
        raise schema.ConfigError(
            f"--backend {backend!r}: expected one of {', '.join(BACKEND_MIN_ITEMSIZE)}"
        )
    min_itemsize = BACKEND_MIN_ITEMSIZE[backend]
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
    residual_args = (abstract_params, x, t, text, added, min_itemsize)
    act = _residual_bytes(model, *residual_args) if activations else 0
    act_no_remat = act
    recompute = 0
    if remat and activations:
        recompute = _remat_recompute_bytes(model, *residual_args)
        # the upper bound: every intermediate saved (no gradient checkpointing)
        plain = UNet2DConditionModel.from_config(unet_cfg, param_dtype=jnp.float32, dtype=dtype)
        act_no_remat = _residual_bytes(plain, *residual_args)
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_params)))
    extra: dict[str, Any] = {}
    # the params in the compute dtype: a LoRA run's frozen base, the matched forward's selection
    compute_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), abstract_params)
    inputs = (x, t, text, added, min_itemsize)
    shard = (ms, rules, fsdp_min_size)
    if lora_rank:
        spec = lora.LoraSpec(int(lora_rank), float(lora_rank), tuple(lora_targets))
        base = compute_params
        adapters = lora.abstract_adapters(abstract_params, spec, jnp.float32)
        flat = traverse_util.flatten_dict(base)
        kernels = {"/".join(p): flat[p] for p in lora.target_paths(base, spec)}
        a_bytes = _leaf_bytes_per_device(adapters, ms, rules, fsdp_min_size)
        k_bytes = _leaf_bytes_per_device(kernels, ms, rules, fsdp_min_size)
        # the LoRA step's program: the kernels merged in the forward, the adapters differentiated
        backward = (
            _backward_peak_bytes(
                model,
                lambda a, b: lora.merge(b, a, spec.alpha / spec.rank),
                adapters,
                base,
                *inputs,
                shard,
            )
            if activations
            else a_bytes + k_bytes
        )
        rows = {
            "base_params": _leaf_bytes_per_device(base, ms, rules, fsdp_min_size),
            "params": a_bytes,
            "ref_params": a_bytes,
            "opt_state": _leaf_bytes_per_device(
                jax.eval_shape(tx.init, adapters), ms, rules, fsdp_min_size
            ),
            "grads": a_bytes,
            "grad_accumulator": a_bytes if grad_accum > 1 else 0,
            "merged_kernels": k_bytes,
            "backward_peak": backward,
            "activations": act,
            "remat_recompute": recompute,
        }
        extra = {"lora_rank": int(lora_rank), "lora_targets": list(spec.targets)}
        extra["num_adapter_params"] = lora.count(adapters)
    else:
        backward = (
            _backward_peak_bytes(
                model,
                lambda p, _: p,
                abstract_params,
                {},
                *inputs,
                shard,
            )
            if activations
            else p_bytes
        )
        rows = {
            "params": p_bytes,
            "ref_params": p_bytes,
            "opt_state": o_bytes,
            "grads": p_bytes,  # one micro-batch's gradient
            "grad_accumulator": p_bytes if grad_accum > 1 else 0,
            "backward_peak": backward,
            "activations": act,
            "remat_recompute": recompute,
            # config.dpo.matched_forward: the forward-only program's selected params, cast
            "matched_forward": _leaf_bytes_per_device(compute_params, ms, rules, fsdp_min_size)
            if matched_forward
            else 0,
        }
    rows["total"] = plan_total(rows)
    rows["activations_without_remat"] = act_no_remat  # not in the total
    fits = {f"{gb}GB": rows["total"] <= (1 - FIT_HEADROOM) * gb * 2**30 for gb in GPU_SIZES_GB}
    return {
        **extra,
        "fits_one_gpu": fits,
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
        "matched_forward": bool(matched_forward),
        "backend": backend,
        "bytes_per_device": rows,
    }


# the rows a step holds at its peak: state through the whole step, the running gradient sum,
# the matched forward's cast params, and the backward's own peak, which includes the gradient,
# the activations still saved, the re-run layer and a LoRA run's merged kernels (those rows are
# its parts, shown apart, not added again)
TOTAL_ROWS = (
    "base_params",
    "params",
    "ref_params",
    "opt_state",
    "grad_accumulator",
    "matched_forward",
    "backward_peak",
)


def plan_total(rows: dict[str, int]) -> int:
    """Peak bytes per device: the sum of the TOTAL_ROWS present."""
    return sum(rows[k] for k in TOTAL_ROWS if k in rows)


def format_table(plans: list[dict[str, Any]]) -> str:
    rows = list(dict.fromkeys(r for p in plans for r in p["bytes_per_device"]))
    head = ["item"] + [
        f"{p['model']}{' LoRA r' + str(p['lora_rank']) if p.get('lora_rank') else ''} "
        f"{p['mesh']} b{p['global_batch']}/acc{p['grad_accum']}"
        for p in plans
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        label = r
        if r == "activations_without_remat":
            label = f"{r} (not in total)"
        elif r not in TOTAL_ROWS and r != "total":
            label = f"{r} (part of backward_peak)"
        cells = [
            f"{p['bytes_per_device'][r] / 2**30:.2f} GiB" if r in p["bytes_per_device"] else "-"
            for p in plans
        ]
        lines.append(" | ".join([label, *cells]))
    lines.append(
        " | ".join(
            [f"fits one GPU ({int(100 * FIT_HEADROOM)}% kept free)"]
            + [
                ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in p["fits_one_gpu"].items())
                for p in plans
            ]
        )
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
    parser.add_argument(
        "--no-matched-forward",
        action="store_true",
        help="config.dpo.matched_forward=False (configs/tiny.py, demo.py)",
    )
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument(
        "--lora-include-ff", action="store_true", help="LoRA on the feed-forward layers too"
    )
    parser.add_argument(
        "--backend",
        default="gpu",
        choices=tuple(BACKEND_MIN_ITEMSIZE),
        help="the XLA backend whose program to plan (cpu: saved values in f32)",
    )
    parser.add_argument("--json", default="")

    def run() -> None:
        args = parser.parse_args(argv)
        mesh = parse_mesh(args.mesh)
        if args.batch < 1 or args.accum < 1:
            raise schema.ConfigError(f"--batch {args.batch}, --accum {args.accum}: must be >= 1")
        if args.lora_rank < 0:
            raise schema.ConfigError(f"--lora-rank {args.lora_rank}: must be >= 0")
        targets = lora.ATTENTION_TARGETS + (lora.FF_TARGETS if args.lora_include_ff else ())
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
                    matched_forward=not args.no_matched_forward,
                    lora_rank=args.lora_rank,
                    lora_targets=targets,
                    backend=args.backend,
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
