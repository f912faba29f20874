"""Optuna rank search: for each method with a searchable size (Wander's d, R_h, R_t; LoRA's rank;
adapters' bottleneck), a multi-objective study (task metric up, #tunable down) whose trials are
ordinary fine-tuning runs, run through the sweep's executor and recorded (so a repeated trial is
read back, not recomputed). Each study lives in a journal file and resumes where it stopped.
The sequential and process executors ask every study for a batch of trials, run the batches
together (one method's longer runs do not leave workers idle) and tell each study its results; the
ray executor hands each study to Ray Tune's OptunaSearch, which asks as workers free up (so its
trials can differ from the batched ones).

The search selects on the VALIDATION split: a trial's objective is its record's
``valid_metrics[metric]`` (the validation metrics at the epoch the run selected), never the test
metric, so the Pareto front is chosen without looking at test data. The test metric of the same
record is reported beside it. Studies are named ``<dataset>-<method>-valid-<hash>``, the hash of
what defines them (metric, space, sampler, and the run key of the first point: data, training
settings, code, package versions), so a changed definition starts a new study.
params.yaml's ``method`` (``dvc exp run -S method=lora``) picks which studies are asked for
trials; the outputs report every study of the current definitions found in the journal, so a run
for one method, or for a method without a search space, leaves the others' trials in them.
Outputs: trials.csv (every trial: ``valid_<metric>``, ``test_<metric>``, #tunable, Pareto flag
on validation), pareto.png (validation metric vs #tunable, with the profile banner), summary.json
(the Pareto front: one entry per setting, with the trials that reached it).

A trial's setting is a function of its number and the trials before it, never of when it was asked
(``NumberSeeded``), and a search interrupted (killed, SIGTERM) leaves its asked-but-untold trials
RUNNING in the journal, which the next start runs under the same numbers: a resumed or extended
search ends with the trials, outputs and Pareto front of one uninterrupted search.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from harness import records  # noqa: E402
from harness.concurrency import one_at_a_time, stop_on_signals  # noqa: E402
from harness.errors import InputError  # noqa: E402
from harness.params_schema import check_search  # noqa: E402
from harness.ray_executor import RayOptions, search_with_ray  # noqa: E402
from harness.run import execute, record_path, run_key  # noqa: E402
from harness.settings import plan_run, section  # noqa: E402
from harness.tasks.metrics import lower_is_better  # noqa: E402
from harness.sweep import RAY_STORAGE, restore, run_many, set_aside, worker_pool  # noqa: E402
from harness.tables.render import profile_banner  # noqa: E402

log = logging.getLogger(__name__)

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
PROPOSALS = "number-seeded"  # how trials are proposed (NumberSeeded): part of a study's identity


class NumberSeeded(optuna.samplers.BaseSampler):
    """``sampler`` (tpe, random) made a pure function of the trial's number: trial n's value for
    a parameter is what a fresh sampler seeded from (seed, n, parameter name) proposes from a
    fresh in-memory study holding exactly the trials before n that batch b = n // batch would
    see in one uninterrupted search: every COMPLETE trial of the earlier batches (numbers below
    b * batch, with their results), and batch b's earlier trials as RUNNING (their settings
    only: TPE's constant liar). Nothing else reaches it: not the sampler's RNG position (which
    a restart resets), not when the trial was asked, not a later or a still-running trial. So a
    restarted search, one resumed mid-batch, or one extended from 8 to 10 trials proposes trial
    n's setting as an uninterrupted search does. (The seed is per parameter too, so a trial cut
    between two suggestions gets the second one as before.)"""

    def __init__(self, sampler: str, seed: int, batch: int):
        self.sampler, self.seed, self.batch = sampler, seed, batch

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}  # every parameter is sampled by sample_independent

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        start = trial.number - trial.number % self.batch
        key = f"{self.seed}/{trial.number}/{param_name}".encode()
        seed = int(hashlib.sha256(key).hexdigest()[:8], 16)
        seen = optuna.create_study(directions=study.directions,
                                   sampler=SAMPLERS[self.sampler](seed=seed))
        for before in study.get_trials(deepcopy=False):
            if before.number < start and before.state == TrialState.COMPLETE:
                seen.add_trial(before)
            elif start <= before.number < trial.number:  # batch b's earlier trials, in flight
                seen.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING,
                                                         params=before.params,
                                                         distributions=before.distributions))
        return seen.ask({param_name: param_distribution}).params[param_name]


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
    # one search at a time on a folder: another would take this one's in-flight trials for an
    # interrupted search's; the second waits, then resumes what the first left (nothing, or the rest)
    with one_at_a_time(out_dir / "journal.log", "the search running on this folder to end"):
        return _search_locked(params, config, executor, workers, out_dir)


def _search_locked(params: dict, config: dict, executor: str, workers: int, out_dir: Path) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = out_dir / "journal.log"
    _check_journal(journal)  # here, in the driver: the trials' workers never open the journal
    left = journal.with_name(journal.name + OPTUNA_LOCK_SUFFIX)
    if left.is_symlink() or left.exists():  # under this search's flock: one a killed search left
        left.unlink()  # (Optuna waited its 30 s grace period, then broke it)
        log.warning("search: removed %s, left by a search that was killed", left)
    if (out_dir / "runs").is_dir():  # trials of other code (its studies are others): runs/.stale
        moved = set_aside(out_dir / "runs")
        if moved:
            log.warning("search: %d trial records of other code set aside in %s (mmpetl records "
                        "stale --out %s)", moved, out_dir / "runs" / ".stale", out_dir / "runs")
    storage = _replayed(journal)
    metric = config["metric"]
    directions = ["minimize" if lower_is_better(metric) else "maximize", "minimize"]
    chosen = params.get("method", "all")
    every_space = section(params, "search", "space")
    spaces = {method: space for method, space in every_space.items() if chosen in ("all", method)}
    studies = {method: _open_study(params, config, storage, directions, method)
               for method in spaces}
    # ``method`` picks the studies that run; every study of the current definitions is reported,
    # as the leaderboard ranks every row on record (`dvc exp run -S method=bias` keeps the front)
    others = {}
    for method in [method for method in every_space if method not in spaces]:
        study = _load_study(study_name_for(params, method), storage, _sampler(config))
        if study is None:
            log.warning("search: no %s study under the current settings in %s: run it with "
                        "method: all or method: %s", method, out_dir / "journal.log", method)
        else:
            others[method] = study
    back = restore([_plan_for(params, config, method, trial.params)
                    for method, study in {**studies, **others}.items()
                    for trial in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])],
                   out_dir / "runs")  # the records of its told trials, set aside by an edit since undone
    if back:
        log.warning("search: %d trial records moved back from %s (their code is current again)",
                    back, out_dir / "runs" / ".stale")
    ray_options = RayOptions.from_params(params) if executor == "ray" else None
    with worker_pool(executor, workers, ray_options and ray_options.local_cpus(workers)) as pool:
        if executor == "ray":  # Ray's OptunaSearch asks each study as workers free up
            with stop_on_signals("every finished trial keeps its record and its study's tell; "
                                 "the same command resumes the search"):
                for method in spaces:
                    studies[method] = _search_with_ray(params, config, storage, directions, method,
                                                       spaces[method], studies[method], workers,
                                                       out_dir, ray_options)
        _search_batches(params, config, studies, spaces, executor, workers, out_dir, pool)
    studies.update(others)
    rows = [row for method in every_space if method in studies
            for row in _trial_rows(params, config, method, studies[method], out_dir)]
    table = pd.DataFrame(rows)
    return _finish(table, config, metric, directions, out_dir, params["profile"])


# The lock Optuna's journal appends take (JournalFileSymlinkLock): <journal>.lock
OPTUNA_LOCK_SUFFIX = ".lock"


def _check_journal(path: Path) -> None:
    """Check the journal before Optuna reads it, and repair an append cut short by a crash.

    Optuna's JournalFileBackend writes one JSON object per line, each append ending with a
    newline, and ignores a last line without one. Left there, a cut line takes Optuna's next
    append onto its end, and the journal is damaged for good. Such a line is an operation that
    never completed (no reader ever applied it), so it is dropped: the file is truncated to its
    last complete line, with a warning, and the search resumes. Any other bad line is damage no
    interrupted append leaves: an InputError naming it, and the file is left as it is."""
    cut = _cut_tail(path)
    if cut is None:
        return
    # Under Optuna's own lock (what its appends take): another search appending to this journal
    # has finished its line once we hold it, so the tail is looked at again before truncating.
    # (A lock left by the crashed append is broken after Optuna's 30 s grace period.)
    lock = JournalFileSymlinkLock(str(path))  # the lock JournalFileBackend takes by default
    lock.acquire()
    try:
        cut = _cut_tail(path)
        if cut is not None:
            number, keep = cut
            dropped = path.stat().st_size - keep
            os.truncate(path, keep)
    finally:
        lock.release()
    if cut is not None:
        log.warning("search: %s: line %d was cut short by an interrupted append (no newline); "
                    "dropped its %d bytes, resuming from the line before", path, number, dropped)


def _replayed(journal: Path) -> JournalStorage:
    """The journal's storage, every operation applied (Optuna replays the journal as it opens it):
    a line that is JSON but no operation Optuna wrote (no op_code, an unknown one, a trial that is
    not there) is refused here, naming the journal, instead of failing inside optuna."""
    try:
        storage = JournalStorage(JournalFileBackend(str(journal)))
        storage.get_all_studies()
    except (AssertionError, KeyError, IndexError, TypeError, ValueError) as error:
        raise InputError("the search journal holds an operation Optuna cannot replay: restore it "
                         f"(`git checkout -- {journal}`) or delete it to start the search over",
                         file=str(journal), key="(its operations)",
                         expected="operations written by Optuna",
                         found=f"{type(error).__name__}: {error}") from None
    return storage


def _cut_tail(path: Path) -> tuple[int, int] | None:
    """(line number, byte offset where it starts) of a last line without its newline, None when
    there is none; InputError for any other line that is not one JSON object."""
    if not path.is_file():
        return None
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):  # the last line only: an append cut short
                return number, offset
            try:
                entry = json.loads(line.decode("utf-8"))
            except ValueError:  # not UTF-8 (UnicodeDecodeError) or not JSON
                entry = None
            if not isinstance(entry, dict):
                raise InputError(
                    "the search journal has a damaged line: restore it (`git checkout -- "
                    f"{path}`) or delete it to start the search over",
                    file=str(path), key=f"line {number}",
                    expected="one JSON object per line (Optuna's journal)",
                    found=repr(line[:80]) + (" ..." if len(line) > 80 else ""))
            offset += len(line)
    return None


def study_name_for(params: dict, method: str) -> str:
    """``<dataset>-<method>-valid-<hash>``: a study is named by everything that defines it: the
    metric, the space, the sampler, its seed and how it proposes (``PROPOSALS``), and the run key
    of its first point (the data, training settings, code and package versions), so a change to
    any of them starts a new study instead of reporting old trials under it."""
    config = section(params, "search")
    space = section(params, "search", "space", method)
    first = plan_run(params, config["dataset"], method, seed=config["train_seed"],
                     settings={name: choices[0] for name, choices in space.items()})
    identity = records.canonical_hash({"metric": config["metric"], "space": space,
                                       "sampler": config["sampler"], "seed": config["seed"],
                                       "proposals": PROPOSALS, "run": run_key(first)})[:12]
    return f"{config['dataset']}-{method}-valid-{identity}"


def _plan_for(params: dict, config: dict, method: str, settings: dict):
    return plan_run(params, config["dataset"], method, seed=config["train_seed"], settings=settings)


def _load_study(name: str, storage, sampler) -> optuna.Study | None:
    """The study ``name`` from the journal, None when it has none. (Loaded, not
    ``create_study(load_if_exists=True)``: that appends a create entry to the journal.)"""
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        return None


def _sampler(config: dict) -> optuna.samplers.BaseSampler:
    return NumberSeeded(config["sampler"], config["seed"], config["batch"])


def _open_study(params, config, storage, directions, method) -> optuna.Study:
    """The method's study, resumed from the journal or created."""
    name, sampler = study_name_for(params, method), _sampler(config)
    study = _load_study(name, storage, sampler)
    if study is None:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                    directions=directions)
        with warnings.catch_warnings():  # set_metric_names is marked experimental since optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"valid_{config['metric']}", "tunable"])
    return study


