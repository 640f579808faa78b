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
    assert "params" in memory_plan.format_table([plan1, plan8])


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
