"""The demo world (bdpo_demo.world), its measures, the demo scorers and the demo UNet config."""

import numpy as np
import PIL.Image
import pytest

from bdpo_demo import measures, model, world

SPECS = world.all_specs()
RANGES = measures.MEASURE_RANGES


def test_world_has_180_distinct_prompts_that_parse_back():
    prompts = [s.prompt for s in SPECS]
    assert len(prompts) == 180 == len(set(prompts))
    assert prompts[0] == "a red circle on a white background, top left"
    assert [world.parse_prompt(p) for p in prompts] == SPECS


@pytest.mark.parametrize(
    "prompt",
    ["a red circle", "a purple circle on a white background, top left",
     "a red circle on a white background, middle"],
)  # fmt: skip
def test_parse_rejects_prompts_outside_the_world(prompt):
    with pytest.raises(ValueError, match="demo-world prompt|outside the demo world"):
        world.parse_prompt(prompt)


def test_render_draws_the_object_with_the_documented_area_colour_and_centre():
    spec = world.Spec("blue", "square", "black", "bottom right")
    image = world.render(spec)
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    blue = np.all(np.abs(image - world.OBJECT_COLOURS["blue"]) < 1e-6, axis=-1)
    # 12% of 1024 px = 122.9 px of square: side 11.1 px, so ~100 px are fully covered
    assert 90 <= blue.sum() <= 123
    rows, cols = np.nonzero(blue)
    assert abs(rows.mean() + 0.5 - 0.7 * 32) < 0.6 and abs(cols.mean() + 0.5 - 0.7 * 32) < 0.6
    corner = image[0, 0]
    np.testing.assert_allclose(corner, world.BACKGROUNDS["black"], atol=1e-6)


def test_another_size_draws_the_same_scene_and_the_config_default_is_the_world_s(monkeypatch):
    """At 16 px with 4x supersampling a render samples the same 64 x 64 points as one at 32 px
    with 2x supersampling: the first is the second averaged over 2 x 2 pixels, exactly."""
    from configs import demo

    assert demo.get_config().demo.image_size == world.IMAGE_SIZE
    no_blur = world.FlawRates(blur=0.0)
    small = {s: world.render(s, size=16) for s in SPECS[::11]}
    flawed = [world.render_flawed(s, no_blur, np.random.default_rng(i), 16)
              for i, s in enumerate(SPECS[::11])]  # fmt: skip
    monkeypatch.setattr(world, "SUPERSAMPLE", 2)
    for i, (spec, image) in enumerate(small.items()):
        assert image.shape == (16, 16, 3)
        pooled = world.render(spec, size=32).reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
        np.testing.assert_allclose(image, pooled, atol=1e-6)
        big = world.render_flawed(spec, no_blur, np.random.default_rng(i), 32)
        np.testing.assert_allclose(flawed[i], big.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3)),
                                   atol=1e-6)  # fmt: skip


def test_perfect_render_scores_at_the_top_of_each_documented_scale():
    for spec in SPECS[::7]:
        image = world.render(spec)
        scores = {name: fn(image, spec) for name, fn in measures.MEASURES.items()}
        for name, (lo, hi) in RANGES.items():
            assert lo <= scores[name] <= hi, (spec, name, scores[name])
        assert scores["colour"] > 0.7 and scores["shape"] > 8.0 and scores["position"] > 95.0


def _flawed(spec: world.Spec) -> dict[str, np.ndarray]:
    other_colour = next(c for c in world.OBJECT_COLOURS if c != spec.colour)
    other_shape = next(s for s in world.SHAPES if s != spec.shape)
    elsewhere = (0.5, 0.5) if spec.position != "center" else (0.3, 0.7)
    return {
        "colour": world.render(spec, colour=world.OBJECT_COLOURS[other_colour]),
        "shape": world.render(spec, shape=other_shape),
        "position": world.render(spec, centre_rc=elsewhere),
        "sharpness": world.render(spec, blur_sigma=1.5),
    }


@pytest.mark.parametrize("flaw", sorted(measures.MEASURES))
def test_each_flaw_lowers_its_own_measure_for_every_prompt(flaw):
    for spec in SPECS:
        perfect = measures.MEASURES[flaw](world.render(spec), spec)
        flawed = measures.MEASURES[flaw](_flawed(spec)[flaw], spec)
        assert flawed < perfect, (spec, flaw, flawed, perfect)