def _search_with_ray(params, config, storage, directions, method, space, study, workers,
                     out_dir, ray_options: RayOptions) -> optuna.Study:
    """Run the study's missing trials through Ray Tune's OptunaSearch; the study reloaded. (Trials
    an interrupted search left RUNNING count: ``_search_batches`` runs them after.)"""
    todo = config["trials"] - len(study.trials)
    if todo <= 0:
        return study
    search_with_ray(study.study_name, storage, study.sampler, directions, space, todo,
                    lambda settings: _plan_for(params, config, method, settings), config["metric"],
                    str((out_dir / "runs").resolve()), os.getcwd(), workers,
                    (out_dir / RAY_STORAGE).resolve(), ray_options)
    return optuna.load_study(study_name=study.study_name, storage=storage)


def _search_batches(params, config, studies, spaces, executor, workers, out_dir, pool) -> None:
    """Until every study has ``trials`` trials, all told: take each study's next batch
    (``_next_batch``), run every study's batch together (the workers stay busy while one method's
    runs are longer than another's), tell each study its results. A study's asks and tells are the
    ones it would get alone: its trials do not depend on the other studies'."""
    metric = config["metric"]
    while True:
        batches = {method: _next_batch(study, spaces[method], config)
                   for method, study in studies.items()}
        plans = {method: [_plan_for(params, config, method, trial.params) for trial in trials]
                 for method, trials in batches.items()}
        todo = [plan for method_plans in plans.values() for plan in method_plans]
        if not todo:
            return
        run_many(todo, executor, workers, out_dir / "runs",
                 desc="search " + ", ".join(m for m, p in plans.items() if p), pool=pool)
        for method, trials in batches.items():
            for trial, plan in zip(trials, plans[method]):
                record = execute(plan, out_dir / "runs", progress=False)  # reads the record back
                tunable = record["tunable"]["method"] + record["tunable"]["head"]
                studies[method].tell(trial, [record["valid_metrics"][metric], tunable])


