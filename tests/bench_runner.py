"""Runs a bench/ script as a user would (a subprocess from the repository root, CPU only)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`python bench/<script> args...`; asserts exit code 0 (stderr's tail in the message)."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