def test_measures_are_independent_a_wrong_colour_keeps_shape_and_position():
    spec = world.Spec("red", "triangle", "gray", "top right")
    perfect, wrong = world.render(spec), _flawed(spec)["colour"]
    assert measures.colour_score(wrong, spec) < 0.2 < 0.75 < measures.colour_score(perfect, spec)
    for name in ("shape", "position"):
        a, b = measures.MEASURES[name](perfect, spec), measures.MEASURES[name](wrong, spec)
        assert abs(a - b) <= 0.02 * (RANGES[name][1] - RANGES[name][0]), (name, a, b)


def test_hand_made_images_score_as_the_formulas_say():
    spec = world.Spec("green", "square", "white", "center")
    empty = np.broadcast_to(np.asarray(world.BACKGROUNDS["white"], np.float32), (32, 32, 3))
    assert measures.colour_score(empty, spec) == 0.0
    assert measures.shape_score(empty, spec) == 1.0
    assert measures.position_score(empty, spec) == 0.0
    assert measures.sharpness_score(empty, spec) == -1.0
    # a hard-edged 8x8 green square exactly at the centre: exact colour, IoU 1, distance 0,
    # every neighbour step is the full colour step (ratio 1 -> sharpness 1)
    square = np.array(empty)
    square[12:20, 12:20] = world.OBJECT_COLOURS["green"]
    assert measures.colour_score(square, spec) == pytest.approx(1.0)
    assert measures.shape_score(square, spec) == pytest.approx(10.0, abs=1e-4)
    assert measures.position_score(square, spec) == pytest.approx(100.0)
    assert measures.sharpness_score(square, spec) == pytest.approx(1.0)
    # moved 8 px right: distance 8 of half-side 16 -> 50
    moved = np.roll(square, 8, axis=1)
    assert measures.position_score(moved, spec) == pytest.approx(50.0)


def _shift(visible_distance: float, visible_step: float) -> dict[str, float]:
    """Per measure, how far invisible noise moves the perfect renders' mean (share of range)."""
    with measures.dead_zones(visible_distance, visible_step):
        return {name: m[2] for name, m in measures.invisible_noise_means().items()}


def test_invisible_noise_moves_no_mean_by_more_than_1_percent_and_the_dead_zones_are_minimal():
    d, g = measures.VISIBLE_DISTANCE, measures.VISIBLE_STEP
    assert max(_shift(d, g).values()) <= 0.01
    # 0.005 less of either dead zone and the noise moves some mean by more than 1%
    assert _shift(d - 0.005, g)["shape"] > 0.01
    assert _shift(d, g - 0.005)["sharpness"] > 0.01
    # without dead zones (the measures before): shape fell by 6 of its 9 points
    assert _shift(0.0, 0.0)["shape"] > 0.7
    assert (measures.VISIBLE_DISTANCE, measures.VISIBLE_STEP) == (d, g)  # restored


def test_invisible_noise_means_follow_a_hand_computed_mean():
    specs = SPECS
    rng = np.random.default_rng(1)
    noisy = [np.round(np.clip(world.render(s) + rng.normal(0, 0.01, (32, 32, 3)), 0, 1) * 255)
             / 255 for s in specs]  # fmt: skip
    want = np.mean([measures.position_score(i, s) for i, s in zip(noisy, specs, strict=True)])
    assert measures.invisible_noise_means()["position"][1] == pytest.approx(want, rel=1e-12)


def test_calibration_cli_prints_the_table(capsys):
    measures.main([])
    out = capsys.readouterr().out
    assert "| these (0.030, 0.050) |" in out and "| none (before) (0.000, 0.000) |" in out
    assert out.count("\n|") == 6  # header, rule and four rows
    with pytest.raises(SystemExit) as exit_info:
        measures.main(["--noise-std", "-1"])
    assert exit_info.value.code == 2
    assert "--noise-std must be > 0, got -1.0" in capsys.readouterr().err


def test_dead_zones_leave_visible_flaws_measured():
    spec = world.Spec("yellow", "triangle", "gray", "top left")
    perfect = measures.sharpness_score(world.render(spec), spec)
    blurred = [
        measures.sharpness_score(world.render(spec, blur_sigma=b), spec) for b in (0.5, 1, 2)
    ]
    assert perfect > blurred[0] > blurred[1] > blurred[2]
    # a pixel just past the dead zone is a little object; one inside it is background
    bg = np.asarray(world.BACKGROUNDS["gray"], np.float32)
    image = np.array(np.broadcast_to(bg, (32, 32, 3)))
    image[0, 0] += measures.VISIBLE_DISTANCE * 0.9 / np.sqrt(3)
    image[0, 1] += (measures.VISIBLE_DISTANCE + 0.032) / np.sqrt(3)
    weights = measures.object_weights(image, spec)
    assert weights[0, 0] == 0.0 and weights[1:, :].max() == 0.0
    assert weights[0, 1] == pytest.approx(
        0.032 / (measures.FOREGROUND_DISTANCE - measures.VISIBLE_DISTANCE), rel=1e-4
    )


