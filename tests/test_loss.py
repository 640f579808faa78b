"""bdpo_jax.loss against a hand-written numpy reference, worked examples and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdpo_jax import loss as loss_lib


def reference_dpo(m1, m2, r1, r2, label, beta, w=None):
    """Numpy float64 Diffusion-DPO (authors' formula); -log_sigmoid(x) = logaddexp(0, -x)."""
    m1, m2, r1, r2 = (np.asarray(x, np.float64) for x in (m1, m2, r1, r2))
    label = np.asarray(label, np.float64)
    diff = (m1 - m2) - (r1 - r2)
    if label.ndim == 1:
        inside = -0.5 * beta * label * diff
        return np.mean(np.logaddexp(0.0, -inside))
    k = label.shape[1]
    w = np.full(k, 1.0 / k) if w is None else np.asarray(w, np.float64)
    inside = -0.5 * beta * label * diff[:, None]
    return np.mean(np.sum(w * np.logaddexp(0.0, -inside), axis=1))


def _random_mse(rng, b, spread=1e-3):
    """Per-image mse values like a real UNet's: ~0.1 with small pair differences."""
    base = rng.uniform(0.05, 0.3, size=b)
    return [base + spread * rng.standard_normal(b) for _ in range(4)]


@pytest.mark.parametrize(
    "label_kind,beta", [("hard", 5000.0), ("soft", 5000.0), ("smpo", 2000.0), ("hard", 1.0)]
)
def test_matches_numpy_reference(label_kind, beta):
    rng = np.random.default_rng(1)
    b = 64
    m1, m2, r1, r2 = _random_mse(rng, b)
    label = {
        "hard": rng.choice([-1.0, 0.0, 1.0], size=b),
        "soft": rng.uniform(-1, 1, size=b),
        "smpo": 10.0 * (2.0 / (1.0 + np.exp(-rng.standard_normal(b))) - 1.0),
    }[label_kind]
    inputs = [np.float32(x) for x in (m1, m2, r1, r2, label)]
    loss, metrics = loss_lib.dpo_loss(*inputs[:4], inputs[4], beta)
    expected = reference_dpo(*inputs, beta)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    inside = -0.5 * beta * inputs[4].astype(np.float64) * ((m1 - m2) - (r1 - r2))
    active = inputs[4] != 0
    np.testing.assert_allclose(
        float(metrics["implicit_accuracy"]), np.mean(inside[active] > 0), atol=1e-6
    )
    sign = np.sign(inputs[4][active])
    np.testing.assert_allclose(
        float(metrics["model_diff"]), np.mean(sign * (inputs[0] - inputs[1])[active]), atol=1e-6
    )
    np.testing.assert_allclose(
        float(metrics["ref_diff"]), np.mean(sign * (inputs[2] - inputs[3])[active]), atol=1e-6
    )
    np.testing.assert_allclose(float(metrics["label_abs_mean"]), np.abs(inputs[4]).mean(), 1e-6)
    np.testing.assert_allclose(float(metrics["label_zero_fraction"]), 1 - active.mean(), 1e-6)


def test_worked_example_by_hand():
    # beta = 10; pairs (m1, m2, r1, r2, label):
    #  A (0.10, 0.20, 0.15, 0.15, +1): diff -0.10, inside = -0.5*10*(+1)*(-0.10) = +0.5
    #  B (0.40, 0.10, 0.20, 0.20, +1): diff +0.30, inside = -1.5
    #  C (0.50, 0.60, 0.30, 0.10,  0): inside 0, loss log 2, no preference
    #  D (0.20, 0.10, 0.12, 0.10, -1): diff 0.10 - 0.02 = 0.08, inside = -0.5*10*(-1)*0.08 = +0.4
    m1 = [0.10, 0.40, 0.50, 0.20]
    m2 = [0.20, 0.10, 0.60, 0.10]
    r1 = [0.15, 0.20, 0.30, 0.12]
    r2 = [0.15, 0.20, 0.10, 0.10]
    label = [1, 1, 0, -1]
    per_pair = [
        math.log1p(math.exp(-0.5)),
        math.log1p(math.exp(1.5)),
        math.log(2.0),
        math.log1p(math.exp(-0.4)),
    ]
    loss, metrics = loss_lib.dpo_loss(*(jnp.array(x) for x in (m1, m2, r1, r2, label)), 10.0)
    np.testing.assert_allclose(float(loss), sum(per_pair) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.845413, atol=1e-6)  # the same, as a number
    np.testing.assert_allclose(float(metrics["implicit_accuracy"]), 2 / 3, rtol=1e-6)  # A, D
    # winner minus loser over A, B, D: -0.10, +0.30, -(0.10) -> 0.1 / 3
    np.testing.assert_allclose(float(metrics["model_diff"]), 0.1 / 3, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ref_diff"]), -0.02 / 3, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["model_mse"]), np.mean(m1 + m2), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ref_mse"]), np.mean(r1 + r2), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["label_abs_mean"]), 0.75, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["label_zero_fraction"]), 0.25, rtol=1e-6)


