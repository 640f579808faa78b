"""A JAX image generator for a trainer workdir (the evaluation protocol's `Generator`).

`JaxGenerator(workdir).generate(prompts, seeds)` restores the workdir's latest Orbax params
(bdpo_jax.checkpointing.restore_params), encodes the prompts with the run's text encoder (MiniLM for
the demo), samples with bdpo_jax.sampling (CFG against the empty prompt) and returns PIL
images. The starting noise of an image depends only on its seed, so every model sees the same
noise for the same seed. Latents are pixels, unshuffled or not (bdpo_demo.model.latents_to_images):
image = (pixels / s + 1) / 2 with s = the data's vae_scaling_factor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from bdpo_demo import model as demo_model
from bdpo_jax import checkpointing, export, sampling
from bdpo_jax.models import UNet2DConditionModel

_MODELS: dict[str, Any] = {}  # one model object per UNet config: sampling's jit cache is per model


def _model_for(unet_cfg: dict[str, Any]) -> Any:
    key = json.dumps(unet_cfg, sort_keys=True)
    if key not in _MODELS:
        _MODELS[key] = UNet2DConditionModel.from_config(unet_cfg)
    return _MODELS[key]


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (not a bdpo_jax.train workdir?)")
    with open(path) as f:
        return json.load(f)


class JaxGenerator:
    """Images of a trained workdir: DDIM (or dpmpp/euler) with classifier-free guidance. The
    noise schedule and prediction type are the workdir's (config.json); `use_karras_sigmas`
    None keeps its sample.use_karras_sigmas too."""

    def __init__(
        self,
        workdir: str,
        *,
        text_encoder: Any,
        scheduler: str = "ddim",
        steps: int = 20,
        guidance: float = 3.0,
        batch_size: int = 32,
        use_karras_sigmas: bool | None = None,
    ):
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be positive")
        self.workdir, self.text_encoder = workdir, text_encoder
        self.scheduler, self.steps, self.guidance = scheduler, steps, guidance
        self.batch_size = batch_size
        run = _read_json(os.path.join(workdir, checkpointing.CONFIG_FILE))
        self.unet_cfg = _read_json(os.path.join(workdir, checkpointing.UNET_CONFIG_FILE))
        self.schedule = sampling.schedule_config_from_config(run)
        if use_karras_sigmas is not None:  # an inference choice: the caller's, not the run's
            self.schedule = dataclasses.replace(self.schedule, use_karras_sigmas=use_karras_sigmas)
        self.scaling = float(run["diffusion"]["vae_scaling_factor"])
        self._params = None
        self._uncond = None

    def _load(self) -> Any:
        if self._params is None:
            _, params = export.unet_params(self.workdir)  # a LoRA run: merged into its base
            self._params = jax.tree.map(jnp.asarray, params)
            self._uncond = np.asarray(self.text_encoder.encode([""])["text_embeds"], np.float32)
        return self._params

    def unet(self) -> tuple[Any, Any]:
        """(the Flax UNet, its params) of the workdir, as the sampler uses them."""
        return _model_for(self.unet_cfg), self._load()

    @property
    def image_size(self) -> int:
        """The side in pixels of the images it draws: its UNet's latent side times the fold."""
        fold = demo_model.fold_of(int(self.unet_cfg["in_channels"]))
        return int(self.unet_cfg["sample_size"]) * fold

    def latents(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """float32 [N, C, H, W] sampled latents, in padded batches of `batch_size`."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        model, params = self.unet()
        c, size = int(self.unet_cfg["in_channels"]), int(self.unet_cfg["sample_size"])
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk_p = prompts[start : start + self.batch_size]
            chunk_s = seeds[start : start + self.batch_size]
            pad = self.batch_size - len(chunk_p)  # a fixed batch: one compile for all calls
            text = np.asarray(self.text_encoder.encode(chunk_p)["text_embeds"], np.float32)
            text = np.concatenate([text, np.repeat(text[:1], pad, axis=0)])
            noise = np.stack(
                [
                    np.asarray(jax.random.normal(jax.random.PRNGKey(int(s)), (c, size, size)))
                    for s in list(chunk_s) + [chunk_s[0]] * pad
                ]
            )
            x = sampling.sample(
                model, params, text, self._uncond, jax.random.PRNGKey(0),
                scheduler=self.scheduler, num_steps=self.steps, guidance_scale=self.guidance,
                latent_shape=(c, size, size), schedule_config=self.schedule,
                init_noise_BxCxHxW=noise,
            )  # fmt: skip
            out.append(np.asarray(x)[: len(chunk_p)])
        return np.concatenate(out)

    def pixels(self, latents_NxCxHxW: np.ndarray) -> np.ndarray:
        """The demo UNet's latents -> RGB float [N, H, W, 3] in [0, 1] (clipped)."""
        x_NxCxHxW = demo_model.latents_to_images(np.asarray(latents_NxCxHxW))
        return np.clip((x_NxCxHxW / self.scaling + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[PIL.Image.Image]:
        uint8 = np.round(self.pixels(self.latents(prompts, seeds)) * 255).astype(np.uint8)
        return [PIL.Image.fromarray(image) for image in uint8]

    def close(self) -> None:
        self._params = None
