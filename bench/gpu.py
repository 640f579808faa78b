"""One-GPU benchmark: the SD1.5 512 px (and SDXL 1024 px) DPO step, JAX vs the authors' PyTorch.

    python bench/gpu.py                         # on the GPU machine: sd15, then sdxl if it fits
    python bench/gpu.py --models sd15 --steps 20 --batches 8 16 32 64
    python bench/gpu.py --tiny                  # CPU, tiny UNet: what tests/test_bench_gpu.py runs

JAX: the trainer's own step (`train.make_train_step` + `train.jit_train_step`, state donated) of
configs/sd15.py (configs/sdxl.py) on one device: random init, 64x64 (128x128) latents, bf16
compute, attention 'auto' (models/attention.gpu_attention: cuDNN flash attention through
jax.nn.dot_product_attention for self-attention, its XLA path for the 77-token cross-attention,
whose odd length jax 0.10's cuDNN attention refuses to differentiate),
remat as in the config, the default DPO recipe (config.dpo.matched_forward), the config's
optimizer. Batch search: each candidate global batch (pairs) is compiled and XLA's memory
analysis checked against the device's bytes_limit; the largest that fits (then runs) is used.
Reports the median step time, pairs/s, MFU = XLA's compiled.cost_analysis()['flops'] per step /
step time / the device's dense bf16 peak (PEAK_BF16_FLOPS, keyed on device_kind, with its source)
and the peak memory (device.memory_stats()['peak_bytes_in_use']).

PyTorch reference (SalesforceAIResearch/DiffusionDPO train.py): diffusers UNet2DConditionModel
of the same config (its own random init), fp32 params, fp16 autocast with a GradScaler (bf16
autocast on CPU), SDPA attention (diffusers' default AttnProcessor2_0), gradient checkpointing
when the config remats, the policy on the 2B batch [image 1; image 2] with grad, the reference
(a frozen copy) under no_grad, mse over C,H,W, -logsigmoid(-beta/2 (model_diff - ref_diff)),
clip_grad_norm_(1.0), AdamW (Adafactor configs: AdamW too, noted in the JSON). Same batch
size as JAX (halved until it fits when it does not). After warm-up the two steps alternate,
--steps times each. Writes bench/results/gpu.json and prints a table.

The GPU machine has jax[cuda], flax, optax, orbax-checkpoint, torch and transformers and NO
network. Extra wheels (pure Python unless noted), fetched here:

    pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 -d .whl \
        diffusers==0.42.1 ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 \
        cloudpickle==3.1.3 portpicker==1.6.0 importlib-metadata==10.2.0 zipp==4.1.2 \
        pillow==13.0.0 tensorboardX==2.6.5
    (grain, array-record and pillow are binary wheels: the platform tag matters; the rest are
    py3-none-any. diffusers' other needs, huggingface-hub, safetensors, regex, requests,
    filelock and numpy, come with transformers; PyYAML, absl-py, etils, protobuf and psutil with
    it and orbax-checkpoint.)

copied there and installed without the network:

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python bench/gpu.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402

# dense bf16 tensor-core peak FLOP/s per device (no sparsity), matched on device_kind substrings
PEAK_BF16_FLOPS = {
    "A100": (312e12, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (dense)"),
    "H100 PCIe": (756e12, "NVIDIA H100 datasheet: PCIe BF16 Tensor Core 1,513 TFLOPS sparse / 2"),
    "H100": (989e12, "NVIDIA H100 datasheet: SXM BF16 Tensor Core 1,979 TFLOPS sparse / 2"),
    "H200": (989e12, "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS sparse / 2"),
}
MODELS = {  # name -> (config module, latent side, text shape, pooled dim); tiny: --tiny
    "sd15": ("sd15", 64, (77, 768), 0),
    "sdxl": ("sdxl", 128, (77, 2048), 1280),
    "tiny": ("sd15", 8, (8, 32), 0),
}
BATCHES = (4, 8, 16, 32, 64, 128)  # candidate global batches (pairs)


def peak_flops(device_kind: str) -> tuple[float | None, str]:
    for key, (flops, source) in PEAK_BF16_FLOPS.items():  # 'H100 PCIe' before 'H100'
        if key in device_kind:
            return flops, source
    return None, f"no bf16 peak known for device_kind {device_kind!r}: MFU not computed"


def _unet_config(name: str) -> dict:
    from bdpo_jax.models import presets

    if name == "tiny":
        return dict(presets.tiny_unet_config("sd15", sample_size=8, cross_attention_dim=32))
    return dict(presets.real_unet_config(name))


def _config(name: str, attention: str):
    import importlib

    config = importlib.import_module(f"configs.{MODELS[name][0]}").get_config()
    config.model.pretrained = ""
    config.model.attention = attention
    config.model.compute_dtype = "bfloat16"
    config.dpo.proportion_empty_prompts = 0.0
    config.optim.warmup_steps = 0
    config.mesh.shape = (1, 1)
    return config


def _info(name: str):
    _, side, text, pooled = MODELS[name]
    return common.synthetic_info((4, side, side), text, pooled)


def make_batch(name: str, pairs: int, seed: int = 0) -> dict:
    """A host batch of `pairs` pairs in the shards' layout (random latents, text, votes)."""
    import numpy as np

    _, side, (length, width), pooled = MODELS[name]
    rng = np.random.default_rng(seed)

    def moments():
        return common.random_moments(rng, pairs, 4, side, np.float16)

    batch = {
        "moments_0": moments(),
        "moments_1": moments(),
        "text_embeds": rng.standard_normal((pairs, length, width)).astype(np.float16),
        "scores": rng.standard_normal((pairs, 4, 2)).astype(np.float32),
        "votes": rng.choice(np.array([-1, 1], np.int8), (pairs, 4)),
        "label": rng.choice(np.array([-1, 1], np.int8), pairs),
        "margin": np.full((pairs,), 4, np.int8),
        "human_label": np.ones((pairs,), np.float32),
    }
    if pooled:
        batch["pooled_text_embeds"] = rng.standard_normal((pairs, pooled)).astype(np.float16)
        batch["add_time_ids"] = np.tile(
            np.array([[8 * side, 8 * side, 0, 0, 8 * side, 8 * side]], np.float32), (pairs, 1)
        )
    return batch


