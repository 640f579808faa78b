"""Tiny random Stable Diffusion pipelines saved as real diffusers folders (no download).

    from tests.tiny_pipeline import build_tiny_sd_pipeline
    folder = build_tiny_sd_pipeline(tmp_path / "base")  # DiffusionPipeline.from_pretrained(folder)

The tokenizer is a real CLIP BPE tokenizer rebuilt from the vocabulary shipped inside open_clip
(bpe_simple_vocab_16e6.txt.gz), so prompts tokenize exactly as with openai/clip-vit-large-patch14.
Every weight is randomised (diffusers zero-initialises some output layers, which would hide bugs).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408


# The tiny SD1.5-like UNet of the Flax port's presets (bdpo_jax.models.presets).
def tiny_unet_config() -> dict:
    from bdpo_jax.models.presets import tiny_unet_config as preset

    return preset("sd15", in_channels=4, sample_size=8, cross_attention_dim=32)


# A tiny AutoencoderKL: 2 levels (x2 up-sampling), 4 latent channels, 16x16 images.
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 0.18215,
}

# Stable Diffusion 1.5's scheduler_config.json values.
SD_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@torch.no_grad()
def randomize_weights_(module: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Overwrites every parameter with random values (weights ~ fan-in scaled normal, norm
    scales ~ 1 + noise, biases ~ small noise), in place, deterministically from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            fan_in = p[0].numel()
            value = noise * (scale / fan_in**0.5)
        elif "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.2 * noise
        else:
            value = 0.2 * noise
        p.copy_(value.to(p.dtype))
    return module


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Writes vocab.json + merges.txt of the CLIP BPE tokenizer from open_clip's vocabulary."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # as open_clip's SimpleTokenizer reads them
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def build_clip_tokenizer(work_dir: str | os.PathLike):
    """A transformers CLIPTokenizer (max length 77) built from open_clip's BPE vocabulary."""
    from transformers import CLIPTokenizer

    files = write_clip_tokenizer_files(Path(work_dir) / "bpe_files")
    return CLIPTokenizer.from_pretrained(str(files), model_max_length=77)


def build_tiny_text_encoder(seed: int = 0, hidden_size: int = 32):
    """A tiny random transformers CLIPTextModel with CLIP's vocabulary size."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed)
    return randomize_weights_(CLIPTextModel(config).eval(), seed)


def build_tiny_vae(seed: int = 0, **overrides):
    """A tiny AutoencoderKL with every weight random (TINY_VAE_CONFIG plus overrides)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize_weights_(AutoencoderKL(**{**TINY_VAE_CONFIG, **overrides}).eval(), seed)


def build_tiny_unet(seed: int = 0, **overrides):
    """A tiny UNet2DConditionModel with every weight random (tiny_unet_config() + overrides)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**tiny_unet_config(), **overrides}).eval()
    return randomize_weights_(unet, seed)


def build_tiny_sd_pipeline(path: str | os.PathLike, seed: int = 0, unet=None) -> Path:
    """Saves a tiny random StableDiffusionPipeline folder at `path` and returns the path.

    Components: UNet (tiny_unet_config(), or `unet`), AutoencoderKL (TINY_VAE_CONFIG), CLIP text
    encoder (hidden 32 = the UNet's cross_attention_dim), the CLIP BPE tokenizer, and a
    DDIMScheduler with SD1.5's schedule. Loads with DiffusionPipeline.from_pretrained(path).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(seed),
        text_encoder=build_tiny_text_encoder(seed),
        tokenizer=build_clip_tokenizer(path.parent / f".{path.name}_tokenizer_src"),
        unet=unet if unet is not None else build_tiny_unet(seed),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
