"""Optuna rank search: two objectives on the validation split, a resumable journal, a Pareto
front, and Ray's OptunaSearch."""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from harness import search
from harness.concurrency import Stopped
from harness.errors import InputError
from harness.search import pareto_figure, run_search
from harness.settings import load_params
from harness.tables.render import TINY_BANNER
from helpers import ROOT, small_mosi_params


@pytest.fixture(scope="module")
def search_params(tmp_path_factory):
    """Wander's d over two values and LoRA's rank over two, 3 trials each, 1 epoch on small MOSI."""
    folder = tmp_path_factory.mktemp("search")
    params = small_mosi_params(folder)
    params["search"].update(dataset="mosi", metric="mae", trials=3, batch=2,
                            space={"wander": {"down_dim": [4, 8]}, "lora": {"rank": [2, 4]}})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path)


def dominated(row, others) -> bool:
    """Another trial is at least as good on both objectives (validation MAE down, #tunable down)
    and better on one."""
    return any(o.valid_mae <= row.valid_mae and o.tunable <= row.tunable
               and (o.valid_mae < row.valid_mae or o.tunable < row.tunable)
               for o in others.itertuples())


def recorded(out) -> dict:
    """(method, searched size) -> (validation MAE, test MAE) of the run records."""
    found = {}
    for path in (out / "runs").rglob("*.json"):
        record = json.loads(path.read_text())
        size = record["row"].get("down_dim", record["row"].get("rank"))
        found[(record["method"], size)] = (record["valid_metrics"]["mae"], record["metrics"]["mae"])
    return found


def check_outputs(out, summary, trials: int) -> None:
    table = pd.read_csv(out / "trials.csv")
    assert summary["directions"] == ["minimize", "minimize"]  # MAE is lower-is-better
    assert summary["selected_on"] == "valid"
    assert len(table) == summary["trials"] == trials
    runs = recorded(out)
    for row in table.itertuples():  # the objective is the validation MAE, test MAE beside it
        size = row.down_dim if row.method == "wander" else row.rank
        assert (row.valid_mae, row.test_mae) == pytest.approx(runs[(row.method, int(size))])
    assert any(valid != test for valid, test in runs.values())  # the two splits do differ
    for method, group in table.groupby("method"):
        for row in group.itertuples():
            assert row.pareto == (not dominated(row, group)), (method, row)
    front = {(p["method"], n) for p in summary["pareto"] for n in p["trials"]}
    assert front == {(row.method, row.trial) for row in table.itertuples() if row.pareto}
    settings = [tuple(None if pd.isna(p.get(f)) else p[f] for f in ("method", "down_dim", "rank"))
                for p in summary["pareto"]]
    assert len(settings) == len(set(settings))  # one entry per setting, with the trials that reached it
    assert (out / "pareto.png").stat().st_size > 0
    assert table["test_mae"].notna().all()  # every trial's record is found again
    storage = JournalStorage(JournalFileBackend(str(out / "journal.log")))
    for method in ("wander", "lora"):
        (name,) = [n for n in optuna.get_all_study_names(storage)
                   if n.startswith(f"mosi-{method}-valid-")]
        study = optuna.load_study(study_name=name, storage=storage)
        assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 3


def test_search_writes_pareto_and_resumes(search_params, tmp_path):
    summary = run_search(search_params, "sequential", 1, tmp_path)
    check_outputs(tmp_path, summary, 6)
    records = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}
    assert 2 <= len(records) <= 4  # repeated settings are read back, not recomputed

    journal = (tmp_path / "journal.log").read_bytes()
    again = run_search(search_params, "sequential", 1, tmp_path)  # the journal has every trial
    assert again["trials"] == 6
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")} == records
    assert (tmp_path / "journal.log").read_bytes() == journal  # nothing appended on a resume

    search_params["search"]["trials"] = 4  # a larger budget adds only the new trials
    assert run_search(search_params, "sequential", 1, tmp_path)["trials"] == 8