def _next_batch(study: optuna.Study, space: dict, config: dict) -> list[optuna.trial.Trial]:
    """The study's next trials, their settings suggested in number order: first those an
    interrupted search asked and never told (still RUNNING: run again under their numbers, a
    setting already suggested kept), then new ones up to the end of their batch (batch b holds
    trials b * batch .. b * batch + batch - 1, as in an uninterrupted search) within ``trials``.
    Their records are read back where the interrupted search had finished them."""
    size, trials = config["batch"], study.get_trials(deepcopy=False)
    batch = [optuna.trial.Trial(study, t._trial_id)  # (Trial: what ask returns for a new one)
             for t in trials if t.state == TrialState.RUNNING]
    first = batch[0].number if batch else len(trials)
    for _ in range(max(0, min(config["trials"], first - first % size + size) - len(trials))):
        batch.append(study.ask())
    for trial in batch:
        for name, choices in space.items():
            trial.suggest_categorical(name, choices)
    return batch


def _trial_rows(params, config, method, study, out_dir) -> list[dict]:
    metric = config["metric"]
    pareto = {t.number for t in study.best_trials}
    return [{"method": method, "trial": t.number, **t.params, f"valid_{metric}": t.values[0],
             f"test_{metric}": _test_value(_plan_for(params, config, method, t.params),
                                           out_dir / "runs", metric),
             "tunable": t.values[1], "pareto": t.number in pareto}
            for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])]


