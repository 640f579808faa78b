"""Diffusers weights <-> Flax parameters: real-config name/shape/count parity, round trips,
sharded and fp16 folders, the hub cache, and clear errors for bad folders."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from bdpo_jax.models import load_unet, real_unet_config, save_unet, tiny_unet_config
from bdpo_jax.models.presets import REAL_CONFIGS, REFINER_NUM_TIME_IDS
from bdpo_jax.models.unet import UNet2DConditionModel, abstract_unet_params
from bdpo_jax.models.weights import WEIGHTS_NAME, flax_path_to_torch

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.unet_fixtures import save_random_unet, torch_forward, unet_inputs  # noqa: E402

# Parameter counts of the real UNets (diffusers' sum of numel for configs/<name>.json).
REAL_COUNTS = {
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sdxl": 2_567_463_684,
    "sdxl_refiner": 2_259_526_660,
    "lcm_sd15": 859_602_884,  # sd15 + cond_proj 256 -> 320, no bias
    "kolors": 2_579_458_820,  # sdxl + encoder_hid_proj 4096 -> 2048, add_embedding 5632 wide
}
FAMILIES = ["sd15", "sd21", "sdxl", "sdxl_refiner", "lcm", "kolors"]
# a tensor that only exists when the family's feature is built (guards the tiny presets)
FEATURE_TENSORS = {
    "sdxl": "add_embedding.linear_1.weight",
    "sdxl_refiner": "add_embedding.linear_1.weight",
    "lcm": "time_embedding.cond_proj.weight",
    "kolors": "encoder_hid_proj.weight",
}


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_match_diffusers_names_shapes_and_counts(name):
    """eval_shape of each full published UNet vs diffusers on the meta device."""
    cfg = real_unet_config(name)
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    abstract = abstract_unet_params(UNet2DConditionModel.from_config(cfg))
    flat = traverse_util.flatten_dict(abstract)
    ours = {flax_path_to_torch(p): _torch_shape(p, a.shape) for p, a in flat.items()}
    assert ours == ref_shapes
    count = sum(int(np.prod(a.shape)) for a in flat.values())
    assert count == sum(p.numel() for p in ref.parameters()) == REAL_COUNTS[name]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random diffusers UNets of each family saved to disk, with their torch models."""
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for family in FAMILIES:
        folder = root / family
        out[family] = (folder, save_random_unet(family, folder, seed=7))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_save_unet_round_trip_through_diffusers(saved, family, tmp_path):
    folder, torch_model = saved[family]
    model, params = load_unet(folder)
    out_dir = save_unet(model, params, tmp_path / "out")
    back = diffusers.UNet2DConditionModel.from_pretrained(str(out_dir)).eval()
    want, got = torch_model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert family not in FEATURE_TENSORS or FEATURE_TENSORS[family] in got
    for k in want:
        assert torch.equal(want[k], got[k]), k
    n_ids = REFINER_NUM_TIME_IDS if family == "sdxl_refiner" else 6
    inputs = unet_inputs(tiny_unet_config(family), batch=2, seed=8, num_time_ids=n_ids)
    np.testing.assert_array_equal(torch_forward(back, inputs), torch_forward(torch_model, inputs))
    _, params_again = load_unet(out_dir)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_unet_casts_to_fp16(saved, tmp_path):
    folder, torch_model = saved["sd15"]
    model, params = load_unet(folder)
    save_unet(model, params, tmp_path, dtype=jnp.float16)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
    back = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path), torch_dtype=torch.float16)
    w = torch_model.state_dict()["conv_in.weight"].half()
    assert torch.equal(back.state_dict()["conv_in.weight"], w)


def test_bf16_load_and_save(saved, tmp_path):
    folder, torch_model = saved["sdxl"]
    model, params = load_unet(folder, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.param_dtype == jnp.bfloat16 and model.dtype == jnp.bfloat16
    save_unet(model, params, tmp_path)
    back = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)
    w = torch_model.state_dict()["add_embedding.linear_1.weight"].bfloat16()
    assert torch.equal(back.state_dict()["add_embedding.linear_1.weight"], w)


def _leaves_equal(p, q, dtype=None):
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        a = np.asarray(a) if dtype is None else np.asarray(a).astype(dtype)
        np.testing.assert_array_equal(a, np.asarray(b))


def test_sharded_and_fp16_variant_folders(saved, tmp_path):
    folder, torch_model = saved["sd21"]
    _, params = load_unet(folder)
    torch_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="300KB")
    assert (tmp_path / "sharded" / f"{WEIGHTS_NAME}.index.json").exists()
    _, sharded = load_unet(tmp_path / "sharded")
    _leaves_equal(params, sharded)
    torch_model.half()
    torch_model.save_pretrained(str(tmp_path / "fp16"), variant="fp16")
    torch_model.save_pretrained(str(tmp_path / "fp16s"), variant="fp16", max_shard_size="300KB")
    torch_model.float()
    assert (tmp_path / "fp16s" / "diffusion_pytorch_model.safetensors.index.fp16.json").exists()
    for name in ("fp16", "fp16s"):
        _, fp16 = load_unet(tmp_path / name, dtype=jnp.float16)
        _leaves_equal(params, fp16, np.float16)


def test_hub_id_resolves_from_the_local_cache_offline(saved, tmp_path, monkeypatch):
    """A hub id with a subfolder, read from a hub cache laid out as huggingface_hub writes it."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny-sd"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(saved["sd15"][0], repo / "snapshots" / commit / "unet")
    _, from_hub = load_unet("someone/tiny-sd", subfolder="unet")
    _, local = load_unet(saved["sd15"][0])
    _leaves_equal(local, from_hub)
    with pytest.raises(FileNotFoundError, match="someone/not-cached"):
        load_unet("someone/not-cached", subfolder="unet")


# ------------------------------------------------------------------------------ bad inputs
def _copy(saved, tmp_path, family="sd15"):
    dst = tmp_path / "unet"
    shutil.copytree(saved[family][0], dst)
    return dst


def test_folder_without_config_json(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_unet(folder)


def test_truncated_safetensors(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    file = folder / WEIGHTS_NAME
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: cannot read .*truncated or corrupt"):
        load_unet(folder)


def test_unsupported_block_in_config_json(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"config\.json: down_block_types\[0\]='SimpleCrossAttnDownBlock2D' is not supported",
    ):
        load_unet(folder)


def test_missing_and_unexpected_tensors_are_listed(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    state = load_file(str(folder / WEIGHTS_NAME))
    del state["conv_in.bias"]
    del state["mid_block.attentions.0.proj_in.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError) as err:
        load_unet(folder)
    msg = str(err.value)
    assert "missing tensors (2): conv_in.bias, mid_block.attentions.0.proj_in.weight" in msg
    assert "unexpected tensors (1): extra.weight" in msg


def test_wrong_shape_names_the_tensor(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    state = load_file(str(folder / WEIGHTS_NAME))
    state["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(
        ValueError, match=r"conv_out\.weight has shape \(4, 32, 1, 1\).*\(4, 32, 3, 3\)"
    ):
        load_unet(folder)


def test_folder_without_safetensors_and_bad_paths(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / WEIGHTS_NAME).rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no UNet weights.*Pickled .bin"):
        load_unet(folder)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_unet(tmp_path, subfolder="nope")
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        load_unet(str(tmp_path / "missing" / "deeper"))
