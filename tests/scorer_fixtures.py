"""Builders of tiny random CLIP models saved to disk, loadable through the real scorer paths
(offline). Usable by any test:

    arch, ckpt = tiny_open_clip(tmp_path)          # open_clip config registered as `arch`
    folder = tiny_hf_clip(tmp_path / "clip")       # CLIPModel + tokenizer + image processor
    mlp_pth = tiny_aesthetic_mlp(tmp_path / "aes.pth", embed_dim=16)
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch
from torch import nn

CLIP_VOCAB_SIZE = 49408  # open_clip / OpenAI CLIP BPE vocabulary
_MERGES = 49152 - 256 - 2  # number of BPE merges CLIP uses


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of the CLIP BPE, built from open_clip's bundled vocabulary."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : _MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def tiny_open_clip(
    folder: Path, name: str = "tiny-clip-test", image_size: int = 28, seed: int = 0
) -> tuple[str, Path]:
    """Registers a tiny open_clip ViT config as `name` and saves random weights as
    folder/<name>.pt holding {'state_dict': ...} (the HPS checkpoint layout)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 14,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": CLIP_VOCAB_SIZE,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():  # non-trivial logit scale and positional embedding
        model.logit_scale.fill_(2.5)
        model.positional_embedding.normal_(std=0.1)
    checkpoint = folder / f"{name}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return name, checkpoint


def tiny_hf_clip(
    folder: Path, image_size: int = 30, projection_dim: int = 16, seed: int = 0
) -> Path:
    """A tiny transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor saved in `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    config = CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": CLIP_VOCAB_SIZE - 2,
            "eos_token_id": CLIP_VOCAB_SIZE - 1,
            "pad_token_id": CLIP_VOCAB_SIZE - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 15,
        },
        projection_dim=projection_dim,
        logit_scale_init_value=2.5,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    vocab, merges = write_clip_tokenizer_files(folder / "bpe")
    merge_lines = merges.read_text().split("\n")[1:-1]
    tokenizer = CLIPTokenizer(
        vocab=json.loads(vocab.read_text()), merges=[tuple(m.split()) for m in merge_lines]
    )
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(folder)
    return folder


class _ReferenceAestheticMLP(nn.Module):
    """The improved-aesthetic-predictor MLP as its repo writes it (for checkpoint key names)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )


def tiny_aesthetic_mlp(path: Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """Random MLP head saved like sac+logos+ava1-l14-linearMSE.pth (keys layers.N.*)."""
    torch.manual_seed(seed)
    mlp = _ReferenceAestheticMLP(embed_dim)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mlp.state_dict(), path)
    return path


def tiny_aesthetic_linear(path: Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """Random linear head saved like sa_0_4_vit_l_14_linear.pth (keys weight, bias)."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nn.Linear(embed_dim, 1).state_dict(), path)
    return path


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


IR_WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "photo", "of", "cat", "red", "cube",
    "##s", "on", "the", "mars", "horse", "blue", "sphere", "astronaut", "riding", ",", "4", "##k",
]  # fmt: skip


def tiny_imagereward(
    folder: Path,
    vision: tuple[int, int, int] = (32, 2, 37),  # width, layers, mlp width (ViT-L: 1024, 24, 4096)
    text: tuple[int, int, int] = (24, 2, 29),  # width, layers, intermediate (BERT: 768, 12, 3072)
    image_size: int = 32,
    patch: int = 16,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Random ImageReward.pt in the ORIGINAL BLIP layout (blip.visual_encoder.* as in BLIP
    models/vit.py, blip.text_encoder.* as in models/med.py, mlp.layers.*) and a tiny BERT
    wordpiece tokenizer folder. Returns (checkpoint, tokenizer_folder)."""
    from transformers import BertTokenizer

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {prefix + "weight": 1 + rand(width, std=0.1), prefix + "bias": rand(width)}

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {prefix + "weight": rand(n_out, n_in), prefix + "bias": rand(n_out)}

    state: dict[str, torch.Tensor] = {}
    vw, vl, vm = vision
    tokens = (image_size // patch) ** 2 + 1
    v = "blip.visual_encoder."
    state[v + "cls_token"] = rand(1, 1, vw)
    state[v + "pos_embed"] = rand(1, tokens, vw)
    state[v + "patch_embed.proj.weight"] = rand(vw, 3, patch, patch, std=0.05)
    state[v + "patch_embed.proj.bias"] = rand(vw)
    for i in range(vl):
        b = f"{v}blocks.{i}."
        state |= norm(b + "norm1.", vw) | norm(b + "norm2.", vw)
        state |= linear(b + "attn.qkv.", vw, 3 * vw) | linear(b + "attn.proj.", vw, vw)
        state |= linear(b + "mlp.fc1.", vw, vm) | linear(b + "mlp.fc2.", vm, vw)
    state |= norm(v + "norm.", vw)
    tw, tl, ti = text
    t = "blip.text_encoder."
    state[t + "embeddings.word_embeddings.weight"] = rand(len(IR_WORDS), tw)
    state[t + "embeddings.position_embeddings.weight"] = rand(40, tw)
    state[t + "embeddings.position_ids"] = torch.arange(40)[None]
    state |= norm(t + "embeddings.LayerNorm.", tw)
    for i in range(tl):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention.", tw), ("crossattention.", vw)):
            state |= linear(b + att + "self.query.", tw, tw)
            state |= linear(b + att + "self.key.", kv_width, tw)
            state |= linear(b + att + "self.value.", kv_width, tw)
            state |= linear(b + att + "output.dense.", tw, tw) | norm(
                b + att + "output.LayerNorm.", tw
            )
        state |= linear(b + "intermediate.dense.", tw, ti)
        state |= linear(b + "output.dense.", ti, tw) | norm(b + "output.LayerNorm.", tw)
    widths = (tw, 1024, 128, 64, 16, 1)
    for index, n_in, n_out in zip((0, 2, 4, 6, 7), widths[:-1], widths[1:], strict=True):
        state |= linear(f"mlp.layers.{index}.", n_in, n_out)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "ImageReward.pt"
    torch.save(state, checkpoint)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(IR_WORDS)})
    tokenizer.save_pretrained(folder / "tokenizer")
    return checkpoint, folder / "tokenizer"
