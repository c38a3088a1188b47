"""Hyperparameter search (``slmops train --search search.yaml``) with optuna.

search.yaml (or the SLMOps guide's hyperparameter-search.yaml: ``search_strategy: {type: random,
num_trials: 20}`` and ``search_space: {learning_rate: {type: float, low, high, log: true}, lora_r:
{type: int, ...}, batch_size: {type: choice, values: [...]}}``)::

    config: examples/tone.yaml      # or inline `base:` options; CLI options override both
    n_trials: 8
    sampler: tpe                    # tpe | random
    metric: eval_loss               # any eval metric of run.json; direction inferred
    output_path: runs/tone-search
    params:
      learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-3}
      lora_r: {type: int, low: 4, high: 32}
      per_device_train_batch_size: {type: choice, values: [4, 8]}
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsUsageError
from slmops.fsutil import check_output_path, replace_dir
from slmops_train.config import TrainConfig, build_config, configs_from_yaml, load_yaml
from slmops_train.metrics import greater_is_better

PARAM_TYPES = ("loguniform", "uniform", "int", "choice", "float")
SPEC_KEYS = {"config", "base", "n_trials", "sampler", "metric", "output_path", "overwrite", "seed", "params",
             "search_strategy", "search_space"}
# the guide's search_space names -> TrainConfig options
SEARCH_ALIASES = {"batch_size": "per_device_train_batch_size", "r": "lora_r", "alpha": "lora_alpha"}


def _suggest(trial: Any, name: str, spec: dict[str, Any]) -> Any:
    kind = spec.get("type")
    missing = [k for k in (("values",) if kind == "choice" else ("low", "high")) if k not in spec]
    if kind in PARAM_TYPES and missing:
        raise SlmopsUsageError("--search", f"params.{name} ({kind}) needs {missing}")
    if kind == "float":
        kind = "loguniform" if spec.get("log") else "uniform"
    if kind == "loguniform":
        return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=True)
    if kind == "uniform":
        return trial.suggest_float(name, float(spec["low"]), float(spec["high"]))
    if kind == "int":
        return trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
    if kind == "choice":
        return trial.suggest_categorical(name, list(spec["values"]))
    raise SlmopsUsageError("--search", f"params.{name}.type '{kind}' is not one of {PARAM_TYPES}")


def normalize_search_spec(spec: dict[str, Any], source: str) -> dict[str, Any]:
    """The SLMOps guide's form (``search_strategy: {type, num_trials}``, ``search_space: {name: {type:
    float|int|choice, low, high, log, values}}``) -> this module's (``sampler``, ``n_trials``, ``params``)."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SlmopsUsageError("--search", f"{unknown} not understood in {source}; use {sorted(SPEC_KEYS)}")
    spec = dict(spec)
    strategy = spec.pop("search_strategy", None)
    if strategy is not None:
        if not isinstance(strategy, dict):
            raise SlmopsUsageError("--search", f"search_strategy in {source} must be a mapping (type, num_trials)")
        strategy = dict(strategy)
        kind = strategy.pop("type", strategy.pop("sampler", None))
        if kind is not None:
            if kind not in ("random", "tpe"):
                raise SlmopsUsageError("--search", f"search_strategy.type '{kind}' in {source}: use random or tpe")
            spec["sampler"] = kind
        trials = strategy.pop("num_trials", strategy.pop("max_samples", strategy.pop("n_trials", None)))
        if trials is not None:
            spec["n_trials"] = trials
        if "seed" in strategy:
            spec["seed"] = strategy.pop("seed")
        strategy.pop("execution_order", None)  # olive's joint/pass-by-pass: one pass here, so both are the same
        if strategy:
            raise SlmopsUsageError("--search", f"search_strategy {sorted(strategy)} not understood in {source}; "
                                   "use type, num_trials, seed")
    space = spec.pop("search_space", None)
    if space is not None:
        if not isinstance(space, dict) or not space:
            raise SlmopsUsageError("--search", f"search_space in {source} must map option names to ranges")
        params = dict(spec.get("params") or {})
        for name, p in space.items():
            if not isinstance(p, dict):
                raise SlmopsUsageError("--search", f"search_space.{name} in {source} must be a mapping with a type")
            p = dict(p)
            if p.get("type") == "float":
                p["type"] = "loguniform" if p.pop("log", False) else "uniform"
            params[SEARCH_ALIASES.get(name, name)] = p
        spec["params"] = params
    return spec


