"""LAION aesthetic predictor on L2-normalised openai/clip-vit-large-patch14 image embeddings.

head='mlp' (default, Diffusion-DPO utils/aes_utils.py): the improved predictor
sac+logos+ava1-l14-linearMSE.pth (christophschuhmann/improved-aesthetic-predictor), five
Linear layers with dropouts between and no activations; state-dict keys layers.{0,2,4,6,7}.*.
head='linear': the older LAION-AI/aesthetic-predictor sa_0_4_vit_l_14_linear.pth, one
Linear(768, 1) with keys weight/bias. The prompt is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from torch import nn

from scorers_torch.registry import SCORERS
from scorers_torch.scorers.hf_clip import HFClipEncoder
from scorers_torch.scorers.runtime import check_batch_size, load_state_dict_file, score_in_batches

HEADS = ("mlp", "linear")
MLP_WIDTHS = (1024, 128, 64, 16, 1)  # output widths of the five Linear layers
MLP_DROPOUTS = (0.2, 0.2, 0.1)  # after the first three Linear layers (inactive in eval)


def aesthetic_mlp(embed_dim: int = 768) -> nn.Sequential:
    """The improved predictor's `layers` (module indices match the public .pth keys)."""
    modules: list[nn.Module] = []
    width = embed_dim
    for i, out in enumerate(MLP_WIDTHS):
        modules.append(nn.Linear(width, out))
        if i < len(MLP_DROPOUTS):
            modules.append(nn.Dropout(MLP_DROPOUTS[i]))
        width = out
    return nn.Sequential(*modules)


def load_head(head: str, checkpoint: str, embed_dim: int) -> nn.Module:
    """The aesthetic head with weights from `checkpoint` (loaded onto the CPU)."""
    if head not in HEADS:
        raise ValueError(f"aesthetic: unknown head {head!r}; use one of {HEADS}")
    state = load_state_dict_file(checkpoint, "aesthetic")
    if head == "mlp":
        module: nn.Module = aesthetic_mlp(embed_dim)
        # the .pth holds the MLP's own state dict: keys 'layers.0.weight', ...
        state = {k.removeprefix("layers."): v for k, v in state.items()}
    else:
        module = nn.Linear(embed_dim, 1)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"aesthetic: checkpoint {checkpoint} does not fit head={head!r} "
            f"(missing {missing}, unexpected {unexpected}); "
            "sac+logos+ava1-l14-linearMSE.pth is head='mlp', sa_0_4_vit_l_14_linear.pth 'linear'"
        )
    return module.eval()


class AestheticScorer:
    """score = head(normalised CLIP image embedding); prompts are ignored."""

    def __init__(self, name: str, encoder: HFClipEncoder, head: nn.Module, batch_size: int):
        self.name, self.encoder = name, encoder
        self.head = head.to(encoder.device, torch.float32)
        self.batch_size = check_batch_size(batch_size)

    def _score_batch(
        self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]
    ) -> torch.Tensor:
        del prompts
        return self.head(self.encoder.embed_images(images)).reshape(-1)

    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        return score_in_batches(self._score_batch, images, prompts, self.batch_size)


@SCORERS.register("aesthetic")
def build_aesthetic(
    checkpoint: str,
    head: str = "mlp",
    model: str = "openai/clip-vit-large-patch14",
    processor: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 16,
    image_backend: str = "pil",
) -> AestheticScorer:
    """`checkpoint`: sac+logos+ava1-l14-linearMSE.pth (head 'mlp') or
    sa_0_4_vit_l_14_linear.pth (head 'linear')."""
    encoder = HFClipEncoder(model, processor or model, device, dtype, image_backend, "aesthetic")
    embed_dim = int(encoder.model.config.projection_dim)
    return AestheticScorer("aesthetic", encoder, load_head(head, checkpoint, embed_dim), batch_size)
