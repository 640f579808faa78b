"""bdpo_jax.models.vae against diffusers' AutoencoderKL on tiny random VAEs (fp32)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from bdpo_jax.models import vae

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402  (needs torch)

from tests.tiny_pipeline import build_tiny_vae  # noqa: E402

CONFIGS = {
    "tiny": {},
    # three levels, two layers per block, no mid attention, no post_quant_conv
    "deeper": {
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [8, 16, 16],
        "layers_per_block": 2,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
        "sample_size": 32,
    },
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved_vae(request, tmp_path_factory):
    """(diffusers model, pipeline-style folder with a 'vae' subfolder)."""
    model = build_tiny_vae(seed=3, **CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    model.save_pretrained(folder / "vae")
    return model, folder


def test_decode_matches_diffusers(saved_vae):
    model, folder = saved_vae
    module, params = vae.load_vae_decoder(str(folder), subfolder="vae")
    assert "encoder" not in params
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    size = model.config.sample_size // factor
    latents = np.random.default_rng(0).normal(size=(2, 4, size, size)).astype(np.float32)
    got = np.asarray(vae.decode(module, params, latents, 0.18215))
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latents) / 0.18215).sample
    want = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape == (2, size * factor, size * factor, 3)
    assert 0.01 < want.std()  # the random VAE produces a non-trivial image
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_encode_moments_match_diffusers(saved_vae):
    model, folder = saved_vae
    module, params = vae.load_vae(str(folder / "vae"), with_encoder=True)
    size = model.config.sample_size
    images = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, size, size)).astype(np.float32)
    got = np.asarray(vae.encode_moments(module, params, images))
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
    want = np.stack([dist.mean.numpy(), dist.logvar.numpy()], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_state_dict_round_trip(saved_vae):
    model, folder = saved_vae
    _, params = vae.load_vae(str(folder / "vae"), with_encoder=True)
    back = vae.state_dict_from_params(params)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(back) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_deprecated_attention_names_load(tmp_path):
    """Old VAE files name the mid attention query/key/value/proj_attn (diffusers renames them)."""
    model = build_tiny_vae(seed=4)
    state = {}
    for name, value in model.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        name = name.replace("attentions.0.to_out.0.", "attentions.0.proj_attn.")
        state[name] = value.contiguous()
    assert any(".proj_attn." in n for n in state)
    config = dict(model.config)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _, params = vae.load_vae_decoder(str(tmp_path))
    mid = params["decoder"]["mid_block"]["attentions_0"]
    want = model.decoder.mid_block.attentions[0].to_out[0].weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(mid["to_out_0"]["kernel"]), want)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        vae.load_vae_decoder(str(tmp_path))
    with pytest.raises(ValueError, match=r"up_block_types\[0\]='AttnUpDecoderBlock2D'"):
        vae.VAEConfig.from_diffusers({"up_block_types": ["AttnUpDecoderBlock2D"]})
    model = build_tiny_vae(seed=5)
    model.save_pretrained(tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    config["block_out_channels"] = [16, 64]
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        vae.load_vae_decoder(str(tmp_path / "v"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["decoder.conv_out.bias"]
    model.save_pretrained(tmp_path / "w")
    save_file(state, str(tmp_path / "w" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): decoder.conv_out.bias"):
        vae.load_vae_decoder(str(tmp_path / "w"))


@pytest.mark.parametrize("saved_vae", ["tiny"], indirect=True)
def test_decode_bf16_close_to_fp32(saved_vae):
    model, folder = saved_vae
    module32, params = vae.load_vae_decoder(str(folder), "vae")
    module16, _ = vae.load_vae_decoder(str(folder), "vae", dtype=jnp.bfloat16)
    size = model.config.sample_size // 2 ** (len(model.config.block_out_channels) - 1)
    latents = np.random.default_rng(2).normal(size=(1, 4, size, size)).astype(np.float32)
    a = np.asarray(vae.decode(module32, params, latents, 0.18215))
    b = np.asarray(vae.decode(module16, params, latents, 0.18215))
    assert np.abs(a - b).max() < 0.1
