"""Evaluation outputs: win-rate and mean-score tables (markdown + CSV), the chart, the grid.

Tables follow the paper: rows "A vs B", one column per metric, values in percent (Tables 1,
3, 5); mean scores per model and metric (Table 6). A win-rate cell reads
"62.0 [52.2, 70.9] (3.0) **win**": the strict win share, its 95% Wilson interval, the tie
share in brackets and the verdict (`VERDICT_NOTE`, the rule of `scorers_torch.winrate`). The
chart plots every model against the reference with those intervals; the image grid shows a
few prompts across models, upscaled without smoothing, with each image's scores under it
("P 0.19 H 0.27 C 0.37 A 4.5").
"""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps

from scorers_torch.generate import image_path
from scorers_torch.prompt_sets import Prompt
from scorers_torch.winrate import MeanResult, PairResult

VERDICT_NOTE = (
    "Cell: strict win % [95% Wilson interval, n = prompts] (tie %) verdict. Verdict: **win** "
    "when the 95% Wilson interval of wins / (wins + losses) (ties excluded) lies above 50%, "
    "**loss** when it lies below, otherwise inconclusive. Each cell is its own 95% test."
)
_VERDICT_MARK = {"win": "**win**", "loss": "**loss**", "inconclusive": "inconclusive"}


def _pct(rate: float) -> str:
    return "n/a" if rate != rate else f"{100 * rate:.2f}"  # NaN when no common prompts


def _pct1(rate: float) -> str:
    return "n/a" if rate != rate else f"{100 * rate:.1f}"


def cell_text(result: PairResult) -> str:
    """'62.0 [52.2, 70.9] (3.0) **win**': win %, its Wilson interval, tie %, verdict."""
    low, high = result.win_interval
    return (
        f"{_pct1(result.win_rate)} [{_pct1(low)}, {_pct1(high)}] ({_pct1(result.tie_rate)}) "
        f"{_VERDICT_MARK[result.verdict]}"
    )


def pair_from_dict(row: Mapping[str, object]) -> PairResult:
    """A PairResult from a row of results.json / winrates.csv (the counts decide the rest)."""
    return PairResult(
        str(row["model_a"]), str(row["model_b"]), str(row["metric"]), int(row["n_prompts"]),
        int(row["wins"]), int(row["ties"]), int(row["losses"]),
    )  # fmt: skip


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pair_rows(pairs: Sequence[PairResult], metrics: Sequence[str]) -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict[str, PairResult]] = {}
    for result in pairs:
        rows.setdefault((result.model_a, result.model_b), {})[result.metric] = result
    return rows


def winrate_markdown(pairs: Sequence[PairResult], metrics: Sequence[str], num_seeds: int) -> str:
    """Two tables: strict win % with interval, tie % and verdict; win % counting ties as half."""
    if not pairs:
        return "## Win rate\n\nOnly one model: no pairs to compare (see means.md)."
    rows = _pair_rows(pairs, metrics)
    header = ["", *metrics]
    strict = [[f"{a} vs {b}"] + [cell_text(r[m]) for m in metrics] for (a, b), r in rows.items()]
    half = [
        [f"{a} vs {b}"] + [_pct(r[m].win_rate_half_ties) for m in metrics]
        for (a, b), r in rows.items()
    ]
    n = {r.n for r in pairs}
    n_text = str(n.pop()) if len(n) == 1 else "varies, see winrates.csv"
    return "\n\n".join(
        [
            f"## Win rate (%), best of {num_seeds} seeds per prompt, {n_text} prompts",
            "Rule: A wins a prompt when its best score is strictly greater than B's; "
            "the share of tied prompts is in brackets (not counted as wins).",
            _markdown_table(header, strict),
            VERDICT_NOTE,
            "## Win rate (%) counting a tie as half a win (PickScore's rule)",
            _markdown_table(header, half),
        ]
    )


