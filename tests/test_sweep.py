"""The finetune grid: executors agree, runs are keyed and resumable (Ray on a cluster:
test_ray_cluster.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.errors import InputError
from harness.settings import load_params
from harness.sweep import grid_plans, sweep, write_index
from helpers import ROOT, small_mosi_params


@pytest.fixture(scope="module")
def small_params(tmp_path_factory):
    """A 8-run grid on small generated MOSI: 4 rows x 2 seeds, 1 epoch."""
    folder = tmp_path_factory.mktemp("sweep")
    params = small_mosi_params(folder)
    params["datasets"] = ["mosi"]
    params["seeds"] = [0, 1]
    params["grid"] = {"mosi": [{"method": "linear"}, {"method": "lora", "rank": 4},
                               {"method": "wander", "down_dim": 8}, {"method": "adapter", "down_dim": 8}]}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def metrics_by_row(out_dir: Path) -> dict:
    found = {}
    for path in out_dir.glob("mosi/*.json"):
        record = json.loads(path.read_text())
        found[(json.dumps(record["row"], sort_keys=True), record["seed"])] = record["metrics"]
    return found


def test_grid_filters_by_method(small_params):
    params = load_params(small_params)
    assert len(grid_plans(params)) == 8
    params["method"] = "wander"
    assert {p.method for p in grid_plans(params)} == {"wander"} and len(grid_plans(params)) == 2
    params["method"] = "wandr"
    with pytest.raises(Exception, match="unknown method"):
        grid_plans(params)


@pytest.mark.slow
def test_executors_give_identical_metrics(small_params, tmp_path):
    params = load_params(small_params)
    results = {}
    for executor in ("sequential", "process", "ray"):
        summary = sweep(params, executor, 2, tmp_path / executor)
        assert summary["computed"] == 8
        results[executor] = metrics_by_row(tmp_path / executor)
    assert len(results["sequential"]) == 8
    assert results["sequential"] == results["process"] == results["ray"]
    assert (tmp_path / "ray" / ".ray" / "finetune").is_dir()  # Tune's storage inside the records folder


def test_second_sweep_computes_nothing(small_params, tmp_path):
    params = load_params(small_params)
    assert sweep(params, "sequential", 1, tmp_path)["computed"] == 8
    again = sweep(params, "sequential", 1, tmp_path)
    assert again["computed"] == 0 and again["reused"] == 8
    params["seeds"] = [0, 1, 2]  # a new seed computes only its own runs
    assert sweep(params, "sequential", 1, tmp_path)["computed"] == 4


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_loss(small_params, tmp_path):
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "harness.cli", "sweep", "--executor", "sequential",
               "--params", str(small_params), "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("mosi/*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("mosi/*.json")}
    assert 3 <= len(finished) < 8
    # A record being written when the kill came stays a hidden temporary (.<record>.<pid>-*.tmp)
    # of a record not on disk: the rename to *.json is a write's last step
    partial = list(out.glob("mosi/.*.tmp"))
    assert len(partial) <= 1
    assert not {p.name[1:].rsplit(".", 2)[0] for p in partial} & {p.name for p in finished}
    for path in finished:
        json.loads(path.read_text())  # every record on disk is complete
    summary = json.loads(subprocess.run(command + ["--json"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout)
    assert summary["computed"] == 8 - len(finished) and summary["reused"] == len(finished)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # none recomputed
    assert not list(out.glob("mosi/.*.tmp"))  # the resumed sweep removed the killed write's temporary


def test_a_sweep_of_one_method_keeps_the_index_of_the_whole_folder(tmp_path):
    """index.json lists every record of the folder: a sweep restricted to one method (as
    `dvc exp run -S method=...` runs it) with nothing to compute leaves the index as it was (it
    rewrote it to list that method's records only)."""
    params = small_mosi_params(tmp_path)
    params["datasets"], params["seeds"] = ["mosi"], [0]
    params["grid"] = {"mosi": [{"method": "linear"}, {"method": "wander", "down_dim": 8}]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    params = load_params(path)
    out = tmp_path / "runs"
    whole = sweep(params, out_dir=out, executor="sequential")
    assert write_index(out, whole)
    one = sweep({**params, "method": "wander"}, out_dir=out, executor="sequential")
    assert one["computed"] == 0 and one["runs"] < whole["runs"]
    assert one["records"] == whole["records"] and len(whole["records"]) == whole["runs"]
    assert not write_index(out, one)


def test_bad_input_of_a_later_dataset_stops_the_sweep_before_any_record(tmp_path):
    """Every dataset's inputs are prepared before the first run: a missing data folder of the
    second dataset stopped the sweep only after the first dataset's records were written."""
    params = small_mosi_params(tmp_path)
    params["datasets"], params["seeds"] = ["mosi", "planted_null"], [0]
    params["grid"] = {"mosi": [{"method": "linear"}], "planted_null": [{"method": "linear"}]}
    params["data"]["tiny"]["planted_null"]["path"] = str(tmp_path / "not_generated")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = tmp_path / "runs"
    with pytest.raises(InputError, match="not_generated"):
        sweep(load_params(path), out_dir=out, executor="sequential")
    assert not list(out.rglob("*.json"))
