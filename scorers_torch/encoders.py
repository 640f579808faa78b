"""Image preprocessing, latent encoders (VAE moments) and text encoders, registered by name.

Latent encoders (`LATENT_ENCODERS`): `encode(images_Nx3xHxW in [-1, 1]) -> float32 moments
[N, 2, C, h, w]` (index 0 = latent_dist mean, 1 = log-variance, unscaled) and a
`scaling_factor` attribute. Text encoders (`TEXT_ENCODERS`): `encode(prompts) -> dict(
text_embeds [N, L, D], pooled_text_embeds [N, P] or None, optional add_time_ids [N, 6])`.
Factories take keyword arguments `model` (hub id or folder), `device`, `dtype`, `resolution`
(and ignore the ones they do not need), so plugins (`--plugins module`) can add their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from scorers_torch.registry import Registry

LATENT_ENCODERS = Registry("latent encoder")
TEXT_ENCODERS = Registry("text encoder")

IDENTITY_LOGVAR = -30.0  # the clamp floor of diffusers' DiagonalGaussianDistribution


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _torch_dtype(dtype: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


# --- image preprocessing ------------------------------------------------------------------------


def preprocess_image(image: PIL.Image.Image, resolution: int, flip_views: bool) -> np.ndarray:
    """float32 [V, 3, R, R] in [-1, 1]: short side resized to R (bilinear), centre crop.

    Mirrors Diffusion-DPO train.py (transforms.Resize(R, BILINEAR), CenterCrop(R), ToTensor,
    Normalize([0.5], [0.5])). With `flip_views` view 1 is the horizontal flip of view 0; the
    trainer picks a view per image independently (Diffusion-DPO flips each image of a pair
    with its own coin), see bdpo_jax.data.choose_views.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    image = TF.resize(image.convert("RGB"), resolution, InterpolationMode.BILINEAR)
    image = TF.center_crop(image, [resolution, resolution])
    pixels_HxWx3 = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    view_3xHxW = pixels_HxWx3.transpose(2, 0, 1)
    views = [view_3xHxW, view_3xHxW[:, :, ::-1]] if flip_views else [view_3xHxW]
    return np.ascontiguousarray(np.stack(views))


# --- latent encoders ----------------------------------------------------------------------------


def load_vae(model: str, dtype: str = "fp32", device: str = "cpu"):
    """diffusers AutoencoderKL from a VAE folder/hub id, or from `model`'s `vae` subfolder."""
    from diffusers import AutoencoderKL

    local = Path(model)
    is_vae_folder = (local / "config.json").is_file() and not (local / "vae").is_dir()
    try:
        if is_vae_folder:
            vae = AutoencoderKL.from_pretrained(model, torch_dtype=_torch_dtype(dtype))
        else:
            vae = AutoencoderKL.from_pretrained(
                model, subfolder="vae", torch_dtype=_torch_dtype(dtype)
            )
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot load the VAE from {model!r} (or its 'vae' subfolder): {err}"
        ) from err
    return vae.to(device).eval()


