"""Flax UNet vs diffusers PyTorch UNet on this machine: forward and forward+backward time.

Same config, same weights (the diffusers model's, loaded through load_unet), same batch, fp32.
JAX: the package defaults (no flag; jitted with bdpo_jax.compile_options, as the trainer and
sampler are), params placed on the device once (compile time reported, excluded). PyTorch: set
up for speed on CPU (bench/common.py: denormals flushed, one thread per core, diffusers' default
SDPA attention), forward under inference_mode, timed in both memory formats (contiguous and
channels_last); the ratio uses the faster one.
Forward+backward is the gradient of mean(out**2) w.r.t. all parameters. The contenders are
timed alternately in one process (bench/common.py); median and IQR of --repeats runs.

    python bench/unet.py [--configs tiny,small,demo] [--attention auto] [--batch N]
                         [--repeats 15] [--warmup 3] [--torch-threads 0] [--out PATH]

Configs: "tiny" = presets.tiny_unet_config("sd15"), 8x8 latents, batch 4; "small" = SD1.5
block structure with block_out_channels (64, 128, 256), 2 layers per block, 32x32 latents, 77
text tokens of width 128, batch 4 (17.8M parameters); "demo" = the demo's UNet (configs/demo.py,
bdpo_demo/model.py: 32x32 RGB folded 2x2 into 12 x 16 x 16, channels config.demo.channels,
16 MiniLM tokens of width 384), batch config.demo.base_batch (the demo's SFT batch, 32).
Writes bench/results/unet.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from bdpo_jax import compile_options, host_memory  # noqa: E402
from bdpo_jax.models import load_unet, tiny_unet_config  # noqa: E402
from bdpo_jax.models.attention import attention_implementation  # noqa: E402
from bench import common  # noqa: E402
from tests.unet_fixtures import random_diffusers_unet, unet_inputs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "unet.json")


def bench_config(name: str) -> tuple[dict, int, int]:
    """(diffusers config, text length, default batch) of a named benchmark config."""
    if name == "tiny":
        return tiny_unet_config("sd15", sample_size=8), 8, 4
    if name == "small":
        cfg = tiny_unet_config("sd15", sample_size=32, cross_attention_dim=128)
        cfg.update(common.SMALL_UNET)
        return cfg, 77, 4
    if name == "demo":
        from bdpo_demo.model import unet_config_for
        from configs import demo

        d = demo.get_config().demo
        return unet_config_for(d), 16, int(d.base_batch)
    raise SystemExit(f"--configs: unknown config {name!r} (tiny, small, demo)")


def run(name: str, attention: str, batch: int, repeats: int, warmup: int) -> dict:
    cfg, seq, default_batch = bench_config(name)
    batch = batch or default_batch
    torch_model = random_diffusers_unet(cfg, seed=0, std=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = load_unet(tmp, attention=attention)
    params = jax.device_put(params)  # load_unet returns host arrays
    host_memory.keep_freed_memory(host_memory.fp32_bytes(params))  # as the trainer does
    x = unet_inputs(cfg, batch=batch, seq=seq, seed=1)
    args = tuple(jax.device_put(np.asarray(x[k])) for k in ("sample", "timesteps", "context"))
    t_args = tuple(torch.from_numpy(np.asarray(x[k])) for k in ("sample", "timesteps", "context"))
    t_args_cl = (t_args[0].contiguous(memory_format=torch.channels_last), *t_args[1:])
    torch_cl = random_diffusers_unet(cfg, seed=0, std=0.02).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in torch_model.parameters())

    fwd = compile_options.jit(lambda p, *a: model.apply({"params": p}, *a))
    grad = compile_options.jit(
        jax.grad(lambda p, *a: jnp.mean(model.apply({"params": p}, *a) ** 2))
    )
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(params, *args))
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params, *args))
    compile_grad = time.perf_counter() - t0

    def torch_fwd(m, a):
        def f():
            with torch.inference_mode():
                return m(*a).sample

        return f

    def torch_fwd_bwd(m, a):
        def f():
            m.zero_grad(set_to_none=True)
            (m(*a).sample ** 2).mean().backward()

        return f

    out_j = np.asarray(fwd(params, *args))
    out_t = torch_fwd(torch_model, t_args)().numpy()
    max_diff = float(np.abs(out_j - out_t).max())
    impl = attention_implementation(attention, jnp.float32, 0)
    print(
        f"[{name}] {n_params:,} params, batch {batch}; JAX attention {attention} -> {impl}; "
        f"compile fwd {compile_fwd:.1f}s grad {compile_grad:.1f}s; max |JAX-torch| {max_diff:.1e}",
        flush=True,
    )
    fwd_stats = common.time_alternating(
        {
            "jax": lambda: jax.block_until_ready(fwd(params, *args)),
            "torch": torch_fwd(torch_model, t_args),
            "torch_channels_last": torch_fwd(torch_cl, t_args_cl),
        },
        repeats,
        warmup,
    )
    bwd_stats = common.time_alternating(
        {
            "jax": lambda: jax.block_until_ready(grad(params, *args)),
            "torch": torch_fwd_bwd(torch_model, t_args),
            "torch_channels_last": torch_fwd_bwd(torch_cl, t_args_cl),
        },
        repeats,
        warmup,
    )
    res = {
        "config": name,
        "attention": attention,
        "attention_resolved": impl,
        "params": n_params,
        "batch": batch,
        "latent": [cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]],
        "text": [seq, cfg["cross_attention_dim"]],
        "max_abs_diff_fwd": max_diff,
        "jax_compile_fwd_s": round(compile_fwd, 2),
        "jax_compile_fwd_bwd_s": round(compile_grad, 2),
        "fwd": fwd_stats,
        "fwd_bwd": bwd_stats,
    }
    for key, stats in (("fwd", fwd_stats), ("fwd_bwd", bwd_stats)):
        best = min(("torch", "torch_channels_last"), key=lambda k: stats[k]["median_s"])
        res[f"{key}_torch_best"] = best
        res[f"{key}_ratio_jax_over_torch"] = stats["jax"]["median_s"] / stats[best]["median_s"]
        res[f"{key}_cpu_ratio_jax_over_torch"] = (
            stats["jax"]["cpu_median_s"] / stats[best]["cpu_median_s"]
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small,demo")
    ap.add_argument("--attention", default="auto", help="JAX attention choices to time")
    ap.add_argument("--batch", type=int, default=0, help="0 = each config's own batch")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = one per core")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()
    torch_setup = common.setup_torch(a.torch_threads)
    load_before = os.getloadavg()
    results = [
        run(n, att, a.batch, a.repeats, a.warmup)
        for n in a.configs.split(",")
        for att in a.attention.split(",")
    ]
    load_after = os.getloadavg()
    meta = {
        **common.environment(),
        **torch_setup,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "repeats": a.repeats,
        "warmup": a.warmup,
    }
    common.write_json(a.out, {"meta": meta, "results": results})
    header = ["config", "attention", "params", "B", "fwd JAX ms", "fwd torch ms", "ratio"]
    header += ["cpu ratio", "fwd+bwd JAX ms", "fwd+bwd torch ms", "ratio", "cpu ratio"]
    rows = []
    for r in results:
        row = [r["config"], f"{r['attention']}->{r['attention_resolved']}", f"{r['params']:,}"]
        row.append(str(r["batch"]))
        for key in ("fwd", "fwd_bwd"):
            best = r[f"{key}_torch_best"]
            tag = " (cl)" if best == "torch_channels_last" else ""
            row += [common.fmt_ms(r[key]["jax"]), common.fmt_ms(r[key][best]) + tag]
            row.append(f"{r[f'{key}_ratio_jax_over_torch']:.2f}")
            row.append(f"{r[f'{key}_cpu_ratio_jax_over_torch']:.2f}")
        rows.append(row)
    common.print_table(header, rows)
    print(
        "median ±IQR/2 over alternating runs; ratio = JAX / the faster PyTorch memory format "
        "((cl) = channels_last); lower is better for JAX; cpu ratio = the same for process CPU "
        "time (a proxy for work when the machine is shared: run with --torch-threads 1 then)"
    )
    print(
        f"{meta['cpu_model']}, {meta['cores']} cores, torch threads {meta['torch_threads']}, "
        f"XLA_FLAGS={meta['xla_flags']!r}"
    )
    faults = "; ".join(
        f"{r['config']} fwd+bwd JAX {r['fwd_bwd']['jax']['minor_faults_median']:.0f}, PyTorch "
        f"{r['fwd_bwd'][r['fwd_bwd_torch_best']]['minor_faults_median']:.0f}"
        for r in results
    )
    print(
        f"minor page faults per call (median): {faults}; malloc keeps freed memory: "
        f"{meta['host_memory_keep_freed']}"
    )
    print(common.load_note(load_before, load_after, meta["cores"]) + f"; written to {a.out}")


if __name__ == "__main__":
    main()
