"""ImageReward v1.0 (Xu et al. 2023): BLIP ViT-L image encoder, BERT-base text encoder with
cross-attention to the image tokens, MLP on the [CLS] output, score = (mlp - mean) / std.

Mirrors THUDM/ImageReward ImageReward/ImageReward.py (ImageReward.score): the image is resized
(shortest side, bicubic) and centre-cropped to 224, normalised with the CLIP mean/std; the prompt
is tokenised by bert-base-uncased, padded to 35 tokens. The released checkpoint ImageReward.pt
(original BLIP layout: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) is mapped onto
transformers' BlipVisionModel / BlipTextModel (the same maths as BLIP models/vit.py and
models/med.py); the architecture sizes are read from the checkpoint's shapes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from torch import nn

from scorers_torch.registry import SCORERS
from scorers_torch.scorers.aesthetic import aesthetic_mlp
from scorers_torch.scorers.clip_preprocess import CLIP_MEAN, CLIP_STD
from scorers_torch.scorers.runtime import (
    check_batch_size,
    load_state_dict_file,
    resolve_device,
    resolve_dtype,
    score_in_batches,
)

IR_HUB_REPO = "THUDM/ImageReward"  # hub repo of ImageReward.pt
IR_FILE = "ImageReward.pt"
IR_MEAN = 0.16717362830052426  # reward normalisation of ImageReward.score
IR_STD = 1.0333394966054072
IR_MAX_LENGTH = 35  # prompt tokens (padding='max_length', truncation)
_VISION_PREFIX, _TEXT_PREFIX, _MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."

# BLIP models/vit.py names -> transformers BlipVisionModel names
_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
)


def vision_key(key: str) -> str:
    """Maps one BLIP ViT state-dict key to its BlipVisionModel name."""
    for pattern, repl in _VISION_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise ValueError(f"imagereward: unexpected vision key {key!r}")


def split_checkpoint(state: dict[str, torch.Tensor], path: str) -> tuple[dict, dict, dict]:
    """(vision, text, mlp) state dicts in transformers / aesthetic_mlp naming."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith(_VISION_PREFIX):
            vision[vision_key(key[len(_VISION_PREFIX) :])] = value
        elif key.startswith(_TEXT_PREFIX) and not key.endswith("position_ids"):
            text[key[len(_TEXT_PREFIX) :]] = value
        elif key.startswith(_MLP_PREFIX + "layers."):
            mlp[key[len(_MLP_PREFIX + "layers.") :]] = value
    if not vision or not text or not mlp:
        raise ValueError(
            f"imagereward: {path} lacks blip.visual_encoder.*, blip.text_encoder.* or mlp.* keys"
        )
    return vision, text, mlp


def _count_layers(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def configs_from_checkpoint(vision: dict, text: dict, vision_heads: int, text_heads: int):
    """BlipVisionConfig and BlipTextConfig sized from the checkpoint's tensor shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_layers(vision, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=vision_heads,
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP vit.py: partial(nn.LayerNorm, eps=1e-6)
        hidden_act="gelu",
    )
    vocab, hidden = text["embeddings.word_embeddings.weight"].shape
    text_config = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count_layers(text, r"encoder\.layer\.(\d+)\."),
        num_attention_heads=text_heads,
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        layer_norm_eps=1e-12,  # BERT med_config.json
        hidden_act="gelu",
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return vision_config, text_config


def _load_strict(module: nn.Module, state: dict, what: str, path: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"imagereward: {path} {what} weights do not fit (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


class ImageRewardScorer:
    """score = (MLP(text [CLS] attending to the image) - IR_MEAN) / IR_STD."""

    def __init__(self, vision, text, mlp, tokenizer, device, batch_size: int):
        self.name = "imagereward"
        self.vision, self.text, self.mlp = vision, text, mlp
        self.tokenizer, self.device = tokenizer, device
        self.batch_size = check_batch_size(batch_size)
        self.image_size = int(vision.config.image_size)
        self.dtype = next(vision.parameters()).dtype

    def pixel_values(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """[N, 3, S, S]: shortest side to S (bicubic, PIL), centre crop, CLIP mean/std."""
        import torchvision.transforms.functional as TF  # only when scoring: the CLI loads fast
        from torchvision.transforms import InterpolationMode

        out = []
        for image in images:
            image = TF.resize(image, self.image_size, InterpolationMode.BICUBIC)
            image = TF.center_crop(image, self.image_size).convert("RGB")
            out.append(TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD))
        return torch.stack(out).to(self.device, self.dtype)

    def _score_batch(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]):
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=IR_MAX_LENGTH,
            return_tensors="pt",
        ).to(self.device)
        image_NxTxD = self.vision(pixel_values=self.pixel_values(images)).last_hidden_state
        image_mask_NxT = torch.ones(image_NxTxD.shape[:2], dtype=torch.long, device=self.device)
        text = self.text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_NxTxD,
            encoder_attention_mask=image_mask_NxT,
        )
        cls_NxD = text.last_hidden_state[:, 0, :].float()
        return (self.mlp(cls_NxD).reshape(-1) - IR_MEAN) / IR_STD

    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        return score_in_batches(self._score_batch, images, prompts, self.batch_size)


def imagereward_checkpoint(checkpoint: str | None) -> str:
    if checkpoint:
        return checkpoint
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(IR_HUB_REPO, IR_FILE)
    except Exception as err:
        raise FileNotFoundError(
            f"imagereward: cannot fetch {IR_FILE} from hub repo {IR_HUB_REPO} ({err}); "
            "download it and pass checkpoint=PATH"
        ) from err


@SCORERS.register("imagereward")
def build_imagereward(
    checkpoint: str | None = None,
    tokenizer: str = "bert-base-uncased",
    vision_heads: int = 16,
    text_heads: int = 12,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 16,
) -> ImageRewardScorer:
    """`checkpoint`: ImageReward.pt (default: fetched from the hub); `tokenizer`: a
    bert-base-uncased hub id or folder. Head counts default to ViT-L (16) and BERT-base (12)."""
    from transformers import AutoTokenizer, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    path = imagereward_checkpoint(checkpoint)
    vision_sd, text_sd, mlp_sd = split_checkpoint(load_state_dict_file(path, "imagereward"), path)
    vision_config, text_config = configs_from_checkpoint(
        vision_sd, text_sd, vision_heads, text_heads
    )
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    vision = BlipVisionModel(vision_config)
    _load_strict(vision, vision_sd, "vision", path)
    text = BlipTextModel(text_config, add_pooling_layer=False)
    _load_strict(text, text_sd, "text", path)
    mlp = aesthetic_mlp(int(mlp_sd["0.weight"].shape[1]))
    _load_strict(mlp, mlp_sd, "mlp", path)
    vision = vision.to(torch_device, torch_dtype).eval()
    text = text.to(torch_device, torch_dtype).eval()
    mlp = mlp.to(torch_device, torch.float32).eval()
    return ImageRewardScorer(
        vision, text, mlp, AutoTokenizer.from_pretrained(tokenizer), torch_device, batch_size
    )
