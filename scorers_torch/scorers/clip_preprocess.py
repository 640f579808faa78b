"""CLIP image preprocessing: the HPSv2 'letterbox' (longest side to 224, zero padding).

Mirrors HPSv2's open_clip fork (hpsv2/src/open_clip/transform.py: image_transform with
resize_longest_max=True, ResizeMaxSize) as used by the Diffusion-DPO scorer utilities
(utils/hps_utils.py, utils/clip_utils.py): convert to RGB, to a float tensor in [0, 1], resize
the longest side to `size` (bicubic), pad the short side with zeros split as
(pad // 2, pad - pad // 2), then normalise with the CLIP mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def letterbox_size(height: int, width: int, size: int) -> tuple[int, int, int, int, int, int]:
    """(new_h, new_w, left, top, right, bottom) for resizing the longest side to `size`."""
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    pad_h, pad_w = size - new_h, size - new_w
    return new_h, new_w, pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2


def letterbox(image: PIL.Image.Image, size: int = 224, antialias: bool = True) -> torch.Tensor:
    """float32 [3, size, size], normalised, of one image (see module docstring)."""
    pixels_HxWx3 = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    image_3xHxW = torch.from_numpy(pixels_HxWx3.copy()).permute(2, 0, 1)
    height, width = image_3xHxW.shape[1:]
    new_h, new_w, left, top, right, bottom = letterbox_size(height, width, size)
    if (new_h, new_w) != (height, width):
        import torchvision.transforms.functional as TF  # only when scoring: the CLI loads fast
        from torchvision.transforms import InterpolationMode

        image_3xHxW = TF.resize(
            image_3xHxW, [new_h, new_w], InterpolationMode.BICUBIC, antialias=antialias
        )
    image_3xSxS = torch.nn.functional.pad(image_3xHxW, (left, right, top, bottom), value=0.0)
    mean_3x1x1 = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std_3x1x1 = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (image_3xSxS - mean_3x1x1) / std_3x1x1


def letterbox_batch(
    images: Sequence[PIL.Image.Image], size: int = 224, antialias: bool = True
) -> torch.Tensor:
    """float32 [N, 3, size, size] of N images."""
    return torch.stack([letterbox(image, size, antialias) for image in images])
