"""The whole Diffusion-DPO loss of one batch: JAX (load_unet + schedules + loss) vs PyTorch.

PyTorch side: the authors' recipe (SalesforceAIResearch/DiffusionDPO train.py) on a tiny random
diffusers UNet: winners and losers as one 2B batch (a pair is flipped when image 2 wins), one
noise and one timestep per pair repeated for both halves, DDPMScheduler.add_noise, mse over
C, H, W, the reference UNet under no_grad, inside = -0.5 * beta * (model_diff - ref_diff),
loss = -logsigmoid(inside).mean(). The reference is a slightly perturbed copy of the weights so
the loss is not log 2. JAX side: the same weights through bdpo_jax.models.load_unet, the pairs in
stored order with the label as a multiplier. Loss and every parameter gradient must agree.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdpo_jax import loss as loss_lib
from bdpo_jax import schedules

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
models = pytest.importorskip("bdpo_jax.models")

# The DPO loss is a difference of differences of per-image mse values (~1): with a reference
# very close to the policy, fp32 rounding alone moves `inside` by ~1e-4 relative (torch fp32 vs
# torch fp64 differ by 1.4e-5 in the gradient at REF_NOISE 0.02, beta 500). A reference 0.3 std
# away and beta 50 keep the problem well conditioned (|inside| ~ 0.1-2, torch fp32 within 3e-6
# of fp64), so a 1e-5 tolerance tests the formulas, not rounding.
BETA = 50.0
REF_NOISE = 0.3  # reference = policy + REF_NOISE * std(tensor) * N(0, 1), per tensor
LABEL = np.array([1.0, -1.0, 1.0], np.float32)  # pair 2: image 2 wins


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = models.tiny_unet_config("sd15")
    torch.manual_seed(0)
    policy = diffusers.UNet2DConditionModel.from_config(config).float()
    ref = diffusers.UNet2DConditionModel.from_config(config).float()
    with torch.no_grad():  # reference = policy + small noise
        for p_ref, p in zip(ref.parameters(), policy.parameters(), strict=True):
            p_ref.copy_(p + REF_NOISE * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0))
    root = tmp_path_factory.mktemp("parity")
    policy.save_pretrained(root / "policy")
    ref.save_pretrained(root / "ref")

    rng = np.random.default_rng(0)
    b, c, s = len(LABEL), config["in_channels"], config["sample_size"]
    data = {
        "x1": rng.standard_normal((b, c, s, s)).astype(np.float32),
        "x2": rng.standard_normal((b, c, s, s)).astype(np.float32),
        "eps": rng.standard_normal((b, c, s, s)).astype(np.float32),
        "t": np.array([10, 500, 990], np.int64),
        "text": rng.standard_normal((b, 4, config["cross_attention_dim"])).astype(np.float32),
    }
    return root, policy, ref, data


def torch_dpo(policy, ref, data):
    """The authors' loss and gradients (dict torch name -> numpy), in the dtype of `data`."""
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    t = {k: torch.from_numpy(v) for k, v in data.items()}
    flip = torch.from_numpy(LABEL < 0)[:, None, None, None]
    x_w = torch.where(flip, t["x2"], t["x1"])
    x_l = torch.where(flip, t["x1"], t["x2"])
    latents = torch.cat([x_w, x_l])
    noise = t["eps"].repeat(2, 1, 1, 1)
    timesteps = t["t"].repeat(2)
    text = t["text"].repeat(2, 1, 1)
    noisy = sched.add_noise(latents, noise, timesteps)
    policy.zero_grad()
    pred = policy(noisy, timesteps, text).sample
    model_losses = (pred - noise).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_pred = ref(noisy, timesteps, text).sample.detach()
        ref_losses = (ref_pred - noise).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * BETA * (model_diff - ref_diff)
    loss = -1 * torch.nn.functional.logsigmoid(inside_term).mean()
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in policy.named_parameters()}
    return float(loss.detach()), inside_term.detach().numpy(), grads


