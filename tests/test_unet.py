"""Flax UNet port vs diffusers' UNet2DConditionModel on tiny randomly initialised models.

Each family (SD1.5-like, SD2-like with non-default options at an odd 7x7 latent, SDXL-like, the
SDXL refiner's layout with 5 time ids, LCM's ``timestep_cond``, Kolors' ``encoder_hid_proj``) is
built in diffusers with every weight random, saved with save_pretrained, loaded with load_unet
and compiled once (module-scoped fixture).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdpo_jax.models import UNet2DConditionModel, init_unet_params, load_unet, tiny_unet_config
from bdpo_jax.models.embeddings import timestep_embedding
from bdpo_jax.models.flash import chunked_attention
from bdpo_jax.models.norms import GroupNorm
from bdpo_jax.models.presets import REFINER_NUM_TIME_IDS
from bdpo_jax.models.resnet import nearest_resize_indices
from bdpo_jax.models.unet_config import UnsupportedConfigError
from bdpo_jax.schema import UserError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from tests.unet_fixtures import save_random_unet, torch_forward, unet_inputs  # noqa: E402

# Timesteps in the three forms diffusers accepts: int [B], float [B], scalar.
TIMESTEPS = {
    "sd15": lambda b: np.array([3, 977])[:b],
    "sd21": lambda b: np.array([12.5, 630.25], np.float32)[:b],
    "sdxl": lambda b: np.int32(421),
    "sdxl_refiner": lambda b: np.array([150, 20])[:b],
    "lcm": lambda b: np.array([999, 259])[:b],
    "kolors": lambda b: np.array([499, 1])[:b],
}
NUM_TIME_IDS = {"sdxl_refiner": REFINER_NUM_TIME_IDS}  # the others: SDXL's 6 (or none)


def compile_quick(fn, *args):
    """jit + compile at XLA backend optimisation level 0 (about half the CPU compile time).

    Used where the test compares two compiled programs of its own (remat, bf16); the parity
    tests against diffusers use the default compile.
    """
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """family -> built, loaded, compiled and run case (each built once, on first use)."""
    cache = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = _build_case(family, tmp_path_factory.mktemp(f"unet_{family}"))
        return cache[family]

    return get


# The SD2-like case also exercises the non-default values the port supports; it runs at 7x7,
# not a multiple of 2, so diffusers forwards the skip's size to the upsampler.
SD21_EXTRAS = dict(
    sample_size=7,
    layers_per_block=[1, 2],
    flip_sin_to_cos=False,
    freq_shift=1,
    center_input_sample=True,
    downsample_padding=0,
    mid_block_scale_factor=1.5,
    conv_in_kernel=1,
)


def _build_case(family: str, folder) -> dict:
    extras = SD21_EXTRAS if family == "sd21" else {}
    torch_model = save_random_unet(family, folder, seed=1, **extras)
    model, params = load_unet(folder)
    cfg = {**tiny_unet_config(family), **extras}
    inputs = unet_inputs(cfg, batch=2, seed=2, num_time_ids=NUM_TIME_IDS.get(family, 6))
    t = TIMESTEPS[family](2)
    ref = torch_forward(torch_model, inputs, timesteps=t)
    apply = jax.jit(model.apply)
    x = inputs
    out = apply(
        {"params": params}, x["sample"], t, x["context"], x["added"], False, x["timestep_cond"]
    )
    return dict(
        family=family,
        model=model,
        torch_model=torch_model,
        params=params,
        inputs=inputs,
        t=t,
        ref=ref,
        out=out,
    )


FAMILIES = ["sd15", "sd21", "sdxl", "sdxl_refiner", "lcm", "kolors"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity_with_diffusers(cases, family):
    case = cases(family)
    out = np.asarray(case["out"])
    assert out.shape == case["ref"].shape and out.dtype == np.float32
    assert np.abs(case["ref"]).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(out, case["ref"], atol=1e-4, rtol=0)


def test_lcm_runs_without_timestep_cond_like_diffusers(cases):
    """diffusers skips cond_proj when timestep_cond is None; so does the port."""
    case = cases("lcm")
    x = dict(case["inputs"], timestep_cond=None)
    ref = torch_forward(case["torch_model"], x, timesteps=case["t"])
    out = case["model"].apply({"params": case["params"]}, x["sample"], case["t"], x["context"])
    assert np.abs(ref - case["ref"]).max() > 1e-3  # the condition matters
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_bf16_compute_close_to_fp32(cases):
    case = cases("sd15")
    model = UNet2DConditionModel.from_config(dict(case["model"].config), dtype=jnp.bfloat16)
    x = case["inputs"]
    args = ({"params": case["params"]}, x["sample"], case["t"], x["context"])
    out = compile_quick(model.apply, *args)(*args)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    ref = case["ref"]
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert np.isfinite(out).all() and err < 0.05, err


def test_remat_and_chunked_attention_give_the_same_gradient():
    """nn.remat per layer and chunked attention change memory, not math (one level: quick)."""
    cfg = tiny_unet_config("sdxl", sample_size=4, cross_attention_dim=8)
    cfg.update(
        block_out_channels=[16],
        down_block_types=["CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D"],
        attention_head_dim=2,
        transformer_layers_per_block=1,
        norm_num_groups=4,
        mid_block_type=None,
    )
    plain = UNet2DConditionModel.from_config(cfg, attention="xla")
    # the remat model also uses the chunked attention: both must give plain's gradient
    remat = UNet2DConditionModel.from_config(cfg, remat=True, attention="chunked")
    params = init_unet_params(plain, jax.random.key(0))
    x = unet_inputs(cfg, batch=2, seq=3, seed=3)

    def grads(model):
        def loss(p):
            out = model.apply({"params": p}, x["sample"], x["timesteps"], x["context"], x["added"])
            return jnp.mean(out**2)

        return compile_quick(jax.grad(loss), params)(params)

    g0, g1 = grads(plain), grads(remat)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 0


def test_remat_checkpoints_each_resnet_and_each_transformer_layer():
    """diffusers' gradient checkpointing grain: one jax.checkpoint per ResnetBlock2D and per
    BasicTransformerBlock (not per UNet block), so the backward re-runs one layer at a time."""
    from bdpo_jax.memory_plan import _remat_eqns

    cfg = tiny_unet_config("sd15", sample_size=8, cross_attention_dim=8)
    model = UNet2DConditionModel.from_config(cfg, remat=True)
    params = init_unet_params(model, jax.random.key(0))
    x = unet_inputs(cfg, batch=1, seq=3, seed=0)
    jaxpr = jax.make_jaxpr(
        lambda p: model.apply({"params": p}, x["sample"], x["timesteps"], x["context"])
    )(params).jaxpr
    eqns = _remat_eqns(jaxpr)
    spec = model.spec
    levels = len(spec.block_out_channels)
    attn_down = [t == "CrossAttnDownBlock2D" for t in spec.down_block_types]
    attn_up = [t == "CrossAttnUpBlock2D" for t in spec.up_block_types]
    expected = 0
    for level in range(levels):
        layers = spec.layers_per_block[level]
        expected += layers * (1 + (spec.transformer_layers[level] if attn_down[level] else 0))
        up_level = levels - 1 - level
        up_layers = spec.layers_per_block[up_level] + 1
        expected += up_layers * (1 + (spec.transformer_layers[up_level] if attn_up[level] else 0))
    if spec.mid_block:
        expected += 2 + spec.transformer_layers[-1]
    assert expected > 4
    assert len(eqns) == expected
    # no checkpoint inside another: each one is a single layer
    assert all(not _remat_eqns(e.params["jaxpr"]) for e in eqns)
    # each layer's backward hands on its input gradient together with its weight gradients:
    # one optimization barrier per checkpointed layer in the gradient's program (models/remat.py),
    # in the branch for GPUs and TPUs of one platform_dependent choice per layer
    grad_jaxpr = jax.make_jaxpr(
        jax.grad(
            lambda p: model.apply({"params": p}, x["sample"], x["timesteps"], x["context"]).sum()
        )
    )(params).jaxpr
    assert _count_primitive(grad_jaxpr, "optimization_barrier") == expected
    assert _count_primitive(grad_jaxpr, "platform_index") == 2 * expected


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive `name` in a jaxpr and every jaxpr nested in its equations' params
    (calls, custom rules, each branch of a cond), each occurrence counted."""

    def nested(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from nested(item)

    return sum(
        (eqn.primitive.name == name)
        + sum(_count_primitive(sub, name) for v in eqn.params.values() for sub in nested(v))
        for eqn in jaxpr.eqns
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_init_shapes_match_loaded_and_eval_shape_allocates_nothing(cases, family):
    case = cases(family)
    model = case["model"]
    abstract = jax.eval_shape(lambda r: init_unet_params(model, r), jax.random.key(0))
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), case["params"])