def test_render_flawed_flaw_rates_are_independent_and_as_given():
    rng = np.random.default_rng(0)
    spec = world.Spec("yellow", "circle", "black", "bottom left")
    rates = world.FlawRates(colour=0.5, shape=0.0, position=0.0, blur=0.0)
    colours = [world.render_flawed(spec, rates, rng) for _ in range(200)]
    wrong = [measures.colour_score(img, spec) < 0.5 for img in colours]
    assert 0.38 < np.mean(wrong) < 0.62
    assert min(measures.shape_score(img, spec) for img in colours) > 8.5
    none = world.FlawRates(0.0, 0.0, 0.0, 0.0)
    clean = world.render_flawed(spec, none, rng)
    assert measures.position_score(clean, spec) > 90


@pytest.mark.torch
def test_demo_scorers_match_the_measures_on_png_round_trips():
    pytest.importorskip("torch")
    from bdpo_demo import plugins  # noqa: F401  (registers the scorers)
    from scorers_torch.scorers.base import build_scorers

    scorers = build_scorers({name: {} for name in measures.MEASURES})
    specs = SPECS[:3]
    images = [world.render(s, blur_sigma=1.0 * i) for i, s in enumerate(specs)]
    pil = [PIL.Image.fromarray(np.round(i * 255).astype(np.uint8)) for i in images]
    prompts = [s.prompt for s in specs]
    for name, scorer in scorers.items():
        got = scorer.score(pil, prompts)
        assert got.dtype == np.float32 and got.shape == (3,)
        want = [measures.MEASURES[name](np.asarray(p, np.float32) / 255, s)
                for p, s in zip(pil, specs, strict=True)]  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="not a demo-world prompt"):
        scorers["colour"].score(pil[:1], ["a cat"])


@pytest.mark.torch
def test_demo_unet_config_builds_the_same_network_in_diffusers_and_flax():
    diffusers = pytest.importorskip("diffusers")
    import jax

    from bdpo_jax.models import UNet2DConditionModel

    cfg = model.demo_unet_config((8, 16), cross_attention_dim=24)
    torch_model = diffusers.UNet2DConditionModel.from_config(cfg)
    flax_model = UNet2DConditionModel.from_config(cfg)
    shapes = jax.eval_shape(
        flax_model.init, jax.random.PRNGKey(0), np.zeros((1, 12, 16, 16), np.float32),
        np.zeros((1,), np.float32), np.zeros((1, 4, 24), np.float32),
    )  # fmt: skip
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == sum(p.numel() for p in torch_model.parameters())
    assert cfg["down_block_types"][0] == "DownBlock2D"  # no attention at 16x16
    assert (cfg["in_channels"], cfg["out_channels"], cfg["sample_size"]) == (12, 12, 16)
    with pytest.raises(ValueError, match="at least 2 levels"):
        model.demo_unet_config((8,))


