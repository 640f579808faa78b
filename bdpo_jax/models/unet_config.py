"""Validation and normalisation of diffusers UNet2DConditionModel configs.

Mirrors the constructor of diffusers/models/unets/unet_2d_condition.py (``__init__`` and
``_check_config``): defaults, the ``attention_head_dim`` naming quirk, per-level expansion.

Keys are read as diffusers' ``ConfigMixin.extract_init_dict`` reads them: a key that is not a
constructor argument (``DIFFUSERS_DEFAULTS``) is ignored, silently when it starts with ``_``
(``_class_name``, ``_diffusers_version``, ``_name_or_path``) and with a warning otherwise (training
leftovers such as ``decay`` or ``optimization_step`` in published configs). A known key whose value
this port does not implement raises ``UnsupportedConfigError`` naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from bdpo_jax.schema import UserError

logger = logging.getLogger(__name__)


class UnsupportedConfigError(UserError, ValueError):
    """A UNet config this port cannot build: the message names the field and its value."""


# Constructor defaults of diffusers.UNet2DConditionModel (diffusers 0.4x signature).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# Fields that must keep the value this port implements (field -> allowed values).
_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "dual_cross_attention": (False, None),
    "only_cross_attention": (False, None),
    "mid_block_only_cross_attention": (False, None),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text_time"),
    "encoder_hid_dim_type": (None, "text_proj"),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """Resolved, per-level architecture of a UNet (all tuples have one entry per level)."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block: bool
    layers_per_block: tuple[int, ...]
    num_heads: tuple[int, ...]  # attention heads per level (diffusers' num_attention_heads)
    transformer_layers: tuple[int, ...]
    cross_attention_dim: tuple[int, ...]
    norm_num_groups: int
    norm_eps: float
    use_linear_projection: bool
    upcast_attention: bool
    flip_sin_to_cos: bool
    freq_shift: float
    center_input_sample: bool
    downsample_padding: int
    mid_block_scale_factor: float
    conv_in_kernel: int
    conv_out_kernel: int
    addition_embed_type: str | None
    addition_time_embed_dim: int | None
    projection_class_embeddings_input_dim: int | None
    time_cond_proj_dim: int | None  # width of the call's ``timestep_cond`` (LCM), or None
    encoder_hid_dim: int | None  # "text_proj": encoder states are projected from this width

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def context_dim(self) -> int:
        """Width of the ``encoder_hidden_states`` the model takes."""
        return self.encoder_hid_dim or self.cross_attention_dim[0]


def unknown_fields(config: dict[str, Any]) -> list[str]:
    """Keys diffusers ignores with a warning: not constructor arguments, not ``_``-prefixed."""
    return sorted(k for k in config if k not in DIFFUSERS_DEFAULTS and not k.startswith("_"))


def warn_unknown_fields(config: dict[str, Any]) -> None:
    """Logs one warning naming the keys diffusers would ignore (none: no warning)."""
    unknown = unknown_fields(config)
    if unknown:
        logger.warning(
            "UNet config field(s) %s are not UNet2DConditionModel arguments and are ignored "
            "(as diffusers ignores them)",
            unknown,
        )


def _per_level(config: dict[str, Any], field: str, n: int) -> tuple[int, ...]:
    value = config[field]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfigError(
                f"{field}={list(value)!r} must have one entry per down block ({n} levels)"
            )
        if any(isinstance(v, (list, tuple)) for v in value):
            raise UnsupportedConfigError(
                f"{field}={list(value)!r}: nested per-layer lists are not supported"
            )
        return tuple(int(v) for v in value)
    return (int(value),) * n


