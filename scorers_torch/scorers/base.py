"""The scorer interface, building scorers from a spec, and the `--scorers` CLI helper.

A spec maps a metric name to the kwargs of its factory in `SCORERS`:

    {"pickscore": {"model": "/ckpt/PickScore_v1", "batch_size": 16},
     "pickscore_logit": {"scorer": "pickscore", "scale": "logit"}}

The optional key "scorer" names the registered factory (default: the metric name itself), so
two conventions of one scorer can run side by side under different metric names.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image

from bdpo_jax.schema import UserError
from scorers_torch.registry import SCORERS

FACTORY_KEY = "scorer"  # spec key naming the registered factory (default: the metric name)


class ScorerSpecError(UserError, ValueError):
    """`--scorers` / `--scorer-config` name an unknown scorer or options it does not take."""


class ScorerConfigNotFoundError(UserError, FileNotFoundError):
    """The `--scorer-config` file does not exist."""


@runtime_checkable
class Scorer(Protocol):
    """Scores images against their prompts; higher is better."""

    name: str

    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        """float32 [N] scores of N images with their N prompts."""
        ...


def _register_builtins() -> None:
    """Imports the built-in scorer modules (cheap: heavy imports happen inside factories)."""
    import scorers_torch.scorers  # noqa: F401  (the package imports every built-in scorer)


def _factory_and_kwargs(
    metric: str, options: Mapping[str, Any], where: str
) -> tuple[str, dict[str, Any]]:
    """Splits `options` into (registered factory name, factory kwargs); checks the kwargs."""
    if not isinstance(options, Mapping):
        raise ScorerSpecError(f"{where}: options of scorer {metric!r} must be a JSON object")
    kwargs = dict(options)
    factory_name = kwargs.pop(FACTORY_KEY, metric)
    try:
        factory = SCORERS.get(factory_name)
    except ValueError as err:
        raise ScorerSpecError(f"{where}: {err}") from None
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ScorerSpecError(
                f"{where}: scorer {metric!r} ({factory_name}) has no option(s) {unknown}; "
                f"its options: {sorted(params)}"
            )
    required = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ScorerSpecError(
            f"{where}: scorer {metric!r} ({factory_name}) needs option(s) {missing} "
            "(set them in the --scorer-config JSON)"
        )
    return factory_name, kwargs


def build_scorers(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Scorer]:
    """Builds every scorer in `spec` (metric name -> options), keeping the order."""
    _register_builtins()
    scorers: dict[str, Scorer] = {}
    for metric, options in spec.items():
        factory_name, kwargs = _factory_and_kwargs(metric, options, "scorer spec")
        scorer = SCORERS.build(factory_name, **kwargs)
        scorer.name = metric
        scorers[metric] = scorer
    return scorers


def parse_scorer_spec(names: str, config_json: str | None) -> dict[str, dict]:
    """`--scorers a,b --scorer-config cfg.json` -> {metric: options}, validated, no model loaded.

    The JSON maps metric name -> options; it may hold entries for metrics not selected (one
    shared file), but each entry must name a known scorer and only its options.
    """
    _register_builtins()
    selected = [n.strip() for n in names.split(",") if n.strip()]
    if not selected:
        raise ScorerSpecError("--scorers is empty; known scorers: " + ", ".join(SCORERS.names()))
    if len(set(selected)) != len(selected):
        raise ScorerSpecError(f"--scorers lists a scorer twice: {names!r}")
    config: dict[str, Any] = {}
    where = "--scorers"
    if config_json:
        path = Path(config_json)
        where = f"--scorer-config {path}"
        if not path.is_file():
            raise ScorerConfigNotFoundError(f"{where}: no such file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ScorerSpecError(f"{where}: invalid JSON: {err}") from None
        if not isinstance(config, dict):
            raise ScorerSpecError(f"{where}: must be a JSON object mapping scorer name -> options")
        for metric, options in config.items():
            _factory_and_kwargs(metric, options, f"{where}, key {metric!r}")
    spec: dict[str, dict] = {}
    for metric in selected:
        options = dict(config.get(metric, {}))
        _factory_and_kwargs(metric, options, f"{where}, scorer {metric!r}")
        spec[metric] = options
    return spec
