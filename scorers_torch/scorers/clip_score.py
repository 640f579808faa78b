"""CLIP score. Default (paper convention, Diffusion-DPO utils/clip_utils.py): open_clip ViT-H-14
laion2B base weights, letterboxed images, raw cosine in [-1, 1]. Also offered: the transformers
backend (default openai/clip-vit-large-patch14, centre-crop processor) and mode='clipscore',
100 * max(cos, 0) per image (Hessel et al. 2021; torchmetrics clamps after averaging instead)."""

from __future__ import annotations

import torch

from scorers_torch.registry import SCORERS
from scorers_torch.scorers.hf_clip import HFClipScorer, build_hf_clip_scorer
from scorers_torch.scorers.open_clip_cosine import OpenClipCosineScorer, build_open_clip_scorer

MODES = ("cosine", "clipscore")
BACKENDS = ("open_clip", "transformers")


def clipscore_from_cosine(cos_N: torch.Tensor) -> torch.Tensor:
    """CLIPScore with w = 100: 100 * max(cos, 0)."""
    return 100.0 * cos_N.clamp(min=0.0)


@SCORERS.register("clip")
def build_clip(
    backend: str = "open_clip",
    mode: str = "cosine",
    arch: str = "ViT-H-14",
    pretrained: str = "laion2B-s32B-b79K",
    model: str = "openai/clip-vit-large-patch14",
    processor: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 16,
    antialias: bool = True,
) -> OpenClipCosineScorer | HFClipScorer:
    """backend 'open_clip' uses `arch` + `pretrained` (an open_clip tag or a local weights file);
    backend 'transformers' uses `model` (hub id or folder) and `processor` (default: `model`)."""
    if mode not in MODES:
        raise ValueError(f"clip: unknown mode {mode!r}; use one of {MODES}")
    post = clipscore_from_cosine if mode == "clipscore" else None
    if backend == "open_clip":
        return build_open_clip_scorer(
            "clip", arch, pretrained, None, device, dtype, batch_size, antialias, post
        )
    if backend == "transformers":
        return build_hf_clip_scorer(
            "clip", model, processor or model, device, dtype, batch_size, post=post
        )
    raise ValueError(f"clip: unknown backend {backend!r}; use one of {BACKENDS}")