def test_beta_is_applied_once():
    # one pair, diff 1e-3, label +1: inside = -0.5 * beta * 1e-3. beta = 5000 -> -2.5 exactly;
    # applying beta twice (a known porting bug) would give -12500.
    loss, _ = loss_lib.dpo_loss(
        jnp.array([0.101]), jnp.array([0.100]), jnp.array([0.2]), jnp.array([0.2]),
        jnp.array([1.0]), 5000.0,
    )  # fmt: skip
    np.testing.assert_allclose(float(loss), math.log1p(math.exp(2.5)), rtol=1e-3)


@pytest.mark.parametrize("label", [[1.0, -1.0, 0.0, 1.0], [0.3, -0.7, 1.0, -10.0]])
def test_policy_equal_reference_gives_log2(label):
    rng = np.random.default_rng(2)
    m1, m2 = rng.uniform(0.05, 0.3, size=(2, 4)).astype(np.float32)
    loss, metrics = loss_lib.dpo_loss(m1, m2, m1, m2, jnp.array(label), 5000.0)
    assert float(loss) == pytest.approx(math.log(2.0), abs=1e-7)
    assert float(metrics["implicit_accuracy"]) == 0.0  # strictly > 0, as the authors log it


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    b, beta = 8, 50.0
    inputs = [x.astype(np.float32) for x in _random_mse(rng, b, spread=0.02)]
    label = rng.choice([-1.0, 1.0], size=b).astype(np.float32)
    label[0] = 0.4  # a soft label too

    def f(*mse):
        return loss_lib.dpo_loss(*mse, label, beta)[0]

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(*(jnp.asarray(x) for x in inputs))
    h = 1e-6
    for arg in range(4):
        for i in range(b):
            plus = [x.astype(np.float64) for x in inputs]
            minus = [x.astype(np.float64) for x in inputs]
            plus[arg][i] += h
            minus[arg][i] -= h
            fd = (reference_dpo(*plus, label, beta) - reference_dpo(*minus, label, beta)) / (2 * h)
            np.testing.assert_allclose(float(grads[arg][i]), fd, rtol=1e-4, atol=1e-7)


def test_label_zero_pairs_get_zero_gradient():
    rng = np.random.default_rng(4)
    inputs = [jnp.asarray(x, jnp.float32) for x in _random_mse(rng, 6, spread=0.05)]
    label = jnp.array([1.0, 0.0, -1.0, 0.0, 0.5, 0.0])
    grads = jax.grad(lambda *m: loss_lib.dpo_loss(*m, label, 5000.0)[0], argnums=(0, 1))(*inputs)
    for g in grads:
        g = np.asarray(g)
        np.testing.assert_array_equal(g[[1, 3, 5]], 0.0)
        assert np.all(g[[0, 2, 4]] != 0.0)


def test_eq10_one_hot_weights_equal_the_single_label_loss():
    rng = np.random.default_rng(5)
    b, k = 16, 4
    inputs = [jnp.asarray(x, jnp.float32) for x in _random_mse(rng, b)]
    votes_BxK = jnp.asarray(rng.choice([-1.0, 1.0], size=(b, k)), jnp.float32)
    for j in range(k):
        one_hot = jnp.zeros(k).at[j].set(1.0)
        loss_k, metrics_k = loss_lib.dpo_loss(*inputs, votes_BxK, 5000.0, weights_K=one_hot)
        loss_1, metrics_1 = loss_lib.dpo_loss(*inputs, votes_BxK[:, j], 5000.0)
        np.testing.assert_allclose(float(loss_k), float(loss_1), rtol=1e-6)
        for name in metrics_1:
            np.testing.assert_allclose(
                float(metrics_k[name]), float(metrics_1[name]), rtol=1e-6, atol=1e-7
            )


def test_eq10_matches_numpy_reference():
    rng = np.random.default_rng(6)
    b, k = 32, 3
    inputs = [x.astype(np.float32) for x in _random_mse(rng, b)]
    votes = rng.choice([-1.0, 1.0], size=(b, k)).astype(np.float32)
    for w in (None, np.array([0.5, 2.0, 0.0], np.float32)):  # weights as given, unnormalised
        loss, _ = loss_lib.dpo_loss(*inputs, votes, 5000.0, weights_K=w)
        np.testing.assert_allclose(float(loss), reference_dpo(*inputs, votes, 5000.0, w), 1e-5)