def test_init_is_lecun_normal_with_unit_norms():
    model = UNet2DConditionModel.from_config(tiny_unet_config("sd15"))
    params = init_unet_params(model, jax.random.key(1))
    k = np.asarray(params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])  # 3x3x32x32
    assert abs(k.std() * np.sqrt(3 * 3 * 32) - 1) < 0.05
    np.testing.assert_array_equal(params["conv_norm_out"]["scale"], 1)
    np.testing.assert_array_equal(params["conv_norm_out"]["bias"], 0)
    again = init_unet_params(model, jax.random.key(1))
    np.testing.assert_array_equal(k, again["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])


def test_chunked_attention_matches_dot_product_attention():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 96, 2, 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 2, 7, 2, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 96, 2, 8)), jnp.float32)
    for k, v in [(q, q), (kv[0], kv[1])]:  # self (several query chunks) and cross attention

        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v) * w)

        ref = jax.value_and_grad(
            functools.partial(loss, jax.nn.dot_product_attention), argnums=(0, 1, 2)
        )(q, k, v)
        got = jax.value_and_grad(
            functools.partial(loss, lambda *a: chunked_attention(*a, chunk=32)), argnums=(0, 1, 2)
        )(q, k, v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 999, 500.5], np.float32)
    for dim, flip, shift in [(32, True, 0), (33, False, 1), (8, True, 1)]:
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
        got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)  # fp32 ulp at ~1e3 rad


