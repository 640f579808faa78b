"""Encoders against diffusers/transformers on tiny random models saved by the test."""

import numpy as np
import PIL.Image
import pytest
import torch

from scorers_torch import encoders
from tests.tiny_pipeline import build_clip_tokenizer, build_tiny_text_encoder, build_tiny_vae

pytestmark = pytest.mark.torch  # needs torch at import

PROMPTS = ["a red cat on a mat", "", "two blue squares " * 20]  # the last one is truncated


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A diffusers-layout folder with vae/, tokenizer(_2)/, text_encoder(_2)/ + the modules."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_base")
    tokenizer = build_clip_tokenizer(root / "src")
    tokenizer.save_pretrained(root / "tokenizer")
    # SDXL's second tokenizer pads with "!" instead of the end token
    tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer", pad_token="!")
    tokenizer_2.save_pretrained(root / "tokenizer_2")
    text_encoder = build_tiny_text_encoder(seed=1)
    text_encoder.save_pretrained(root / "text_encoder")
    config_2 = CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=24,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(config_2).eval()
    text_encoder_2.save_pretrained(root / "text_encoder_2")
    vae = build_tiny_vae(seed=3)
    vae.save_pretrained(root / "vae")
    return {
        "root": root,
        "vae": vae,
        "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
    }


def _image(w: int, h: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_preprocess_image_matches_torchvision_compose():
    from torchvision import transforms

    image = _image(40, 25, 0)  # non-square: short side 25 -> 16, centre crop 16x16
    reference = transforms.Compose(
        [
            transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(16),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )(image).numpy()
    one = encoders.preprocess_image(image, 16, flip_views=False)
    two = encoders.preprocess_image(image, 16, flip_views=True)
    assert one.shape == (1, 3, 16, 16) and two.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(one[0], reference, atol=1e-6)
    np.testing.assert_allclose(two[1], reference[:, :, ::-1], atol=1e-6)
    assert one.min() >= -1 and one.max() <= 1


def test_vae_moments_match_diffusers(parts):
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    enc = encoders.LATENT_ENCODERS.build(
        "vae", model=str(parts["root"]), device="cpu", batch_size=2
    )  # batch 2 < 3 images: chunking must not change results
    with torch.no_grad():
        dist = parts["vae"].encode(torch.from_numpy(images)).latent_dist
    moments = enc.encode(images)
    assert moments.shape == (3, 2, 4, 8, 8) and moments.dtype == np.float32
    np.testing.assert_allclose(moments[:, 0], dist.mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moments[:, 1], dist.logvar.numpy(), rtol=1e-5, atol=1e-5)
    assert enc.scaling_factor == pytest.approx(parts["vae"].config.scaling_factor)
    # a VAE folder given directly (as madebyollin/sdxl-vae-fp16-fix) loads the same weights
    direct = encoders.LATENT_ENCODERS.build("vae", model=str(parts["root"] / "vae"))
    np.testing.assert_allclose(direct.encode(images), moments, rtol=1e-5, atol=1e-5)


def test_identity_encoder():
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    enc = encoders.LATENT_ENCODERS.build("identity", model="unused")
    moments = enc.encode(images)
    assert moments.shape == (2, 2, 3, 8, 8) and enc.scaling_factor == 1.0
    np.testing.assert_array_equal(moments[:, 0], images)
    assert (moments[:, 1] == -30.0).all()


def test_sd15_text_matches_pipeline_encode_prompt(parts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        unet=None, scheduler=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    with torch.no_grad():
        reference, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    for name in ("sd15", "sd21"):
        out = encoders.TEXT_ENCODERS.build(name, model=str(parts["root"]), device="cpu").encode(
            PROMPTS
        )
        assert out["text_embeds"].shape == (3, 77, 32) and out["pooled_text_embeds"] is None
        np.testing.assert_allclose(out["text_embeds"], reference.numpy(), rtol=1e-5, atol=1e-5)


def test_sdxl_text_matches_pipeline_encode_prompt(parts):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer_2"], unet=None, scheduler=None,
    )  # fmt: skip
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    enc = encoders.TEXT_ENCODERS.build("sdxl", model=str(parts["root"]), resolution=64)
    out = enc.encode(PROMPTS)
    assert out["text_embeds"].shape == (3, 77, 32 + 48)
    assert out["pooled_text_embeds"].shape == (3, 24)
    np.testing.assert_allclose(out["text_embeds"], embeds.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pooled_text_embeds"], pooled.numpy(), rtol=1e-5, atol=1e-5)
    # diffusers _get_add_time_ids: list(original_size + crops_coords_top_left + target_size)
    expected = np.array(list((64, 64) + (0, 0) + (64, 64)), np.float32)
    np.testing.assert_array_equal(out["add_time_ids"], np.tile(expected, (3, 1)))


def test_missing_model_errors_name_the_path(tmp_path):
    with pytest.raises(OSError, match="nowhere"):
        encoders.LATENT_ENCODERS.build("vae", model=str(tmp_path / "nowhere"))
    with pytest.raises(OSError, match="nowhere"):
        encoders.TEXT_ENCODERS.build("sd15", model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown text encoder 'sd3'"):
        encoders.TEXT_ENCODERS.build("sd3", model="x")