def write_winrate_tables(
    pairs: Sequence[PairResult], metrics: Sequence[str], num_seeds: int, out_dir: Path
) -> tuple[Path, Path]:
    """DIR/winrates.md and DIR/winrates.csv (one row per pair and metric, all counts)."""
    md_path, csv_path = out_dir / "winrates.md", out_dir / "winrates.csv"
    md_path.write_text(winrate_markdown(pairs, metrics, num_seeds) + "\n", encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        fields = list(PairResult("a", "b", "m", 0, 0, 0, 0).as_dict())
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for result in pairs:
            writer.writerow(result.as_dict())
    return md_path, csv_path


def write_group_tables(
    groups: Mapping[tuple[str, str], Sequence[PairResult]],
    reference: str,
    metrics: Sequence[str],
    out_dir: Path,
) -> tuple[Path, Path]:
    """Win rates per prompt group (PartiPrompts Category / Challenge): DIR/winrates_by_group.md
    (every model vs `reference`, win % with tie % in brackets) and .csv (every pair)."""
    sections = []
    for field in dict.fromkeys(f for f, _ in groups):
        values = [v for f, v in groups if f == field]
        models = dict.fromkeys(
            r.model_a for v in values for r in groups[field, v] if r.model_b == reference
        )
        for model in models:
            rows = []
            for value in values:
                found = {
                    r.metric: r
                    for r in groups[field, value]
                    if (r.model_a, r.model_b) == (model, reference)
                }
                n = next(iter(found.values())).n
                rows.append([value, str(n), *[cell_text(found[m]) for m in metrics]])
            sections += [
                f"## {model} vs {reference} by {field}: win % [95% interval] (tie %) verdict",
                _markdown_table([field, "prompts", *metrics], rows),
            ]
    sections.append(VERDICT_NOTE)
    md_path, csv_path = out_dir / "winrates_by_group.md", out_dir / "winrates_by_group.csv"
    md_path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        fields = ["group_field", "group", *PairResult("a", "b", "m", 0, 0, 0, 0).as_dict()]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for (field, value), results in groups.items():
            for result in results:
                writer.writerow({"group_field": field, "group": value, **result.as_dict()})
    return md_path, csv_path


def write_mean_tables(
    means: Sequence[MeanResult], models: Sequence[str], metrics: Sequence[str], out_dir: Path
) -> tuple[Path, Path]:
    """DIR/means.md (Table 6 style: models x metrics) and DIR/means.csv."""
    lookup = {(r.model, r.metric): r for r in means}
    sections = []
    for field, title in (
        ("mean_all", "Mean score over all images"),
        ("mean_best", "Mean of the per-prompt best score"),
    ):
        rows = [
            [model] + [f"{getattr(lookup[model, m], field):.4f}" for m in metrics]
            for model in models
        ]
        sections += [f"## {title}", _markdown_table(["model", *metrics], rows)]
    md_path, csv_path = out_dir / "means.md", out_dir / "means.csv"
    md_path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(means[0].as_dict()))
        writer.writeheader()
        for result in means:
            writer.writerow(result.as_dict())
    return md_path, csv_path


VERDICT_COLOURS = {"win": "#1a9850", "loss": "#d73027", "inconclusive": "#7f7f7f"}


