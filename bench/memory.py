"""XLA's compiled memory analysis of the full DPO step vs `bdpo_jax.memory_plan`, per device.

    PYTHONPATH=. python bench/memory.py                    # sd15 and sdxl on 8 fake CPU devices
    PYTHONPATH=. python bench/memory.py --model tiny       # the same path on a tiny UNet
    PYTHONPATH=. VENV/bin/python bench/memory.py --target gpu-h100  # 8 H100s (README: the venv)

Compile only, nothing is executed: the abstract state from `jax.eval_shape`
(`train_state.make_initializers`), the batch and the step's constants as ShapeDtypeStructs with
their shardings, the trainer's own step (`train.make_train_step` + `train.jit_train_step`,
state donated) lowered and compiled for the mesh, global batch, accumulation, optimizer, remat
and compute dtype of configs/<model>.py, at the model's native latent size (64 SD1.5, 128 SDXL).
`compiled.memory_analysis()` (per device under SPMD) gives argument, output, alias and temp bytes;
XLA's peak estimate is argument + output - alias + temp. From XLA's dump of the compile it also
reads live_at_peak, the bytes live at the peak of XLA's schedule (arguments included): the peak
without what the buffer assignment loses packing values into one heap. The plan's rows are set
beside it: params + ref_params + opt_state against the arguments, the rest (the backward's peak, the
matched forward's params, the gradient accumulator) against the temps; plan/XLA is plan total /
XLA peak. `--replan JSON` sets today's plan beside an earlier run's XLA figures without
compiling (they hold while the step's program is unchanged; meta["replanned"] says when).
Writes bench/results/memory.json (memory_gpu.json for a GPU target) and prints a table (GiB per
device; compile seconds; XLA's HloCostAnalysis FLOPs of the step per device).

--target gpu-h100 / gpu-h200 compiles the same step for 8 GPUs of bench/gpu_specs/ without a GPU
(bench/gpu_target.py: needs jax-cuda12-plugin[with-cuda] at jax's version, best in its own
virtualenv). There attention "auto" is what it picks on that GPU (models/attention.gpu_attention:
cuDNN flash attention for bf16 self-attention on Hopper, the XLA path for the 77-token
cross-attention), and the FLOPs come from the unoptimised HLO (the compile-only executable has
no cost analysis). XLA flags set for a GPU target unless XLA_FLAGS already names them:
  * --xla_gpu_enable_triton_gemm=false: cuBLAS for every matmul. Without a GPU XLA cannot
    autotune, and the Triton tiling it falls back to failed for SD1.5's [131072, 320] x
    [320, 320] attention output projection ("Couldn't find output tile sizes that satisfy hlo");
    on a GPU the autotuner picks cuBLAS or a Triton tiling that compiles.
  * SDXL only (GPU_COMPILER_OPTIONS): xla_disable_hlo_passes=gpu-all-reduce-combiner. As on CPU,
    the combiner's reachability rebuilds on SDXL's FSDP step ran 23 CPU minutes without
    finishing. It is not neutral on GPU: SD1.5 without it held 34.14 instead of 27.46 GiB of
    temporaries (measured before models/remat.py's layer barriers), so SDXL's figure may be high
    by a like share. With the barriers configs/sdxl.py's own step (128 pairs, no accumulation)
    compiles in 14 minutes here (31 beside another compile; 15-16 GB of host memory) and needs
    27.55 GiB per H100; before them XLA:GPU's rematerialisation ran on a schedule of 144 GiB
    (at --accum 4).
SDXL's FSDP mesh (1, 8) with cuDNN attention: jax 0.10's custom_partitioning of the cuDNN call
was handed the projection kernels' heads split, which it cannot map onto the mesh
(IndivisibleError: "shape=[1, 1, 2, 1, 4] is incompatible with mesh_shape ... ('fsdp', 8)"), on a
GPU as here. The model now places q, k, v and the output over the batch axes before and after the
call (models.attention.split_over_mesh; the step is traced under its mesh), and `--model tiny-sdxl
--attention cudnn` compiles that path at tiny size (tests/test_bench_memory.py).

--devices 1 --batch B/8 compiles one device's share of the step: the same per-device batch and
state (unsharded), no collectives. It separates what the model and its backward hold from what
XLA's scheduling around the gradient all-reduces adds on 8 devices (README).

On CPU the figures come from compiled.memory_analysis() or, where XLA:CPU goes on building the
executable for more than DUMP_GRACE_S after assigning the buffers (SDXL's FSDP step: the thunk
graph's transitive reduction ran for over an hour), from the buffer assignment in XLA's dump
(compile_cpu; the row's memory_source says which, and the two agree exactly on the tiny step).

XLA flags set for --target cpu unless XLA_FLAGS already names them (the plan describes a GPU run;
these make the CPU compile that program as far as the CPU backend allows, and make it fit this
machine):
  * --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED: XLA:CPU's default schedule is
    concurrency-optimized (it runs independent ops in parallel at the cost of memory); GPU's
    latency-hiding scheduler is memory-aware. SD1.5 at configs/sd15.py: temp 92.2 GiB with the
    default, 59.9 GiB with this.
  * --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true: LLVM codegen
    only (the full SD1.5 compile went over 24 GiB of host memory without them; with them 2.3
    GiB); the buffer assignment is the same (the tiny step's memory analysis is identical).
  * --xla_disable_hlo_passes=cpu-all-reduce-combiner: on SDXL's FSDP step the combiner's
    reachability rebuilds ran over 25 CPU minutes without finishing; it only merges collectives
    into larger ones (GPU combines under its own size thresholds), not what a block keeps live.
Attention: "auto" is "chunked" on CPU (models/flash.py, FlashAttention's algorithm: no [T, S]
logits kept), the memory class of cuDNN's flash attention on GPU. What stays CPU-specific:
XLA:CPU runs bf16 matmuls, convolutions and elementwise ops in f32 (GPU runs them in bf16), so
most of what the backward keeps is f32: a CPU row's plan is `memory_plan(backend="cpu")`, which
counts each held element at 4 bytes at least (SD1.5: XLA:CPU 30.97 GiB, plan 29.70; SDXL:
39.94 against 44.45, XLA:CPU keeping part of it in bf16). XLA:CPU
also drops optimization barriers before it schedules; models/remat.py orders each layer's
backward by data dependencies there instead (without them: 72.08 GiB, README).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time

DEFAULT_XLA_FLAGS = {  # flag -> value, each set unless XLA_FLAGS already names it
    "--xla_force_host_platform_device_count": "8",
    "--xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "--xla_backend_optimization_level": "0",
    "--xla_llvm_disable_expensive_passes": "true",
    "--xla_disable_hlo_passes": "cpu-all-reduce-combiner",
}


GPU_XLA_FLAGS = {  # for a GPU target, set unless XLA_FLAGS names it: see the docstring
    "--xla_gpu_enable_triton_gemm": "false",
}
GPU_COMPILER_OPTIONS = {  # model -> XLA debug options of its GPU compile only (docstring)
    "sdxl": {"xla_disable_hlo_passes": "gpu-all-reduce-combiner"},
}


def with_default_flags(flags: str, defaults: dict[str, str] = DEFAULT_XLA_FLAGS) -> str:
    """`flags` plus each `defaults` entry it does not name."""
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in flags]
    return " ".join([flags.strip(), *extra]).strip()


def set_environment(target: str) -> None:
    """Before jax starts a backend: CPU devices only (a GPU target compiles for devices that the
    CUDA plugin describes, and JAX_PLATFORMS=cpu keeps it from looking for a driver); the CPU
    target's flags. No persistent compilation cache: a cached executable would skip the compile
    whose dump and time this measures."""
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    if target == "cpu":
        os.environ["XLA_FLAGS"] = with_default_flags(os.environ.get("XLA_FLAGS", ""))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        os.environ["XLA_FLAGS"] = with_default_flags(os.environ.get("XLA_FLAGS", ""), GPU_XLA_FLAGS)
        os.environ["JAX_PLATFORMS"] = "cpu"


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common, gpu_target  # noqa: E402

GIB = 2**30
DEVICES = 8
DUMP_GRACE_S = 300  # compile_cpu: how long after the buffer assignment to wait for the executable
_SHAPES = {  # model -> (config file, unet_config, latent side, text shape, pooled dim)
    "tiny": ("tiny", "tiny:sd15", 8, (8, 32), 0),
    "tiny-sdxl": ("tiny", "tiny:sdxl", 8, (8, 32), 32),
    "sd15": ("sd15", "sd15", 64, (77, 768), 0),
    "sdxl": ("sdxl", "sdxl", 128, (77, 2048), 1280),
}
_OVERRIDES = {  # model -> config fields set on top of its config file
    # configs/sdxl.py's FSDP mesh and bf16 compute at tiny size (every param sharded)
    "tiny-sdxl": {
        "mesh.shape": (1, -1),
        "mesh.fsdp_min_size": 1,
        "model.compute_dtype": "bfloat16",
    },
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
    for field, value in _OVERRIDES.get(name, {}).items():
        group, key = field.split(".")
        config[group][key] = value
    if batch:
        config.train.global_batch_size = batch
    if accum:
        config.optim.grad_accum_steps = accum
    config.data.synthetic_num_records = int(config.train.global_batch_size)
    return config


def gpu_auto_attention(spec, compute_dtype: str, capability: float, text_len: int) -> str:
    """What "auto" picks on a CUDA GPU of `capability` for a UNet `spec`'s self-attention (even
    token counts) and cross-attention (`text_len` tokens), over its levels' head dims
    (models/attention.gpu_attention), e.g. "self cudnn, cross xla"."""
    from bdpo_jax.models import attention, dtypes

    dtype = dtypes.dtype_from_name(compute_dtype, "compute_dtype")
    dims = {c // h for c, h in zip(spec.block_out_channels, spec.num_heads, strict=True) if h}

    def picks(kv_len: int) -> str:
        return "+".join(
            sorted({attention.gpu_attention(dtype, d, capability, 64, kv_len) for d in dims})
        )

    return f"self {picks(64)}, cross {picks(text_len)}"


def compiled_memory(
    name: str,
    batch: int | None = None,
    accum: int | None = None,
    target: str = "cpu",
    attention_choice: str = "",
    devices: int = DEVICES,
    matched_forward: bool | None = None,
) -> dict:
    """Lower and compile the DPO step of `name` on `devices` (fake CPU or compile-only GPU)
    devices; its memory analysis and FLOPs."""
    if target == "cpu":
        return _compiled_memory(
            name, batch, accum, attention_choice, None, devices, matched_forward
        )
    with open(gpu_target.spec_path(target)) as f:
        spec_text = f.read()
    spec = gpu_target.parse_spec(spec_text)
    from bdpo_jax.models import attention

    capability = spec["compute_capability"]  # "auto" and jax's cuDNN checks as on that GPU:
    with attention.gpu_target(capability), gpu_target.cudnn_capability(capability):
        return _compiled_memory(
            name,
            batch,
            accum,
            attention_choice,
            (target, spec_text, spec),
            devices,
            matched_forward,
        )


def _compiled_memory(
    name, batch, accum, attention_choice, gpu, n_devices, matched_forward=None
) -> dict:
    import jax

    from bdpo_jax import compile_options, data, sharding, train, train_state
    from bdpo_jax.models import attention, dtypes

    config = _config(name, batch, accum)
    if matched_forward is not None:
        config.dpo.matched_forward = matched_forward
    config.model.attention = attention_choice or config.model.attention
    global_batch = int(config.train.global_batch_size)
    target, spec = "cpu", None
    devices = jax.devices()[:n_devices]
    if gpu is not None:
        target, spec_text, spec = gpu
        devices = gpu_target.topology_devices(spec_text, n_devices)
    mesh = sharding.make_mesh(config.mesh.shape, devices=devices)
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
    flops = gpu_target.step_flops(lowered)
    options = GPU_COMPILER_OPTIONS.get(name, {}) if gpu is not None else {}
    if gpu is None:
        xla_bytes, timing = compile_cpu(lowered)
    else:
        folder = tempfile.mkdtemp(prefix="bench_memory_dump_")
        t0 = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options={**options, **_dump_options(folder)})
            xla_bytes = memory_analysis_bytes(compiled)
            xla_bytes["live_at_peak"] = live_at_peak_bytes(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        timing = {"compile_seconds": time.perf_counter() - t0}
    impl = attention.attention_implementation(
        config.model.attention,
        dtypes.dtype_from_name(config.model.compute_dtype, "compute_dtype"),
        64,
    )
    if spec is not None and config.model.attention == "auto":
        impl = gpu_auto_attention(
            model.spec, config.model.compute_dtype, spec["compute_capability"], info.text_shape[0]
        )
    return {
        "model": name,
        "target": target,
        "target_spec": None
        if spec is None
        else {**spec, "file": os.path.relpath(gpu_target.spec_path(target), REPO)},
        "device_kind": mesh.devices.flat[0].device_kind,
        "devices": len(mesh.devices.flat),
        "mesh": [int(n) for n in mesh.devices.shape],
        "global_batch": global_batch,
        "grad_accum": int(config.optim.grad_accum_steps),
        "latent_size": int(info.latent_shape[1]),
        "optimizer": config.optim.optimizer,
        "compute_dtype": config.model.compute_dtype,
        "remat": bool(config.model.remat),
        "matched_forward": bool(config.dpo.matched_forward),
        "attention": impl,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # what the compile got: the package's options (train.jit_train_step) merged with these
        "compiler_options": {**(compile_options.compiler_options() or {}), **options},
        "lower_seconds": lower_s,
        **timing,
        "xla_flops_per_step": flops,  # all devices; HloCostAnalysis of the unoptimised HLO
        "xla_flops_per_device": flops / len(mesh.devices.flat),
        "xla_bytes_per_device": xla_bytes,
    }


def memory_analysis_bytes(compiled) -> dict[str, int]:
    """XLA's compiled memory analysis per device; peak = argument + output - alias + temp."""
    ma = compiled.memory_analysis()
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
    return {
        "argument": arg,
        "output": out,
        "alias": alias,
        "temp": temp,
        "generated_code": ma.generated_code_size_in_bytes,
        "peak": arg + out - alias + temp,
    }