class VaeEncoder:
    """Moments (mean, log-variance) of a diffusers AutoencoderKL's latent_dist, unscaled."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8):
        import torch

        self._torch = torch
        self.device = resolve_device(device)
        self.vae = load_vae(model, dtype, self.device)
        self.dtype = self.vae.dtype
        self.batch_size = batch_size
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def encode(self, images_Nx3xHxW: np.ndarray) -> np.ndarray:
        torch = self._torch
        out = []
        for start in range(0, len(images_Nx3xHxW), self.batch_size):
            chunk = torch.from_numpy(np.asarray(images_Nx3xHxW[start : start + self.batch_size]))
            with torch.no_grad():
                dist = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            moments = torch.stack([dist.mean, dist.logvar], dim=1)  # logvar clamped to [-30, 20]
            out.append(moments.float().cpu().numpy())
        return np.concatenate(out)


class IdentityEncoder:
    """Pixel space as the 'latent' (for pixel-space toy models): mean = image, logvar = -30."""

    scaling_factor = 1.0

    def encode(self, images_Nx3xHxW: np.ndarray) -> np.ndarray:
        mean = np.asarray(images_Nx3xHxW, dtype=np.float32)
        return np.stack([mean, np.full_like(mean, IDENTITY_LOGVAR)], axis=1)


@LATENT_ENCODERS.register("vae")
def build_vae(
    model: str, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8, **_: Any
) -> VaeEncoder:
    return VaeEncoder(model, device=device, dtype=dtype, batch_size=batch_size)


@LATENT_ENCODERS.register("identity")
def build_identity(**_: Any) -> IdentityEncoder:
    return IdentityEncoder()


# --- text encoders ------------------------------------------------------------------------------


def _load_text_part(cls, model: str, subfolder: str, dtype: str, device: str):
    try:
        part = cls.from_pretrained(model, subfolder=subfolder, torch_dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load {cls.__name__} from {model!r}/{subfolder}: {err}") from err
    return part.to(device).eval()


def _load_tokenizer(model: str, subfolder: str):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(model, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load the CLIP tokenizer from {model!r}/{subfolder}: {err}") from err


def _token_ids(tokenizer, prompts: list[str]):
    """Padded to the tokenizer's max length (77 for CLIP), truncated, as diffusers' pipelines."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class ClipTextEncoder:
    """SD1.5 / SD2.1 prompt embeddings: the text encoder's last_hidden_state.

    Mirrors diffusers StableDiffusionPipeline.encode_prompt with clip_skip=None (SD2.1's
    OpenCLIP-H text encoder is shipped with 23 layers, so its last layer is OpenCLIP's
    penultimate one; the attention mask is passed only when the config asks for it).
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "fp32"):
        import torch
        from transformers import CLIPTextModel

        self._torch = torch
        self.device = resolve_device(device)
        self.tokenizer = _load_tokenizer(model, "tokenizer")
        self.text_encoder = _load_text_part(
            CLIPTextModel, model, "text_encoder", dtype, self.device
        )

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray | None]:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with self._torch.no_grad():
            hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"text_embeds": hidden.float().cpu().numpy(), "pooled_text_embeds": None}


class SdxlTextEncoder:
    """SDXL: penultimate hidden states of both encoders concatenated on the feature axis,
    pooled = text_encoder_2's projected text_embeds, add_time_ids = [R, R, 0, 0, R, R].

    Mirrors diffusers StableDiffusionXLPipeline.encode_prompt (clip_skip=None) and
    _get_add_time_ids with original size = target size = (R, R), crop (0, 0), as Diffusion-DPO's
    SDXL training.
    """

    def __init__(
        self, model: str, device: str = "cpu", dtype: str = "fp32", resolution: int = 1024
    ):
        import torch
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self._torch = torch
        self.device = resolve_device(device)
        self.resolution = resolution
        self.tokenizers = [
            _load_tokenizer(model, "tokenizer"),
            _load_tokenizer(model, "tokenizer_2"),
        ]
        self.text_encoders = [
            _load_text_part(CLIPTextModel, model, "text_encoder", dtype, self.device),
            _load_text_part(
                CLIPTextModelWithProjection, model, "text_encoder_2", dtype, self.device
            ),
        ]

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray | None]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            with self._torch.no_grad():
                out = encoder(
                    _token_ids(tokenizer, prompts).to(self.device), output_hidden_states=True
                )
            if (
                pooled is None and out[0].ndim == 2
            ):  # only CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL text_encoder_2 must be a CLIPTextModelWithProjection")
        r = float(self.resolution)
        time_ids = np.tile(np.array([r, r, 0.0, 0.0, r, r], np.float32), (len(prompts), 1))
        return {
            "text_embeds": self._torch.cat(hidden, dim=-1).float().cpu().numpy(),
            "pooled_text_embeds": pooled.float().cpu().numpy(),
            "add_time_ids": time_ids,
        }


@TEXT_ENCODERS.register("sd15")
def build_sd15(model: str, device: str = "cpu", dtype: str = "fp32", **_: Any) -> ClipTextEncoder:
    return ClipTextEncoder(model, device=device, dtype=dtype)


@TEXT_ENCODERS.register("sd21")
def build_sd21(model: str, device: str = "cpu", dtype: str = "fp32", **_: Any) -> ClipTextEncoder:
    return ClipTextEncoder(model, device=device, dtype=dtype)


@TEXT_ENCODERS.register("sdxl")
def build_sdxl(
    model: str, device: str = "cpu", dtype: str = "fp32", resolution: int = 1024, **_: Any
) -> SdxlTextEncoder:
    return SdxlTextEncoder(model, device=device, dtype=dtype, resolution=resolution)
