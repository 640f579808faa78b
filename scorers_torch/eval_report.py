"""Evaluation outputs: win-rate and mean-score tables (markdown + CSV), the bar chart, the grid.

Tables follow the paper: rows "A vs B", one column per metric, values in percent (Tables 1,
3, 5); mean scores per model and metric (Table 6). The image grid shows a few prompts across
models with the scores of each image under it ("P 0.19 H 0.27 C 0.37 A 4.5").
"""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps

from scorers_torch.generate import image_path
from scorers_torch.prompt_sets import Prompt
from scorers_torch.winrate import MeanResult, PairResult


def _pct(rate: float) -> str:
    return "n/a" if rate != rate else f"{100 * rate:.2f}"  # NaN when no common prompts


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
    """Two tables: strict win % with the tie % in brackets, and win % counting ties as half."""
    if not pairs:
        return "## Win rate\n\nOnly one model: no pairs to compare (see means.md)."
    rows = _pair_rows(pairs, metrics)
    header = ["", *metrics]
    strict = [
        [f"{a} vs {b}"] + [f"{_pct(r[m].win_rate)} ({_pct(r[m].tie_rate)})" for m in metrics]
        for (a, b), r in rows.items()
    ]
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
                cells = [f"{_pct(found[m].win_rate)} ({_pct(found[m].tie_rate)})" for m in metrics]
                rows.append([value, str(n), *cells])
            sections += [
                f"## {model} vs {reference} by {field}: win % (tie %)",
                _markdown_table([field, "prompts", *metrics], rows),
            ]
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


def plot_winrates(
    pairs: Sequence[PairResult], reference: str, metrics: Sequence[str], path: Path
) -> Path:
    """Bar chart of every model's win rate vs `reference` per metric; ties stacked, hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {a: r for (a, b), r in _pair_rows(pairs, metrics).items() if b == reference}
    if not rows:
        raise ValueError(f"no pair has {reference!r} as the second model; cannot plot")
    width = 0.8 / len(rows)
    x_K = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics) * max(1, len(rows) / 2), 4.5), dpi=100)
    for i, (model, results) in enumerate(rows.items()):
        win_K = np.array([100 * results[m].win_rate for m in metrics])
        tie_K = np.array([100 * results[m].tie_rate for m in metrics])
        offset_K = x_K - 0.4 + width * (i + 0.5)
        bars = ax.bar(offset_K, win_K, width, label=f"{model} vs {reference}")
        ax.bar(
            offset_K,
            tie_K,
            width,
            bottom=win_K,
            color=bars.patches[0].get_facecolor(),
            alpha=0.35,
            hatch="//",
        )
        for x, win in zip(offset_K, win_K, strict=True):
            ax.text(x, win + 1, f"{win:.1f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(50, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(x_K, list(metrics))
    ax.set_ylim(0, 110)
    ax.set_ylabel("win rate (%)")
    ax.set_title(f"Win rate vs {reference} (best of seeds; hatched: ties)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(rows)), fontsize=8)
    fig.tight_layout()
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


def write_image_grid(
    cells: Sequence[Sequence[PIL.Image.Image]],
    row_titles: Sequence[str],
    column_titles: Sequence[str],
    captions: Sequence[Sequence[str]],
    path: Path,
    cell_size: int = 256,
    header: str = "",
) -> Path:
    """Rows of images (one row per prompt, one column per model) with a caption under each
    image, an optional header line, the model names on top and each row's prompt above it."""
    font = PIL.ImageFont.load_default(size=max(10, cell_size // 16))
    line_h = font.getbbox("Ag")[3] + 4
    chars = max(20, int(cell_size * len(column_titles) / (0.55 * font.size)))
    wrapped_titles = [textwrap.wrap(t, chars)[:3] or [""] for t in row_titles]
    caption_lines = max(len(textwrap.wrap(c, cell_size // 7) or [""]) for r in captions for c in r)
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
            cell = PIL.ImageOps.pad(image.convert("RGB"), (cell_size, cell_size), color="white")
            canvas.paste(cell, (x, y_img))
            lines = textwrap.wrap(captions[i][j], cell_size // 7) or [""]
            for k, line in enumerate(lines):
                draw.text((x, y_img + cell_size + 2 + k * line_h), line, fill="black", font=font)
        y += row_heights[i]
    canvas.save(path)
    return path


def write_score_grid(
    out_dir: Path,
    frame: pd.DataFrame,
    models: list[str],
    metrics: list[str],
    prompts: list[Prompt],
    seed: int,
) -> Path:
    """DIR/grid.png: `prompts` x `models` images of one seed, each with its scores under it."""
    abbreviations = metric_abbreviations(metrics)
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
            scores = {m: lookup[(model, prompt.id, m)] for m in metrics}
            row_captions.append(format_scores(scores, abbreviations))
        cells.append(row_cells)
        captions.append(row_captions)
    legend = ", ".join(f"{a} = {m}" for m, a in abbreviations.items())
    return write_image_grid(
        cells,
        [f"{p.id}: {p.text}" for p in prompts],
        models,
        captions,
        out_dir / "grid.png",
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
        [name]
        + [
            f"{_pct(cells[m]['win_rate'])} ({_pct(cells[m]['tie_rate'])})" if m in cells else ""
            for m in metrics
        ]
        for name, cells in rows
    ]
    return "Win rate % (tie %), best of seeds, strictly greater\n\n" + _markdown_table(
        ["", *metrics], table
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
