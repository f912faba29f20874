"""Ray Tune executor: the same trial function as the other executors, one CPU per trial.

Ray itself is imported only when the ``ray`` executor is chosen. ``ray.init`` joins the cluster named by
RAY_ADDRESS when it is set (``RAY_ADDRESS=... dvc repro``), else starts a local instance.
Tune's storage lives inside the results folder, not ~/ray_results.

Two entry points: ``run_with_ray`` runs a fixed list of plans (the finetune grid, a grid search
over plans); ``search_with_ray`` lets Ray's ``OptunaSearch`` ask an Optuna study for each trial's
settings (the rank search), the same study (journal storage) the other executors drive.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from harness.run import run_trial
from harness.settings import plan_to_dict


@contextlib.contextmanager
def ray_session(workers: int):
    """Ray, initialised here unless the caller already did (then left running)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # no per-trial CSV / JSON / TensorBoard logs from Tune: the run records hold every result, and
    # writing them costs CPU that the trials compete for on a small machine
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # "local": a Ray instance of this process's own, never a cluster someone else
            # started on this machine (ray.init() without an address would join the latest one)
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     log_to_driver=False)
    try:
        yield
    finally:
        if started_here:  # leave no Ray driver behind (a later `ray stop` would kill this process)
            ray.shutdown()


def _fit(trainable, name: str, storage: Path, workers: int, **tune_config) -> None:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=tune_config.pop("param_space", None),
        # reuse_actors: a worker process (torch, harness imported) runs trial after trial instead of
        # one fresh process per trial; Tune's default (False) costs seconds per tiny trial.
        tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} Ray trials failed; first: {errors[0]}")


def run_with_ray(plan_values: list[dict], out_dir: str, root: str, workers: int,
                 storage: Path) -> None:
    from ray import tune

    # A trial's config is its index in the grid: the plans travel once, with the function, and
    # Tune's driver names, stores and checkpoints small configs.
    def trainable(config: dict) -> None:
        record = run_trial(plan_values[config["run"]], out_dir, root)
        tune.report({"key": record["key"], **{k: v for k, v in record["metrics"].items()
                                               if isinstance(v, (int, float))}})

    with ray_session(workers):
        _fit(trainable, "finetune", storage, workers,
             param_space={"run": tune.grid_search(list(range(len(plan_values))))})


def search_with_ray(study_name: str, journal, sampler, directions: list[str], space: dict[str, list],
                    trials: int, plan_for, metric: str, out_dir: str, root: str, workers: int,
                    storage: Path) -> None:
    """Run ``trials`` more trials of the Optuna study ``study_name`` in ``journal`` (two
    objectives: the validation ``metric`` and the #tunable, in ``directions``), each asked by
    Ray's OptunaSearch over the categorical ``space`` with ``sampler`` and turned into a plan by
    ``plan_for(settings)``, at most ``workers`` at a time."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config: dict) -> None:
        os.chdir(root)  # plan_for resolves the data and checkpoint paths
        record = run_trial(plan_to_dict(plan_for(config)), out_dir, root)
        tune.report({metric: record["valid_metrics"][metric],  # select on validation
                     "tunable": record["tunable"]["method"] + record["tunable"]["head"]})

    searcher = OptunaSearch(
        space={name: optuna.distributions.CategoricalDistribution(choices)
               for name, choices in space.items()},
        metric=[metric, "tunable"],
        mode=[direction[:3] for direction in directions],  # minimize -> min, maximize -> max
        sampler=sampler, study_name=study_name, storage=journal)
    with ray_session(workers):
        _fit(trainable, f"search-{study_name}", storage, workers,
             search_alg=ConcurrencyLimiter(searcher, max_concurrent=workers), num_samples=trials)