def test_trials_of_other_code_are_set_aside(search_params, tmp_path):
    """After a change of run code every study is a new one: the old trials' records leave
    runs/ for runs/.stale/ (they piled up in results/search/runs, one set per change)."""
    run_search(search_params, "sequential", 1, tmp_path)
    kept = sorted(p.name for p in (tmp_path / "runs").rglob("*.json"))
    old = next((tmp_path / "runs").glob("*/*.json"))
    record = json.loads(old.read_text())
    other = old.with_name(old.name.rsplit("-", 1)[0] + "-000000000000.json")
    other.write_text(json.dumps({**record, "key": "0" * 64, "code_hash": "0" * 64}))
    run_search(search_params, "sequential", 1, tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs").glob("*/*.json")) == kept
    assert (tmp_path / "runs" / ".stale" / other.parent.name / other.name).is_file()


def test_an_undone_edit_brings_the_trial_records_back(search_params, tmp_path):
    """An edit sets the trials' records aside; undone, its studies are the old ones again, told and
    complete: their records come back from runs/.stale, nothing is computed (the search found
    none, reported its front without test metrics and the command died on a KeyError)."""
    first = run_search(search_params, "sequential", 1, tmp_path)
    runs = tmp_path / "runs"
    kept = {p.relative_to(runs): p.read_bytes() for p in runs.glob("*/*.json")}
    for path in kept:  # what the sweep of an edited method does with them
        (runs / ".stale" / path).parent.mkdir(parents=True, exist_ok=True)
        (runs / path).rename(runs / ".stale" / path)
    again = run_search(search_params, "sequential", 1, tmp_path)
    assert again == first and all(p["test_mae"] is not None for p in again["pareto"])
    assert {p.relative_to(runs): p.read_bytes() for p in runs.glob("*/*.json")} == kept


def test_an_undone_edit_brings_back_the_studies_that_do_not_run(search_params, tmp_path):
    """With ``method: wander`` only Wander's study runs, but LoRA's is reported too: its told
    trials' records come back from runs/.stale as well, so its front keeps its test metrics."""
    first = run_search(search_params, "sequential", 1, tmp_path)
    runs = tmp_path / "runs"
    kept = {p.relative_to(runs): p.read_bytes() for p in runs.glob("*/*.json")}
    for path in kept:
        (runs / ".stale" / path).parent.mkdir(parents=True, exist_ok=True)
        (runs / path).rename(runs / ".stale" / path)
    again = run_search({**search_params, "method": "wander"}, "sequential", 1, tmp_path)
    assert {p["method"] for p in again["pareto"]} == {"wander", "lora"}
    assert again["pareto"] == first["pareto"] and all(p["test_mae"] is not None for p in again["pareto"])
    assert {p.relative_to(runs): p.read_bytes() for p in runs.glob("*/*.json")} == kept


def test_a_changed_definition_starts_a_new_study(search_params, tmp_path):
    """Training settings, metric and space name the study: old trials are never reported under
    a changed definition (their records would not even be found under the new run keys)."""
    params = json.loads(json.dumps(search_params))
    params["search"].update(trials=1, space={"wander": {"down_dim": [4]}})
    storage = lambda: JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    run_search(params, "sequential", 1, tmp_path)
    first = set(optuna.get_all_study_names(storage()))
    params["profiles"]["tiny"]["train"]["epochs"] = 2
    summary = run_search(params, "sequential", 1, tmp_path)
    second = set(optuna.get_all_study_names(storage())) - first
    assert len(first) == 1 and len(second) == 1  # a new study, the old one kept
    assert summary["trials"] == 1 and all(p["test_mae"] is not None for p in summary["pareto"])
    params["search"]["metric"] = "acc2_non0"
    run_search(params, "sequential", 1, tmp_path)
    assert len(set(optuna.get_all_study_names(storage())) - first - second) == 1


@pytest.fixture(scope="module")
def long_params(search_params):
    """12 trials per study in batches of 2 (past TPE's 10 random start-up trials, so its proposals
    depend on the results before them), wander over two parameters, four LoRA ranks."""
    params = json.loads(json.dumps(search_params))
    params["search"].update(trials=12, batch=2, space={"wander": {"down_dim": [4, 8, 16, 32],
                                                                   "rank_h": [1, 2]},
                                                        "lora": {"rank": [1, 2, 4, 8]}})
    return params


def outcome_trials(out) -> dict:
    """Every study's trials: (number, state, setting, results)."""
    storage = JournalStorage(JournalFileBackend(str(out / "journal.log")))
    return {name: [(t.number, t.state.name, t.params, t.values)
                   for t in optuna.load_study(study_name=name, storage=storage).trials]
            for name in optuna.get_all_study_names(storage)}


def outcome(out) -> dict:
    """Every study's trials and the output files (summary.json holds the Pareto fronts)."""
    return {"trials": outcome_trials(out), **{name: (out / name).read_bytes()
                                              for name in ("trials.csv", "summary.json")}}


@pytest.fixture(scope="module")
def uninterrupted(long_params, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_search(long_params, "sequential", 1, out)
    return outcome(out)


def stop_at(monkeypatch, owner, name: str, call: int) -> None:
    """``owner.name`` raises Stopped (what SIGTERM raises) at its ``call``-th call, as a search
    killed there: the trials asked by then stay RUNNING in the journal, untold."""
    original, calls = getattr(owner, name), []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Stopped(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, stopping)


@pytest.mark.parametrize("where, call", [
    ("run_many", 3),  # the third batch asked, never run
    ("execute", 7),  # told in part (LoRA's study first): LoRA's trials 2-3 told, wander's not
    ("sample_independent", 16),  # wander's trial 4 has its down_dim, not its rank_h; 5 neither
    ("execute", 24)])  # wander's last trial never told
def test_an_interrupted_search_resumes_as_if_uninterrupted(long_params, uninterrupted, tmp_path,
                                                           monkeypatch, where, call):
    """Stopped at any point and run again, a search ends with the trials (numbers, settings,
    states, results), trials.csv, summary.json and Pareto front of an uninterrupted one: the
    trials left RUNNING run again under their numbers, and the sampler's proposals do not
    restart with the process (they re-proposed trials 0.. settings: 4 distinct settings of 8)."""
    owner = search.NumberSeeded if where == "sample_independent" else search
    with monkeypatch.context() as patch:
        stop_at(patch, owner, where, call)
        with pytest.raises(Stopped):
            run_search(long_params, "sequential", 1, tmp_path)
    stopped = outcome_trials(tmp_path)
    assert any(state == "RUNNING" for trials in stopped.values() for _, state, _, _ in trials)
    records = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}
    run_search(long_params, "sequential", 1, tmp_path)
    assert outcome(tmp_path) == uninterrupted
    assert records == {p: p.stat().st_mtime_ns for p in records}  # no finished run is redone


def test_no_trial_stays_running_after_a_resume(long_params, tmp_path):
    """Trials a killed search asked and never told (another process's, in the journal) are run
    and told by the next start: none stays RUNNING, and the budget counts them."""
    params = json.loads(json.dumps(long_params))
    params["search"]["trials"] = 4
    run_search(params, "sequential", 1, tmp_path)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    for name in optuna.get_all_study_names(storage):  # as a search killed after its asks
        study = optuna.load_study(study_name=name, storage=storage, sampler=search._sampler(
            params["search"]))
        for _ in range(2):
            trial = study.ask()
            for parameter, choices in params["search"]["space"][name.split("-")[1]].items():
                trial.suggest_categorical(parameter, choices)
    params["search"]["trials"] = 6
    run_search(params, "sequential", 1, tmp_path)
    trials = outcome_trials(tmp_path)
    assert len(trials) == 2
    for study in trials.values():
        assert [(number, state) for number, state, _, _ in study] == [
            (number, "COMPLETE") for number in range(6)]


@pytest.mark.parametrize("first", [8, 11], ids=["8-to-12", "11-to-12"])
def test_an_extended_search_equals_a_fresh_one(long_params, uninterrupted, tmp_path, first):
    """Raising ``trials`` adds the trials a fresh search of the new count has (they repeated
    trials 0-1 when the sampler's random stream restarted), also from a batch left half full."""
    params = json.loads(json.dumps(long_params))
    params["search"]["trials"] = first
    run_search(params, "sequential", 1, tmp_path)
    run_search(long_params, "sequential", 1, tmp_path)
    assert outcome(tmp_path) == uninterrupted


@pytest.mark.slow
def test_search_through_ray_optuna_search(search_params, tmp_path):
    search_params["search"]["trials"] = 3
    summary = run_search(search_params, "ray", 2, tmp_path)
    check_outputs(tmp_path, summary, 6)
    assert list((tmp_path / ".ray").glob("search-mosi-wander-valid-*/*"))  # Tune's storage
    assert run_search(search_params, "ray", 2, tmp_path)["trials"] == 6  # resumes: nothing new


@pytest.mark.slow
def test_ctrl_c_stops_a_ray_search_which_the_same_command_resumes(search_params, tmp_path):
    """Before: Tune took the SIGINT, ended its loop, and the search went on with the next study
    and ran the trials left RUNNING in this process."""
    pytest.importorskip("ray")
    params_path = tmp_path / "params.yaml"
    params = json.loads(json.dumps({k: v for k, v in search_params.items() if not k.startswith("_")}))
    params["search"]["trials"] = 8
    params_path.write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "harness.cli", "search", "--executor", "ray", "--workers", "2",
               "--params", str(params_path), "--out", str(tmp_path / "out"), "--json"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records = tmp_path / "out" / "runs" / "mosi"
    deadline = time.monotonic() + 300
    while len(list(records.glob("*.json"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole job
    assert process.wait(30) == 128 + signal.SIGINT
    assert "stopped by SIGINT" in process.stderr.read()
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["trials"] == 16


def test_pareto_plot_names_the_split_and_carries_the_banner():
    table = pd.DataFrame({"method": ["wander", "wander"], "valid_mae": [0.9, 1.0],
                          "test_mae": [1.1, 1.0], "tunable": [100, 50], "pareto": [True, True]})
    figure = pareto_figure(table, "mae", "mosi", "tiny")
    axes = figure.axes[0]
    assert axes.get_ylabel().startswith("validation mae")
    assert "validation" in axes.get_title()
    assert list(axes.collections[0].get_offsets()[:, 1]) == [0.9, 1.0]  # validation, not test
    texts = [t.get_text() for t in figure.texts]
    assert any(TINY_BANNER in t for t in texts)
    paper = pareto_figure(table, "mae", "mosi", "paper")
    assert not any(TINY_BANNER in t.get_text() for t in paper.texts)


def test_a_method_choice_runs_its_study_and_reports_every_study(search_params, tmp_path, caplog):
    """params.yaml ``method`` (``dvc exp run -S method=...``) picks the studies asked for trials;
    the outputs keep reporting every study of the current definitions in the journal."""
    params = json.loads(json.dumps(search_params))
    params["search"].update(trials=1, batch=1)
    everything = run_search(params, "sequential", 1, tmp_path)
    outputs = {name: (tmp_path / name).read_bytes()
               for name in ("trials.csv", "summary.json", "pareto.png", "journal.log")}
    assert everything["trials"] == 2

    params["method"] = "adapter"  # a method without a search space: nothing runs, nothing changes
    assert run_search(params, "sequential", 1, tmp_path)["trials"] == 2
    assert {name: (tmp_path / name).read_bytes() for name in outputs} == outputs

    params.update(method="lora")
    params["search"]["trials"] = 2  # only LoRA's study is asked for its second trial
    summary = run_search(params, "sequential", 1, tmp_path)
    table = pd.read_csv(tmp_path / "trials.csv")
    assert summary["trials"] == 3 and table.groupby("method").size().to_dict() == {"lora": 2, "wander": 1}

    fresh = tmp_path / "fresh"  # a study never run is named, not silently missing
    with caplog.at_level("WARNING", logger="harness.search"):
        assert run_search(params, "sequential", 1, fresh)["trials"] == 2
    assert "no wander study under the current settings" in caplog.text


def test_a_journal_cut_by_a_crash_mid_append_resumes(search_params, tmp_path, caplog):
    """A search killed while appending leaves the journal's last line without its newline: that
    line is dropped (a warning names the file, the line, the bytes), and the search resumes
    instead of Optuna appending onto the cut line and damaging the journal for good."""
    params = json.loads(json.dumps(search_params))
    params["search"].update(trials=2, batch=1)
    run_search(params, "sequential", 1, tmp_path)
    journal = tmp_path / "journal.log"
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-40])  # as a process killed mid-append leaves it
    kept = whole[:whole.rstrip(b"\n").rfind(b"\n") + 1]  # up to the end of the last whole line
    lines = whole.count(b"\n")

    def complete() -> dict:
        storage = JournalStorage(JournalFileBackend(str(journal)))  # reads only
        return {(name, t.number): (t.params, t.values)
                for name in optuna.get_all_study_names(storage)
                for t in optuna.load_study(study_name=name, storage=storage).get_trials(
                    states=[optuna.trial.TrialState.COMPLETE])}

    earlier = complete()
    with caplog.at_level("WARNING", logger="harness.search"):
        summary = run_search(params, "sequential", 1, tmp_path)
    assert f"{journal}: line {lines} was cut short" in caplog.text
    assert f"dropped its {len(whole) - 40 - len(kept)} bytes" in caplog.text
    after = journal.read_bytes()
    assert after.startswith(kept) and after.endswith(b"\n")  # nothing committed is lost
    assert all(isinstance(json.loads(line), dict) for line in after.splitlines())
    now = complete()
    assert earlier.items() <= now.items() and len(earlier) == 3  # the earlier trials, kept
    assert summary["trials"] == len(now) == 4  # 2 per method: the cut trial run again
    caplog.clear()
    with caplog.at_level("WARNING", logger="harness.search"):
        run_search(params, "sequential", 1, tmp_path)  # resumed again: nothing to repair or add
    assert journal.read_bytes() == after and "cut short" not in caplog.text


@pytest.mark.parametrize("bad", [b'{"op_code": 4, "worker_id": "a\n', b"[1, 2]\n",
                                 b'{"op_code": 4, "\xff": 1}\n'],
                         ids=["not-json", "not-an-object", "not-utf8"])
@pytest.mark.parametrize("where", [1, -1], ids=["middle", "last"])
def test_a_damaged_journal_line_is_an_input_error(search_params, tmp_path, bad, where):
    """A bad line a crash cannot leave (inside the journal, or whole with its newline) names the
    file and the line, and nothing is changed or written."""
    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name="other", storage=JournalStorage(
        JournalFileBackend(str(journal))))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    lines = journal.read_bytes().splitlines(keepends=True)
    lines.insert(where if where >= 0 else len(lines), bad)
    journal.write_bytes(b"".join(lines))
    damaged = journal.read_bytes()
    number = lines.index(bad) + 1
    with pytest.raises(InputError) as error:
        run_search(search_params, "sequential", 1, tmp_path)
    assert error.value.file == str(journal) and error.value.key == f"line {number}"
    assert f"'line {number}'" in str(error.value) and "git checkout" in str(error.value)
    assert journal.read_bytes() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.log"]  # no partial results


@pytest.mark.parametrize("bad", [b"{}\n", b'{"op_code": 99}\n', b'{"op_code": 6, "worker_id": "x"}\n'],
                         ids=["no-op-code", "unknown-op-code", "no-trial-id"])
def test_a_journal_line_optuna_cannot_replay_is_an_input_error(search_params, tmp_path, bad):
    """JSON objects, but no operation Optuna wrote: named with the journal (they were a KeyError or
    an AssertionError from inside optuna), nothing changed or written."""
    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name="other", storage=JournalStorage(
        JournalFileBackend(str(journal))))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:1], bad, *lines[1:]]))
    damaged = journal.read_bytes()
    with pytest.raises(InputError) as error:
        run_search(search_params, "sequential", 1, tmp_path)
    assert error.value.file == str(journal) and "cannot replay" in str(error.value), str(error.value)
    assert journal.read_bytes() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.log"]


