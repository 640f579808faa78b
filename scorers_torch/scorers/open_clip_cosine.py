"""open_clip image-text cosine on letterboxed images: the engine of the 'hps' and 'clip' scorers.

Mirrors the Diffusion-DPO scorer utilities (utils/hps_utils.py, utils/clip_utils.py): the model's
normalised image and text features, score = their dot product (a cosine in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from scorers_torch.scorers.clip_preprocess import letterbox_batch
from scorers_torch.scorers.runtime import (
    check_batch_size,
    resolve_device,
    resolve_dtype,
    score_in_batches,
)


def load_open_clip(
    arch: str,
    pretrained: str | None,
    checkpoint: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    what: str,
) -> torch.nn.Module:
    """open_clip model `arch` with weights from `pretrained` (an open_clip tag such as
    'laion2B-s32B-b79K' or a local weights file) or a full state dict `checkpoint` (a file
    holding {'state_dict': ...} or the bare dict, e.g. HPS_v2_compressed.pt), in eval mode."""
    import open_clip

    if arch not in open_clip.list_models() and not arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"{what}: unknown open_clip arch {arch!r} (register a config with "
            "open_clip.add_model_config, or use a built-in name such as 'ViT-H-14')"
        )
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{what}: checkpoint file {checkpoint} does not exist")
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        try:  # handles {'state_dict': ...}, a 'module.' prefix and older open_clip layouts
            open_clip.load_checkpoint(model, str(checkpoint), strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"{what}: checkpoint {checkpoint} does not match open_clip {arch!r}: {err}"
            ) from err
    else:
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, device="cpu")
        except Exception as err:  # unknown tag, offline hub, unreadable file
            raise ValueError(
                f"{what}: cannot load open_clip weights {pretrained!r} for {arch!r} ({err}); "
                "offline, pass pretrained=PATH to a local open_clip_pytorch_model.bin"
            ) from err
    return model.to(device=device, dtype=dtype).eval()


def image_size_of(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    return int(size)


class OpenClipCosineScorer:
    """Scores = cos(image features, text features) of an open_clip model (optionally mapped)."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        batch_size: int,
        antialias: bool = True,
        postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.name, self.model, self.tokenizer, self.device = name, model, tokenizer, device
        self.batch_size = check_batch_size(batch_size)
        self.antialias = antialias
        self.image_size = image_size_of(model)
        self.dtype = next(model.parameters()).dtype
        self.postprocess = postprocess or (lambda cos_N: cos_N)

    def embed(
        self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm (image [N, D], text [N, D]) features."""
        pixels = letterbox_batch(images, self.image_size, self.antialias)
        pixels = pixels.to(self.device, self.dtype)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        image_NxD = self.model.encode_image(pixels, normalize=True)
        text_NxD = self.model.encode_text(tokens, normalize=True)
        return image_NxD, text_NxD

    def _score_batch(
        self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]
    ) -> torch.Tensor:
        image_NxD, text_NxD = self.embed(images, prompts)
        return self.postprocess((image_NxD.float() * text_NxD.float()).sum(-1))

    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        return score_in_batches(self._score_batch, images, prompts, self.batch_size)


def build_open_clip_scorer(
    name: str,
    arch: str,
    pretrained: str | None,
    checkpoint: str | Path | None,
    device: str,
    dtype: str,
    batch_size: int,
    antialias: bool,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> OpenClipCosineScorer:
    import open_clip

    torch_device = resolve_device(device)
    model = load_open_clip(arch, pretrained, checkpoint, torch_device, resolve_dtype(dtype), name)
    tokenizer = open_clip.get_tokenizer(arch)
    return OpenClipCosineScorer(
        name, model, tokenizer, torch_device, batch_size, antialias, postprocess
    )
