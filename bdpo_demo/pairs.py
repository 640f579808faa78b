"""Generic pair files (JSONL + PNGs) for the preprocessing CLI: `--format generic`.

Each line is {"prompt", "image_0", "image_1", "human_label"} with image paths relative to the
JSONL file (see scorers_torch.inputs). The demo writes two kinds:

- SFT data for the base model: one flawed render per record, stored in both slots, so every
  scorer ties, every vote is +1 and the SFT winner (label mode 'sft') is that render;
- on-policy pairs: two samples of the base model for the same prompt (different seeds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
from tqdm import tqdm

from bdpo_demo import world


def to_pil(image_HxWx3: np.ndarray) -> PIL.Image.Image:
    """float [H, W, 3] in [0, 1] -> RGB PIL image."""
    return PIL.Image.fromarray(np.round(np.clip(image_HxWx3, 0, 1) * 255).astype(np.uint8))


def _save(image: PIL.Image.Image, path: str) -> None:
    tmp = path + ".tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_pair_file(
    out_dir: str,
    prompts: Sequence[str],
    images_0: Sequence[PIL.Image.Image],
    images_1: Sequence[PIL.Image.Image] | None = None,
    name: str = "pairs.jsonl",
) -> str:
    """Writes OUT/images/*.png and OUT/NAME; `images_1=None` repeats image 0 (SFT records)."""
    if len(images_0) != len(prompts) or (images_1 is not None and len(images_1) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts but {len(images_0)} / images_1 images")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    lines = []
    for i, prompt in enumerate(prompts):
        first = f"images/{i:06d}_0.png"
        _save(images_0[i], os.path.join(out_dir, first))
        second = first
        if images_1 is not None:
            second = f"images/{i:06d}_1.png"
            _save(images_1[i], os.path.join(out_dir, second))
        lines.append({"prompt": prompt, "image_0": first, "image_1": second, "human_label": None})
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(path + ".tmp", path)
    return path


def write_sft_file(
    out_dir: str,
    per_prompt: int,
    rates: world.FlawRates,
    seed: int,
    specs: Sequence[world.Spec] | None = None,
    size: int = world.IMAGE_SIZE,
) -> str:
    """Flawed renders of `specs` (default: every world prompt) at `size` px, `per_prompt` each,
    shuffled; returns the JSONL."""
    rng = np.random.default_rng(seed)
    prompts, images = [], []
    specs = world.all_specs() if specs is None else list(specs)
    for spec in tqdm(specs * per_prompt, desc="render", unit="img", disable=None):
        prompts.append(spec.prompt)
        images.append(to_pil(world.render_flawed(spec, rates, rng, size)))
    order = rng.permutation(len(prompts))
    return write_pair_file(
        out_dir, [prompts[i] for i in order], [images[i] for i in order], None, "sft.jsonl"
    )