def buffer_assignment_bytes(text: str) -> dict[str, int]:
    """The same figures from XLA:CPU's buffer-assignment dump (`allocation N: size S, kind`):
    argument = the parameter allocations, temp = the preallocated temp allocation, output -
    alias = the live-out allocations that are no parameter (donated state is written in place).
    tests/test_bench_memory.py checks it against memory_analysis() on the tiny step."""
    argument = temp = unaliased_out = 0
    for size, kind in re.findall(r"^allocation \d+: size (\d+), (\S+)", text, re.M):
        if kind == "parameter":
            argument += int(size)
        elif kind == "preallocated-temp:":
            temp += int(size)
        elif kind in ("maybe-live-out:", "output"):
            unaliased_out += int(size)
    return {
        "argument": argument,
        "unaliased_output": unaliased_out,
        "temp": temp,
        "peak": argument + unaliased_out + temp,
    }


def live_at_peak_bytes(folder: str) -> int | None:
    """The bytes of the values live at the peak of XLA's schedule, from its dump's live-range
    file ("Stack trace breakdown for peak usage: N bytes"; arguments included), or None. The
    memory analysis's peak is this plus what the buffer assignment loses packing values of
    different lifetimes into one heap."""
    for path in glob.glob(os.path.join(folder, "*after_optimizations-live-range.txt")):
        with open(path) as f:
            found = re.search(r"breakdown for peak usage: ([\d ]+) bytes", f.read())
        if found:
            return int(found.group(1).replace(" ", ""))
    return None