@pytest.mark.torch
def test_full_resolution_demo_unet_has_plain_levels_and_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    import jax

    from bdpo_jax.models import UNet2DConditionModel

    cfg = model.demo_unet_config((8, 16, 16), fold=1, plain_levels=2, cross_attention_dim=24)
    assert (cfg["in_channels"], cfg["out_channels"], cfg["sample_size"]) == (3, 3, 32)
    assert cfg["down_block_types"] == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert cfg["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    torch_model = diffusers.UNet2DConditionModel.from_config(cfg)
    shapes = jax.eval_shape(
        UNet2DConditionModel.from_config(cfg).init, jax.random.PRNGKey(0),
        np.zeros((1, 3, 32, 32), np.float32), np.zeros((1,), np.float32),
        np.zeros((1, 4, 24), np.float32),
    )  # fmt: skip
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == sum(p.numel() for p in torch_model.parameters())
    no_attention = model.demo_unet_config((8, 16, 16), plain_levels=0)
    assert no_attention["down_block_types"][0] == "CrossAttnDownBlock2D"
    with pytest.raises(ValueError, match="plain_levels=3"):
        model.demo_unet_config((8, 16, 16), plain_levels=3)  # no level left to read the text
    with pytest.raises(ValueError, match="fold=3"):
        model.demo_unet_config((8, 16, 16), fold=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        model.demo_unet_config((4, 16, 16))  # GroupNorm's 8 groups
    # another world size: the latent side follows it; each level must halve a whole side
    small = model.demo_unet_config((8, 16, 16), fold=1, plain_levels=2, image_size=16)
    assert small["sample_size"] == 16 and small["in_channels"] == 3
    assert model.demo_unet_config((8, 16, 16), image_size=16)["sample_size"] == 8
    with pytest.raises(ValueError, match="image_size=20: .* multiple of 8"):
        model.demo_unet_config((8, 16, 16), fold=2, image_size=20)


@pytest.mark.torch
def test_each_fold_has_an_encoder_that_writes_the_latents_the_study_builds():
    from bdpo_demo import plugins  # noqa: F401  (registers the unshuffle encoder)
    from scorers_torch.encoders import LATENT_ENCODERS

    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    for fold, channels in ((1, 3), (2, 12)):
        moments = LATENT_ENCODERS.build(model.latent_encoder_name(fold)).encode(images)
        latents = model.images_to_latents(images, fold)
        assert latents.shape == (2, channels, 32 // fold, 32 // fold)
        np.testing.assert_array_equal(moments[:, 0], latents)
        np.testing.assert_array_equal(model.latents_to_images(latents), images)


@pytest.mark.torch
def test_pixel_unshuffle_matches_torch_and_round_trips_through_the_encoder_and_generator():
    torch = pytest.importorskip("torch")

    from bdpo_demo import plugins  # noqa: F401  (registers the latent encoder)
    from scorers_torch.encoders import IDENTITY_LOGVAR, LATENT_ENCODERS

    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    folded = model.pixel_unshuffle(images)
    want = torch.nn.functional.pixel_unshuffle(torch.from_numpy(images), 2).numpy()
    np.testing.assert_array_equal(folded, want)
    np.testing.assert_array_equal(model.pixel_shuffle(folded), images)
    np.testing.assert_array_equal(model.latents_to_images(folded), images)
    np.testing.assert_array_equal(model.latents_to_images(images), images)  # RGB: as is
    moments = LATENT_ENCODERS.build(model.LATENT_ENCODER).encode(images)
    assert moments.shape == (2, 2, 12, 16, 16)
    np.testing.assert_array_equal(moments[:, 0], want)
    assert np.all(moments[:, 1] == IDENTITY_LOGVAR)
    with pytest.raises(ValueError, match="neither RGB nor unshuffled RGB"):
        model.latents_to_images(np.zeros((1, 5, 4, 4), np.float32))
    with pytest.raises(ValueError, match="not a multiple of 2"):
        model.pixel_unshuffle(np.zeros((1, 3, 5, 4), np.float32))


def test_border_distance_keeps_renders_on_their_background_and_flags_noise():
    from bdpo_demo import base_study

    rng = np.random.default_rng(0)
    specs = world.all_specs()
    rates = world.FlawRates()
    flawed = [base_study.border_distance(world.render_flawed(s, rates, rng), s) for s in specs]
    assert max(flawed) < base_study.OFF_BACKGROUND / 2
    spec = specs[0]
    noise = rng.uniform(0, 1, (32, 32, 3))
    assert base_study.border_distance(noise, spec) > 3 * base_study.OFF_BACKGROUND
    # by hand: only the outer 2-pixel ring counts, at its RGB distance from the background
    image = np.broadcast_to(np.asarray(world.BACKGROUNDS[spec.background]), (32, 32, 3)).copy()
    image[5:27, 5:27] = 0.0 if spec.background != "black" else 1.0  # inside: ignored
    assert base_study.border_distance(image, spec) == pytest.approx(0.0)
    image[0, :] += 0.3  # one row of the ring: 32 of its 240 pixels, each 0.3 * sqrt(3) away
    want = 32 / 240 * 0.3 * np.sqrt(3)
    assert base_study.border_distance(image, spec) == pytest.approx(want)
    scores = {"sharpness": np.array([0.1, 0.3])}
    rows = base_study.by_background([spec.prompt, spec.prompt], np.stack([image, noise]), scores)
    assert rows == {
        spec.background: {"images": 2, "sharpness": pytest.approx(0.2), "off_background": 0.5}
    }
