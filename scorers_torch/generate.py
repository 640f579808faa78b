"""Image generation backends for the evaluation: a `Generator` protocol and the diffusers backend.

A generator turns (prompt, seed) pairs into PIL images; the image of a pair depends only on
its prompt and seed (one torch.Generator per image), so batching and resuming do not change it
and every model sees the same seeds. Backends are registered by name in `GENERATORS`; a plugin
module (e.g. the demo's JAX sampler) registers its own with `@GENERATORS.register("name")`.
A factory is called as `factory(path, **model_options, **settings)` where `settings` holds the
shared sampling settings (scheduler, steps, guidance, resolution, dtype, device, batch_size).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import PIL.Image
from tqdm import tqdm

from bdpo_jax.schema import UserError
from scorers_torch.prompt_sets import Prompt
from scorers_torch.registry import Registry

log = logging.getLogger(__name__)

GENERATORS = Registry("generator")

SCHEDULERS = ("default", "ddim", "dpmpp", "euler")
DTYPES = ("auto", "fp32", "fp16", "bf16")


class GeneratorSettingsError(UserError, ValueError):
    """A generation setting (--scheduler, --dtype, --steps, --batch-size) out of range."""


class ModelFolderError(UserError, FileNotFoundError):
    """A local model folder (a `unet=` of --models) without the files a model needs."""


@runtime_checkable
class Generator(Protocol):
    """Makes one image per (prompt, seed) pair; `close()` (optional) frees its memory."""

    def generate(self, prompts: list[str], seeds: list[int]) -> list[PIL.Image.Image]: ...


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'mps' when available, else 'cpu'."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    """'auto' -> fp16 on CUDA, fp32 elsewhere; else fp32 / fp16 / bf16."""
    import torch

    if dtype not in DTYPES:
        raise GeneratorSettingsError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def make_scheduler(name: str, config: Any):
    """A diffusers scheduler from the pipeline's scheduler config: ddim, dpmpp (DPM-Solver++ 2M),
    euler, or 'default' (None: keep the pipeline's own)."""
    import diffusers

    if name == "default":
        return None
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "dpmpp":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        )
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    raise GeneratorSettingsError(f"--scheduler must be one of {SCHEDULERS}, got {name!r}")