def _test_value(plan, runs_dir: Path, metric: str) -> float | None:
    """The test metric of a trial's run record (None when the record is gone: not recomputed)."""
    path = record_path(plan, run_key(plan), runs_dir)
    return records.read_run_record(path)["metrics"][metric] if path.is_file() else None


def _finish(table, config, metric, directions, out_dir, profile) -> dict:
    table = _whole_numbers(table)
    table.to_csv(out_dir / "trials.csv", index=False)
    figure = pareto_figure(table, metric, config["dataset"], profile)
    figure.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(figure)
    summary = {"dataset": config["dataset"], "metric": metric, "selected_on": "valid",
               "directions": directions, "sampler": config["sampler"], "seed": config["seed"],
               "trials": len(table), "pareto": _front(table) if len(table) else []}
    records.write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _setting_columns(table: pd.DataFrame) -> list[str]:
    """The columns of the searched settings (each method's own: empty in the other methods' rows)."""
    return [column for column in table.columns if column not in ("method", "trial", "tunable", "pareto")
            and not column.startswith(("valid_", "test_"))]


def _whole_numbers(table: pd.DataFrame) -> pd.DataFrame:
    """The settings and #tunable as integers (a column empty in another method's rows would read
    8.0), their empty cells as missing."""
    columns = [c for c in [*_setting_columns(table), "tunable"] if c in table
               and pd.api.types.is_float_dtype(table[c]) and (table[c].dropna() % 1 == 0).all()]
    return table.astype({column: "Int64" for column in columns})