def test_a_second_search_on_the_folder_waits_for_the_first(search_params, tmp_path, capfd):
    """One search at a time on a folder (the other would take this one's in-flight trials for an
    interrupted search's): the second says so, waits, then finds the first's trials done."""
    import threading

    from harness.concurrency import one_at_a_time

    first = run_search(search_params, "sequential", 1, tmp_path)
    held, release = threading.Event(), threading.Event()

    def other_search():  # holds the folder's search lock as a running search does
        with one_at_a_time(tmp_path / "journal.log", "the test's holder"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=other_search)
    holder.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    again = run_search(search_params, "sequential", 1, tmp_path)
    holder.join()
    assert time.monotonic() - started >= 0.9 and again == first
    assert "journal.log is locked by another process; waiting for the search" in capfd.readouterr().err


def test_optunas_lock_left_by_a_killed_search_is_removed(search_params, tmp_path):
    """A search killed while appending leaves Optuna's ``journal.log.lock``; the next search (which
    holds the folder's own lock) removes it instead of waiting Optuna's 30 s grace period."""
    from optuna.storages.journal import JournalFileSymlinkLock

    journal = tmp_path / "journal.log"
    journal.touch()
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()  # held by a process that then died: the lock file stays
    assert (tmp_path / ("journal.log" + search.OPTUNA_LOCK_SUFFIX)).is_symlink()
    started = time.monotonic()
    run_search({**search_params, "search": {**search_params["search"], "trials": 1,
                                             "space": {"wander": {"down_dim": [4]}}}},
               "sequential", 1, tmp_path)
    assert time.monotonic() - started < 25
    assert not (tmp_path / ("journal.log" + search.OPTUNA_LOCK_SUFFIX)).exists()
