"""The DPO signal at policy == reference: how much of `inside` is rounding noise.

    PYTHONPATH=. python bench/dpo_signal.py                       # full SD1.5, 32x32 latents
    PYTHONPATH=. python bench/dpo_signal.py --model small --latent 16 --pairs 4

In exact arithmetic inside = -beta/2 * label * ((mse_w - mse_l) - (ref_w - ref_l)) is 0 when the
policy's params equal the reference's (step 0, after every 'copy' refresh); at beta 5000 an mse
gap of 1e-4 between the two programs already gives |inside| 0.25. For each compute dtype and
config.dpo.matched_forward setting this runs the trainer's own DPO loss (`train_step.dpo_mse` +
`loss.dpo_loss`) under value_and_grad (the gradient is kept alive, as in the step) with the
SAME params passed as policy and reference, and reports the distribution of |inside| over
pairs (median, p90, max), the implicit accuracy (share of inside > 0) and the loss+gradient
time (median of --repeats calls after one warm-up; the cost of the extra forward).
Random init (no weights), remat on, beta 5000, random +-1 labels, no prompt dropout.
Writes bench/results/dpo_signal.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402

BETA = 5000.0


def _unet_config(name: str, latent: int) -> tuple[dict, tuple[int, int]]:
    from bdpo_jax.models import presets

    if name == "sd15":
        return dict(presets.real_unet_config("sd15")), (77, 768)
    text = (8, 32) if name == "tiny" else (16, 64)
    cfg = presets.tiny_unet_config("sd15", sample_size=latent, cross_attention_dim=text[1])
    if name == "small":
        cfg.update(common.SMALL_UNET)
    return cfg, text


def _batch(pairs: int, latent: int, text: tuple[int, int], seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)

    def moments():
        return common.random_moments(rng, pairs, 4, latent, np.float32)

    batch = {
        "moments_0": moments(),
        "moments_1": moments(),
        "text_embeds": rng.standard_normal((pairs, *text)).astype(np.float32),
    }
    label = rng.choice([-1.0, 1.0], pairs).astype(np.float32)
    return batch, label


def measure(name: str, latent: int, pairs: int, batches: int, dtypes, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bdpo_jax import compile_options, schedules
    from bdpo_jax import loss as loss_lib
    from bdpo_jax import train_step as ts
    from bdpo_jax.models import UNet2DConditionModel, init_unet_params

    cfg, text = _unet_config(name, latent)
    schedule = schedules.make_schedule(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    consts = jax.tree.map(
        jnp.asarray,
        ts.make_consts(
            beta=BETA,
            weights_K=np.ones(1),
            score_std_K=np.ones(1),
            empty_text_embeds=np.zeros(text, np.float32),
            empty_pooled_text_embeds=None,
        ),
    )
    data = [_batch(pairs, latent, text, seed) for seed in range(batches)]
    rows, params = [], None
    for dtype in dtypes:
        model = UNet2DConditionModel.from_config(
            cfg, param_dtype=jnp.float32, dtype=jnp.dtype(dtype), remat=True
        )
        if params is None:
            params = jax.jit(lambda k, m=model: init_unet_params(m, k))(jax.random.PRNGKey(0))
        for matched in (False, True):

            def loss(p, r, mb, label, rng, model=model, matched=matched):
                err, ref = ts.dpo_mse(
                    p,
                    r,
                    mb,
                    rng,
                    consts,
                    model=model,
                    schedule=schedule,
                    prediction_type="epsilon",
                    vae_scaling_factor=0.18215,
                    proportion_empty_prompts=0.0,
                    matched_forward=matched,
                )
                b = pairs
                value, metrics = loss_lib.dpo_loss(
                    err[:b], err[b:], ref[:b], ref[b:], label, consts["beta"]
                )
                inside = -0.5 * consts["beta"] * label * ((err[:b] - err[b:]) - (ref[:b] - ref[b:]))
                return value, (metrics, jax.lax.stop_gradient(inside))

            @compile_options.jit  # as the trainer's step
            def step(p, r, mb, label, rng, loss=loss):
                (value, (metrics, inside)), grads = jax.value_and_grad(loss, has_aux=True)(
                    p, r, mb, label, rng
                )
                return value, inside, optax.global_norm(grads)

            t0 = time.perf_counter()
            compiled = step.lower(params, params, *data[0], jax.random.PRNGKey(0)).compile()
            compile_s = time.perf_counter() - t0
            insides, times = [], []
            for i, (mb, label) in enumerate(data):
                out = compiled(params, params, mb, label, jax.random.PRNGKey(i))
                jax.block_until_ready(out)
                insides.append(np.asarray(out[1]))
                assert np.isfinite(float(out[2])), "non-finite gradient"
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(params, params, *data[0], jax.random.PRNGKey(0)))
                times.append(time.perf_counter() - t0)
            a = np.abs(np.concatenate(insides))
            rows.append(
                {
                    "model": name,
                    "latent": latent,
                    "pairs": pairs * batches,
                    "compute_dtype": jnp.dtype(dtype).name,
                    "matched_forward": matched,
                    "abs_inside_median": float(np.median(a)),
                    "abs_inside_p90": float(np.percentile(a, 90)),
                    "abs_inside_max": float(a.max()),
                    "implicit_accuracy": float(np.mean(np.concatenate(insides) > 0)),
                    "loss_grad_seconds": statistics.median(times) if times else None,
                    "compile_seconds": compile_s,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del compiled
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| model | dtype | matched_forward | median abs(inside) | p90 | max | impl. acc. "
        "| loss+grad s |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        t = r["loss_grad_seconds"]
        lines.append(
            f"| {r['model']} {r['latent']}x{r['latent']} | {r['compute_dtype']} | "
            f"{r['matched_forward']} | {r['abs_inside_median']:.3g} | {r['abs_inside_p90']:.3g} "
            f"| {r['abs_inside_max']:.3g} | {r['implicit_accuracy']:.2f} | "
            f"{'-' if t is None else f'{t:.3f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["sd15"], choices=("sd15", "small", "tiny"))
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per setting")
    parser.add_argument("--out", default=os.path.join(REPO, "bench/results/dpo_signal.json"))
    args = parser.parse_args()
    meta = {**common.environment(), "load_avg_before": os.getloadavg()}
    rows = []
    for name in args.model:
        rows += measure(name, args.latent, args.pairs, args.batches, args.dtypes, args.repeats)
    meta["load_avg_after"] = os.getloadavg()
    print(format_table(rows))
    common.write_json(args.out, {"meta": meta, "beta": BETA, "rows": rows})


if __name__ == "__main__":
    main()