def _front(table: pd.DataFrame) -> list[dict]:
    """The Pareto trials, one entry per distinct setting with the numbers of the trials that
    reached it: the sampler proposes a setting again (8 trials in a space of 5 sizes), and each
    repeat reads the same run record back."""
    front = table[table["pareto"]]
    entries = []
    for _, group in front.groupby(["method", *_setting_columns(table)], dropna=False, sort=False):
        entry = {name: value.item() if hasattr(value, "item") else value  # numpy -> JSON numbers
                 for name, value in group.iloc[0].drop("trial").items() if not pd.isna(value)}
        entries.append({**entry, "trials": [int(number) for number in group["trial"]]})
    return entries


def pareto_figure(table: pd.DataFrame, metric: str, dataset: str, profile: str):
    """Validation ``metric`` vs #tunable of every trial, each method's Pareto front joined."""
    figure, axes = plt.subplots(figsize=(6, 4.4))
    column = f"valid_{metric}"
    for method, group in table.groupby("method") if len(table) else []:
        points = axes.scatter(group["tunable"], group[column], label=method, alpha=0.6)
        front = group[group["pareto"]].sort_values("tunable")
        axes.plot(front["tunable"], front[column], color=points.get_facecolor()[0], marker="o")
        for (x, y), repeats in group.groupby(["tunable", column]).size().items():
            if repeats > 1:  # a setting proposed again: one point, so many trials
                axes.annotate(f"×{repeats}", (x, y), textcoords="offset points", xytext=(4, 4),
                              fontsize=7)
    axes.set_xscale("log")
    if len(table) and table["tunable"].max() < 10 * table["tunable"].min():
        # within one decade a log axis labels one power of ten, or none: round numbers instead
        axes.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6))
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    axes.set_xlabel("#tunable (method + head, log scale)")
    axes.set_ylabel(f"validation {metric} (selected epoch)")
    axes.set_title(f"Rank search on {dataset}: validation {metric}, Pareto fronts", fontsize=10)
    if len(table):
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no trials yet", ha="center", va="center", transform=axes.transAxes)
    figure.text(0.5, 0.01, profile_banner([profile]) or f"profile: {profile}", ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return figure

