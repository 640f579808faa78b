"""DPO train step: the JAX trainer's jitted step vs a PyTorch reference step, same weights/batch.

    python bench/train_step.py [--configs tiny small demo] [--steps 15] [--warmup 3]

PyTorch reference = the Diffusion-DPO authors' recipe (SalesforceAIResearch/DiffusionDPO
train.py): diffusers UNet2DConditionModel with the same weights (written by save_unet, read by
from_pretrained), policy on the 2B batch, reference under no_grad, mse over C,H,W, -logsigmoid
loss, clip_grad_norm_(1.0), torch.optim.AdamW, set up for speed on CPU (bench/common.py:
denormals flushed, one thread per core). JAX = the trainer's step with the package defaults
(fp32 here). Both steps run in one process, ALTERNATELY, after --warmup untimed steps each
(JAX's compile is timed separately); median and IQR of --steps timed steps. Memory: XLA's
compiled memory analysis for the JAX step and the process's peak RSS (both frameworks).
Writes bench/results/train_step.json and prints a table.

Configs: "tiny" (tiny SD1.5 UNet, 8 pairs, 4x8x8 latents), "small" (the 17.8M-parameter UNet of
bench/unet.py, 4 pairs, 4x16x16), "demo" (the demo's UNet and DPO batch: 8 pairs of 32x32 RGB
images unshuffled to 12x16x16, 16 MiniLM tokens of width 384; same loss as the others, epsilon
prediction).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bdpo_demo import model as demo_model  # noqa: E402
from bench import common  # noqa: E402
from configs import demo  # noqa: E402

DEMO = demo.get_config().demo  # the demo's UNet: channels, pixel fold, plain levels
_DEMO_UNET = demo_model.unet_config_for(DEMO)  # its latent channels and side

# name -> (unet overrides or "demo", latent channels, latent side, text shape, pairs per step)
CONFIGS = {
    "tiny": ({}, 4, 8, (8, 32), 8),
    "small": (common.SMALL_UNET, 4, 16, (16, 64), 4),
    "demo": ("demo", _DEMO_UNET["in_channels"], _DEMO_UNET["sample_size"], (16, 384), 8),
}
BETA = 500.0


def _unet_config(name: str) -> dict:
    from bdpo_jax.models import presets

    overrides, channels, side, text_shape, _ = CONFIGS[name]
    if overrides == "demo":
        return demo_model.unet_config_for(DEMO, cross_attention_dim=text_shape[1])
    cfg = presets.tiny_unet_config("sd15", sample_size=side, cross_attention_dim=text_shape[1])
    cfg.update(overrides)
    return cfg


def _batch(name: str):
    import numpy as np

    _, channels, side, (length, width), pairs = CONFIGS[name]
    rng = np.random.default_rng(0)

    def moments():
        return common.random_moments(rng, pairs, channels, side, np.float16)

    return {
        "moments_0": moments(),
        "moments_1": moments(),
        "text_embeds": rng.standard_normal((pairs, length, width)).astype(np.float16),
        "scores": rng.standard_normal((pairs, 4, 2)).astype(np.float32),
        "votes": np.ones((pairs, 4), np.int8),
        "label": rng.choice([-1, 1], pairs).astype(np.int8),
        "margin": np.full((pairs,), 4, np.int8),
        "human_label": np.ones((pairs,), np.float32),
    }


def _config(name: str):
    from configs import tiny

    config = tiny.get_config()
    config.mesh.shape = (1, 1)
    config.dpo.proportion_empty_prompts = 0.0
    config.optim.warmup_steps = 0
    config.train.global_batch_size = CONFIGS[name][4]
    return config


def make_jax(name: str, weights_dir: str) -> tuple:
    """(step callable, info): the trainer's compiled step; writes the weights torch loads."""
    import jax
    import numpy as np

    from bdpo_jax import host_memory, sharding, train, train_state
    from bdpo_jax.models import UNet2DConditionModel, save_unet

    config = _config(name)
    model = UNet2DConditionModel.from_config(_unet_config(name))
    _, channels, side, text_shape, _ = CONFIGS[name]
    info = common.synthetic_info((channels, side, side), text_shape)
    config.dpo.beta = BETA
    step_fn, tx, consts = train.make_train_step(config, info, model)
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    inits = train_state.make_initializers(model, tx, mesh, (), 2**18)
    state = inits.init_random(jax.random.PRNGKey(0))
    save_unet(model, jax.device_get(state.params), weights_dir)  # the torch side loads these
    consts = jax.device_put(consts, sharding.replicated(mesh))
    batch = sharding.to_global_batch(_batch(name), sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    step = train.jit_train_step(step_fn, inits.shardings, mesh)
    compiled = step.lower(state, batch, consts).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = None
    if mem is not None:
        xla_bytes = int(
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
    holder = {"state": state, "losses": []}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, consts)
        holder["losses"].append(float(metrics["loss"]))  # blocks

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    host_memory.keep_freed_memory(4 * n_params)  # as the trainer does
    return step, {
        "compile_s": compile_s,
        "xla_step_bytes": xla_bytes,
        "losses": holder["losses"],
        "params": n_params,
    }


def make_torch(name: str, weights_dir: str) -> tuple:
    """(step callable, info): the Diffusion-DPO authors' step on the same weights and batch."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(weights_dir).train()
    ref = UNet2DConditionModel.from_pretrained(weights_dir).eval().requires_grad_(False)
    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
    )
    opt = torch.optim.AdamW(
        unet.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2
    )
    b = {k: torch.from_numpy(np.asarray(v)) for k, v in _batch(name).items()}
    label = b["label"].float()
    losses = []

    def latents(m):
        m = m.float()
        mean, logvar = m[:, 0], m[:, 1].clamp(-30, 20)
        return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215

    def step():
        x1, x2 = latents(b["moments_0"]), latents(b["moments_1"])
        noise = torch.randn_like(x1).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (x1.shape[0],)).repeat(2)
        x0 = torch.cat([x1, x2])
        noisy = sched.add_noise(x0, noise, t)
        text = b["text_embeds"].float().repeat(2, 1, 1)
        pred = unet(noisy, t, text).sample
        model_losses = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        m1, m2 = model_losses.chunk(2)
        with torch.no_grad():
            ref_losses = (ref(noisy, t, text).sample - noise).pow(2).mean(dim=[1, 2, 3])
            r1, r2 = ref_losses.chunk(2)
        inside = -0.5 * BETA * label * ((m1 - m2) - (r1 - r2))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    return step, {"losses": losses}


def run(name: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as weights:
        jax_step, jax_info = make_jax(name, weights)  # writes the weights
        torch_step, torch_info = make_torch(name, weights)
    stats = common.time_alternating({"jax": jax_step, "torch": torch_step}, steps, warmup)
    _, channels, side, text_shape, pairs = CONFIGS[name]
    print(f"[{name}] done, JAX compile {jax_info['compile_s']:.1f}s", flush=True)
    return {
        "config": name,
        "pairs": pairs,
        "params": jax_info["params"],
        "latent": [channels, side, side],
        "text": list(text_shape),
        "jax": {**stats["jax"], **jax_info},
        "torch": {**stats["torch"], **torch_info},
        "time_ratio_jax_over_torch": stats["jax"]["median_s"] / stats["torch"]["median_s"],
        "cpu_ratio_jax_over_torch": stats["jax"]["cpu_median_s"] / stats["torch"]["cpu_median_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=15, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per framework")
    parser.add_argument("--torch-threads", type=int, default=0, help="0 = one per core")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "train_step.json"))
    args = parser.parse_args()
    for name in args.configs:
        if name not in CONFIGS:
            parser.error(f"--configs: unknown config {name!r} ({', '.join(CONFIGS)})")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    torch_setup = common.setup_torch(args.torch_threads)
    load_before = os.getloadavg()
    results = [run(name, args.steps, args.warmup) for name in args.configs]
    load_after = os.getloadavg()
    meta = {
        **common.environment(),
        **torch_setup,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    common.write_json(args.out, {"meta": meta, "results": results})
    header = ["config", "params", "pairs", "JAX step ms", "PyTorch step ms", "JAX/PyTorch"]
    header.append("CPU-time ratio")
    header.append("XLA step buffers (MB)")
    rows = []
    for r in results:
        xla = r["jax"]["xla_step_bytes"]
        rows.append(
            [
                r["config"],
                f"{r['params']:,}",
                str(r["pairs"]),
                common.fmt_ms(r["jax"]),
                common.fmt_ms(r["torch"]),
                f"{r['time_ratio_jax_over_torch']:.2f}",
                f"{r['cpu_ratio_jax_over_torch']:.2f}",
                f"{xla / 2**20:.1f}" if xla else "n/a",
            ]
        )
    common.print_table(header, rows)
    print(
        "median ±IQR/2 over alternating steps; lower JAX/PyTorch is better for JAX; CPU-time "
        "ratio: the same for process CPU time (a proxy for work on a shared machine: run with "
        "--torch-threads 1 then)"
    )
    print(
        f"{meta['cpu_model']}, {meta['cores']} cores, torch threads {meta['torch_threads']}, "
        f"XLA_FLAGS={meta['xla_flags']!r}, peak RSS {meta['peak_rss_mb_process']:.0f} MB"
    )
    faults = "; ".join(
        f"{r['config']} JAX {r['jax']['minor_faults_median']:.0f}, PyTorch "
        f"{r['torch']['minor_faults_median']:.0f}"
        for r in results
    )
    print(
        f"minor page faults per step (median): {faults}; malloc keeps freed memory: "
        f"{meta['host_memory_keep_freed']}"
    )
    print(common.load_note(load_before, load_after, meta["cores"]) + f"; written to {args.out}")


if __name__ == "__main__":
    main()
