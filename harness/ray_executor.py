"""Ray Tune executor: the same trial function as the other executors, one CPU per trial.

Imported only when the ``ray`` executor is chosen. ``ray.init`` joins the cluster named by
RAY_ADDRESS when it is set (``RAY_ADDRESS=... dvc repro``), else starts a local instance.
Tune's storage lives inside the results folder, not ~/ray_results.
"""
from __future__ import annotations

import os
from pathlib import Path


def run_with_ray(plan_values: list[dict], out_dir: str, root: str, workers: int,
                 storage: Path) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import tune

    from harness.sweep import run_trial

    started_here = not ray.is_initialized()
    if started_here:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        _fit(tune, run_trial, plan_values, out_dir, root, workers, storage)
    finally:
        if started_here:  # leave no Ray driver behind (a later `ray stop` would kill this process)
            ray.shutdown()


def _fit(tune, run_trial, plan_values, out_dir, root, workers, storage) -> None:
    def trainable(config: dict) -> None:
        record = run_trial(config["plan"], out_dir, root)
        tune.report({"key": record["key"], **{k: v for k, v in record["metrics"].items()
                                               if isinstance(v, (int, float))}})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"plan": tune.grid_search(plan_values)},
        # reuse_actors: a worker process (torch, harness imported) runs trial after trial instead of
        # one fresh process per trial; Tune's default (False) costs seconds per tiny trial.
        tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=True),
        run_config=tune.RunConfig(name="finetune", storage_path=str(storage), verbose=1),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} Ray trials failed; first: {errors[0]}")
