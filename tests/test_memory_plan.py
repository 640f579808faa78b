"""bdpo_jax.memory_plan: the per-device plan from eval_shape, and its CLI's user errors."""

import subprocess
import sys

import pytest

from bdpo_jax import memory_plan, schema


def test_memory_plan_counts_sd15_params_and_shards_them():
    """The plan from eval_shape: SD1.5 has 859.5M UNet params; FSDP over 8 divides the bulk."""
    plan1 = memory_plan.memory_plan(
        "sd15", mesh_shape=(1, 1), global_batch=8, grad_accum=1, latent_size=16, remat=True
    )
    plan8 = memory_plan.memory_plan(
        "sd15", mesh_shape=(1, 8), global_batch=8, grad_accum=1, latent_size=16, remat=True
    )
    assert plan1["num_params"] == 859_520_964
    rows1, rows8 = plan1["bytes_per_device"], plan8["bytes_per_device"]
    assert rows1["params"] == 4 * 859_520_964
    assert rows1["opt_state"] >= 2 * rows1["params"]  # Adam mu and nu
    assert rows8["params"] < rows1["params"] / 7  # nearly everything sharded 8 ways
    assert 0 < rows1["activations"] < rows1["activations_without_remat"]
    # the backward re-runs one checkpointed layer at a time: the largest layer's residuals, a
    # part of the un-checkpointed residuals
    assert 0 < rows1["remat_recompute"] < rows1["activations_without_remat"]
    # the backward's peak (jaxpr_memory): at its start every saved activation is held, at its
    # end the whole gradient; never more than all of them and the largest re-run layer at once
    # here (no skip-connection gradient outweighs a layer at 16 x 16)
    peak = rows1["backward_peak"]
    assert max(rows1["grads"], rows1["activations"]) <= peak
    assert peak <= rows1["grads"] + rows1["activations"] + rows1["remat_recompute"]
    held = rows1["params"] + rows1["ref_params"] + rows1["opt_state"]
    # config.dpo.matched_forward (the default): the selected params, once, in bf16 compute
    assert rows1["matched_forward"] == 2 * 859_520_964
    held += rows1["matched_forward"]
    assert rows1["grad_accumulator"] == 0
    assert rows1["total"] == held + peak
    accum = memory_plan.memory_plan(
        "sd15", mesh_shape=(1, 1), global_batch=8, grad_accum=2, latent_size=16, remat=True
    )["bytes_per_device"]
    assert accum["grad_accumulator"] == accum["grads"] == rows1["grads"]  # the running sum
    assert accum["total"] == (
        accum["params"]
        + accum["ref_params"]
        + accum["opt_state"]
        + accum["grad_accumulator"]
        + accum["matched_forward"]
        + accum["backward_peak"]
    )
    # FSDP over 8: the gradients held are the device's shards (1/8 of the bulk)
    assert rows8["backward_peak"] < rows1["backward_peak"] - 0.8 * rows1["grads"]
    off = memory_plan.memory_plan(
        "sd15",
        mesh_shape=(1, 1),
        global_batch=8,
        grad_accum=1,
        latent_size=16,
        matched_forward=False,
    )["bytes_per_device"]
    assert off["matched_forward"] == 0 and off["total"] == rows1["total"] - rows1["matched_forward"]
    assert "params" in memory_plan.format_table([plan1, plan8])