def test_group_norm_matches_torch():
    rng = np.random.default_rng(0)
    x_NCHW = (rng.standard_normal((2, 12, 5, 3)) * 3 + 1).astype(np.float32)
    scale, bias = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12)
    gn = torch.nn.GroupNorm(4, 12, eps=1e-6)
    with torch.no_grad():
        gn.weight.copy_(torch.from_numpy(scale))
        gn.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        ref = gn(torch.from_numpy(x_NCHW)).numpy()
    params = {"params": {"scale": scale, "bias": bias.astype(np.float32)}}
    got = GroupNorm(4, 1e-6).apply(params, jnp.asarray(x_NCHW.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-5)


@pytest.mark.parametrize(
    "shape, groups", [((2, 5, 3, 12), 4), ((3, 4, 4, 16), 16), ((2, 6, 6, 8), 1)]
)
def test_group_norm_gradients_match_torch_autograd(shape, groups):
    """The hand-written backward (norms.group_norm) against torch's autograd in fp64, for a
    weighted sum of the output (so every output element has its own cotangent)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 + 0.7).astype(np.float32)
    scale, bias = rng.standard_normal((2, shape[-1])).astype(np.float32)
    weights = rng.standard_normal(shape).astype(np.float32)

    def loss(x_, s_, b_):
        y = GroupNorm(groups, 1e-6).apply({"params": {"scale": s_, "bias": b_}}, x_)
        return jnp.sum(y * weights)

    got = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    tx, ts, tb = (
        torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, bias)
    )
    y = torch.nn.functional.group_norm(tx.permute(0, 3, 1, 2), groups, ts, tb, eps=1e-6)
    (y.permute(0, 2, 3, 1) * torch.from_numpy(weights).double()).sum().backward()
    for name, g, ref in zip(("x", "scale", "bias"), got, (tx.grad, ts.grad, tb.grad), strict=True):
        ref = ref.numpy()
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=name)  # fmt: skip


def test_group_norm_bf16_input_keeps_dtypes():
    """bf16 activations: statistics in fp32, output in the module's dtype, gradient in x's."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 8)), jnp.bfloat16)
    params = {"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
    module = GroupNorm(2, 1e-6, dtype=jnp.bfloat16)
    y = module.apply(params, x)
    ref = GroupNorm(2, 1e-6).apply(params, x.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.05)
    dx, dp = jax.grad(lambda x_, p_: jnp.sum(module.apply(p_, x_).astype(jnp.float32) ** 2),
                      argnums=(0, 1))(x, params)  # fmt: skip
    assert dx.dtype == jnp.bfloat16 and dp["params"]["scale"].dtype == jnp.float32


def test_nearest_resize_matches_torch_interpolate():
    for n_in, n_out in [(3, 6), (3, 5), (4, 7), (5, 10)]:
        x = torch.arange(n_in, dtype=torch.float32)[None, None, :, None]
        ref = torch.nn.functional.interpolate(x, size=(n_out, 1), mode="nearest")
        np.testing.assert_array_equal(nearest_resize_indices(n_in, n_out), ref[0, 0, :, 0].long())


UNSUPPORTED = [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], r"down_block_types\[0\]"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"], r"up_block_types\[1\]='AttnUpBlock2D'"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type="),
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("addition_embed_type", "text", "addition_embed_type='text'"),
    ("time_cond_proj_dim", 0, "time_cond_proj_dim=0"),
    ("encoder_hid_dim_type", "image_proj", "encoder_hid_dim_type='image_proj'"),
    ("encoder_hid_dim_type", "text_proj", "encoder_hid_dim=None"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift'"),
    ("only_cross_attention", True, "only_cross_attention=True"),
    ("dual_cross_attention", True, "dual_cross_attention=True"),
    ("attention_head_dim", [2, 4, 8], r"attention_head_dim=\[2, 4, 8\]"),
    ("num_attention_heads", 4, "num_attention_heads=4"),
    ("cross_attention_dim", [16, 32], r"cross_attention_dim=\[16, 32\]: encoder_hid_dim_type"),
]


@pytest.mark.parametrize("field,value,match", UNSUPPORTED)
def test_unsupported_config_value_names_the_field(field, value, match):
    cfg = tiny_unet_config("kolors" if field == "cross_attention_dim" else "sd15")
    cfg[field] = value
    with pytest.raises(UnsupportedConfigError, match=match) as info:
        UNet2DConditionModel.from_config(cfg)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_bad_call_arguments_are_clear():
    with pytest.raises(ValueError, match="attention='flash'"):
        UNet2DConditionModel.from_config(tiny_unet_config("sd15"), attention="flash")
    model = UNet2DConditionModel.from_config(tiny_unet_config("sdxl"))
    params = jax.eval_shape(lambda r: init_unet_params(model, r), jax.random.key(0))
    x = unet_inputs(tiny_unet_config("sdxl"), batch=1)
    with pytest.raises(ValueError, match="text_embeds"):
        jax.eval_shape(model.apply, {"params": params}, x["sample"], 1, x["context"], None)
    with pytest.raises(ValueError, match="timesteps has shape"):
        jax.eval_shape(
            model.apply, {"params": params}, x["sample"], np.zeros(3), x["context"], x["added"]
        )


def test_bad_conditioning_is_clear():
    """time_ids that do not fill the projection, timestep_cond and context widths."""
    for family, call, match in [
        ("sdxl", {"num_time_ids": 5}, "32 \\+ 5 time ids \\* addition_time_embed_dim 8 = 72 != "),
        ("lcm", {"timestep_cond": np.zeros((1, 3))}, r"expected \(1, 8\) \(time_cond_proj_dim\)"),
        ("sd15", {"timestep_cond": np.zeros((1, 8))}, "time_cond_proj_dim=None"),
        ("kolors", {"context": np.zeros((1, 5, 24))}, r"expected \(B, L, 32\)"),
    ]:
        cfg = tiny_unet_config(family)
        model = UNet2DConditionModel.from_config(cfg)
        params = jax.eval_shape(lambda r, m=model: init_unet_params(m, r), jax.random.key(0))
        x = unet_inputs(cfg, batch=1)
        if "num_time_ids" in call:  # 5 time ids where the config needs 6 beside P = 32
            x["added"]["time_ids"] = x["added"]["time_ids"][:, :5]
        x.update({k: v for k, v in call.items() if k != "num_time_ids"})
        args = (x["sample"], 1, x["context"], x["added"], False, x["timestep_cond"])
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(model.apply, {"params": params}, *args)