def jax_dpo(root, data):
    model, params = models.load_unet(root / "policy")
    _, ref_params = models.load_unet(root / "ref")
    sched = schedules.make_schedule()
    b = len(LABEL)

    def per_image_mse(p, xt_2B, t_2B, text_2B, target_2B):
        pred = model.apply({"params": p}, xt_2B, t_2B, text_2B)
        return ((pred.astype(target_2B.dtype) - target_2B) ** 2).mean(axis=(1, 2, 3))

    def loss_fn(p, ref_p, x1, x2, eps, t_B, text, label):
        x0_2B = jnp.concatenate([x1, x2])
        eps_2B = jnp.concatenate([eps, eps])
        t_2B = jnp.concatenate([t_B, t_B])
        xt_2B = schedules.add_noise(sched, x0_2B, eps_2B, t_2B)
        target_2B = schedules.training_target(sched, x0_2B, eps_2B, t_2B, "epsilon")
        text_2B = jnp.concatenate([text, text])
        err = per_image_mse(p, xt_2B, t_2B, text_2B, target_2B)
        ref = jax.lax.stop_gradient(per_image_mse(ref_p, xt_2B, t_2B, text_2B, target_2B))
        return loss_lib.dpo_loss(err[:b], err[b:], ref[:b], ref[b:], label, BETA)

    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # the one compile
    (loss, metrics), grads = fn(
        params, ref_params, data["x1"], data["x2"], data["eps"],
        jnp.asarray(data["t"], jnp.int32), data["text"], jnp.asarray(LABEL),
    )  # fmt: skip
    return float(loss), metrics, models.weights.params_to_torch_state(grads)


def _global_rel(grads, truth):
    diff_sq = sum(float(np.sum((grads[n] - truth[n]) ** 2)) for n in truth)
    return np.sqrt(diff_sq / sum(float(np.sum(truth[n].astype(np.float64) ** 2)) for n in truth))


def test_dpo_loss_and_gradients_match_pytorch(setup):
    root, policy, ref, data = setup
    loss_t, inside_t, grads_t = torch_dpo(policy, ref, data)
    loss_j, metrics_j, grads_j = jax_dpo(root, data)
    # the same computation in torch float64: how far fp32 rounding alone moves the result
    data64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in data.items()}
    loss_64, _, grads_64 = torch_dpo(
        copy.deepcopy(policy).double(), copy.deepcopy(ref).double(), data64
    )

    assert abs(loss_t - np.log(2.0)) > 0.05, "reference too close to the policy: loss ~ log 2"
    assert np.all(np.abs(inside_t) < 20), f"inside saturates: {inside_t}"
    assert abs(loss_j - loss_t) <= 1e-5 * abs(loss_t), (loss_j, loss_t)
    assert abs(loss_j - loss_64) <= 1e-5 * abs(loss_64), (loss_j, loss_64)
    np.testing.assert_allclose(
        float(metrics_j["implicit_accuracy"]), np.mean(inside_t > 0), atol=1e-6
    )

    assert set(grads_j) == set(grads_t), set(grads_j) ^ set(grads_t)
    global_rel = _global_rel(grads_j, grads_t)
    per_tensor = {
        n: float(np.max(np.abs(grads_j[n] - grads_t[n])) / max(np.max(np.abs(grads_t[n])), 1e-12))
        for n in grads_t
    }
    worst = max(per_tensor, key=per_tensor.get)
    print(
        f"loss torch {loss_t:.8f} jax {loss_j:.8f} torch-fp64 {loss_64:.8f}; grad global rel "
        f"jax-torch {global_rel:.2e}, jax-fp64 {_global_rel(grads_j, grads_64):.2e}, "
        f"torch-fp64 {_global_rel(grads_t, grads_64):.2e}; worst tensor {worst} "
        f"{per_tensor[worst]:.2e}"
    )
    assert global_rel <= 1e-5, global_rel
    assert _global_rel(grads_j, grads_64) <= 1e-5
    assert per_tensor[worst] <= 1e-4, (worst, per_tensor[worst])
