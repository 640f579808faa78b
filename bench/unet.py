"""Flax UNet vs diffusers PyTorch UNet: forward and forward+backward time on this machine.

Same config, same weights (the diffusers model's, loaded through load_unet), same batch. JAX is
jitted (compile time reported separately, excluded); PyTorch runs eagerly in fp32 with its
default thread count. Forward+backward is the gradient of mean(out**2) w.r.t. all parameters.
Median of --runs timed runs after --warmup untimed ones.

    python bench/unet.py [--configs tiny,small] [--attention auto,chunked] [--batch 4]
                         [--runs 10] [--warmup 2] [--torch-threads N] [--out PATH]

On a CPU shared with other jobs PyTorch's OpenMP threads suffer most (spin-waiting); the JSON
records the load average so such runs can be recognised.

Configs: "tiny" = presets.tiny_unet_config("sd15") at 8x8 latents; "small" = SD1.5 block
structure with block_out_channels (64, 128, 256), layers_per_block 2, 32x32 latents, 77 text
tokens of width 128. Writes bench/results/unet.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from bdpo_jax.models import load_unet, tiny_unet_config  # noqa: E402
from tests.unet_fixtures import random_diffusers_unet, unet_inputs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "unet.json")


def bench_config(name: str) -> tuple[dict, int]:
    """(diffusers config, text length) of a named benchmark config."""
    if name == "tiny":
        return tiny_unet_config("sd15", sample_size=8), 8
    if name == "small":
        cfg = tiny_unet_config("sd15", sample_size=32, cross_attention_dim=128)
        cfg.update(
            block_out_channels=[64, 128, 256],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            layers_per_block=2,
            attention_head_dim=4,
            norm_num_groups=32,
        )
        return cfg, 77
    raise SystemExit(f"--configs: unknown config {name!r} (tiny, small)")


def median_ms(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def run(name: str, attention: str, batch: int, runs: int, warmup: int) -> dict:
    cfg, seq = bench_config(name)
    torch_model = random_diffusers_unet(cfg, seed=0, std=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = load_unet(tmp, attention=attention)
    x = unet_inputs(cfg, batch=batch, seq=seq, seed=1)
    args = (x["sample"], x["timesteps"], x["context"])
    t_args = tuple(torch.from_numpy(np.asarray(a)) for a in args)
    n_params = sum(p.numel() for p in torch_model.parameters())

    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    grad = jax.jit(jax.grad(lambda p, *a: jnp.mean(model.apply({"params": p}, *a) ** 2)))
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(params, *args))
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params, *args))
    compile_grad = time.perf_counter() - t0
    print(
        f"[{name}] {n_params:,} params; JAX compile fwd {compile_fwd:.1f}s grad {compile_grad:.1f}s"
    )

    def torch_fwd():
        with torch.no_grad():
            return torch_model(*t_args).sample

    def torch_fwd_bwd():
        torch_model.zero_grad(set_to_none=True)
        (torch_model(*t_args).sample ** 2).mean().backward()

    res = {
        "config": name,
        "attention": attention,
        "params": n_params,
        "batch": batch,
        "latent": cfg["sample_size"],
        "jax_compile_fwd_s": round(compile_fwd, 2),
        "jax_compile_fwd_bwd_s": round(compile_grad, 2),
        "jax_fwd_ms": median_ms(lambda: jax.block_until_ready(fwd(params, *args)), runs, warmup),
        "torch_fwd_ms": median_ms(torch_fwd, runs, warmup),
        "jax_fwd_bwd_ms": median_ms(
            lambda: jax.block_until_ready(grad(params, *args)), runs, warmup
        ),
        "torch_fwd_bwd_ms": median_ms(torch_fwd_bwd, runs, warmup),
    }
    res["fwd_ratio_jax_over_torch"] = res["jax_fwd_ms"] / res["torch_fwd_ms"]
    res["fwd_bwd_ratio_jax_over_torch"] = res["jax_fwd_bwd_ms"] / res["torch_fwd_bwd_ms"]
    print(f"[{name}/{attention}] done: {json.dumps({k: v for k, v in res.items() if 'ms' in k})}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--attention", default="auto,chunked", help="JAX attention choices to time")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    results = [
        run(n, att, a.batch, a.runs, a.warmup)
        for n in a.configs.split(",")
        for att in a.attention.split(",")
    ]
    meta = {
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "jax": jax.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": a.runs,
        "warmup": a.warmup,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    head = f"{'config':7} {'attention':9} {'params':>10} {'B':>2} {'HxW':>5} | "
    head += f"{'fwd ms JAX':>10} {'torch':>8} "
    head += f"{'ratio':>5} | {'fwd+bwd JAX':>11} {'torch':>8} {'ratio':>5}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['config']:7} {r['attention']:9} {r['params']:>10,} {r['batch']:>2} "
            f"{r['latent']:>2}x{r['latent']:<2} | "
            f"{r['jax_fwd_ms']:>10.1f} {r['torch_fwd_ms']:>8.1f} "
            f"{r['fwd_ratio_jax_over_torch']:>5.2f} | {r['jax_fwd_bwd_ms']:>11.1f} "
            f"{r['torch_fwd_bwd_ms']:>8.1f} {r['fwd_bwd_ratio_jax_over_torch']:>5.2f}"
        )
    print(
        f"ratio = JAX time / PyTorch time (lower is better for JAX); {meta['device']}, "
        f"load avg {meta['load_avg_1m_at_end']:.1f}; written to {a.out}"
    )


if __name__ == "__main__":
    main()