class JaxStep:
    """The trainer's step of `name` at `pairs` pairs: compiled, its state initialised."""

    def __init__(self, name: str, pairs: int, attention: str):
        import jax

        from bdpo_jax import schema, sharding, train, train_state
        from bdpo_jax.models import UNet2DConditionModel

        config = _config(name, attention)
        config.train.global_batch_size = pairs
        info = _info(name)
        cfg = _unet_config(name)
        model = UNet2DConditionModel.from_config(
            cfg, dtype=jax.numpy.bfloat16, remat=bool(config.model.remat), attention=attention
        )
        step_fn, tx, consts = train.make_train_step(config, info, model)
        self.mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
        self.inits = train_state.make_initializers(model, tx, self.mesh, (), 2**18)
        self.consts = jax.device_put(consts, sharding.replicated(self.mesh))
        host = make_batch(name, pairs)
        self.batch = sharding.to_global_batch(
            {k: host[k] for k in schema.BATCH_FIELDS if k in host},
            sharding.batch_sharding(self.mesh),
        )
        self.config, self.unet_cfg, self.host_batch = config, cfg, host
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.inits.abstract,
            self.inits.shardings,
        )
        t0 = time.perf_counter()
        jit_step = train.jit_train_step(step_fn, self.inits.shardings, self.mesh)
        self.compiled = jit_step.lower(abstract, self.batch, self.consts).compile()
        self.compile_seconds = time.perf_counter() - t0
        ma = self.compiled.memory_analysis()
        self.xla_peak_bytes = int(
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes
        )
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        self.flops = float(cost.get("flops", 0.0)) if cost else 0.0
        self.state = None

    def init(self) -> None:
        import jax

        self.state = self.inits.init_random(jax.random.PRNGKey(0))
        jax.block_until_ready(self.state)

    def step(self) -> float:
        import jax

        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch, self.consts)
        loss = float(jax.device_get(metrics["loss"]))  # syncs
        if loss != loss:
            raise FloatingPointError("JAX step: non-finite loss")
        return time.perf_counter() - t0


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def search_jax(name: str, batches, attention: str) -> tuple[JaxStep | None, list[dict]]:
    """The largest candidate batch whose compiled step fits the device and runs a step."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    tried, best = [], None
    for pairs in sorted(batches):
        row = {"pairs": pairs}
        try:
            step = JaxStep(name, pairs, attention)
            row.update(xla_peak_bytes=step.xla_peak_bytes, compile_seconds=step.compile_seconds)
            if limit and step.xla_peak_bytes > limit:
                row["fits"] = False
                tried.append(row)
                break
            if best is not None:
                best.state = None  # free the smaller run's state first
            step.init()
            step.step()
            row["fits"] = True
            tried.append(row)
            best = step
        except Exception as error:  # XLA raises XlaRuntimeError / ValueError on OOM
            if not _is_oom(error):
                raise
            row.update(fits=False, error=str(error).splitlines()[0][:200])
            tried.append(row)
            break
    if best is not None and best.state is None:
        best.init()
    return best, tried


class TorchStep:
    """The authors' step in PyTorch on the same batch (their recipe, see the module docstring)."""

    def __init__(self, name: str, unet_cfg: dict, host_batch: dict, beta: float, remat: bool):
        import copy

        import diffusers
        import numpy as np
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        dev = torch.device("cuda" if self.cuda else "cpu")
        self.dev, self.beta = dev, beta
        cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
        self.unet = diffusers.UNet2DConditionModel.from_config(cfg).to(dev)
        if remat:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.ref = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.unet.parameters(), lr=1e-8, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        self.amp_dtype = torch.float16 if self.cuda else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda else None
        scale = 0.18215
        b = host_batch["moments_0"].shape[0]
        x0 = np.concatenate([host_batch["moments_0"][:, 0], host_batch["moments_1"][:, 0]])
        self.x0 = torch.tensor(x0.astype(np.float32) * scale, device=dev)
        self.text = torch.tensor(
            np.concatenate([host_batch["text_embeds"]] * 2).astype(np.float32), device=dev
        )
        self.added = None
        if "pooled_text_embeds" in host_batch:
            self.added = {
                "text_embeds": torch.tensor(
                    np.concatenate([host_batch["pooled_text_embeds"]] * 2).astype(np.float32),
                    device=dev,
                ),
                "time_ids": torch.tensor(
                    np.concatenate([host_batch["add_time_ids"]] * 2), device=dev
                ),
            }
        self.b = b
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.acp = torch.cumprod(1 - betas, 0).float().to(dev)
        self.gen = torch.Generator(device=dev).manual_seed(0)

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def step(self) -> float:
        torch, b = self.torch, self.b
        self._sync()
        t0 = time.perf_counter()
        noise = torch.randn(self.x0[:b].shape, generator=self.gen, device=self.dev).repeat(
            2, 1, 1, 1
        )
        t = torch.randint(0, 1000, (b,), generator=self.gen, device=self.dev).repeat(2)
        a = self.acp[t].sqrt()[:, None, None, None]
        s = (1 - self.acp[t]).sqrt()[:, None, None, None]
        xt = a * self.x0 + s * noise
        kw = {} if self.added is None else {"added_cond_kwargs": self.added}
        with torch.autocast(self.dev.type, dtype=self.amp_dtype):
            pred = self.unet(xt, t, self.text, **kw).sample
            with torch.no_grad():
                ref = self.ref(xt, t, self.text, **kw).sample
        err = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        ref_err = ((ref.float() - noise) ** 2).mean(dim=(1, 2, 3))
        diff = (err[:b] - err[b:]) - (ref_err[:b] - ref_err[b:])
        loss = -torch.nn.functional.logsigmoid(-0.5 * self.beta * diff).mean()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        if not torch.isfinite(loss):
            raise FloatingPointError("torch step: non-finite loss")
        return time.perf_counter() - t0


