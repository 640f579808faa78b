"""UNet configs are read as diffusers reads them: the known fields are diffusers' constructor
arguments, other keys (training leftovers in published configs) are ignored with a warning,
``_``-prefixed ones silently; a value the port does not implement is a one-line user error."""

from __future__ import annotations

import inspect
import json
import logging

import numpy as np
import pytest

from bdpo_jax.models import load_unet, save_unet, tiny_unet_config
from bdpo_jax.models.unet import UNet2DConditionModel, abstract_unet_params
from bdpo_jax.models.unet_config import (
    DIFFUSERS_DEFAULTS,
    UnsupportedConfigError,
    unet_spec,
    unknown_fields,
)
from bdpo_jax.schema import UserError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.unet_fixtures import random_diffusers_unet  # noqa: E402  (imports torch)

# Keys the published SDXL inpainting 0.1 UNet config carries from its EMA training run.
TRAINING_LEFTOVERS = {
    "decay": 0.9999,
    "inv_gamma": 1.0,
    "min_decay": 0.0,
    "optimization_step": 37000,
    "power": 0.6666666666666666,
    "update_after_step": 0,
    "use_ema_warmup": False,
}


def _inpainting_like_config() -> dict:
    """A tiny SDXL-like inpainting UNet (9 input channels) with the leftovers and private keys."""
    cfg = tiny_unet_config("sdxl", in_channels=9, out_channels=4)
    cfg.update(TRAINING_LEFTOVERS, _name_or_path="someone/sdxl-inpainting", _diffusers_version="0")
    return cfg


def test_known_fields_are_diffusers_constructor_arguments_with_their_defaults():
    params = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    want = {k: p.default for k, p in params.items() if k != "self"}
    assert set(DIFFUSERS_DEFAULTS) == set(want)
    for key, default in want.items():
        ours = DIFFUSERS_DEFAULTS[key]
        assert (list(ours) if isinstance(ours, (list, tuple)) else ours) == (
            list(default) if isinstance(default, (list, tuple)) else default
        ), key


def test_unknown_fields_are_the_keys_diffusers_ignores():
    cfg = _inpainting_like_config()
    _, unused, _ = diffusers.UNet2DConditionModel.extract_init_dict(cfg)
    assert unknown_fields(cfg) == sorted(unused) == sorted(TRAINING_LEFTOVERS)


def test_unknown_fields_warn_once_and_do_not_change_the_model(caplog):
    cfg = _inpainting_like_config()
    clean = {k: v for k, v in cfg.items() if k not in TRAINING_LEFTOVERS}
    with caplog.at_level(logging.WARNING, logger="bdpo_jax.models.unet_config"):
        model = UNet2DConditionModel.from_config(cfg)
        (record,) = caplog.records
        for key in TRAINING_LEFTOVERS:
            assert repr(key) in record.getMessage()
        assert "_name_or_path" not in record.getMessage()
        caplog.clear()
        plain = UNet2DConditionModel.from_config(clean)
        shapes = abstract_unet_params(model)  # tracing (spec on every call) warns no more
        assert not caplog.records
    assert model.spec == plain.spec == unet_spec(cfg)
    assert dict(model.config)["optimization_step"] == 37000  # kept, as diffusers keeps it
    assert shapes == abstract_unet_params(plain)


def test_published_folder_with_leftovers_loads_and_saves_like_diffusers(tmp_path, caplog):
    """diffusers loads such a folder (warning) and writes the keys back; so do we."""
    cfg = _inpainting_like_config()
    torch_model = random_diffusers_unet({k: v for k, v in cfg.items() if not k.startswith("_")})
    torch_model.save_pretrained(str(tmp_path / "in"))
    written = json.loads((tmp_path / "in" / "config.json").read_text())
    assert written["decay"] == 0.9999  # diffusers keeps the leftovers in its config
    with caplog.at_level(logging.WARNING, logger="bdpo_jax.models.unet_config"):
        model, params = load_unet(tmp_path / "in")
    assert "optimization_step" in caplog.text
    assert params["conv_in"]["kernel"].shape[2] == 9
    out = save_unet(model, params, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in TRAINING_LEFTOVERS} == TRAINING_LEFTOVERS
    back = diffusers.UNet2DConditionModel.from_pretrained(str(out))
    np.testing.assert_array_equal(
        back.state_dict()["conv_in.weight"].numpy(), torch_model.state_dict()["conv_in.weight"]
    )


def test_unsupported_value_in_a_folder_is_a_user_error_naming_file_field_and_value(tmp_path):
    cfg = tiny_unet_config("sd15")
    cfg["time_embedding_type"] = "fourier"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError) as info:
        load_unet(tmp_path)
    msg = str(info.value)
    assert "config.json: time_embedding_type='fourier' is not supported" in msg
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in msg


def test_encoder_hid_dim_alone_means_text_proj_as_in_diffusers():
    cfg = tiny_unet_config("kolors")
    cfg["encoder_hid_dim_type"] = None
    model = UNet2DConditionModel.from_config(cfg)
    assert dict(model.config)["encoder_hid_dim_type"] == "text_proj"
    assert model.spec.context_dim == cfg["encoder_hid_dim"]
    assert "encoder_hid_proj" in abstract_unet_params(model)
