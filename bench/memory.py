"""XLA's compiled memory analysis of the full DPO step vs `bdpo_jax.memory_plan`, per device.

    PYTHONPATH=. python bench/memory.py                    # sd15 and sdxl on 8 fake CPU devices
    PYTHONPATH=. python bench/memory.py --model tiny       # the same path on a tiny UNet

Compile only, nothing is executed: the abstract state from `jax.eval_shape`
(`train_state.make_initializers`), the batch and the step's constants as ShapeDtypeStructs with
their shardings, the trainer's own step (`train.make_train_step` + `train.jit_train_step`,
state donated) lowered and compiled for the mesh, global batch, accumulation, optimizer, remat
and compute dtype of configs/<model>.py, at the model's native latent size (64 SD1.5, 128 SDXL).
`compiled.memory_analysis()` (per device under SPMD) gives argument, output, alias and temp bytes;
XLA's peak estimate is argument + output - alias + temp. The plan's rows are set beside it:
params + ref_params + opt_state against the arguments, grads + activations against the temps.
Writes bench/results/memory.json and prints a table (GiB per device; compile seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402

GIB = 2**30
_SHAPES = {  # model -> (config file, unet_config, latent side, text shape, pooled dim)
    "tiny": ("tiny", "tiny:sd15", 8, (8, 32), 0),
    "sd15": ("sd15", "sd15", 64, (77, 768), 0),
    "sdxl": ("sdxl", "sdxl", 128, (77, 2048), 1280),
}


def _config(name: str, batch: int | None, accum: int | None):
    import importlib

    cfg_name, unet, side, text, pooled = _SHAPES[name]
    config = importlib.import_module(f"configs.{cfg_name}").get_config()
    config.model.pretrained = ""
    config.model.unet_config = unet
    config.data.source = "synthetic"
    config.data.synthetic_latent_shape = (4, side, side)
    config.data.synthetic_text_shape = text
    config.data.synthetic_pooled_dim = pooled
    if batch:
        config.train.global_batch_size = batch
    if accum:
        config.optim.grad_accum_steps = accum
    config.data.synthetic_num_records = int(config.train.global_batch_size)
    return config


def compiled_memory(name: str, batch: int | None = None, accum: int | None = None) -> dict:
    """Lower and compile the DPO step of `name` on all (fake) devices; its memory analysis."""
    import jax

    from bdpo_jax import data, sharding, train, train_state

    config = _config(name, batch, accum)
    global_batch = int(config.train.global_batch_size)
    mesh = sharding.make_mesh(config.mesh.shape)
    ds, info = data.make_dataset(
        config.data, global_batch_size=global_batch, seed=0, label_mode=config.label.mode
    )
    host_batch = next(iter(ds))
    model, _, _ = train_state.build_model(
        config.model,
        latent_shape=info.latent_shape,
        text_shape=info.text_shape,
        pooled_dim=info.pooled_dim,
    )
    step_fn, tx, host_consts = train.make_train_step(config, info, model)
    rules = sharding.validate_rules(config.mesh.rules)
    inits = train_state.make_initializers(model, tx, mesh, rules, int(config.mesh.fsdp_min_size))

    def abstract(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    state = jax.tree.map(abstract, inits.abstract, inits.shardings)
    bs, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    from bdpo_jax import schema

    batch_abs = {k: abstract(host_batch[k], bs) for k in schema.BATCH_FIELDS if k in host_batch}
    consts = jax.tree.map(lambda x: abstract(x, repl), host_consts)
    jit_step = train.jit_train_step(step_fn, inits.shardings, mesh)
    t0 = time.perf_counter()
    lowered = jit_step.lower(state, batch_abs, consts)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
    return {
        "model": name,
        "devices": len(mesh.devices.flat),
        "mesh": [int(n) for n in mesh.devices.shape],
        "global_batch": global_batch,
        "grad_accum": int(config.optim.grad_accum_steps),
        "latent_size": int(info.latent_shape[1]),
        "optimizer": config.optim.optimizer,
        "compute_dtype": config.model.compute_dtype,
        "remat": bool(config.model.remat),
        "matched_forward": bool(config.dpo.matched_forward),
        "lower_seconds": lower_s,
        "compile_seconds": compile_s,
        "xla_bytes_per_device": {
            "argument": arg,
            "output": out,
            "alias": alias,
            "temp": temp,
            "generated_code": ma.generated_code_size_in_bytes,
            "peak": arg + out - alias + temp,
        },
    }


def plan_for(row: dict) -> dict:
    from bdpo_jax import memory_plan

    return memory_plan.memory_plan(
        row["model"],
        mesh_shape=tuple(row["mesh"]),
        global_batch=row["global_batch"],
        grad_accum=row["grad_accum"],
        latent_size=row["latent_size"],
        optimizer=row["optimizer"],
        compute_dtype=row["compute_dtype"],
        remat=row["remat"],
    )["bytes_per_device"]


def format_table(rows: list[dict]) -> str:
    lines = [
        "| model (mesh, batch/accum) | XLA args | plan params+ref+opt | XLA temp | "
        "plan grads+act | XLA peak | plan total | plan/XLA | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        x, p = r["xla_bytes_per_device"], r.get("plan_bytes_per_device")
        if p is None:
            plan_state = plan_temp = plan_total = ratio = "-"
        else:
            plan_state = f"{(p['params'] + p['ref_params'] + p['opt_state']) / GIB:.2f}"
            plan_temp = f"{(p['grads'] + p['activations']) / GIB:.2f}"
            plan_total = f"{p['total'] / GIB:.2f}"
            ratio = f"{p['total'] / x['peak']:.2f}"
        lines.append(
            f"| {r['model']} ({r['mesh']}, {r['global_batch']}/{r['grad_accum']}) | "
            f"{x['argument'] / GIB:.2f} | {plan_state} | {x['temp'] / GIB:.2f} | {plan_temp} | "
            f"{x['peak'] / GIB:.2f} | {plan_total} | {ratio} | {r['compile_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["sd15", "sdxl"], choices=tuple(_SHAPES))
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    parser.add_argument("--accum", type=int, default=0, help="accumulation (0: the config's)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench/results/memory.json"))
    args = parser.parse_args()
    meta, rows = common.environment(), []
    for name in args.model:
        row = compiled_memory(name, args.batch or None, args.accum or None)
        if name != "tiny":
            row["plan_bytes_per_device"] = plan_for(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
        # after each model: a long compile keeps what it has
        common.write_json(args.out, {"meta": meta, "rows": rows})
    print(format_table(rows))


if __name__ == "__main__":
    main()