def make_torch(name: str, jax_step: JaxStep) -> tuple[TorchStep | None, int, str]:
    """The torch step at the JAX batch, halved while it runs out of memory."""
    import torch

    pairs = jax_step.host_batch["moments_0"].shape[0]
    while pairs >= 1:
        try:
            step = TorchStep(
                name,
                jax_step.unet_cfg,
                make_batch(name, pairs),
                float(jax_step.config.dpo.beta),
                bool(jax_step.config.model.remat),
            )
            step.step()
            return step, pairs, ""
        except torch.OutOfMemoryError as error:
            note = f"torch OOM at {pairs} pairs: {str(error).splitlines()[0][:120]}"
            step = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pairs //= 2
    return None, 0, note


def bench_model(name: str, batches, steps: int, warmup: int, with_torch: bool) -> dict:
    import jax

    on_gpu = jax.default_backend() == "gpu"
    attention = "auto" if on_gpu else "xla"  # on GPU: cuDNN where it can differentiate
    device = jax.devices()[0]
    jstep, tried = search_jax(name, batches, attention)
    out = {"model": name, "batch_search": tried, "attention": attention}
    if jstep is None:
        out["jax"] = None
        return out
    pairs = jstep.host_batch["moments_0"].shape[0]
    tstep, tpairs, note = (None, 0, "skipped (--no-torch)")
    if with_torch:
        tstep, tpairs, note = make_torch(name, jstep)
    for _ in range(warmup):
        jstep.step()
        if tstep is not None:
            tstep.step()
    jt, tt = [], []
    for _ in range(steps):  # alternating
        jt.append(jstep.step())
        if tstep is not None:
            tt.append(tstep.step())
    j_s = statistics.median(jt)
    peak, source = peak_flops(device.device_kind)
    stats = device.memory_stats() or {}
    out["jax"] = {
        "pairs": pairs,
        "images": 2 * pairs,
        "step_seconds": j_s,
        "pairs_per_second": pairs / j_s,
        "flops_per_step": jstep.flops,
        "mfu": (jstep.flops / j_s / peak) if (peak and jstep.flops) else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "xla_peak_bytes": jstep.xla_peak_bytes,
        "compile_seconds": jstep.compile_seconds,
        "optimizer": jstep.config.optim.optimizer,
        "remat": bool(jstep.config.model.remat),
        "matched_forward": bool(jstep.config.dpo.matched_forward),
    }
    if tstep is None:
        out["torch"] = {"note": note}
    else:
        import torch

        t_s = statistics.median(tt)
        out["torch"] = {
            "pairs": tpairs,
            "step_seconds": t_s,
            "pairs_per_second": tpairs / t_s,
            "peak_bytes_in_use": torch.cuda.max_memory_allocated() if tstep.cuda else None,
            "autocast": str(tstep.amp_dtype).replace("torch.", ""),
            "optimizer": "adamw",
            "note": note,
        }
    out["peak_bf16_flops"], out["peak_source"] = peak, source
    del jstep, tstep
    return out


