"""Sample-grid PNGs with a caption under each image, and the grids the trainer writes.

`training_grid_writer(config, model, info)` is all the trainer calls: it loads the VAE decoder
once and returns `write(params, host_batch, workdir, step)`, which samples the batch's first
prompts with the current params into WORKDIR/samples/step_N.png.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bdpo_jax.schema import ConfigError

PAD = 4  # pixels around every cell
MIN_CAPTION_WIDTH = 160  # cells are at least this wide so captions of small images stay legible
FONT_SIZE = 12
MAX_CAPTION_LINES = 6
SAMPLES_DIR = "samples"  # WORKDIR/samples/step_N.png: the trainer's grids
TRAINING_GRID_SIZE = 4  # prompts per training grid (the batch's first ones)


def to_uint8(images_NHWC: np.ndarray) -> np.ndarray:
    """float images in [0, 1] (clipped) or uint8 -> uint8 [N, H, W, 3]."""
    images = np.asarray(images_NHWC)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1|3], got shape {images.shape}")
    if images.dtype != np.uint8:
        images = np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def wrap_caption(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; over-long words are cut; '...' marks a cut tail."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        while font.getlength(word) > width:  # a word wider than the cell: hard-cut it
            cut = max(1, int(len(word) * width / font.getlength(word)) - 1)
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def write_grid(
    images_NHWC: np.ndarray,
    captions: Sequence[str],
    path: str | os.PathLike,
    ncols: int = 4,
    *,
    upscale: int = 1,
) -> list[tuple[int, int]]:
    """Writes a PNG grid with each caption under its image; returns each image's (x, y) corner.

    Images go in row-major order; `upscale` repeats pixels (nearest) so tiny images are visible.
    The file is written to a temporary name and renamed, so readers never see half a PNG.
    """
    images = to_uint8(images_NHWC)
    n, h, w, _ = images.shape
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    if ncols < 1 or upscale < 1:
        raise ValueError(f"ncols ({ncols}) and upscale ({upscale}) must be >= 1")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    font = ImageFont.load_default(size=FONT_SIZE)
    cell_w = max(w, MIN_CAPTION_WIDTH)
    wrapped = [wrap_caption(str(c), font, cell_w, MAX_CAPTION_LINES) for c in captions]
    line_h = FONT_SIZE + 3
    caption_h = max(len(lines) for lines in wrapped) * line_h + PAD
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    cell_h = h + caption_h
    canvas = Image.new(
        "RGB", (ncols * (cell_w + PAD) + PAD, nrows * (cell_h + PAD) + PAD), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    corners = []
    for i in range(n):
        row, col = divmod(i, ncols)
        x0, y0 = PAD + col * (cell_w + PAD), PAD + row * (cell_h + PAD)
        corner = (x0 + (cell_w - w) // 2, y0)
        canvas.paste(Image.fromarray(images[i]), corner)
        corners.append(corner)
        for k, line in enumerate(wrapped[i]):
            draw.text((x0, y0 + h + PAD // 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(fd)
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return corners


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _model_config_value(model: Any, name: str) -> Any:
    config = getattr(model, "config", None)
    try:
        return config[name]
    except (TypeError, KeyError) as e:
        raise ValueError(
            f"cannot read {name!r} from model.config; pass latent_shape= explicitly"
        ) from e


def decoder_for_config(
    config: Any, in_channels: int, scaling_factor: float | None = None
) -> tuple[Any, Any, float] | None:
    """The `decoder` of sample_grid_for_training for a run config (load once, reuse).

    None for pixel-space models (in_channels 3); otherwise the Flax VAE decoder of
    config.sample.vae (a VAE folder, a pipeline folder or hub id) or, when that is empty, of
    config.model.pretrained's 'vae' subfolder, with `scaling_factor` (default
    config.diffusion.vae_scaling_factor; the trainer passes the data's).
    """
    if in_channels == 3:
        return None
    from bdpo_jax.models import vae

    source = str(config.sample.vae or config.model.pretrained or "")
    if not source:
        raise ConfigError(
            f"config.sample.vae: sample grids of a latent model ({in_channels} channels) need a "
            "VAE; set config.sample.vae or config.model.pretrained, or config.train.sample_every=0"
        )
    subfolder = "vae"
    if config.sample.vae and not os.path.isdir(os.path.join(source, "vae")):
        subfolder = None  # a VAE folder itself (or a hub id of a bare VAE)
    module, params = vae.load_vae_decoder(source, subfolder)
    if scaling_factor is None:
        scaling_factor = config.diffusion.vae_scaling_factor
    return module, params, float(scaling_factor)


def sample_grid_for_training(
    model: Any,
    params: Any,
    text_BxLxD: Any,
    uncond: Any,
    prompts: Sequence[str],
    rng: Any,
    path: str | os.PathLike,
    sample_config: Any,
    schedule_config: Any,
    decoder: tuple[Any, Any, float] | None = None,
    *,
    latent_shape: tuple[int, int, int] | None = None,
    added_cond_kwargs: Mapping[str, Any] | None = None,
    uncond_added_cond_kwargs: Mapping[str, Any] | None = None,
    ncols: int = 4,
) -> np.ndarray:
    """Samples one image per prompt with the current params and writes a captioned grid PNG.

    Args:
      sample_config: config.sample (scheduler, num_steps, guidance_scale).
      schedule_config: a sampling.ScheduleConfig, or the run config
        (sampling.schedule_config_from_config reads it).
      decoder: None for pixel-space models (their output is the image in [-1, 1]), else
        (vae_module, vae_params, scaling_factor) from bdpo_jax.models.vae.load_vae_decoder.
      latent_shape: (C, H, W); default (in_channels, sample_size, sample_size) of model.config.
    Returns:
      the images [B, H, W, 3] as float32 in [0, 1].
    """
    from bdpo_jax import sampling

    if latent_shape is None:
        size = _model_config_value(model, "sample_size")
        channels = _model_config_value(model, "in_channels")
        latent_shape = (channels, *((size, size) if isinstance(size, int) else size))
    if decoder is None and latent_shape[0] != 3:
        raise ValueError(
            f"decoder=None needs a pixel-space model (3 channels), got {latent_shape[0]}; "
            "pass decoder=(vae_module, vae_params, scaling_factor)"
        )
    latents = sampling.sample(
        model,
        params,
        text_BxLxD,
        uncond,
        rng,
        scheduler=_get(sample_config, "scheduler", "ddim"),
        num_steps=int(_get(sample_config, "num_steps", 50)),
        guidance_scale=float(_get(sample_config, "guidance_scale", 7.5)),
        latent_shape=tuple(latent_shape),
        schedule_config=sampling.as_schedule_config(schedule_config),
        added_cond_kwargs=added_cond_kwargs,
        uncond_added_cond_kwargs=uncond_added_cond_kwargs,
    )
    if decoder is None:
        images = np.asarray(np.clip(np.asarray(latents) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    else:
        from bdpo_jax.models import vae

        vae_module, vae_params, scaling = decoder
        images = np.asarray(vae.decode(vae_module, vae_params, latents, scaling))
    height = images.shape[1]
    write_grid(images, list(prompts), path, ncols, upscale=max(1, 128 // height))
    return images.astype(np.float32)


def training_grid_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, SAMPLES_DIR, f"step_{step:06d}.png")


def training_grid_writer(
    config: Any, model: Any, info: Any
) -> Callable[[Any, Mapping[str, np.ndarray], str, int], np.ndarray]:
    """`write(params, host_batch, workdir, step)` for the trainer's sample grids.

    config: the run config (config.sample, the schedule fields, config.data for the prompts'
    text); info: the data's DatasetInfo (latent shape, empty-prompt embeddings, scaling factor).
    The VAE decoder of a latent model is loaded here, once. Each call samples the batch's first
    TRAINING_GRID_SIZE prompts with `params` (key PRNGKey(step)) into
    `training_grid_path(workdir, step)`, captioned with the prompts (shards) or record indices
    (synthetic data), and returns the images.
    """
    import jax

    from bdpo_jax import sampling

    latent_shape = tuple(int(d) for d in info.latent_shape)
    decoder = decoder_for_config(config, latent_shape[0], info.vae_scaling_factor)
    schedule_config = sampling.schedule_config_from_config(config)
    empty_text = np.asarray(info.empty_text_embeds, np.float32)
    empty_pooled = None
    if info.pooled_dim:
        empty_pooled = np.asarray(info.empty_pooled_text_embeds, np.float32)

    def prompts_of(index: np.ndarray) -> list[str]:
        if config.data.source != "shards":
            return [f"record {int(i)}" for i in index]
        from bdpo_jax import data

        return [r["prompt"] for r in data.read_records(config.data.path, [int(i) for i in index])]

    def write(params: Any, host_batch: Mapping[str, np.ndarray], workdir: str, step: int):
        n = min(TRAINING_GRID_SIZE, host_batch["text_embeds"].shape[0])
        text = np.asarray(host_batch["text_embeds"][:n], np.float32)
        uncond = np.repeat(empty_text[None], n, axis=0)
        index = host_batch.get("index", np.arange(n))[:n]
        added = uncond_added = None
        if empty_pooled is not None:
            time_ids = np.asarray(host_batch["add_time_ids"][:n], np.float32)
            pooled = np.asarray(host_batch["pooled_text_embeds"][:n], np.float32)
            added = {"text_embeds": pooled, "time_ids": time_ids}
            uncond_added = {
                "text_embeds": np.repeat(empty_pooled[None], n, axis=0),
                "time_ids": time_ids,
            }
        return sample_grid_for_training(
            model,
            params,
            text,
            uncond,
            prompts_of(index),
            jax.random.PRNGKey(step),
            training_grid_path(workdir, step),
            config.sample,
            schedule_config,
            decoder,
            latent_shape=latent_shape,
            added_cond_kwargs=added,
            uncond_added_cond_kwargs=uncond_added,
        )

    return write
