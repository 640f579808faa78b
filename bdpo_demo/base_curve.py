"""How the base's scores move with its SFT steps: base studies -> a table and a picture.

    python -m bdpo_demo.base_curve --out DIR STUDY [STUDY ...]

Each STUDY is an output folder of `python -m bdpo_demo.base_study` (or its base_study.json),
one per base, the bases differing in `--config.demo.base_steps` only. Prints, and writes to
DIR/base_curve.json, per base and measure the mean score of its samples, its standard error
over prompts and its relative distance from the flawed renders' mean (issue 11's criterion:
within 15%); per measure, the least-squares change of the mean per doubling of the steps, with
its standard error (from 3 bases on). DIR/base_curve.png draws the means with 95% intervals
against the steps (log scale), the renders' mean and its 15% band behind them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bdpo_demo import report
from bdpo_demo.__main__ import check_out
from bdpo_jax import schema

PROG = "python -m bdpo_demo.base_curve"
STUDY_FILE = "base_study.json"
CURVE_PNG = "base_curve.png"
CURVE_JSON = "base_curve.json"
Z95 = 1.959964  # two-sided 95% normal quantile


def read_study(path: str) -> dict[str, Any]:
    """One base_study.json (or the folder holding it), checked for what the curve needs."""
    file = os.path.join(path, STUDY_FILE) if os.path.isdir(path) else path
    try:
        with open(file) as f:
            study = json.load(f)
    except FileNotFoundError:
        raise schema.UserError(f"{file}: not found (a base_study output folder?)") from None
    except (OSError, ValueError) as error:
        raise schema.UserError(f"{file}: not a readable base study ({error})") from None
    missing = [
        k for k in ("sft_steps", "base_vs_renders", "base_standard_errors") if k not in study
    ]
    if missing:
        raise schema.UserError(
            f"{file}: no {' / '.join(missing)} (written before base_study recorded them); "
            f"study the same base again: python -m bdpo_demo.base_study --out NEW --base "
            f"{study.get('base', 'RUNS/base')}"
        )
    return {**study, "file": file}


def curve_rows(studies: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per base, sorted by SFT steps: steps, file, and per measure mean, standard error,
    renders' mean, relative difference and whether it lies within report.BASE_TOLERANCE. The
    bases must have been compared with the same renders (same prompts and flaw rate)."""
    if not studies:
        raise schema.UserError("no base study given")
    first = studies[0]
    rows, seen = [], {}
    for study in studies:
        steps = int(study["sft_steps"])
        if steps in seen:
            raise schema.UserError(f"{study['file']}: {steps} SFT steps, as {seen[steps]}")
        seen[steps] = study["file"]
        row: dict[str, Any] = {"sft_steps": steps, "file": study["file"]}
        for m in report.SCORER_NAMES:
            cell = study["base_vs_renders"][m]
            renders = first["base_vs_renders"][m]["flawed_renders"]
            if not math.isclose(cell["flawed_renders"], renders, rel_tol=1e-6):
                raise schema.UserError(
                    f"{study['file']}: its flawed renders score {cell['flawed_renders']:.6g} in "
                    f"{m}, {first['file']} {renders:.6g}: not the same prompts and flaw rate"
                )
            row[m] = {
                "mean": cell["base_samples"],
                "standard_error": float(study["base_standard_errors"][m]),
                "flawed_renders": renders,
                "relative_difference": cell["relative_difference"],
                "within_tolerance": cell["within_tolerance"],
            }
        rows.append(row)
    return sorted(rows, key=lambda r: r["sft_steps"])


def per_doubling(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per measure, the least-squares slope of the mean on log2(SFT steps) (the change per
    doubling) and its standard error from the fit's residuals (NaN below 3 bases)."""
    x = np.log2([r["sft_steps"] for r in rows])
    out = {}
    for m in report.SCORER_NAMES:
        y = np.array([r[m]["mean"] for r in rows])
        if len(x) < 2:
            out[m] = {"slope": float("nan"), "standard_error": float("nan")}
            continue
        dx = x - x.mean()
        slope = float(dx @ (y - y.mean()) / (dx @ dx))
        se = float("nan")
        if len(x) > 2:
            residual = y - y.mean() - slope * dx
            se = float(np.sqrt(residual @ residual / (len(x) - 2) / (dx @ dx)))
        out[m] = {"slope": slope, "standard_error": se}
    return out


def curve_table(rows: Sequence[Mapping[str, Any]], slopes: Mapping[str, Mapping]) -> str:
    """Markdown: one row per base (mean +- standard error, relative to the renders), the
    renders' means, and the change per doubling."""
    header = ["SFT steps", *report.SCORER_NAMES]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        "| flawed renders | "
        + " | ".join(f"{rows[0][m]['flawed_renders']:.4g}" for m in report.SCORER_NAMES)
        + " |",
    ]
    for r in rows:
        cells = [
            f"{r[m]['mean']:.4g} +- {r[m]['standard_error']:.2g} "
            f"({100 * r[m]['relative_difference']:+.0f}%"
            + (")" if r[m]["within_tolerance"] else ", **outside**)")
            for m in report.SCORER_NAMES
        ]
        lines.append(f"| {r['sft_steps']} | " + " | ".join(cells) + " |")
    lines.append(
        "| per doubling | "
        + " | ".join(
            f"{slopes[m]['slope']:+.3g} +- {slopes[m]['standard_error']:.2g}"
            for m in report.SCORER_NAMES
        )
        + " |"
    )
    return "\n".join(lines)


def plot_curve(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """One panel per measure: the base's mean with its 95% interval per SFT steps (log2 axis),
    the flawed renders' mean (dashed) and its +-report.BASE_TOLERANCE band (shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["sft_steps"] for r in rows]
    names = report.SCORER_NAMES
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), dpi=100)
    for ax, m in zip(axes, names, strict=True):
        renders = rows[0][m]["flawed_renders"]
        band = report.BASE_TOLERANCE * abs(renders)
        ax.axhspan(renders - band, renders + band, color="#2ca02c", alpha=0.15, zorder=0)
        ax.axhline(renders, color="#2ca02c", linestyle="--", linewidth=1)
        means = [r[m]["mean"] for r in rows]
        errors = [Z95 * r[m]["standard_error"] for r in rows]
        ax.errorbar(steps, means, yerr=errors, fmt="o-", color="#1f4e9c", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [f"{s:,}" for s in steps], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_title(m)
        ax.set_xlabel("SFT steps")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "base samples (mean, 95% interval over prompts) vs flawed renders "
        f"(dashed, +-{100 * report.BASE_TOLERANCE:.0f}% shaded)",
        fontsize=10,
    )
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    p = schema.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--out", required=True, help="output folder (base_curve.png, .json)")
    p.add_argument("studies", nargs="+", help="base_study output folders or base_study.json")

    def run() -> dict[str, Any]:
        args = p.parse_args(argv)
        rows = curve_rows([read_study(s) for s in args.studies])
        slopes = per_doubling(rows)
        check_out(args.out)
        result = {"bases": rows, "per_doubling": slopes}
        tmp = os.path.join(args.out, CURVE_JSON + ".tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, os.path.join(args.out, CURVE_JSON))
        plot_curve(rows, os.path.join(args.out, CURVE_PNG))
        print(curve_table(rows, slopes), flush=True)
        return result

    return schema.run_cli(PROG, run, debug)


if __name__ == "__main__":
    main()
