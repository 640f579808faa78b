"""PickScore: CLIPModel yuvalkirstain/PickScore_v1 with the laion ViT-H-14 processor.

scale='cosine' (default, Diffusion-DPO utils/pickscore_utils.py, values ~0.2) or 'logit'
(PickScore README: logit_scale.exp() * cos, values ~20-23)."""

from __future__ import annotations

from scorers_torch.registry import SCORERS
from scorers_torch.scorers.hf_clip import HFClipScorer, build_hf_clip_scorer

SCALES = ("cosine", "logit")


@SCORERS.register("pickscore")
def build_pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    scale: str = "cosine",
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 16,
    image_backend: str = "pil",
) -> HFClipScorer:
    if scale not in SCALES:
        raise ValueError(f"pickscore: unknown scale {scale!r}; use one of {SCALES}")
    return build_hf_clip_scorer(
        "pickscore",
        model,
        processor,
        device,
        dtype,
        batch_size,
        logit_scale=scale == "logit",
        image_backend=image_backend,
    )
