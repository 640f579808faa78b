"""Several hosts on one machine: two processes x 4 CPU devices, launched as the README says
(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), train exactly like one
process x 8 devices, and their checkpoint resumes on one process.

The one-process runs run in this test process (the conftest's eight fake devices); the
two-process run is two `python -m bdpo_jax.train` subprocesses on a free localhost port, each
with a timeout, killed if anything fails. They share the persistent compilation cache of
tests/conftest.py, so a second session does not compile again.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bdpo_jax import checkpointing, train
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]
STEPS, STOP = 4, 2  # checkpoints at 2 and 4; the resume starts from 2
OVERRIDES = {
    "train.steps": STEPS,
    "train.checkpoint_every": STOP,
    "train.keep_checkpoints": 2,
    "train.log_every": 1,
    "train.progress_bar": False,
    "train.async_checkpoints": False,  # Orbax's background saves cost seconds per save here
    "dpo.ref_update_every": STEPS,  # the losses move off log 2; one refresh, after the resume
    # data parallel over the 8 devices: the batch placement is what differs between the
    # launches (FSDP across processes trains alike too, but its per-layer gathers over gloo
    # cost ~10x the test's time on a 2-core machine)
    "mesh.shape": (-1, 1),
}
TIMEOUT_S = 300  # per subprocess: a hung coordinator must not hang the suite
# Observed: params within 1.2e-7 with YNNPACK's convolutions and 1.2e-6 with XLA's own (Eigen)
# convolutions, the package's CPU default (bdpo_jax.compile_options), whose summation order is
# not the same in the one- and two-process launches; losses within 2.5e-5 relative (tiny.py's
# beta 500 multiplies the float32 differences, and the all-reduce across processes adds in
# another order than the in-process one). The bounds leave a margin and stay far below one
# step's update (Adam moves each param by ~lr = 1e-4 per step), which a wrong batch placement
# would show.
LOSS_RTOL, PARAM_ATOL = 1e-4, 5e-6


def _config(**overrides):
    config = tiny.get_config()
    for key, value in (OVERRIDES | overrides).items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(process_id: int, port: int) -> dict[str, str]:
    env = dict(os.environ)  # the conftest's cache dir, CPU platform and fast-compile flags
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env["JAX_NUM_PROCESSES"] = "2"
    env["JAX_PROCESS_ID"] = str(process_id)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("BDPO_DISTRIBUTED", None)
    return env


def _launch_two_processes(workdir: Path) -> None:
    """The README's two-process command on localhost; raises with both logs on failure."""
    argv = [sys.executable, "-m", "bdpo_jax.train", "--config", str(ROOT / "configs/tiny.py")]
    argv += ["--workdir", str(workdir)] + [
        f"--config.{k}={v}".replace(" ", "") for k, v in OVERRIDES.items()
    ]
    port = _free_port()
    logs = [workdir.parent / f"process_{i}.log" for i in range(2)]
    children = []
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                children.append(
                    subprocess.Popen(
                        argv, env=_child_env(i, port), cwd=ROOT, stdout=log, stderr=log
                    )
                )
        codes = [child.wait(timeout=TIMEOUT_S) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if codes != [0, 0]:
        tails = "\n".join(f"--- process {i}:\n{logs[i].read_text()[-3000:]}" for i in range(2))
        pytest.fail(f"two-process run exited with {codes}\n{tails}")


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _assert_close_params(a, b, what: str) -> None:
    diff = max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    print(f"{what}: max |param difference| {diff:.2e}")
    assert diff <= PARAM_ATOL, what


def _assert_close_losses(losses, reference, what: str) -> None:
    steps = sorted(losses)
    got, want = np.array([losses[s] for s in steps]), np.array([reference[s] for s in steps])
    print(
        f"{what}: steps {steps}, max relative loss difference {np.max(np.abs(got / want - 1)):.2e}"
    )
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL, err_msg=what)


def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
    assert jax.process_count() == 1 and jax.device_count() == 8
    two = tmp_path / "two_processes"
    _launch_two_processes(two)

    # only the final checkpoint: Orbax saves dominate the time of the in-process runs
    final_only = {"train.checkpoint_every": 100}
    one = train.train_and_evaluate(_config(**final_only), str(tmp_path / "one_process"))
    one_losses, two_losses = _losses(tmp_path / "one_process"), _losses(two)
    assert sorted(two_losses) == sorted(one_losses) == list(range(1, STEPS + 1))
    _assert_close_losses(two_losses, one_losses, "2 processes vs 1")
    assert len({round(v, 3) for v in one_losses.values()}) > 2  # the losses move
    _assert_close_params(
        checkpointing.restore_params(str(two), step=STEPS), one.params, "2 processes vs 1"
    )

    # one readable data position per checkpoint, not one file per process
    position = json.loads(
        (two / "checkpoints" / str(STOP) / checkpointing.DATA_ITEM / "metadata").read_text()
    )
    assert position == {"position": STOP * 8}

    # the two-process checkpoint at STOP resumes on one process and continues identically
    resumed_dir = tmp_path / "resumed_on_one"
    shutil.copytree(two / "checkpoints" / str(STOP), resumed_dir / "checkpoints" / str(STOP))
    resumed = train.train_and_evaluate(_config(**final_only), str(resumed_dir))
    resumed_losses = _losses(resumed_dir)
    assert sorted(resumed_losses) == list(range(STOP + 1, STEPS + 1))
    _assert_close_losses(resumed_losses, one_losses, "resumed on 1 vs 1")
    _assert_close_params(resumed.params, one.params, "resumed on 1 vs 1")
    _assert_close_params(resumed.ref_params, one.ref_params, "resumed on 1 vs 1 (reference)")
