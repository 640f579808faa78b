"""transformers CLIPModel image/text embeddings: the engine of 'pickscore', 'aesthetic' and the
transformers 'clip' backend.

Mirrors Diffusion-DPO utils/pickscore_utils.py: the processor's images (shortest side to 224
bicubic, centre crop, CLIP mean/std; PIL backend as in transformers 4.x) and text (padding,
truncation at 77 tokens), get_image_features / get_text_features, L2 normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch

from scorers_torch.scorers.runtime import (
    check_batch_size,
    l2_normalize,
    resolve_device,
    resolve_dtype,
    score_in_batches,
)

IMAGE_BACKENDS = ("pil", "torchvision")


def projected(output: torch.Tensor | object) -> torch.Tensor:
    """The projected embedding of get_*_features: a tensor (transformers 4.x) or, in 5.x, an
    output object whose pooler_output holds it."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"cannot find the projected embedding in {type(output).__name__}")
    return pooled


class HFClipEncoder:
    """A transformers CLIPModel with its image processor and tokenizer."""

    def __init__(
        self,
        model: str,
        processor: str,
        device: str = "auto",
        dtype: str = "float32",
        image_backend: str = "pil",
        what: str = "scorer",
    ):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if image_backend not in IMAGE_BACKENDS:
            raise ValueError(f"{what}: unknown image_backend {image_backend!r}: {IMAGE_BACKENDS}")
        self.device = resolve_device(device)
        self.model = CLIPModel.from_pretrained(model, dtype=resolve_dtype(dtype))
        self.model = self.model.to(self.device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(processor, backend=image_backend)
        self.tokenizer = AutoTokenizer.from_pretrained(processor)
        self.dtype = next(self.model.parameters()).dtype

    def pixel_values(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        inputs = self.image_processor(images=list(images), return_tensors="pt")
        return inputs["pixel_values"].to(self.device, self.dtype)

    def embed_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings [N, D]."""
        out = self.model.get_image_features(pixel_values=self.pixel_values(images))
        return l2_normalize(projected(out).float())

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [N, D]."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return l2_normalize(projected(out).float())


class HFClipScorer:
    """score = scale * cos(text, image), scale = 1 or the model's logit_scale.exp()."""

    def __init__(
        self,
        name: str,
        encoder: HFClipEncoder,
        batch_size: int,
        logit_scale: bool = False,
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.name, self.encoder = name, encoder
        self.batch_size = check_batch_size(batch_size)
        self.logit_scale = logit_scale
        self.post = post or (lambda s_N: s_N)

    def _score_batch(
        self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]
    ) -> torch.Tensor:
        cos_N = (self.encoder.embed_texts(prompts) * self.encoder.embed_images(images)).sum(-1)
        if self.logit_scale:
            cos_N = self.encoder.model.logit_scale.float().exp() * cos_N
        return self.post(cos_N)

    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        return score_in_batches(self._score_batch, images, prompts, self.batch_size)


def build_hf_clip_scorer(
    name: str,
    model: str,
    processor: str,
    device: str,
    dtype: str,
    batch_size: int,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    logit_scale: bool = False,
    image_backend: str = "pil",
) -> HFClipScorer:
    encoder = HFClipEncoder(model, processor, device, dtype, image_backend, what=name)
    return HFClipScorer(name, encoder, batch_size, logit_scale, post)
