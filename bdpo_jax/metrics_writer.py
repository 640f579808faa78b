"""Training metrics to the console (tqdm), WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tb).

The training loop fetches each step's metrics to the host one step late (while the device runs
the next step) and hands this writer host floats at log steps; `write_summary` records one-off
scalars of a (re)start (compile time, parameter counts) to TensorBoard only, so every row of
metrics.jsonl is a logged step. Only process 0 writes files. `plot_curves` draws loss and
implicit accuracy to a PNG.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CURVES_FILE = "curves.png"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the run stops without saving the bad state."""


def check_finite(step: int, loss: float) -> None:
    """Raise NonFiniteLossError naming `step` when its loss is NaN or inf."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite loss {loss} at step {step}: stopping; the last good checkpoint is kept "
            "(lower config.optim.learning_rate or config.dpo.beta, or check the data)"
        )


class MetricsWriter:
    """Console progress bar + JSONL + TensorBoard, with steps/s and images/s."""

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        start_step: int,
        pairs_per_step: int,
        progress: bool = True,
    ):
        self.is_main = jax.process_index() == 0
        self.pairs_per_step = pairs_per_step
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._jsonl = self._tb = self._bar = None
        if not self.is_main:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, TB_DIR))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def advance(self, step: int) -> None:
        """Called after every step (no device sync)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def write(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Record host metrics of `step`, adding steps/s and images/s since the last write."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        rate = (step - self._last_step) / elapsed
        self._last_time, self._last_step = now, step
        row = {k: float(v) for k, v in metrics.items()}
        row["steps_per_sec"] = rate
        row["images_per_sec"] = rate * 2 * self.pairs_per_step
        if not self.is_main:
            return row
        self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
        self._jsonl.flush()
        for name, value in row.items():
            self._tb.add_scalar(f"train/{name}", value, step)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                acc=f"{row.get('implicit_accuracy', 0):.2f}",
                refresh=False,
            )
            self.advance(step)
        return row

    def write_summary(self, step: int, scalars: Mapping[str, float]) -> None:
        """One-off scalars of a (re)start at `step`, to TensorBoard under 'run/'."""
        if self._tb is None:
            return
        for name, value in scalars.items():
            self._tb.add_scalar(f"run/{name}", float(value), step)
        self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """Rows of WORKDIR/metrics.jsonl (a resumed run appends; later rows win per step)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(workdir: str, accuracy_key: str = "implicit_accuracy") -> str | None:
    """WORKDIR/curves.png: loss and implicit accuracy against step. Returns its path."""
    rows = read_metrics(workdir)
    if not rows or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set(xlabel="step", ylabel="loss", title="DPO loss")
    if any(accuracy_key in r for r in rows):
        axes[1].plot(steps, [r.get(accuracy_key, float("nan")) for r in rows])
    axes[1].set(xlabel="step", ylabel=accuracy_key, title="implicit accuracy", ylim=(-0.02, 1.02))
    fig.tight_layout()
    path = os.path.join(workdir, CURVES_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