def run_search(search_path: Path, overrides: dict[str, Any], config_path: Path | None = None) -> dict[str, Any]:
    import optuna

    from slmops_train.recipe import RUN_JSON, train

    spec = normalize_search_spec(load_yaml(search_path), str(search_path))
    base_config = spec.get("config") or config_path
    if base_config:
        path = Path(base_config)
        if not path.is_absolute() and not path.exists():
            path = Path(search_path).parent / path
        configs = configs_from_yaml(path, {k: v for k, v in overrides.items() if k != "output_path"})
        if len(configs) != 1:
            raise SlmopsUsageError("--search", "the base config must describe exactly one adapter")
        base = configs[0].model_dump()
    else:
        base = {**spec.get("base", {}), **{k: v for k, v in overrides.items() if k != "output_path"}}
    params = spec.get("params") or {}
    unknown = [p for p in params if p not in TrainConfig.model_fields]
    if not params or unknown:
        raise SlmopsUsageError("--search", f"params must name TrainConfig options; unknown: {unknown or 'none given'}")
    n_trials = int(spec.get("n_trials", 8))
    metric = str(spec.get("metric", "eval_loss"))
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    out = Path(str(overrides.get("output_path") or spec.get("output_path") or f"runs/{build_config(base).run_name()}-search"))
    overwrite = bool(overrides.get("overwrite") or spec.get("overwrite"))
    check_output_path(out, overwrite)
    work = out.parent / f".{out.name}.search"
    if work.exists() and any(work.iterdir()) and not overwrite:
        trials = sorted(p.name for p in work.iterdir() if p.name.startswith("trial_"))
        raise SlmopsUsageError("--overwrite", f"'{work}' holds an unfinished search's trials ({', '.join(trials) or 'files'}); "
                               "a search cannot --resume: pass --overwrite to delete them and search again, or move them away")
    shutil.rmtree(work, ignore_errors=True)
    sampler_name = spec.get("sampler", "tpe")
    seed = int(spec.get("seed", base.get("seed", 42)))
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if sampler_name not in samplers:
        raise SlmopsUsageError("--search", f"sampler '{sampler_name}' is not 'tpe' or 'random'")
    maximize = greater_is_better(metric)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if maximize else "minimize", sampler=samplers[sampler_name](seed=seed))
    rows: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        values = {name: _suggest(trial, name, p) for name, p in params.items()}
        cfg = build_config({**base, **values, "name": f"trial_{trial.number}",
                            "output_path": str(work / f"trial_{trial.number}"), "overwrite": True})
        result = train(cfg)
        if metric not in result.metrics:
            raise SlmopsUsageError("--search", f"metric '{metric}' not produced; available: {sorted(result.metrics)}")
        value = float(result.metrics[metric])
        rows.append({"trial": trial.number, **values, metric: value,
                     "s_per_step": result.record["performance"]["s_per_step"]})
        return value

    study.optimize(objective, n_trials=n_trials)
    best = study.best_trial.number
    final = work / "final"
    final.mkdir(parents=True)
    shutil.copytree(work / f"trial_{best}", final, dirs_exist_ok=True, symlinks=True)  # <out>/model stays a link
    shutil.move(str(final / RUN_JSON), final / "best_trial_run.json")
    summary = {"metric": metric, "direction": "maximize" if maximize else "minimize", "sampler": sampler_name,
               "n_trials": n_trials, "best_trial": best, "best_value": study.best_value,
               "best_params": study.best_params, "trials": rows}
    (final / "trials.json").write_text(json.dumps(summary, indent=2))
    with open(final / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # run.json of the kept adapter, pointing back to the search
    record = json.loads((final / "best_trial_run.json").read_text())
    record["search"] = {k: v for k, v in summary.items() if k != "trials"}
    (final / RUN_JSON).write_text(json.dumps(record, indent=2, default=str))
    (final / "best_trial_run.json").unlink()
    replace_dir(final, out)
    shutil.rmtree(work, ignore_errors=True)
    _print_table(rows, metric, best)
    return summary


def _print_table(rows: list[dict[str, Any]], metric: str, best: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"search: {metric}")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        style = "bold green" if row["trial"] == best else None
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()], style=style)
    Console(stderr=True).print(table)