def plot_winrates(
    pairs: Sequence[PairResult], reference: str, metrics: Sequence[str], path: Path
) -> Path:
    """Every model vs `reference`, one panel per metric, one row per model: the verdict's share
    wins / (wins + losses) with its 95% Wilson interval (filled dot, coloured by verdict) and
    the paper's win rate wins / prompts with its interval (open dot, thin bar), the 50% line,
    and each row's tie %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = {a: r for (a, b), r in _pair_rows(pairs, metrics).items() if b == reference}
    if not rows:
        raise ValueError(f"no pair has {reference!r} as the second model; cannot plot")
    models = list(rows)
    fig, axes = plt.subplots(
        1, len(metrics), sharey=True, squeeze=False, dpi=100,
        figsize=(1.2 + 3.0 * len(metrics), 2.4 + 0.4 * len(models)),
    )  # fmt: skip
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.axvline(50, color="black", linestyle="--", linewidth=1, zorder=0)
        for i, model in enumerate(models):
            r = rows[model][metric]
            share, (d_low, d_high) = 100 * r.decisive_share, r.decisive_interval
            if share == share:  # NaN when every prompt tied: no verdict point to draw
                ax.errorbar(
                    share, i - 0.12,
                    xerr=[[share - 100 * d_low], [100 * d_high - share]],
                    fmt="o", color=VERDICT_COLOURS[r.verdict], markersize=6, capsize=3,
                    linewidth=2,
                )  # fmt: skip
            win, (w_low, w_high) = 100 * r.win_rate, r.win_interval
            ax.errorbar(
                win, i + 0.18, xerr=[[win - 100 * w_low], [100 * w_high - win]],
                fmt="o", mfc="white", color="#404040", markersize=4, capsize=2, linewidth=0.8,
            )  # fmt: skip
            ax.text(104, i, f"t{100 * r.tie_rate:.0f}", va="center", fontsize=7, color="#404040")
        ax.set_xlim(-3, 103)
        ax.set_xticks([0, 25, 50, 75, 100])
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(metric)
        ax.set_xlabel("%")
    axes[0][0].set_yticks(range(len(models)), models)
    axes[0][0].set_ylim(len(models) - 0.5, -0.5)
    handles = [
        Line2D([], [], marker="o", color=c, linestyle="-", label=f"wins/(wins+losses): {v}")
        for v, c in VERDICT_COLOURS.items()
    ] + [
        Line2D([], [], marker="o", mfc="white", color="#404040", linestyle="-",
               label="wins/prompts (paper's win rate)")
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    n = {r.n for r in pairs}
    fig.suptitle(
        f"vs {reference}: 95% Wilson intervals, best of seeds, "
        f"{n.pop() if len(n) == 1 else 'varying'} prompts; t = tie %",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def metric_abbreviations(metrics: Sequence[str]) -> dict[str, str]:
    """Shortest unique upper-case prefixes: pickscore, hps, clip, aesthetic -> P, H, C, A."""
    result = {}
    for metric in metrics:
        for length in range(1, len(metric) + 1):
            prefix = metric[:length]
            if all(other == metric or not other.startswith(prefix) for other in metrics):
                break
        result[metric] = prefix[:1].upper() + prefix[1:]
    return result


def format_scores(scores: Mapping[str, float], abbreviations: Mapping[str, str]) -> str:
    """'P 0.19 H 0.271 C 0.37 A 4.49' (3 significant digits)."""
    return " ".join(f"{abbreviations[m]} {value:.3g}" for m, value in scores.items())


def fit_cell(image: PIL.Image.Image, cell_size: int) -> PIL.Image.Image:
    """`image` in a white `cell_size` square: a small image is enlarged by the largest whole
    factor with nearest-neighbour resampling (a 32 px image stays crisp pixels), a large one
    is shrunk with Lanczos."""
    image = image.convert("RGB")
    factor = cell_size // max(image.size)
    if factor >= 1:
        image = image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)
        cell = PIL.Image.new("RGB", (cell_size, cell_size), "white")  # pad() would resample
        cell.paste(image, ((cell_size - image.width) // 2, (cell_size - image.height) // 2))
        return cell
    return PIL.ImageOps.pad(image, (cell_size, cell_size), PIL.Image.LANCZOS, color="white")


Caption = str | Sequence[tuple[str, str]]  # a wrapped line, or (line, colour) pairs


def write_image_grid(
    cells: Sequence[Sequence[PIL.Image.Image]],
    row_titles: Sequence[str],
    column_titles: Sequence[str],
    captions: Sequence[Sequence[Caption]],
    path: Path,
    cell_size: int = 256,
    header: str = "",
) -> Path:
    """Rows of images (one row per prompt, one column per model) with a caption under each
    image (a string, wrapped, or a list of (line, colour) pairs), an optional header line, the
    model names on top and each row's prompt above it. Images go through `fit_cell`."""
    font = PIL.ImageFont.load_default(size=max(11, cell_size // 14))
    line_h = font.getbbox("Ag")[3] + 4
    chars = max(20, int(cell_size * len(column_titles) / (0.55 * font.size)))
    cell_chars = max(8, int(cell_size / (0.55 * font.size)))

    def lines_of(caption: Caption) -> list[tuple[str, str]]:
        if isinstance(caption, str):
            return [(line, "black") for line in textwrap.wrap(caption, cell_chars) or [""]]
        return list(caption)

    wrapped_titles = [textwrap.wrap(t, chars)[:3] or [""] for t in row_titles]
    caption_lines = max(len(lines_of(c)) for r in captions for c in r)
    pad = 6
    width = len(column_titles) * (cell_size + pad) + pad
    row_heights = [
        len(t) * line_h + cell_size + caption_lines * line_h + 2 * pad for t in wrapped_titles
    ]
    header_lines = textwrap.wrap(header, chars) if header else []
    top = (len(header_lines) + 1) * line_h + pad
    height = top + sum(row_heights)
    canvas = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for k, line in enumerate(header_lines):
        draw.text((pad, pad // 2 + k * line_h), line, fill=(60, 60, 60), font=font)
    for j, title in enumerate(column_titles):
        x = pad + j * (cell_size + pad)
        draw.text((x, pad // 2 + len(header_lines) * line_h), title, fill="black", font=font)
    y = top
    for i, title_lines in enumerate(wrapped_titles):
        for k, line in enumerate(title_lines):
            draw.text((pad, y + k * line_h), line, fill=(60, 60, 60), font=font)
        y_img = y + len(title_lines) * line_h
        for j, image in enumerate(cells[i]):
            x = pad + j * (cell_size + pad)
            canvas.paste(fit_cell(image, cell_size), (x, y_img))
            for k, (line, fill) in enumerate(lines_of(captions[i][j])):
                draw.text((x, y_img + cell_size + 2 + k * line_h), line, fill=fill, font=font)
        y += row_heights[i]
    canvas.save(path)
    return path


BETTER, WORSE = "#1a7f37", "#c62828"  # caption colours: higher / lower than the reference


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """`count` of `items` at evenly spaced positions, first and last included, in order (all
    of them when count >= len(items)): the grid shows the whole prompt set, not its head."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def write_score_grid(
    out_dir: Path,
    frame: pd.DataFrame,
    models: list[str],
    metrics: list[str],
    prompts: list[Prompt],
    seed: int,
    *,
    path: Path | None = None,
    cell_size: int = 256,
    abbreviations: Mapping[str, str] | None = None,
    reference: str | None = None,
) -> Path:
    """DIR/grid.png (or `path`): `prompts` x `models` images of one seed, each with its
    scores under it, one metric a line; with a `reference` model, a score above the
    reference's on the same prompt and seed is green, one below red (as shown, 3 significant
    digits). `abbreviations`: metric -> label (default: `metric_abbreviations`)."""
    abbreviations = dict(abbreviations or metric_abbreviations(metrics))
    lookup = {
        (r.model, r.prompt_id, r.metric): r.score
        for r in frame[frame["seed"] == seed].itertuples(index=False)
    }
    cells, captions = [], []
    for prompt in prompts:
        row_cells, row_captions = [], []
        for model in models:
            with PIL.Image.open(image_path(out_dir, model, prompt.id, seed)) as image:
                row_cells.append(image.convert("RGB"))
            lines = []
            for m in metrics:
                value, fill = lookup[(model, prompt.id, m)], "black"
                if reference is not None and model != reference:  # as shown: 3 digits
                    shown, ref = (
                        float(f"{value:.3g}"),
                        float(f"{lookup[reference, prompt.id, m]:.3g}"),
                    )
                    fill = BETTER if shown > ref else WORSE if shown < ref else "black"
                lines.append((format_scores({m: value}, abbreviations), fill))
            row_captions.append(lines)
        cells.append(row_cells)
        captions.append(row_captions)
    legend = ", ".join(f"{a} = {m}" for m, a in abbreviations.items())
    if reference is not None:
        legend += f"; green / red: above / below {reference} on the same prompt and seed"
    return write_image_grid(
        cells,
        [f"{p.id}: {p.text}" for p in prompts],
        models,
        captions,
        path or out_dir / "grid.png",
        cell_size=cell_size,
        header=f"seed {seed}; {legend}",
    )


def merge_results(out_dirs: Sequence[Path], labels: Sequence[str] | None = None) -> str:
    """One markdown table over several evaluation folders (one per prompt set), rows
    "<set>: A vs B", like the paper's Tables 1, 2 and 5; values win % (tie %)."""
    import json

    labels = list(labels) if labels else [Path(d).name for d in out_dirs]
    if len(labels) != len(out_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(out_dirs)} folders")
    metrics: dict[str, None] = {}
    rows: list[tuple[str, dict[str, dict]]] = []
    for label, out_dir in zip(labels, out_dirs, strict=True):
        path = Path(out_dir) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run scorers_torch.evaluate first")
        summary = json.loads(path.read_text(encoding="utf-8"))
        metrics.update(dict.fromkeys(summary["metrics"]))
        by_pair: dict[tuple[str, str], dict[str, dict]] = {}
        for pair in summary["pairs"]:
            by_pair.setdefault((pair["model_a"], pair["model_b"]), {})[pair["metric"]] = pair
        rows += [(f"{label}: {a} vs {b}", cells) for (a, b), cells in by_pair.items()]
    table = [
        [name] + [cell_text(pair_from_dict(cells[m])) if m in cells else "" for m in metrics]
        for name, cells in rows
    ]
    return (
        "Win rate %, best of seeds, strictly greater\n\n"
        + _markdown_table(["", *metrics], table)
        + "\n\n"
        + VERDICT_NOTE
    )


def main(argv: Sequence[str] | None = None) -> str:
    """python -m scorers_torch.eval_report DIR [DIR ...] [--labels a,b] [--out tables.md]"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m scorers_torch.eval_report",
        description="Merge the win-rate tables of several evaluation folders into one table.",
    )
    parser.add_argument("dirs", nargs="+", help="output folders of scorers_torch.evaluate")
    parser.add_argument("--labels", default="", help="comma-separated set names (default: dirs)")
    parser.add_argument("--out", default="", help="write the markdown here (default: print)")
    args = parser.parse_args(argv)
    labels = [x for x in args.labels.split(",") if x] or None
    text = merge_results([Path(d) for d in args.dirs], labels)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
