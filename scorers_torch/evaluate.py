"""The paper's evaluation protocol end to end: generate, score, best-of-seeds win rates, report.

    python -m scorers_torch.evaluate \\
        --models base=stable-diffusion-v1-5/stable-diffusion-v1-5,ours=exports/bdpo-sd15 \\
        --prompts PartiPrompts.tsv --scorers pickscore,hps,clip,aesthetic \\
        --scorer-config scorers.json --out eval/parti

Every model generates `--seeds` images per prompt with the shared seeds base_seed + i, saved
as DIR/images/<model>/<prompt_id>_<seed>.png; every scorer scores every image into
DIR/scores.parquet (model, prompt_id, prompt, seed, metric, score). A rerun reuses existing
images and scored rows. Outputs: winrates.md/.csv, means.md/.csv, winrates_vs_<ref>.png,
grid.png, results.json, and winrates_by_group.md/.csv for sets with categories (PartiPrompts).
`evaluate(...)` is the Python API the CLI and the demo share. A user's mistake (a missing
prompt file, an unknown scorer or backend, a malformed --models, an --out made with other
settings) ends the CLI with one line naming it and exit code 2 (`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import PIL.Image
from tqdm import tqdm

from bdpo_jax import schema
from scorers_torch import eval_report, winrate
from scorers_torch.generate import Generator, generate_images, image_path
from scorers_torch.prompt_sets import FORMATS, Prompt, read_prompt_set

if TYPE_CHECKING:  # the scorer package imports torch; only needed for type hints here
    from scorers_torch.scorers.base import Scorer

log = logging.getLogger(__name__)

PROG = "python -m scorers_torch.evaluate"
SCORE_COLUMNS = ("model", "prompt_id", "prompt", "seed", "metric", "score")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_MODEL_OPTION_KEYS = ("unet", "backend")  # "name=path,unet=X" attaches X to the model before


class EvalSetupError(schema.UserError, ValueError):
    """Models, prompts, scorers or an output folder that do not fit (names the flag or file)."""


@dataclass
class EvalResults:
    """Everything `evaluate` computed; `files` maps output names to their paths."""

    scores: pd.DataFrame
    best: winrate.BestScores
    pairs: list[winrate.PairResult]
    means: list[winrate.MeanResult]
    files: dict[str, Path] = field(default_factory=dict)


def _check_name(name: str, what: str) -> None:
    if not _SAFE_NAME.match(name):
        raise EvalSetupError(
            f"{what} name {name!r} must start with a letter or digit and use only "
            "letters, digits and _ . + - (it names folders and table columns)"
        )


def _as_prompts(prompts: Sequence[Prompt | str]) -> list[Prompt]:
    result = [p if isinstance(p, Prompt) else Prompt(f"{i:05d}", p) for i, p in enumerate(prompts)]
    ids = [p.id for p in result]
    if len(set(ids)) != len(ids):
        raise EvalSetupError("prompt ids must be unique")
    if not result:
        raise EvalSetupError("no prompts to evaluate")
    return result


def _check_prompts_file(out_dir: Path, prompts: list[Prompt]) -> None:
    """DIR/prompts.jsonl records every prompt id ever used; a different text for an id means
    the folder was made from another prompt set, whose images must not be reused."""
    path = out_dir / "prompts.jsonl"
    known: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            known[entry["id"]] = entry
    for prompt in prompts:
        old = known.get(prompt.id)
        if old is not None and old["text"] != prompt.text:
            raise EvalSetupError(
                f"{path}: prompt {prompt.id} was {old['text']!r} in an earlier run, now "
                f"{prompt.text!r}; this folder was made from another prompt set: use a new --out"
            )
        known[prompt.id] = {"id": prompt.id, "text": prompt.text, "meta": prompt.meta}
    _atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in known.values()))


def check_run_record(out_dir: Path, record: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse to reuse images/scores made with other settings; then store the merged record.

    `record` = {"generation": {...}, "models": {name: spec}, "scorers": {name: spec}}:
    generation settings must equal the stored ones; a model or scorer already in the record
    must have the same spec (new ones are added).
    """
    path = out_dir / "run.json"
    stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    stored_gen, new_gen = stored.get("generation", {}), dict(record.get("generation", {}))
    changed = {
        k: (stored_gen[k], v) for k, v in new_gen.items() if k in stored_gen and stored_gen[k] != v
    }
    if changed:
        raise EvalSetupError(
            f"{path}: generation settings differ from the earlier run (old, new): {changed}; "
            "use a new --out or the old settings"
        )
    for section, fix in (("models", "images/<model>"), ("scorers", "its rows in scores.parquet")):
        for name, spec in record.get(section, {}).items():
            old = stored.get(section, {}).get(name)
            if old is not None and old != json.loads(json.dumps(spec)):
                raise EvalSetupError(
                    f"{path}: {section[:-1]} {name!r} was {old} in an earlier run, now {spec}; "
                    f"use another name, a new --out, or delete {fix}"
                )
    merged = {
        "generation": {**stored_gen, **new_gen},
        "models": {**stored.get("models", {}), **record.get("models", {})},
        "scorers": {**stored.get("scorers", {}), **record.get("scorers", {})},
    }
    _atomic_write_text(path, json.dumps(merged, indent=2) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_scores(path: Path, frame: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _read_scores(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SCORE_COLUMNS}).astype(
            {"seed": np.int64, "score": np.float64}
        )
    frame = pd.read_parquet(path)
    missing = set(SCORE_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: scores table lacks columns {sorted(missing)}")
    return frame


def score_images(
    models: Sequence[str],
    prompts: list[Prompt],
    seeds: list[int],
    scorers: Mapping[str, Scorer],
    out_dir: Path,
    chunk: int = 64,
) -> pd.DataFrame:
    """Score every image not yet scored by each scorer; DIR/scores.parquet is rewritten
    (atomically) after each chunk, so an interrupted run loses at most one chunk."""
    path = out_dir / "scores.parquet"
    frame = _read_scores(path)
    done = set(
        zip(
            frame["model"],
            frame["prompt_id"],
            frame["seed"].astype(int),
            frame["metric"],
            strict=True,
        )
    )
    for model in models:
        keys = [(p, s) for p in prompts for s in seeds]
        todo = [(p, s, [m for m in scorers if (model, p.id, s, m) not in done]) for p, s in keys]
        todo = [item for item in todo if item[2]]
        if not todo:
            continue
        with tqdm(total=len(todo), desc=f"score {model}", unit="img") as bar:
            for start in range(0, len(todo), chunk):
                batch = todo[start : start + chunk]
                images = []
                for prompt, seed, _ in batch:
                    file = image_path(out_dir, model, prompt.id, seed)
                    if not file.exists():
                        raise FileNotFoundError(f"image {file} to score does not exist")
                    with PIL.Image.open(file) as image:
                        images.append(image.convert("RGB"))
                new_rows = []
                for metric, scorer in scorers.items():
                    idx = [i for i, (_, _, metrics) in enumerate(batch) if metric in metrics]
                    if not idx:
                        continue
                    values = np.asarray(
                        scorer.score([images[i] for i in idx], [batch[i][0].text for i in idx]),
                        dtype=np.float64,
                    )
                    if values.shape != (len(idx),) or not np.all(np.isfinite(values)):
                        raise RuntimeError(
                            f"scorer {metric!r} returned {values.shape} values "
                            f"(finite: {np.isfinite(values).all()}) for {len(idx)} images"
                        )
                    for i, value in zip(idx, values, strict=True):
                        prompt, seed, _ = batch[i]
                        new_rows.append((model, prompt.id, prompt.text, seed, metric, value))
                        done.add((model, prompt.id, seed, metric))
                new = pd.DataFrame(new_rows, columns=list(SCORE_COLUMNS))
                frame = new if frame.empty else pd.concat([frame, new], ignore_index=True)
                _write_scores(path, frame)
                bar.update(len(batch))
    return frame


def evaluate(
    models: Mapping[str, Generator],
    prompts: Sequence[Prompt | str],
    scorers: Mapping[str, Scorer],
    out_dir: str | Path,
    *,
    seeds: int = 5,
    base_seed: int = 0,
    reference: str | None = None,
    tie_tol: float = 0.0,
    grid_prompts: int = 4,
    grid_models: Sequence[str] | None = None,
    grid_cell_size: int = 256,
    grid_labels: Mapping[str, str] | None = None,
    group_by: Sequence[str] = ("Category", "Challenge"),
    run_record: Mapping[str, Mapping[str, Any]] | None = None,
    bootstrap: int = 0,
) -> EvalResults:
    """Generate `seeds` images per prompt and model, score them, and write the tables.

    models: name -> Generator (`generate(prompts, seeds) -> list[PIL.Image]`, optional
    `close()`); scorers: name -> Scorer (`score(images, prompts) -> float array [N]`).
    `reference` (default: the first model) is the model the chart compares against.
    `group_by`: prompt meta fields (PartiPrompts Category, Challenge) to break win rates down by.
    `run_record` (settings and specs; see `check_run_record`) guards resumed runs.
    `grid_models` (default: all), `grid_cell_size` (px per image) and `grid_labels` (metric ->
    short label under each image) shape grid.png;
    `bootstrap` > 0 adds a paired bootstrap over prompts (that many resamples) to every
    win-rate cell (winrates.csv, results.json).
    """
    out_dir = Path(out_dir)
    prompts = _as_prompts(prompts)
    model_names, metrics = list(models), list(scorers)
    if not model_names or not metrics:
        raise EvalSetupError("evaluate needs at least one model and one scorer")
    for name in model_names:
        _check_name(name, "model")
    for name in metrics:
        _check_name(name, "scorer")
    reference = model_names[0] if reference is None else reference
    if reference not in model_names:
        raise EvalSetupError(f"--reference {reference!r} is not one of the models {model_names}")
    if seeds < 1:
        raise EvalSetupError(f"--seeds must be positive, got {seeds}")
    seed_list = [base_seed + i for i in range(seeds)]
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_prompts_file(out_dir, prompts)
    if run_record is not None:
        check_run_record(out_dir, run_record)

    for name, generator in models.items():
        made = generate_images(name, generator, prompts, seed_list, out_dir)
        log.info("model %s: %d new images", name, made)
        if hasattr(generator, "close"):
            generator.close()
    frame = score_images(model_names, prompts, seed_list, scorers, out_dir)

    ids = {p.id for p in prompts}
    frame = frame[
        frame["model"].isin(model_names)
        & frame["prompt_id"].isin(ids)
        & frame["seed"].isin(seed_list)
        & frame["metric"].isin(metrics)
    ].reset_index(drop=True)
    best = winrate.best_of_seeds(
        frame["model"],
        frame["prompt_id"],
        frame["metric"],
        frame["score"],
        models=model_names,
        metrics=metrics,
    )
    pair_list = winrate.default_pairs(model_names, reference)
    pairs = winrate.pairwise_win_rates(best, pair_list, tie_tol, bootstrap=bootstrap)
    means = winrate.mean_scores(frame["model"], frame["metric"], frame["score"], best)
    groups = {}
    for group_field in group_by:
        members: dict[str, list[str]] = {}
        for prompt in prompts:
            if group_field in prompt.meta:
                members.setdefault(prompt.meta[group_field], []).append(prompt.id)
        for value, group_ids in sorted(members.items()):
            groups[group_field, value] = winrate.pairwise_win_rates(
                best.select_prompts(group_ids), pair_list, tie_tol
            )

    files: dict[str, Path] = {"scores": out_dir / "scores.parquet"}
    files["winrates_md"], files["winrates_csv"] = eval_report.write_winrate_tables(
        pairs, metrics, seeds, out_dir
    )
    files["means_md"], files["means_csv"] = eval_report.write_mean_tables(
        means, model_names, metrics, out_dir
    )
    if groups and len(model_names) > 1:
        files["groups_md"], files["groups_csv"] = eval_report.write_group_tables(
            groups, reference, metrics, out_dir
        )
    if len(model_names) > 1:
        files["chart"] = eval_report.plot_winrates(
            pairs, reference, metrics, out_dir / f"winrates_vs_{reference}.png"
        )
    if grid_prompts > 0:
        files["grid"] = eval_report.write_score_grid(
            out_dir, frame, list(grid_models or model_names), metrics,
            eval_report.spread(prompts, grid_prompts), seed_list[0], cell_size=grid_cell_size,
            reference=reference,
            abbreviations=grid_labels,
        )  # fmt: skip
    summary = {
        "num_prompts": len(prompts),
        "seeds": seed_list,
        "models": model_names,
        "metrics": metrics,
        "reference": reference,
        "tie_tol": tie_tol,
        "win_rule": "strictly greater best-of-seeds score; ties reported separately",
        "verdict_rule": eval_report.VERDICT_NOTE,
        "bootstrap_resamples": bootstrap,
        "pairs": [r.as_dict() for r in pairs],
        "means": [r.as_dict() for r in means],
    }
    files["results"] = out_dir / "results.json"
    _atomic_write_text(files["results"], json.dumps(summary, indent=2) + "\n")
    return EvalResults(frame, best, pairs, means, files)


def parse_models(text: str) -> dict[str, dict[str, str]]:
    """'base=PATH,ours=PATH,dpo=PATH,unet=UNET' -> {name: {"path": ..., "unet": ...}}.

    A `unet=` (or `backend=`) entry belongs to the model listed just before it; a model value
    may itself start with 'base=' ("dpo=base=PATH,unet=UNET")."""
    models: dict[str, dict[str, str]] = {}
    last = None
    for token in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = token.partition("=")
        if not sep or not value:
            raise EvalSetupError(f"--models entry {token!r} must be NAME=PATH")
        if name in _MODEL_OPTION_KEYS:
            if last is None:
                raise EvalSetupError(f"--models: {token!r} must follow the model it belongs to")
            models[last][name] = value
            continue
        _check_name(name, "model")
        if name in models:
            raise EvalSetupError(f"--models lists model {name!r} twice")
        if value.startswith("base="):
            value = value[len("base=") :]
        models[name] = {"path": value}
        last = name
    if not models:
        raise EvalSetupError("--models is empty")
    return models


class _LazyScorer:
    """Builds the named scorer on its first `score` call, so no scorer occupies memory while
    images are generated, and nothing is loaded when every score is already stored."""

    def __init__(self, name: str, spec: Mapping[str, Any]):
        self.name, self.spec, self._scorer = name, dict(spec), None

    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        if self._scorer is None:
            from scorers_torch.scorers.base import build_scorers

            self._scorer = build_scorers({self.name: self.spec})[self.name]
        return self._scorer.score(images, prompts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Best-of-seeds win rates of several text-to-image models (BalancedDPO App. D).",
    )
    add = parser.add_argument
    add("--models", required=True, help="NAME=PATH[,unet=UNET],... pipeline folders or hub ids")
    add(
        "--prompts",
        required=True,
        help="prompt file: parquet, PartiPrompts .tsv, HPDv2 .json, .txt",
    )
    add("--prompt-format", default="auto", choices=("auto", *FORMATS))
    add("--limit", type=int, default=None, help="use the first N prompts")
    add("--scorers", required=True, help="comma-separated scorer names")
    add("--scorer-config", default=None, help="JSON: scorer name -> options (model paths...)")
    add("--plugins", default="", help="comma-separated modules that register scorers/generators")
    add("--generator", default="diffusers", help="generation backend (GENERATORS registry)")
    add("--seeds", type=int, default=5, help="images per prompt and model")
    add("--base-seed", type=int, default=0, help="seeds are base_seed + 0 .. seeds-1")
    add("--steps", type=int, default=50)
    add("--guidance", type=float, default=7.5)
    add("--scheduler", default="ddim", choices=("default", "ddim", "dpmpp", "euler"))
    add("--resolution", type=int, default=None, help="image size (default: the model's)")
    add("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    add("--device", default="auto")
    add("--batch-size", type=int, default=4, help="images per pipeline call")
    add("--negative-prompt", default=None)
    add("--out", required=True, help="output folder (reused on a rerun)")
    add("--grid-prompts", type=int, default=4, help="prompts shown in grid.png (0 = none)")
    add("--reference", default=None, help="model the chart compares against (default: first)")
    add("--tie-tol", type=float, default=0.0, help="|best_A - best_B| <= tol counts as a tie")
    add("--bootstrap", type=int, default=0, help="paired bootstrap resamples per cell (0: off)")
    return parser


def main(argv: Sequence[str] | None = None) -> EvalResults:
    """The CLI; a user error (a flag, a prompt file, a name) exits 2 with one line on stderr."""
    argv, debug = schema.pop_debug_flag(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return schema.run_cli(PROG, lambda: _run(build_parser().parse_args(argv)), debug)


def _run(args: argparse.Namespace) -> EvalResults:
    from scorers_torch.generate import GENERATORS
    from scorers_torch.registry import import_plugins
    from scorers_torch.scorers.base import parse_scorer_spec

    import_plugins([m for m in args.plugins.split(",") if m.strip()])
    model_specs = parse_models(args.models)
    scorer_spec = parse_scorer_spec(args.scorers, args.scorer_config)
    prompts = read_prompt_set(args.prompts, args.prompt_format, args.limit)
    generation = {
        "scheduler": args.scheduler,
        "steps": args.steps,
        "guidance": args.guidance,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "negative_prompt": args.negative_prompt,
    }
    settings = {**generation, "device": args.device, "batch_size": args.batch_size}
    generators = {}
    for name, spec in model_specs.items():
        options = {k: v for k, v in spec.items() if k not in ("path", "backend")}
        flag = f"--models {name}: backend" if "backend" in spec else "--generator"
        backend = GENERATORS.get(spec.get("backend", args.generator), flag)
        generators[name] = backend(path=spec["path"], **options, **settings)
    record = {
        "generation": {**generation, "base_seed": args.base_seed},
        "models": {n: {"backend": args.generator, **s} for n, s in model_specs.items()},
        # batch size and device do not change a scorer's values: they may differ on a rerun
        "scorers": {
            name: {k: v for k, v in spec.items() if k not in ("batch_size", "device")}
            for name, spec in scorer_spec.items()
        },
    }
    results = evaluate(
        generators,
        prompts,
        {name: _LazyScorer(name, spec) for name, spec in scorer_spec.items()},
        args.out,
        seeds=args.seeds,
        base_seed=args.base_seed,
        reference=args.reference,
        tie_tol=args.tie_tol,
        grid_prompts=args.grid_prompts,
        run_record=record,
        bootstrap=args.bootstrap,
    )
    print(results.files["winrates_md"].read_text(encoding="utf-8"))
    print(results.files["means_md"].read_text(encoding="utf-8"))
    print("outputs:", ", ".join(str(p) for p in results.files.values()))
    return results


if __name__ == "__main__":
    main()
