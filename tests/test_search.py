"""Optuna rank search: two objectives, a resumable journal, a Pareto front, and Ray's OptunaSearch."""
import optuna
import pandas as pd
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from harness.search import run_search
from harness.settings import load_params
from helpers import small_mosi_params


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
    """Another trial is at least as good on both objectives (MAE down, #tunable down) and better
    on one."""
    return any(o.mae <= row.mae and o.tunable <= row.tunable and (o.mae < row.mae or o.tunable < row.tunable)
               for o in others.itertuples())


def check_outputs(out, summary, trials: int) -> None:
    table = pd.read_csv(out / "trials.csv")
    assert summary["directions"] == ["minimize", "minimize"]  # MAE is lower-is-better
    assert len(table) == summary["trials"] == trials
    for method, group in table.groupby("method"):
        for row in group.itertuples():
            assert row.pareto == (not dominated(row, group)), (method, row)
    assert (out / "pareto.png").stat().st_size > 0
    storage = JournalStorage(JournalFileBackend(str(out / "journal.log")))
    for name in ("mosi-wander", "mosi-lora"):
        study = optuna.load_study(study_name=name, storage=storage)
        assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 3


def test_search_writes_pareto_and_resumes(search_params, tmp_path):
    summary = run_search(search_params, "sequential", 1, tmp_path)
    check_outputs(tmp_path, summary, 6)
    records = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}
    assert 2 <= len(records) <= 4  # repeated settings are read back, not recomputed

    again = run_search(search_params, "sequential", 1, tmp_path)  # the journal has every trial
    assert again["trials"] == 6
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")} == records

    search_params["search"]["trials"] = 4  # a larger budget adds only the new trials
    assert run_search(search_params, "sequential", 1, tmp_path)["trials"] == 8


@pytest.mark.slow
def test_search_through_ray_optuna_search(search_params, tmp_path):
    search_params["search"]["trials"] = 3
    summary = run_search(search_params, "ray", 2, tmp_path)
    check_outputs(tmp_path, summary, 6)
    assert list((tmp_path / ".ray").glob("search-mosi-wander/*"))  # Tune's storage beside the study
    assert run_search(search_params, "ray", 2, tmp_path)["trials"] == 6  # resumes: nothing new
