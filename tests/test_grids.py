"""Sample grids: the PNG layout, and the trainer's grid against a diffusers pipeline run."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bdpo_jax import grids, sampling
from bdpo_jax.models import load_unet, vae

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
StableDiffusionPipeline = pytest.importorskip("diffusers").StableDiffusionPipeline

from tests.tiny_pipeline import build_tiny_sd_pipeline  # noqa: E402  (imports torch)


@pytest.mark.parametrize("as_uint8", [False, True])
def test_write_grid_layout_and_pixels(tmp_path, as_uint8):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(5, 20, 24, 3)).astype(np.float32)
    if as_uint8:
        images = (images * 255).astype(np.uint8)
    captions = ["a red circle", "x" * 80, "a very long caption " * 10, "", "blue"]
    path = tmp_path / "sub" / "grid.png"
    corners = grids.write_grid(images, captions, path, ncols=2)

    grid = np.asarray(Image.open(path).convert("RGB"))
    cell_w = max(24, grids.MIN_CAPTION_WIDTH)
    assert grid.shape[1] == 2 * (cell_w + grids.PAD) + grids.PAD  # 2 columns
    assert len(corners) == 5 and len({y for _, y in corners}) == 3  # 3 rows
    want = grids.to_uint8(images)
    for (x, y), image in zip(corners, want, strict=True):
        np.testing.assert_array_equal(grid[y : y + 20, x : x + 24], image)
    # captions are drawn under their image (dark text pixels), nothing under the empty one
    for i, (x, y) in enumerate(corners):
        band = grid[y + 20 : y + 20 + 14, x - (cell_w - 24) // 2 : x + cell_w]
        assert (band.min() < 100) == bool(captions[i]), i
    assert grid[-1, -1].tolist() == [255, 255, 255]


def test_write_grid_upscale_and_errors(tmp_path):
    images = np.zeros((1, 4, 4, 1), np.float32)
    images[0, 1, 2, 0] = 1.0
    (x, y), *_ = grids.write_grid(images, ["dot"], tmp_path / "g.png", upscale=3)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    block = grid[y + 3 : y + 6, x + 6 : x + 9]
    assert (block == 255).all() and (grid[y : y + 3, x : x + 3] == 0).all()
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        grids.write_grid(np.zeros((2, 4, 4, 3)), ["a"], tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"\[N, H, W, 1\|3\]"):
        grids.write_grid(np.zeros((2, 3, 4, 4)), ["a", "b"], tmp_path / "h.png")


class _PixelModel:
    """A pixel-space stand-in model (3 channels) with a diffusers-like config."""

    config = {"in_channels": 3, "sample_size": 6}

    def apply(self, variables, x, t_B, text_BxLxD, added_cond_kwargs=None):
        return 0.5 * x + jnp.mean(text_BxLxD) * variables["params"]["w"]


def test_pixel_space_grid(tmp_path):
    text = np.ones((2, 3, 4), np.float32)
    path = tmp_path / "step_10.png"
    sample_config = {"scheduler": "euler", "num_steps": 3, "guidance_scale": 2.0}
    images = grids.sample_grid_for_training(
        _PixelModel(),
        {"w": jnp.float32(0.1)},
        text,
        np.zeros((1, 3, 4), np.float32),
        ["one", "two"],
        jax.random.key(0),
        path,
        sample_config,
        sampling.ScheduleConfig(),
    )
    assert images.shape == (2, 6, 6, 3) and images.min() >= 0 and images.max() <= 1
    assert path.exists()
    with pytest.raises(ValueError, match="pixel-space"):
        model = _PixelModel()
        model.config = {"in_channels": 4, "sample_size": 6}
        grids.sample_grid_for_training(
            model, {"w": 0.1}, text, text, ["a", "b"], None, path, sample_config, {}
        )


def test_training_grid_writer_samples_the_batch_prompts(tmp_path):
    """What the trainer calls every config.train.sample_every steps (pixel-space model)."""
    from configs.default import get_config

    config = get_config()
    config.data.source = "synthetic"
    config.sample.scheduler, config.sample.num_steps = "euler", 3
    info = types.SimpleNamespace(
        latent_shape=(3, 6, 6),
        vae_scaling_factor=1.0,
        empty_text_embeds=np.zeros((3, 4), np.float16),
        pooled_dim=None,
        empty_pooled_text_embeds=None,
    )
    write = grids.training_grid_writer(config, _PixelModel(), info)
    batch = {"text_embeds": np.ones((6, 3, 4), np.float16), "index": np.arange(10, 16)}
    images = write({"w": jnp.float32(0.1)}, batch, str(tmp_path), 7)
    assert images.shape == (grids.TRAINING_GRID_SIZE, 6, 6, 3)
    assert os.path.exists(grids.training_grid_path(str(tmp_path), 7))
    assert grids.training_grid_path("w", 7) == os.path.join("w", "samples", "step_000007.png")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("grids") / "base", seed=1)


def test_decoder_for_config(base):
    from configs.default import get_config

    config = get_config()
    assert grids.decoder_for_config(config, 3) is None
    config.model.pretrained = str(base)
    module, params, scaling = grids.decoder_for_config(config, 4)
    assert isinstance(module, vae.AutoencoderKL) and scaling == 0.18215
    config.sample.vae = str(base / "vae")
    assert grids.decoder_for_config(config, 4)[0].config == module.config
    config.sample.vae = config.model.pretrained = ""
    with pytest.raises(ValueError, match="config.sample.vae"):
        grids.decoder_for_config(config, 4)


def test_training_grid_matches_diffusers_pipeline(base, tmp_path):
    """JAX UNet + JAX sampler + Flax VAE decoder == StableDiffusionPipeline on the same inputs."""
    pipe = StableDiffusionPipeline.from_pretrained(base)
    prompts = ["a red circle", "a blue square, top left"]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=None)
    model, params = load_unet(str(base), subfolder="unet")
    decoder = (*vae.load_vae_decoder(str(base), "vae"), pipe.vae.config.scaling_factor)
    schedule = sampling.schedule_config_from_diffusers(pipe.scheduler.config)
    rng = jax.random.key(7)
    images = grids.sample_grid_for_training(
        model,
        params,
        cond.numpy(),
        uncond.numpy()[:1],
        prompts,
        rng,
        tmp_path / "grid.png",
        {"scheduler": "ddim", "num_steps": 3, "guidance_scale": 7.5},
        schedule,
        decoder,
    )
    noise = np.asarray(jax.random.normal(rng, (2, 4, 8, 8), jnp.float32))
    want = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=torch.from_numpy(noise.copy()),
        num_inference_steps=3,
        guidance_scale=7.5,
        output_type="np",
    ).images
    assert images.shape == want.shape == (2, 16, 16, 3)
    assert want.std() > 0.01
    np.testing.assert_allclose(images, want, atol=1e-4, rtol=0)
    assert (tmp_path / "grid.png").exists()