def unet_spec(config: dict[str, Any]) -> UNetSpec:
    """Validates a diffusers UNet config and resolves it to a ``UNetSpec``.

    Keys that are not diffusers constructor arguments are ignored (``warn_unknown_fields`` tells
    the user; ``UNet2DConditionModel.from_config`` calls it). Raises ``UnsupportedConfigError``
    naming the field and value for anything the port does not implement.
    """
    cfg = dict(DIFFUSERS_DEFAULTS)
    cfg.update((k, v) for k, v in config.items() if k in DIFFUSERS_DEFAULTS)
    for field, allowed in _FIXED.items():
        if cfg[field] not in allowed:
            raise UnsupportedConfigError(
                f"{field}={cfg[field]!r} is not supported (supported: "
                f"{', '.join(repr(a) for a in allowed)})"
            )
    down = tuple(cfg["down_block_types"])
    up = tuple(cfg["up_block_types"])
    for field, types, ok in (
        ("down_block_types", down, DOWN_BLOCKS),
        ("up_block_types", up, UP_BLOCKS),
    ):
        for i, t in enumerate(types):
            if t not in ok:
                raise UnsupportedConfigError(
                    f"{field}[{i}]={t!r} is not supported (supported: {ok})"
                )
    if cfg["mid_block_type"] not in MID_BLOCKS + (None,):
        raise UnsupportedConfigError(
            f"mid_block_type={cfg['mid_block_type']!r} is not supported (supported: {MID_BLOCKS})"
        )
    n = len(down)
    if len(up) != n:
        raise UnsupportedConfigError(
            f"up_block_types has {len(up)} entries, down_block_types has {n}"
        )
    block_out = tuple(int(c) for c in cfg["block_out_channels"])
    if len(block_out) != n:
        raise UnsupportedConfigError(f"block_out_channels={list(block_out)} must have {n} entries")
    # The diffusers quirk: attention_head_dim means the number of heads when
    # num_attention_heads is None (unet_2d_condition.py, "This looks weird ... and it is").
    heads_field = "num_attention_heads" if cfg["num_attention_heads"] else "attention_head_dim"
    num_heads = _per_level(cfg, heads_field, n)
    if cfg["num_attention_heads"] is not None:
        raise UnsupportedConfigError(
            f"num_attention_heads={cfg['num_attention_heads']!r} is not supported: diffusers "
            "rejects it for UNet2DConditionModel, use attention_head_dim"
        )
    groups = cfg["norm_num_groups"]
    if groups is None:
        raise UnsupportedConfigError("norm_num_groups=None is not supported")
    for c in block_out:
        if c % groups:
            raise UnsupportedConfigError(
                f"block_out_channels entry {c} is not divisible by norm_num_groups={groups}"
            )
    for i, (c, h) in enumerate(zip(block_out, num_heads, strict=True)):
        if c % h:
            raise UnsupportedConfigError(
                f"{heads_field}[{i}]={h} does not divide block_out_channels[{i}]={c}"
            )
    if cfg["dropout"] not in (0, 0.0):
        raise UnsupportedConfigError(f"dropout={cfg['dropout']!r} is not supported (only 0.0)")
    add = cfg["addition_embed_type"]
    if add == "text_time":
        for f in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if cfg[f] is None:
                raise UnsupportedConfigError(f"{f}=None: addition_embed_type='text_time' needs it")
        if cfg["projection_class_embeddings_input_dim"] <= cfg["addition_time_embed_dim"]:
            raise UnsupportedConfigError(
                "projection_class_embeddings_input_dim="
                f"{cfg['projection_class_embeddings_input_dim']} leaves no room for text_embeds "
                f"beside time ids of addition_time_embed_dim={cfg['addition_time_embed_dim']}"
            )
    cross_dims = _per_level(cfg, "cross_attention_dim", n)
    hid_dim, hid_type = cfg["encoder_hid_dim"], cfg["encoder_hid_dim_type"]
    if hid_type is not None and hid_dim is None:
        raise UnsupportedConfigError(
            f"encoder_hid_dim=None: encoder_hid_dim_type={hid_type!r} needs it"
        )
    # diffusers: encoder_hid_dim without a type means "text_proj"
    if hid_dim is not None and len(set(cross_dims)) != 1:
        raise UnsupportedConfigError(
            f"cross_attention_dim={cfg['cross_attention_dim']!r}: encoder_hid_dim_type="
            "'text_proj' projects to one width; per-level widths are not supported"
        )
    cond_dim = cfg["time_cond_proj_dim"]
    for f, v in (("encoder_hid_dim", hid_dim), ("time_cond_proj_dim", cond_dim)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UnsupportedConfigError(f"{f}={v!r} is not supported (a positive int or None)")
    return UNetSpec(
        in_channels=int(cfg["in_channels"]),
        out_channels=int(cfg["out_channels"]),
        block_out_channels=block_out,
        down_block_types=down,
        up_block_types=up,
        mid_block=cfg["mid_block_type"] is not None,
        layers_per_block=_per_level(cfg, "layers_per_block", n),
        num_heads=num_heads,
        transformer_layers=_per_level(cfg, "transformer_layers_per_block", n),
        cross_attention_dim=cross_dims,
        norm_num_groups=int(groups),
        norm_eps=float(cfg["norm_eps"]),
        use_linear_projection=bool(cfg["use_linear_projection"]),
        upcast_attention=bool(cfg["upcast_attention"]),
        flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
        freq_shift=float(cfg["freq_shift"]),
        center_input_sample=bool(cfg["center_input_sample"]),
        downsample_padding=int(cfg["downsample_padding"]),
        mid_block_scale_factor=float(cfg["mid_block_scale_factor"]),
        conv_in_kernel=int(cfg["conv_in_kernel"]),
        conv_out_kernel=int(cfg["conv_out_kernel"]),
        addition_embed_type=add,
        addition_time_embed_dim=cfg["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"],
        time_cond_proj_dim=cond_dim,
        encoder_hid_dim=hid_dim,
    )