def _dtype_kwarg(dtype) -> dict[str, Any]:
    """{"dtype": dtype} for diffusers versions that renamed torch_dtype, else {"torch_dtype"}."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype" if renamed else "torch_dtype": dtype}


def _load_unet(unet: str, dtype):
    """A UNet from a folder (with or without a `unet/` subfolder) or a hub id (tries `unet/`)."""
    import diffusers

    path = Path(unet)
    if path.exists():
        if (path / "unet" / "config.json").exists():
            return diffusers.UNet2DConditionModel.from_pretrained(
                path, subfolder="unet", **_dtype_kwarg(dtype)
            )
        if (path / "config.json").exists():
            return diffusers.UNet2DConditionModel.from_pretrained(path, **_dtype_kwarg(dtype))
        raise ModelFolderError(f"UNet folder {path} has neither config.json nor unet/config.json")
    try:  # public Diffusion-DPO repos such as mhdang/dpo-sd1.5-text2image-v1 keep it in unet/
        return diffusers.UNet2DConditionModel.from_pretrained(
            unet, subfolder="unet", **_dtype_kwarg(dtype)
        )
    except OSError:
        return diffusers.UNet2DConditionModel.from_pretrained(unet, **_dtype_kwarg(dtype))


class DiffusersGenerator:
    """A diffusers text-to-image pipeline, loaded on first use.

    `path` is a pipeline folder or hub id (the base, an exported folder, a public model);
    `unet` optionally replaces its UNet (a UNet-only repo such as a Diffusion-DPO checkpoint).
    """

    def __init__(
        self,
        path: str,
        *,
        unet: str | None = None,
        scheduler: str = "ddim",
        steps: int = 50,
        guidance: float = 7.5,
        resolution: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 4,
        negative_prompt: str | None = None,
        generator_device: str = "cpu",
    ):
        if scheduler not in SCHEDULERS:
            raise GeneratorSettingsError(
                f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}"
            )
        if dtype not in DTYPES:
            raise GeneratorSettingsError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        if steps < 1 or batch_size < 1:
            raise GeneratorSettingsError(
                f"steps ({steps}) and batch_size ({batch_size}) must be positive"
            )
        self.path, self.unet = path, unet
        self.scheduler, self.steps, self.guidance = scheduler, steps, guidance
        self.resolution, self.dtype, self.device = resolution, dtype, device
        self.batch_size, self.negative_prompt = batch_size, negative_prompt
        self.generator_device = generator_device
        self._pipe = None

    def load(self):
        """Load the pipeline now (done by the first `generate` otherwise)."""
        if self._pipe is not None:
            return self._pipe
        import diffusers

        device = resolve_device(self.device)
        torch_dtype = resolve_dtype(self.dtype, device)
        kwargs: dict[str, Any] = _dtype_kwarg(torch_dtype)
        if self.unet:
            kwargs["unet"] = _load_unet(self.unet, torch_dtype)
        log.info("loading pipeline %s (unet %s) on %s", self.path, self.unet, device)
        pipe = diffusers.DiffusionPipeline.from_pretrained(self.path, **kwargs)
        if getattr(pipe, "safety_checker", None) is not None:
            # Blacked-out images would be scored as images; evaluations run without it.
            pipe.safety_checker = None
        scheduler = make_scheduler(self.scheduler, pipe.scheduler.config)
        if scheduler is not None:
            pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(device)
        self._device = device
        return self._pipe

    def generate(self, prompts: list[str], seeds: list[int]) -> list[PIL.Image.Image]:
        """One image per (prompt, seed), in batches of `batch_size`."""
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        pipe = self.load()
        size = {"height": self.resolution, "width": self.resolution} if self.resolution else {}
        images: list[PIL.Image.Image] = []
        for start in range(0, len(prompts), self.batch_size):
            batch_prompts = prompts[start : start + self.batch_size]
            generators = [
                torch.Generator(self.generator_device).manual_seed(int(seed))
                for seed in seeds[start : start + self.batch_size]
            ]
            negative = [self.negative_prompt] * len(batch_prompts) if self.negative_prompt else None
            with torch.inference_mode():
                out = pipe(
                    prompt=batch_prompts,
                    negative_prompt=negative,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    generator=generators,
                    output_type="pil",
                    **size,
                )
            images.extend(out.images)
        return images

    def close(self) -> None:
        """Drop the pipeline and free accelerator memory."""
        import torch

        self._pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@GENERATORS.register("diffusers")
def diffusers_generator(path: str, **kwargs: Any) -> DiffusersGenerator:
    """Factory of the diffusers backend (see DiffusersGenerator for the options)."""
    return DiffusersGenerator(path, **kwargs)


def image_path(out_dir: Path, model: str, prompt_id: str, seed: int) -> Path:
    """DIR/images/<model>/<prompt_id>_<seed>.png"""
    return out_dir / "images" / model / f"{prompt_id}_{seed}.png"


def generate_images(
    name: str,
    generator: Generator,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    out_dir: Path,
    chunk: int | None = None,
) -> int:
    """Generate the missing images of one model, `chunk` (default: max(16, the generator's
    batch_size)) per `generate` call, saving each chunk; returns how many were made."""
    chunk = chunk or max(16, int(getattr(generator, "batch_size", 0) or 0))
    todo = [
        (p, s) for p in prompts for s in seeds if not image_path(out_dir, name, p.id, s).exists()
    ]
    if not todo:
        return 0
    (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(todo), desc=f"generate {name}", unit="img") as bar:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            images = generator.generate([p.text for p, _ in batch], [s for _, s in batch])
            if len(images) != len(batch):
                raise RuntimeError(
                    f"generator of model {name!r} returned {len(images)} images for "
                    f"{len(batch)} (prompt, seed) pairs"
                )
            for (prompt, seed), image in zip(batch, images, strict=True):
                path = image_path(out_dir, name, prompt.id, seed)
                tmp = path.with_name(path.name + ".tmp")
                image.save(tmp, format="PNG")  # then rename: a kill never leaves half a PNG
                os.replace(tmp, path)
            bar.update(len(batch))
    return len(todo)
