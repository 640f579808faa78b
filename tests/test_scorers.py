"""Scorers on tiny random models through the real loading paths, checked against hand formulas."""

from __future__ import annotations

import json
import sys

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from transformers import CLIPModel

from scorers_torch.registry import SCORERS, Registry, import_plugins
from scorers_torch.scorers.base import Scorer, build_scorers, parse_scorer_spec
from scorers_torch.scorers.clip_preprocess import CLIP_MEAN, CLIP_STD, letterbox, letterbox_size
from tests.scorer_fixtures import (
    tiny_aesthetic_linear,
    tiny_aesthetic_mlp,
    tiny_hf_clip,
    tiny_open_clip,
)

pytestmark = pytest.mark.torch  # needs torch at import

HF_SIZE = 30  # tiny transformers CLIP image size
MEAN_3 = np.array(CLIP_MEAN, np.float32)
STD_3 = np.array(CLIP_STD, np.float32)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer_assets")
    arch, checkpoint = tiny_open_clip(root / "open_clip", name="tiny-clip-scorer-test")
    return {
        "arch": arch,
        "checkpoint": str(checkpoint),
        "hf": str(tiny_hf_clip(root / "hf_clip", image_size=HF_SIZE, projection_dim=16)),
        "mlp": str(tiny_aesthetic_mlp(root / "aes_mlp.pth", embed_dim=16)),
        "linear": str(tiny_aesthetic_linear(root / "aes_linear.pth", embed_dim=16)),
    }