def test_memory_plan_lora_counts_by_hand_and_fits():
    """SD1.5 LoRA rank 4 on to_q, to_k, to_v, to_out.0 of its 16 transformer blocks (C = 320 in
    down_blocks_0 and up_blocks_3, 640 in down_blocks_1 and up_blocks_2, 1280 in down_blocks_2,
    the mid block and up_blocks_1; 2, 2, 2 blocks down, 1 mid, 3, 3, 3 up): a linear in -> out
    has r (in + out) adapter params; attn1 has four C -> C, attn2 to_q and to_out C -> C and
    to_k, to_v 768 -> C (CLIP's text width)."""
    r, text = 4, 768
    blocks = {320: 2 + 3, 640: 2 + 3, 1280: 2 + 1 + 3}
    per_block = {c: r * (4 * 2 * c + 2 * 2 * c + 2 * (text + c)) for c in blocks}
    expected = sum(n * per_block[c] for c, n in blocks.items())
    assert expected == 797_184  # diffusers' train_text_to_image_lora.py at rank 4: 797,184
    kernels = sum(n * (4 * c * c + 2 * c * c + 2 * text * c) for c, n in blocks.items())

    plan = memory_plan.memory_plan(
        "sd15",
        mesh_shape=(1, 1),
        global_batch=2,
        grad_accum=1,
        latent_size=16,
        activations=False,
        lora_rank=r,
    )
    rows = plan["bytes_per_device"]
    assert plan["num_adapter_params"] == expected
    assert rows["base_params"] == 2 * 859_520_964  # once, in the bf16 compute dtype
    assert rows["params"] == rows["ref_params"] == rows["grads"] == 4 * expected
    assert 0 <= rows["opt_state"] - 2 * 4 * expected <= 16  # AdamW mu, nu (+ step counts)
    assert rows["merged_kernels"] == 2 * kernels
    # without activations the backward holds the adapters' gradients and reads the merged kernels
    assert rows["backward_peak"] == rows["grads"] + rows["merged_kernels"]
    assert rows["total"] == (
        rows["base_params"]
        + rows["params"]
        + rows["ref_params"]
        + rows["opt_state"]
        + rows["backward_peak"]
    )
    assert plan["fits_one_gpu"] == {"24GB": True, "40GB": True, "80GB": True}
    full = memory_plan.memory_plan(
        "sd15", mesh_shape=(1, 1), global_batch=2, grad_accum=1, latent_size=16, activations=False
    )
    assert full["bytes_per_device"]["total"] > 5 * rows["total"]
    assert "merged_kernels" in memory_plan.format_table([plan, full])
    # with activations: the LoRA step's program (kernels merged in the forward, the adapters
    # differentiated) holds every merged kernel at the backward's start; its gradients are the
    # adapters' (the full model's f32 gradient would be twice the bf16 base)
    traced = memory_plan.memory_plan(
        "sd15", mesh_shape=(1, 1), global_batch=2, grad_accum=1, latent_size=16, lora_rank=r
    )["bytes_per_device"]
    assert traced["merged_kernels"] < traced["backward_peak"] < traced["base_params"]


def test_cpu_backend_counts_what_the_backward_keeps_in_f32():
    """XLA:CPU runs bf16 ops in f32 and keeps f32 values for the backward: the cpu plan counts
    each saved element at >= 4 bytes (by hand on a residual list), the state rows unchanged."""
    import jax
    import jax.numpy as jnp

    residuals = [
        (jax.ShapeDtypeStruct((2, 3), jnp.bfloat16), "output of dot_general"),
        (jax.ShapeDtypeStruct((5,), jnp.float32), "output of reduce_sum"),
        (jax.ShapeDtypeStruct((7, 7), jnp.bfloat16), "from the argument p"),
    ]
    assert memory_plan._held_bytes(residuals, memory_plan.BACKEND_MIN_ITEMSIZE["gpu"]) == 12 + 20
    assert memory_plan._held_bytes(residuals, memory_plan.BACKEND_MIN_ITEMSIZE["cpu"]) == 24 + 20
    kw = dict(mesh_shape=(1, 1), global_batch=2, grad_accum=1, latent_size=16)
    gpu = memory_plan.memory_plan("sd15", **kw)["bytes_per_device"]
    cpu = memory_plan.memory_plan("sd15", backend="cpu", **kw)["bytes_per_device"]
    for row in ("params", "ref_params", "opt_state", "grads", "matched_forward"):
        assert cpu[row] == gpu[row], row
    # bf16 mostly, some f32 (norm statistics); the backward's peak also holds the f32 gradient
    for row in ("activations", "remat_recompute", "backward_peak"):
        assert gpu[row] < cpu[row] <= 2 * gpu[row], row
    with pytest.raises(schema.ConfigError, match="--backend 'tpu'"):
        memory_plan.memory_plan("sd15", backend="tpu", **kw)


def test_parse_mesh():
    assert memory_plan.parse_mesh("1,8") == (1, 8)
    for bad in ("8", "1,x", "0,8", "1,2,3", ""):
        with pytest.raises(schema.ConfigError, match="--mesh"):
            memory_plan.parse_mesh(bad)


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    cases = {
        "--model": ["--model", "sd3"],
        "--mesh": ["--mesh", "1x8"],
        "--batch": ["--model", "sd15", "--mesh", "1,8", "--batch", "12"],
        "--optimizer": ["--optimizer", "sgd"],
        "--lora-rank": ["--lora-rank", "-1"],
        "--backend": ["--backend", "tpu"],
    }
    for culprit, args in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            memory_plan.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, culprit
        assert err.count("\n") == 1 and culprit in err, err
        assert err.startswith(f"{memory_plan.PROG}: error: ") and "Traceback" not in err
    with pytest.raises(schema.ConfigError, match="--mesh"):  # --debug: the traceback
        memory_plan.main(["--mesh", "1x8", "--debug"])
    # the real command line
    command = [sys.executable, "-m", "bdpo_jax.memory_plan", "--mesh", "a,b"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--mesh 'a,b'" in result.stderr and "Traceback" not in result.stderr