def _dump_options(folder: str) -> dict[str, object]:
    return {"xla_dump_to": folder, "xla_dump_hlo_as_text": True}


def _dump_text(folder: str, sizes: dict[str, int] | None = None) -> str | None:
    """The buffer-assignment dump in `folder`; while XLA may still be writing it (`sizes`: the
    sizes seen at the previous call), only once its size held still between two calls."""
    for path in glob.glob(os.path.join(folder, "*after_optimizations-buffer-assignment.txt")):
        size = os.path.getsize(path)
        if sizes is None or (sizes.get(path) == size and size > 0):
            with open(path) as f:
                return f.read()
        sizes[path] = size
    return None


ABANDONED_COMPILES: list[tuple[threading.Thread, str]] = []  # (compile, its dump folder)


def compile_cpu(lowered, poll_s: float = 5.0) -> tuple[dict, dict]:
    """Compile for the fake CPU devices; XLA's memory figures and timing.

    The memory figures come from compiled.memory_analysis() when the executable is built within
    DUMP_GRACE_S of XLA's buffer assignment; otherwise from the buffer assignment itself, read
    from XLA's dump (buffer_assignment_bytes). Why: on SDXL's FSDP step XLA:CPU assigned its
    buffers in 3 to 5 minutes and then spent over an hour building the executable's thunk
    graph (ExecutionGraph's transitive reduction, seen in gdb), which the figures do not need.
    """
    folder = tempfile.mkdtemp(prefix="bench_memory_dump_")
    dump_options = _dump_options(folder)
    result: dict = {}

    def run() -> None:
        try:
            result["compiled"] = lowered.compile(compiler_options=dump_options)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    t0 = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text, assigned_s, sizes = None, None, {}
    while thread.is_alive():
        thread.join(poll_s)
        if text is None and (text := _dump_text(folder, sizes)) is not None:
            assigned_s = time.perf_counter() - t0
        if assigned_s is not None and time.perf_counter() - t0 - assigned_s > DUMP_GRACE_S:
            break
    finished = not thread.is_alive()
    if finished:  # the compile returned: its dump is complete
        text = text or _dump_text(folder)
    live = live_at_peak_bytes(folder)  # written with the buffer assignment
    if finished:
        shutil.rmtree(folder, ignore_errors=True)
    if "error" in result:
        raise result["error"]
    dumped = buffer_assignment_bytes(text) if text else None
    if "compiled" in result:
        xla_bytes = memory_analysis_bytes(result["compiled"])
        if dumped is not None:  # the two readings of one buffer assignment
            xla_bytes["dump_agrees"] = all(
                dumped[k] == xla_bytes[k] for k in ("argument", "temp", "peak")
            )
        xla_bytes["live_at_peak"] = live
        return xla_bytes, {"compile_seconds": time.perf_counter() - t0, "memory_source": "xla"}
    ABANDONED_COMPILES.append((thread, folder))
    dumped["live_at_peak"] = live
    print(
        f"XLA:CPU assigned the step's buffers after {assigned_s:.0f} s and was still building "
        f"the executable {DUMP_GRACE_S} s later: figures from its buffer-assignment dump",
        flush=True,
    )
    return dumped, {
        "compile_seconds": assigned_s,
        "memory_source": "buffer-assignment dump (executable not built)",
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
        matched_forward=row["matched_forward"],
        backend="cpu" if row["target"] == "cpu" else "gpu",
    )["bytes_per_device"]