def format_table(result: dict) -> str:
    lines = [
        f"device: {result['device_kind']} ({result['backend']}); bf16 peak: "
        f"{result['models'][0].get('peak_source', '-') if result['models'] else '-'}",
        "| model | framework | pairs | step s | pairs/s | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for fw in ("jax", "torch"):
            r = m.get(fw) or {}
            if "step_seconds" not in r:
                lines.append(f"| {m['model']} | {fw} | - | - | - | - | {r.get('note', '')} |")
                continue
            mfu = r.get("mfu")
            peak = r.get("peak_bytes_in_use")
            lines.append(
                f"| {m['model']} | {fw} | {r['pairs']} | {r['step_seconds']:.3f} | "
                f"{r['pairs_per_second']:.2f} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"{'-' if peak is None else f'{peak / 2**30:.1f}'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=tuple(MODELS))
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on CPU (the test)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=os.path.join(REPO, "bench/results/gpu.json"))
    args = parser.parse_args(argv)
    import jax

    models = ["tiny"] if args.tiny else args.models
    batches = args.batches if not args.tiny else [b for b in args.batches if b <= 2] or [1, 2]
    device = jax.devices()[0]
    result = {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "jax_version": jax.__version__,
        "meta": common.environment(),  # machine, load, threads, versions, XLA flags
        "models": [],
    }
    for name in models:
        try:
            result["models"].append(
                bench_model(name, batches, args.steps, args.warmup, not args.no_torch)
            )
        except Exception as error:  # SDXL may not fit at all: record it, keep sd15's result
            if not _is_oom(error):
                raise
            result["models"].append({"model": name, "error": str(error).splitlines()[0][:300]})
        common.write_json(args.out, result)  # after each model: SDXL may still fail
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
