"""Helpers for UNet tests: tiny diffusers UNets with every weight randomised, and inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdpo_jax.models.presets import NUM_TIME_IDS, sdxl_pooled_dim, tiny_unet_config


def random_diffusers_unet(config: dict[str, Any], seed: int = 0, std: float = 0.2):
    """A diffusers UNet2DConditionModel (fp32, eval) with every parameter drawn from N(0, std).

    diffusers zero-initialises some projections and sets norms to (1, 0); overwriting everything
    makes a port mistake in any of them visible.
    """
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel.from_config(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def save_random_unet(family: str, folder: Path, seed: int = 0, **overrides: Any):
    """A random tiny diffusers UNet of ``family`` (``overrides`` applied), saved to ``folder``."""
    model = random_diffusers_unet({**tiny_unet_config(family), **overrides}, seed)
    model.save_pretrained(str(folder))
    return model


def unet_inputs(
    config: dict[str, Any],
    batch: int = 2,
    seq: int = 5,
    seed: int = 0,
    num_time_ids: int = NUM_TIME_IDS,
) -> dict:
    """Random numpy inputs for a config: sample, timesteps, context (``encoder_hid_dim`` wide
    when the config projects it), "text_time" added kwargs with ``num_time_ids`` time ids (the
    refiner's fifth is an aesthetic score) and, for ``time_cond_proj_dim``, a timestep_cond."""
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    context_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    inputs = {
        "sample": rng.standard_normal((batch, config["in_channels"], size, size), np.float32),
        "timesteps": rng.integers(0, 1000, (batch,)),
        "context": rng.standard_normal((batch, seq, context_dim), np.float32),
        "added": None,
        "timestep_cond": None,
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = sdxl_pooled_dim(config, num_time_ids)
        time_ids = np.array([[64.0, 48.0, 3.0, 5.0, 64.0, 64.0]], np.float32)[:, :num_time_ids]
        if num_time_ids == 5:
            time_ids[:, 4] = 6.0  # aesthetic score
        noise = rng.integers(0, 8, (batch, num_time_ids)).astype(np.float32)
        inputs["added"] = {
            "text_embeds": rng.standard_normal((batch, pooled), np.float32),
            "time_ids": np.tile(time_ids, (batch, 1)) + noise,
        }
    if config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = rng.standard_normal(
            (batch, config["time_cond_proj_dim"]), np.float32
        )
    return inputs


def torch_forward(model, inputs: dict, timesteps=None) -> np.ndarray:
    """The diffusers model's prediction for ``unet_inputs`` (timesteps overridable)."""
    t = inputs["timesteps"] if timesteps is None else timesteps
    added = inputs["added"]
    cond = inputs.get("timestep_cond")
    with torch.no_grad():
        out = model(
            torch.from_numpy(inputs["sample"]),
            torch.as_tensor(t),
            torch.from_numpy(inputs["context"]),
            timestep_cond=None if cond is None else torch.from_numpy(cond),
            added_cond_kwargs=None
            if added is None
            else {k: torch.from_numpy(v) for k, v in added.items()},
        ).sample
    return out.numpy()