def test_huge_inside_is_finite():
    loss, _ = loss_lib.dpo_loss(
        jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), jnp.zeros(2), jnp.zeros(2),
        jnp.array([1.0, 1.0]), 5000.0,
    )  # fmt: skip
    # inside = -2500 (loss 2500) and +2500 (loss 0)
    np.testing.assert_allclose(float(loss), 1250.0, rtol=1e-6)
    grads = jax.grad(
        lambda m: loss_lib.dpo_loss(m, jnp.array([0.0, 1.0]), jnp.zeros(2), jnp.zeros(2),
                                    jnp.array([1.0, 1.0]), 5000.0)[0]
    )(jnp.array([1.0, 0.0]))  # fmt: skip
    assert np.all(np.isfinite(np.asarray(grads)))


def test_all_labels_zero_metrics_are_zero_not_nan():
    z = jnp.zeros(3)
    loss, metrics = loss_lib.dpo_loss(z + 0.1, z + 0.2, z, z, z, 5000.0)
    assert float(loss) == pytest.approx(math.log(2.0))
    assert float(metrics["implicit_accuracy"]) == 0.0 and float(metrics["model_diff"]) == 0.0
    assert float(metrics["label_zero_fraction"]) == 1.0


def test_jit_and_bad_shapes():
    x = jnp.full((4,), 0.1)
    jitted = jax.jit(loss_lib.dpo_loss, static_argnums=(5,))
    loss, _ = jitted(x, x + 0.01, x, x, jnp.ones(4), 100.0)
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="model_mse_1_B"):
        loss_lib.dpo_loss(x, jnp.ones(3), x, x, jnp.ones(4), 1.0)
    with pytest.raises(ValueError, match="label"):
        loss_lib.dpo_loss(x, x, x, x, jnp.ones(5), 1.0)
    with pytest.raises(ValueError, match="weights_K"):
        loss_lib.dpo_loss(x, x, x, x, jnp.ones(4), 1.0, weights_K=jnp.ones(2))
    with pytest.raises(ValueError, match="weights_K"):
        loss_lib.dpo_loss(x, x, x, x, jnp.ones((4, 3)), 1.0, weights_K=jnp.ones(2))


def test_sft_loss_is_the_mean_mse_of_winners():
    assert float(loss_lib.sft_loss(jnp.array([0.1, 0.2, 0.6]))) == pytest.approx(0.3)
    g = jax.grad(loss_lib.sft_loss)(jnp.array([0.1, 0.2, 0.6, 0.3]))
    np.testing.assert_allclose(np.asarray(g), 0.25)


def test_per_image_error_worked_example():
    # one image of 4 elements, errors (0, 0.1, -0.3, 2): l2 mean 4.1 / 4, l1 mean 2.4 / 4
    pred = jnp.array([[0.0, 0.1, -0.3, 2.0]]).reshape(1, 1, 2, 2)
    target = jnp.zeros_like(pred)
    l2 = loss_lib.per_image_error(pred, target)
    l1 = loss_lib.per_image_error(pred, target, "l1")
    np.testing.assert_allclose(np.asarray(l2), [(0.01 + 0.09 + 4.0) / 4], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(l1), [2.4 / 4], rtol=1e-6)
    # pseudo-Huber, c = 1: sqrt(d^2 + 1) - 1 per element
    want = np.mean(np.sqrt(np.array([0.0, 0.01, 0.09, 4.0]) + 1.0) - 1.0)
    got = loss_lib.per_image_error(pred, target, "pseudo_huber", 1.0)
    np.testing.assert_allclose(np.asarray(got), [want], rtol=1e-6)


def test_pseudo_huber_is_half_l2_for_small_errors_and_c_l1_for_large_ones():
    rng = np.random.default_rng(0)
    pred = jnp.asarray(rng.standard_normal((3, 2, 4, 4)), jnp.float32)
    target = jnp.zeros_like(pred)
    small = loss_lib.per_image_error(1e-3 * pred, target, "pseudo_huber", 10.0)
    half_l2 = 0.5 * loss_lib.per_image_error(1e-3 * pred, target)
    np.testing.assert_allclose(np.asarray(small), np.asarray(half_l2), rtol=1e-3)
    large = loss_lib.per_image_error(pred, target, "pseudo_huber", 1e-4)
    c_l1 = 1e-4 * loss_lib.per_image_error(pred, target, "l1")
    np.testing.assert_allclose(np.asarray(large), np.asarray(c_l1), rtol=1e-3)


def test_per_image_error_rejects_an_unknown_type():
    with pytest.raises(ValueError, match="loss_type='huber'"):
        loss_lib.per_image_error(jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1)), "huber")
