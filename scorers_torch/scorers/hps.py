"""HPSv2 (Human Preference Score v2): open_clip ViT-H-14 with the HPS weights, letterboxed
images, score = cos(image, text) (Diffusion-DPO utils/hps_utils.py; HPSv2 score.py)."""

from __future__ import annotations

from scorers_torch.registry import SCORERS
from scorers_torch.scorers.open_clip_cosine import OpenClipCosineScorer, build_open_clip_scorer

HPS_HUB_REPO = "xswu/HPSv2"  # hub repo of the released checkpoints
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hps_checkpoint(version: str, checkpoint: str | None) -> str:
    """Local checkpoint path: `checkpoint` when given, else the `version` file from the hub."""
    if checkpoint:
        return checkpoint
    if version not in HPS_FILES:
        raise ValueError(f"hps: unknown version {version!r}; use one of {sorted(HPS_FILES)}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(HPS_HUB_REPO, HPS_FILES[version])
    except Exception as err:  # offline, no cache, no network: say what to do instead
        raise FileNotFoundError(
            f"hps: cannot fetch {HPS_FILES[version]} from hub repo {HPS_HUB_REPO} ({err}); "
            "download it and pass checkpoint=PATH"
        ) from err


@SCORERS.register("hps")
def build_hps(
    version: str = "v2.0",
    checkpoint: str | None = None,
    arch: str = "ViT-H-14",
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 16,
    antialias: bool = True,
) -> OpenClipCosineScorer:
    """version 'v2.0' (HPS_v2_compressed.pt, the Diffusion-DPO/paper convention) or 'v2.1';
    `checkpoint` (a local .pt holding {'state_dict': ...}) overrides `version`."""
    path = hps_checkpoint(version, checkpoint)
    return build_open_clip_scorer("hps", arch, None, path, device, dtype, batch_size, antialias)