def plan_state_bytes(plan: dict) -> int:
    """The plan's rows that are step arguments: params, reference and optimizer state."""
    return plan["params"] + plan["ref_params"] + plan["opt_state"]


def with_plan(row: dict, plan: dict) -> dict:
    """`row` with the plan's rows, its temp share (total - state) and plan total / XLA peak."""
    return {
        **row,
        "plan_bytes_per_device": plan,
        "plan_temp_bytes_per_device": plan["total"] - plan_state_bytes(plan),
        "plan_over_xla_peak": plan["total"] / row["xla_bytes_per_device"]["peak"],
    }


def replan(path: str) -> None:
    """Rewrite `path`'s plan columns with today's plan for each row's settings; its XLA figures
    stay (they hold while the step's program is unchanged); meta records when and from what."""
    try:
        with open(path) as f:
            result = json.load(f)
        rows = result["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--replan {path}: not a bench/memory.py JSON ({error})") from None
    rows = [
        with_plan(row, plan_for(row)) if not row["model"].startswith("tiny") else row
        for row in rows
    ]
    meta = {**result.get("meta", {}), "replanned": common.environment()}
    common.write_json(path, {"meta": meta, "rows": rows})
    print(format_table(rows))


def format_table(rows: list[dict]) -> str:
    lines = [
        "| model (mesh, batch/accum) | XLA args | plan params+ref+opt | XLA temp | "
        "plan temp | XLA peak | XLA live at peak | plan total | plan/XLA | compile s | "
        "TFLOP/device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        x, p = r["xla_bytes_per_device"], r.get("plan_bytes_per_device")
        if p is None:
            plan_state = plan_temp = plan_total = ratio = "-"
        else:
            plan_state = f"{plan_state_bytes(p) / GIB:.2f}"
            plan_temp = f"{r['plan_temp_bytes_per_device'] / GIB:.2f}"
            plan_total = f"{p['total'] / GIB:.2f}"
            ratio = f"{r['plan_over_xla_peak']:.2f}"
        where = "" if r.get("target", "cpu") == "cpu" else f" {r['target'].removeprefix('gpu-')}"
        flops = r.get("xla_flops_per_device")
        live = x.get("live_at_peak")
        lines.append(
            f"| {r['model']}{where} ({r['mesh']}, {r['global_batch']}/{r['grad_accum']}) | "
            f"{x['argument'] / GIB:.2f} | {plan_state} | {x['temp'] / GIB:.2f} | {plan_temp} | "
            f"{x['peak'] / GIB:.2f} | {'-' if live is None else f'{live / GIB:.2f}'} | "
            f"{plan_total} | {ratio} | {r['compile_seconds']:,.0f} | "
            f"{'-' if flops is None else f'{flops / 1e12:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["sd15", "sdxl"], choices=tuple(_SHAPES))
    parser.add_argument(
        "--no-matched-forward",
        action="store_true",
        help="config.dpo.matched_forward=False (default: the config's, on)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=DEVICES,
        help="devices of the mesh (1 with --batch B / 8: one device's share, no collectives)",
    )
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    parser.add_argument("--accum", type=int, default=0, help="accumulation (0: the config's)")
    parser.add_argument(
        "--target",
        default="cpu",
        choices=("cpu", *gpu_target.TARGETS),
        help="compile for 8 fake CPU devices or 8 GPUs of bench/gpu_specs/ (no GPU needed)",
    )
    parser.add_argument(
        "--attention",
        default="",
        help="config.model.attention: auto, xla, cudnn or chunked (default: the config's, auto)",
    )
    parser.add_argument(
        "--out", default="", help="JSON (default bench/results/memory.json, memory_gpu.json)"
    )
    parser.add_argument(
        "--replan",
        default="",
        metavar="JSON",
        help="set today's memory_plan beside the XLA figures of an earlier run's JSON (no compile)",
    )
    args = parser.parse_args()
    if args.replan:
        try:
            replan(args.replan)
        except ValueError as error:
            parser.error(str(error))
        return
    if not 1 <= args.devices <= DEVICES:
        parser.error(f"--devices {args.devices}: expected 1 to {DEVICES}")
    if args.batch < 0 or args.accum < 0:
        parser.error(f"--batch {args.batch}, --accum {args.accum}: expected >= 0")
    if args.target != "cpu" and not gpu_target.plugin_available():
        parser.error(f"--target {args.target} {gpu_target.PLUGIN_HINT}")
    set_environment(args.target)
    from bdpo_jax.models import attention  # jax only after set_environment has set JAX_PLATFORMS

    if args.attention and args.attention not in attention.ATTENTION_CHOICES:
        parser.error(f"--attention {args.attention}: expected one of {attention.ATTENTION_CHOICES}")
    out = args.out or os.path.join(
        REPO, "bench/results", "memory.json" if args.target == "cpu" else "memory_gpu.json"
    )
    meta, rows = common.environment(), []
    for name in args.model:
        row = compiled_memory(
            name,
            args.batch or None,
            args.accum or None,
            args.target,
            args.attention,
            args.devices,
            False if args.no_matched_forward else None,
        )
        if not name.startswith("tiny"):
            row = with_plan(row, plan_for(row))
        rows.append(row)
        print(json.dumps(row), flush=True)
        # after each model: a long compile keeps what it has
        common.write_json(out, {"meta": meta, "rows": rows})
    print(format_table(rows))
    if ABANDONED_COMPILES:  # an XLA compile cannot be interrupted: the process ends here
        for _, folder in ABANDONED_COMPILES:
            shutil.rmtree(folder, ignore_errors=True)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
