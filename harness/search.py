"""Optuna rank search: for each method with a searchable size (Wander's d, R_h, R_t; LoRA's rank;
adapters' bottleneck), a multi-objective study (task metric up, #tunable down) whose trials are
ordinary fine-tuning runs, run through the sweep's executor and recorded (so a repeated trial is
read back, not recomputed). Each study lives in a journal file and resumes where it stopped.
The sequential and process executors ask a batch of trials, run them and tell the results; the ray
executor hands the same study to Ray Tune's OptunaSearch, which asks as workers free up (so its
trials can differ from the batched ones).

The search selects on the VALIDATION split: a trial's objective is its record's
``valid_metrics[metric]`` (the validation metrics at the epoch the run selected), never the test
metric, so the Pareto front is chosen without looking at test data. The test metric of the same
record is reported beside it. Studies are named ``<dataset>-<method>-valid-<hash>``, the hash of
what defines them (metric, space, sampler, and the run key of the first point: data, training
settings, code, package versions), so a changed definition starts a new study.
Outputs: trials.csv (every trial: ``valid_<metric>``, ``test_<metric>``, #tunable, Pareto flag
on validation), pareto.png (validation metric vs #tunable, with the profile banner).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402

from harness import records  # noqa: E402
from harness.params_schema import check_search  # noqa: E402
from harness.run import execute, record_path, run_key  # noqa: E402
from harness.settings import plan_run, section  # noqa: E402
from harness.tasks.metrics import lower_is_better  # noqa: E402
from harness.sweep import RAY_STORAGE, run_many, worker_pool  # noqa: E402
from harness.tables.render import profile_banner  # noqa: E402

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}


def _settings(params: dict) -> dict:
    """The ``search`` section, checked whole (types, ranges, metric, space) before any trial runs
    or any file is written."""
    check_search(params)
    return dict(section(params, "search"))


def run_search(params: dict, executor: str, workers: int, out_dir: Path) -> dict:
    with records.inputs_fixed():  # every trial's key is asked for several times
        return _run_search(params, executor, workers, out_dir)


def _run_search(params: dict, executor: str, workers: int, out_dir: Path) -> dict:
    config = _settings(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out_dir / "journal.log")))
    metric = config["metric"]
    directions = ["minimize" if lower_is_better(metric) else "maximize", "minimize"]
    chosen = params.get("method", "all")
    rows = []
    with worker_pool(executor, workers) as pool:
        for method, space in section(params, "search", "space").items():
            if chosen in ("all", method):
                rows += _search_method(params, config, storage, directions, method, space,
                                       executor, workers, out_dir, pool)
    table = pd.DataFrame(rows)
    return _finish(table, config, metric, directions, out_dir, params["profile"])


def study_name_for(params: dict, method: str) -> str:
    """``<dataset>-<method>-valid-<hash>``: a study is named by everything that defines it: the
    metric, the space, the sampler and its seed, and the run key of its first point (the data,
    training settings, code and package versions), so a change to any of them starts a new study
    instead of reporting old trials under it."""
    config = section(params, "search")
    space = section(params, "search", "space", method)
    first = plan_run(params, config["dataset"], method, seed=config["train_seed"],
                     settings={name: choices[0] for name, choices in space.items()})
    identity = records.canonical_hash({"metric": config["metric"], "space": space,
                                       "sampler": config["sampler"], "seed": config["seed"],
                                       "run": run_key(first)})[:12]
    return f"{config['dataset']}-{method}-valid-{identity}"


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.is_finished()]


def _search_method(params, config, storage, directions, method, space, executor, workers,
                   out_dir, pool) -> list[dict]:
    """Run (or resume) one method's study until it has ``trials`` finished trials."""
    metric = config["metric"]

    def plan_for(settings: dict):
        return plan_run(params, config["dataset"], method, seed=config["train_seed"], settings=settings)

    study_name = study_name_for(params, method)
    sampler = SAMPLERS[config["sampler"]](seed=config["seed"])
    try:  # load first: create_study(load_if_exists=True) appends a create entry to the journal
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    except KeyError:
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                    directions=directions)
        with warnings.catch_warnings():  # set_metric_names is marked experimental since optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"valid_{metric}", "tunable"])

    todo = config["trials"] - len(_finished(study))
    if executor == "ray" and todo > 0:  # Ray's OptunaSearch asks this study as workers free up
        from harness.ray_executor import RayOptions, search_with_ray

        search_with_ray(study_name, storage, sampler, directions, space, todo, plan_for, metric,
                        str((out_dir / "runs").resolve()), os.getcwd(), workers,
                        (out_dir / RAY_STORAGE).resolve(), RayOptions.from_params(params))
        study = optuna.load_study(study_name=study_name, storage=storage)
    while len(_finished(study)) < config["trials"]:  # ask a batch, run it, tell
        asked = [study.ask() for _ in range(min(config["batch"], config["trials"] - len(_finished(study))))]
        plans = [plan_for({name: trial.suggest_categorical(name, choices)
                           for name, choices in space.items()})
                 for trial in asked]
        run_many(plans, executor, workers, out_dir / "runs", desc=f"search {method}", pool=pool)
        for trial, plan in zip(asked, plans):
            record = execute(plan, out_dir / "runs", progress=False)  # reads the record back
            study.tell(trial, [record["valid_metrics"][metric],
                               record["tunable"]["method"] + record["tunable"]["head"]])
    pareto = {t.number for t in study.best_trials}
    return [{"method": method, "trial": t.number, **t.params, f"valid_{metric}": t.values[0],
             f"test_{metric}": _test_value(plan_for(t.params), out_dir / "runs", metric),
             "tunable": t.values[1], "pareto": t.number in pareto}
            for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])]


def _test_value(plan, runs_dir: Path, metric: str) -> float | None:
    """The test metric of a trial's run record (None when the record is gone: not recomputed)."""
    path = record_path(plan, run_key(plan), runs_dir)
    return records.read_json(path)["metrics"][metric] if path.is_file() else None


def _finish(table, config, metric, directions, out_dir, profile) -> dict:
    table.to_csv(out_dir / "trials.csv", index=False)
    figure = pareto_figure(table, metric, config["dataset"], profile)
    figure.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(figure)
    summary = {"dataset": config["dataset"], "metric": metric, "selected_on": "valid",
               "directions": directions, "sampler": config["sampler"], "seed": config["seed"],
               "trials": len(table),
               "pareto": table[table["pareto"]].to_dict("records") if len(table) else []}
    records.write_json_atomic(out_dir / "summary.json", summary)
    return summary


def pareto_figure(table: pd.DataFrame, metric: str, dataset: str, profile: str):
    """Validation ``metric`` vs #tunable of every trial, each method's Pareto front joined."""
    figure, axes = plt.subplots(figsize=(6, 4.4))
    column = f"valid_{metric}"
    for method, group in table.groupby("method") if len(table) else []:
        points = axes.scatter(group["tunable"], group[column], label=method, alpha=0.6)
        front = group[group["pareto"]].sort_values("tunable")
        axes.plot(front["tunable"], front[column], color=points.get_facecolor()[0], marker="o")
    axes.set_xscale("log")
    axes.set_xlabel("#tunable (method + head)")
    axes.set_ylabel(f"validation {metric} (selected epoch)")
    axes.set_title(f"Rank search on {dataset}: validation {metric}, Pareto fronts", fontsize=10)
    axes.legend()
    banner = profile_banner([profile])
    figure.text(0.5, 0.01, f"profile: {profile}" + (f". {banner}" if banner else ""),
                ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return figure