def _random_image(height: int, width: int, seed: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def images():
    sizes = [(40, 64), (64, 40), (50, 50), (37, 81), (64, 64)]
    return [_random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]


PROMPTS = [
    "a photo of a cat",
    "an astronaut riding a horse on mars, 4k",
    "a red cube on a blue sphere",
    "portrait of an old man, oil painting",
    "café, 123",
]


def _numpy_letterbox(image: PIL.Image.Image, size: int) -> np.ndarray:
    """Independent letterbox: hand geometry and padding, torch interpolate for the resize."""
    x_HxWx3 = np.asarray(image.convert("RGB"), np.float32) / 255.0
    height, width = x_HxWx3.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    x_1x3xHxW = torch.from_numpy(x_HxWx3).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(
        x_1x3xHxW, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
    )[0].numpy()
    canvas_3xSxS = np.zeros((3, size, size), np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas_3xSxS[:, top : top + new_h, left : left + new_w] = resized
    return (canvas_3xSxS - MEAN_3[:, None, None]) / STD_3[:, None, None]


# --- preprocessing ---------------------------------------------------------------------------


def test_letterbox_geometry_worked_example():
    # 30 high x 50 wide to 28: scale 0.56 -> 16.8 -> 17 rows, pad 11 rows = 5 top + 6 bottom
    assert letterbox_size(30, 50, 28) == (17, 28, 0, 5, 0, 6)
    assert letterbox_size(50, 30, 28) == (28, 17, 5, 0, 6, 0)
    assert letterbox_size(64, 64, 28) == (28, 28, 0, 0, 0, 0)


@pytest.mark.parametrize("height,width", [(30, 50), (81, 37), (28, 28), (64, 64)])
def test_letterbox_matches_numpy(height, width):
    image = _random_image(height, width, seed=height * width)
    got = letterbox(image, 28).numpy()
    want = _numpy_letterbox(image, 28)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if height != width:  # the padded rows/columns are zero before normalisation
        pad_value = (-MEAN_3 / STD_3)[:, None]
        edge = got[:, 0, :] if height < width else got[:, :, 0]
        np.testing.assert_allclose(edge, np.broadcast_to(pad_value, edge.shape), atol=1e-6)


# --- open_clip scorers: hps and clip ---------------------------------------------------------


def _open_clip_reference_cos(assets, images, prompts) -> np.ndarray:
    model = open_clip.create_model(assets["arch"], pretrained=None)
    model.load_state_dict(torch.load(assets["checkpoint"], map_location="cpu")["state_dict"])
    model.eval()
    pixels = torch.from_numpy(np.stack([_numpy_letterbox(im, 28) for im in images]))
    tokens = open_clip.get_tokenizer(assets["arch"])(prompts)
    with torch.no_grad():
        image_NxD = model.encode_image(pixels).numpy()
        text_NxD = model.encode_text(tokens).numpy()
    image_NxD /= np.linalg.norm(image_NxD, axis=-1, keepdims=True)
    text_NxD /= np.linalg.norm(text_NxD, axis=-1, keepdims=True)
    return (image_NxD * text_NxD).sum(-1)


@pytest.fixture(scope="module")
def hps_scorer(assets):
    return SCORERS.build(
        "hps", checkpoint=assets["checkpoint"], arch=assets["arch"], device="cpu", batch_size=3
    )


def test_hps_is_cosine_of_letterboxed_image_and_text(assets, images, hps_scorer):
    got = hps_scorer.score(images, PROMPTS)
    assert got.dtype == np.float32 and got.shape == (len(images),)
    np.testing.assert_allclose(got, _open_clip_reference_cos(assets, images, PROMPTS), atol=1e-5)
    assert np.ptp(got) > 1e-4  # the scores do depend on the inputs


def test_hps_batch_size_invariance(assets, images, hps_scorer):
    one = SCORERS.build(
        "hps", checkpoint=assets["checkpoint"], arch=assets["arch"], device="cpu", batch_size=1
    )
    np.testing.assert_allclose(
        one.score(images, PROMPTS), hps_scorer.score(images, PROMPTS), atol=1e-5
    )


def test_clip_open_clip_default_is_cosine_and_clipscore_mode(assets, images):
    common = dict(arch=assets["arch"], pretrained=assets["checkpoint"], device="cpu")
    cosine = SCORERS.build("clip", **common).score(images, PROMPTS)
    want = _open_clip_reference_cos(assets, images, PROMPTS)
    np.testing.assert_allclose(cosine, want, atol=1e-5)
    clipscore = SCORERS.build("clip", mode="clipscore", **common).score(images, PROMPTS)
    np.testing.assert_allclose(clipscore, 100 * np.maximum(want, 0), atol=1e-3)


def test_hps_errors(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SCORERS.build("hps", checkpoint=str(tmp_path / "nope.pt"), arch=assets["arch"])
    with pytest.raises(FileNotFoundError, match="checkpoint=PATH"):  # offline, nothing cached
        SCORERS.build("hps", version="v2.1", arch=assets["arch"])
    with pytest.raises(ValueError, match="unknown version"):
        SCORERS.build("hps", version="v3", arch=assets["arch"])
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        SCORERS.build("hps", checkpoint=assets["checkpoint"], arch="no-such-arch")
    with pytest.raises(ValueError, match="does not match"):
        SCORERS.build("hps", checkpoint=assets["linear"], arch=assets["arch"])
    with pytest.raises(ValueError, match="pass pretrained=PATH"):
        SCORERS.build("clip", arch=assets["arch"])  # no such tag for the tiny arch


@pytest.mark.parametrize("name", ["hps", "pickscore"])
def test_bfloat16_dtype_close_to_float32(assets, images, name):
    if name == "hps":
        kwargs = dict(checkpoint=assets["checkpoint"], arch=assets["arch"], device="cpu")
    else:
        kwargs = dict(model=assets["hf"], processor=assets["hf"], device="cpu")
    fp32 = SCORERS.build(name, **kwargs).score(images, PROMPTS)
    bf16 = SCORERS.build(name, dtype="bfloat16", **kwargs).score(images, PROMPTS)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
    with pytest.raises(ValueError, match="unknown scorer dtype"):
        SCORERS.build(name, dtype="float8", **kwargs)


# --- transformers scorers: pickscore, clip(transformers), aesthetic ---------------------------


@pytest.fixture(scope="module")
def hf_reference(assets, images):
    """Unit-norm embeddings from CLIPModel.forward (not get_*_features) and hand pixels."""
    model = CLIPModel.from_pretrained(assets["hf"]).eval()
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(assets["hf"], backend="pil")(
        images=images, return_tensors="pt"
    )["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(assets["hf"])(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    image_NxD, text_NxD = out.image_embeds.numpy(), out.text_embeds.numpy()
    return {
        "cos": (image_NxD * text_NxD).sum(-1),
        "image": image_NxD,
        "logit_scale": float(model.logit_scale.detach().exp()),
    }


def test_hf_pixels_square_image_by_hand(assets):
    """On an image already at the model size, the processor is rescale + normalise only."""
    from scorers_torch.scorers.hf_clip import HFClipEncoder

    image = _random_image(HF_SIZE, HF_SIZE, seed=7)
    encoder = HFClipEncoder(assets["hf"], assets["hf"], device="cpu")
    got = encoder.pixel_values([image])[0].numpy()
    want = (np.asarray(image, np.float32) / 255.0 - MEAN_3) / STD_3
    np.testing.assert_allclose(got, want.transpose(2, 0, 1), atol=1e-5)
    assert encoder.pixel_values([_random_image(40, 64, 1)]).shape == (1, 3, HF_SIZE, HF_SIZE)


def test_pickscore_cosine_default_and_logit_scale(assets, images, hf_reference):
    common = dict(model=assets["hf"], processor=assets["hf"], device="cpu")
    cosine = SCORERS.build("pickscore", **common).score(images, PROMPTS)
    np.testing.assert_allclose(cosine, hf_reference["cos"], atol=1e-5)
    logit = SCORERS.build("pickscore", scale="logit", **common).score(images, PROMPTS)
    assert hf_reference["logit_scale"] == pytest.approx(np.exp(2.5), rel=1e-6)
    np.testing.assert_allclose(logit, hf_reference["logit_scale"] * hf_reference["cos"], atol=1e-4)
    with pytest.raises(ValueError, match="unknown scale"):
        SCORERS.build("pickscore", scale="softmax", **common)


def test_pickscore_batch_size_invariance(assets, images):
    common = dict(model=assets["hf"], processor=assets["hf"], device="cpu")
    one = SCORERS.build("pickscore", batch_size=1, **common).score(images, PROMPTS)
    three = SCORERS.build("pickscore", batch_size=3, **common).score(images, PROMPTS)
    np.testing.assert_allclose(one, three, atol=1e-5)


def test_clip_transformers_backend(assets, images, hf_reference):
    scorer = SCORERS.build("clip", backend="transformers", model=assets["hf"], device="cpu")
    np.testing.assert_allclose(scorer.score(images, PROMPTS), hf_reference["cos"], atol=1e-5)


def _numpy_linear(state: dict, prefix: str, x_NxD: np.ndarray) -> np.ndarray:
    return x_NxD @ state[prefix + "weight"].numpy().T + state[prefix + "bias"].numpy()


def test_aesthetic_mlp_by_hand(assets, images, hf_reference):
    scorer = SCORERS.build("aesthetic", checkpoint=assets["mlp"], model=assets["hf"], device="cpu")
    got = scorer.score(images, ["ignored"] * len(images))
    state = torch.load(assets["mlp"], map_location="cpu")
    x = hf_reference["image"]
    for i in (0, 2, 4, 6, 7):  # Linear layers; dropouts in between, no activations
        x = _numpy_linear(state, f"layers.{i}.", x)
    np.testing.assert_allclose(got, x[:, 0], rtol=1e-4, atol=1e-4)
    assert np.ptp(got) > 1e-3
    # batch-size invariance and prompt independence
    one = SCORERS.build(
        "aesthetic", checkpoint=assets["mlp"], model=assets["hf"], device="cpu", batch_size=1
    )
    np.testing.assert_allclose(one.score(images, PROMPTS), got, rtol=1e-5, atol=1e-5)


def test_aesthetic_linear_head_by_hand(assets, images, hf_reference):
    scorer = SCORERS.build(
        "aesthetic", checkpoint=assets["linear"], head="linear", model=assets["hf"], device="cpu"
    )
    state = torch.load(assets["linear"], map_location="cpu")
    want = _numpy_linear(state, "", hf_reference["image"])[:, 0]
    np.testing.assert_allclose(scorer.score(images, PROMPTS), want, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit head='mlp'"):
        SCORERS.build("aesthetic", checkpoint=assets["linear"], model=assets["hf"], device="cpu")


def test_score_length_mismatch(hps_scorer, images):
    with pytest.raises(ValueError, match="5 images but 2 prompts"):
        hps_scorer.score(images, PROMPTS[:2])
    assert hps_scorer.score([], []).shape == (0,)


# --- building from specs, CLI parsing, registry -----------------------------------------------


def test_build_scorers_keeps_order_names_and_factory_key(assets):
    hf = dict(model=assets["hf"], processor=assets["hf"], device="cpu")
    spec = {
        "pick_logit": {"scorer": "pickscore", "scale": "logit", **hf},
        "hps": {"checkpoint": assets["checkpoint"], "arch": assets["arch"], "device": "cpu"},
    }
    scorers = build_scorers(spec)
    assert list(scorers) == ["pick_logit", "hps"]
    assert [s.name for s in scorers.values()] == ["pick_logit", "hps"]
    assert all(isinstance(s, Scorer) for s in scorers.values())


def test_parse_scorer_spec(tmp_path):
    config = tmp_path / "scorers.json"
    config.write_text(
        json.dumps({"hps": {"version": "v2.1"}, "aesthetic": {"checkpoint": "a.pth"}})
    )
    spec = parse_scorer_spec("pickscore, hps", str(config))
    assert spec == {"pickscore": {}, "hps": {"version": "v2.1"}}
    assert parse_scorer_spec("pickscore", None) == {"pickscore": {}}


@pytest.mark.parametrize(
    "names,content,match",
    [
        ("nosuch", None, "unknown scorer 'nosuch'; known scorers: .*aesthetic.*clip.*pickscore"),
        ("hps", {"hps": {"batchsize": 4}}, r"key 'hps'.*no option\(s\) \['batchsize'\]"),
        ("hps", {"hsp": {}}, "key 'hsp'.*unknown scorer 'hsp'"),
        ("aesthetic", None, r"needs option\(s\) \['checkpoint'\]"),
        ("hps", "{not json", "invalid JSON"),
        ("hps", [1, 2], "must be a JSON object"),
        ("hps", {"hps": 3}, "options of scorer 'hps' must be a JSON object"),
        ("hps,hps", None, "twice"),
        (" , ", None, "--scorers is empty"),
    ],
)
def test_parse_scorer_spec_errors(tmp_path, names, content, match):
    path = None
    if content is not None:
        path = tmp_path / "bad.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=match) as err:
        parse_scorer_spec(names, str(path) if path else None)
    if path is not None and "twice" not in match:
        assert str(path) in str(err.value)


def test_parse_scorer_spec_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        parse_scorer_spec("hps", str(tmp_path / "nope.json"))


def test_build_scorers_unknown_kwarg():
    with pytest.raises(ValueError, match=r"no option\(s\) \['modle'\]"):
        build_scorers({"pickscore": {"modle": "x"}})


def test_registry_and_plugins(tmp_path, monkeypatch):
    registry = Registry("widget")

    @registry.register("a")
    def make_a(x: int = 1):
        return ("a", x)

    assert registry.build("a", x=3) == ("a", 3) and registry.names() == ["a"]
    with pytest.raises(ValueError, match="unknown widget 'b'; known widgets: a"):
        registry.build("b")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda: None)
    (tmp_path / "my_scorer_plugin.py").write_text(
        "import numpy as np\n"
        "from scorers_torch.registry import SCORERS\n"
        "class Length:\n"
        "    name = 'length'\n"
        "    def score(self, images, prompts):\n"
        "        return np.array([len(p) for p in prompts], np.float32)\n"
        "@SCORERS.register('prompt_length')\n"
        "def build(scale: float = 1.0):\n"
        "    return Length()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import_plugins(["my_scorer_plugin", " "])
    try:
        scorer = build_scorers({"len": {"scorer": "prompt_length"}})["len"]
        assert scorer.score([None, None], ["ab", "abcd"]).tolist() == [2.0, 4.0]
        with pytest.raises(ImportError, match="no_such_plugin_module"):
            import_plugins(["no_such_plugin_module"])
    finally:
        SCORERS._factories.pop("prompt_length", None)
        sys.modules.pop("my_scorer_plugin", None)


# --- imagereward: transformers BLIP vs a hand-written forward of the original layout ----------


def _layer_norm(x, state, prefix, eps):
    return torch.nn.functional.layer_norm(
        x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps
    )


def _lin(x, state, prefix):
    return x @ state[prefix + "weight"].T + state[prefix + "bias"]


def _attention(q_NxTxD, k_NxSxD, v_NxSxD, heads, bias_NxS=None):
    n, t, d = q_NxTxD.shape
    split = lambda x: x.reshape(n, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    logits = split(q_NxTxD) @ split(k_NxSxD).transpose(-1, -2) / (d // heads) ** 0.5
    if bias_NxS is not None:
        logits = logits + bias_NxS[:, None, None, :]
    return (logits.softmax(-1) @ split(v_NxSxD)).transpose(1, 2).reshape(n, t, d)


def _ir_pixels(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """torchvision Resize(size) + CenterCrop(size) on a PIL image, written out by hand."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    resized = image.resize((new_w, new_h), PIL.Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = np.asarray(resized.convert("RGB"), np.float64)[top : top + size, left : left + size]
    return torch.from_numpy(((crop / 255.0 - MEAN_3) / STD_3).transpose(2, 0, 1))


def _imagereward_reference(checkpoint, tokenizer_dir, images, prompts, heads=2):
    from transformers import AutoTokenizer

    s = {k: v.double() for k, v in torch.load(checkpoint, map_location="cpu").items()}
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    patch = s[v + "patch_embed.proj.weight"].shape[-1]
    size = round((s[v + "pos_embed"].shape[1] - 1) ** 0.5) * patch
    pixels = torch.stack([_ir_pixels(im, size) for im in images])
    x = torch.nn.functional.conv2d(
        pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=patch
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(len(images), -1, -1), x], 1) + s[v + "pos_embed"]
    gelu = torch.nn.functional.gelu
    for i in range(2):
        b = f"{v}blocks.{i}."
        q, k, val = _lin(_layer_norm(x, s, b + "norm1.", 1e-6), s, b + "attn.qkv.").chunk(3, -1)
        x = x + _lin(_attention(q, k, val, heads), s, b + "attn.proj.")
        h = _layer_norm(x, s, b + "norm2.", 1e-6)
        x = x + _lin(gelu(_lin(h, s, b + "mlp.fc1.")), s, b + "mlp.fc2.")
    image_tokens = _layer_norm(x, s, v + "norm.", 1e-6)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    ids, mask = tok["input_ids"], tok["attention_mask"].double()
    x = s[t + "embeddings.word_embeddings.weight"][ids]
    x = x + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _layer_norm(x, s, t + "embeddings.LayerNorm.", 1e-12)
    bias_NxL = (1.0 - mask) * -1e9
    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        for att, kv, bias in (("attention.", None, bias_NxL), ("crossattention.", 1, None)):
            kv_in = x if kv is None else image_tokens
            a = _attention(
                _lin(x, s, b + att + "self.query."),
                _lin(kv_in, s, b + att + "self.key."),
                _lin(kv_in, s, b + att + "self.value."),
                heads,
                bias,
            )
            x = _layer_norm(
                _lin(a, s, b + att + "output.dense.") + x, s, b + att + "output.LayerNorm.", 1e-12
            )
        f = _lin(gelu(_lin(x, s, b + "intermediate.dense.")), s, b + "output.dense.")
        x = _layer_norm(f + x, s, b + "output.LayerNorm.", 1e-12)
    r = x[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = _lin(r, s, f"mlp.layers.{i}.")
    return ((r[:, 0] - 0.16717362830052426) / 1.0333394966054072).numpy()


@pytest.fixture(scope="module")
def imagereward_assets(tmp_path_factory):
    from tests.scorer_fixtures import tiny_imagereward

    return tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


def test_imagereward_matches_original_layout_forward(imagereward_assets, images):
    checkpoint, tokenizer = imagereward_assets
    kwargs = dict(
        checkpoint=str(checkpoint), tokenizer=str(tokenizer), vision_heads=2, text_heads=2
    )
    scorer = SCORERS.build("imagereward", device="cpu", batch_size=3, **kwargs)
    got = scorer.score(images, PROMPTS)
    want = _imagereward_reference(checkpoint, tokenizer, images, PROMPTS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.ptp(got) > 1e-3
    assert scorer.vision.config.layer_norm_eps == 1e-6  # BLIP vit.py LayerNorm eps
    one = SCORERS.build("imagereward", device="cpu", batch_size=1, **kwargs)
    np.testing.assert_allclose(one.score(images, PROMPTS), got, rtol=1e-5, atol=1e-5)


def test_imagereward_errors(assets, imagereward_assets):
    with pytest.raises(FileNotFoundError, match="checkpoint=PATH"):  # offline, nothing cached
        SCORERS.build("imagereward")
    with pytest.raises(ValueError, match="lacks blip.visual_encoder"):
        SCORERS.build("imagereward", checkpoint=assets["mlp"])
