"""DPO train step: the JAX trainer's jitted step vs a PyTorch reference step, same weights/batch.

    python bench/train_step.py [--configs tiny small] [--steps 10]

PyTorch reference = the Diffusion-DPO authors' recipe (SalesforceAIResearch/DiffusionDPO
train.py): diffusers UNet2DConditionModel with the same weights (written by save_unet, read by
from_pretrained), policy on the 2B batch, reference under no_grad, mse over C,H,W, -logsigmoid
loss, clip_grad_norm_(1.0), torch.optim.AdamW. Each framework runs in its own subprocess so the
peak resident memory (ru_maxrss) is its own; JAX also reports XLA's compiled memory analysis.
Warm-up steps (compile) are excluded; the median step time is reported. fp32 on CPU.
Writes bench/results/train_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {  # name -> (unet overrides, latent side, text shape, pairs per step)
    "tiny": ({}, 8, (8, 32), 8),
    "small": (
        {
            "block_out_channels": [64, 128, 256],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "norm_num_groups": 32,
            "attention_head_dim": 4,
            "layers_per_block": 2,
        },
        16,
        (16, 64),
        4,
    ),
}
BETA = 500.0


def _unet_config(name: str) -> dict:
    from bdpo_jax.models import presets

    overrides, side, text_shape, _ = CONFIGS[name]
    cfg = presets.tiny_unet_config("sd15", sample_size=side, cross_attention_dim=text_shape[1])
    cfg.update(overrides)
    return cfg


def _batch(name: str):
    import numpy as np

    _, side, (length, width), pairs = CONFIGS[name]
    rng = np.random.default_rng(0)

    def moments():
        mean = rng.standard_normal((pairs, 1, 4, side, side)) / 0.18215
        return np.concatenate([mean, np.full_like(mean, -6.0)], axis=1).astype(np.float16)

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
    _, _, _, pairs = CONFIGS[name]
    config.train.global_batch_size = pairs
    return config


def run_jax(name: str, steps: int, weights_dir: str) -> dict:
    import jax
    import numpy as np

    from bdpo_jax import data, sharding, train, train_state
    from bdpo_jax.models import UNet2DConditionModel, save_unet

    config = _config(name)
    unet_cfg = _unet_config(name)
    model = UNet2DConditionModel.from_config(unet_cfg)
    _, side, text_shape, _ = CONFIGS[name]
    info = data.DatasetInfo(
        scorer_names=tuple(f"s{k}" for k in range(4)),
        latent_shape=(4, side, side),
        text_shape=text_shape,
        pooled_dim=None,
        views=1,
        vae_scaling_factor=0.18215,
        num_records=0,
        score_mean=np.zeros(4, np.float32),
        score_std=np.ones(4, np.float32),
        empty_text_embeds=np.zeros(text_shape, np.float16),
        empty_pooled_text_embeds=None,
    )
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
    times, losses = [], []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, consts)
        loss = float(metrics["loss"])  # blocks
        if i >= 2:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    xla_bytes = None
    if mem is not None:
        xla_bytes = int(
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
    return {
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "losses": losses,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "xla_step_bytes": xla_bytes,
    }


def run_torch(name: str, steps: int, weights_dir: str) -> dict:
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
        losses = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        m1, m2 = losses.chunk(2)
        with torch.no_grad():
            ref_losses = (ref(noisy, t, text).sample - noise).pow(2).mean(dim=[1, 2, 3])
            r1, r2 = ref_losses.chunk(2)
        inside = -0.5 * BETA * label * ((m1 - m2) - (r1 - r2))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = [], []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        losses.append(step())
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.median(times),
        "losses": losses,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def _child(framework: str, name: str, steps: int, weights_dir: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        framework,
        "--configs",
        name,
        "--steps",
        str(steps),
        "--weights",
        weights_dir,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{framework} {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", default="")
    parser.add_argument("--weights", default="")
    args = parser.parse_args()
    if args.child:
        fn = run_jax if args.child == "jax" else run_torch
        print(json.dumps(fn(args.configs[0], args.steps, args.weights)))
        return
    results = {"load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "configs": {}}
    for name in args.configs:
        with tempfile.TemporaryDirectory() as weights:
            jax_r = _child("jax", name, args.steps, weights)  # writes the weights
            torch_r = _child("torch", name, args.steps, weights)
        _, side, text_shape, pairs = CONFIGS[name]
        results["configs"][name] = {
            "pairs": pairs,
            "latent": [4, side, side],
            "text": list(text_shape),
            "jax": jax_r,
            "torch": torch_r,
            "time_ratio_jax_over_torch": jax_r["step_s"] / torch_r["step_s"],
        }
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    path = os.path.join(REPO, "bench", "results", "train_step.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"load average {results['load_average']}")
    print(
        "| config | pairs | JAX step (s) | PyTorch step (s) | JAX/PyTorch | JAX peak RSS (MB) | "
        "PyTorch peak RSS (MB) | XLA step buffers (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["configs"].items():
        xla = r["jax"]["xla_step_bytes"]
        print(
            f"| {name} | {r['pairs']} | {r['jax']['step_s']:.4f} | {r['torch']['step_s']:.4f} | "
            f"{r['time_ratio_jax_over_torch']:.2f} | {r['jax']['peak_rss_mb']:.0f} | "
            f"{r['torch']['peak_rss_mb']:.0f} | {xla / 2**20 if xla else float('nan'):.1f} |"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
