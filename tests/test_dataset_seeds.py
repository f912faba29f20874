"""Per-dataset seeds (params.yaml ``seeds_by_dataset``, ``settings.seeds_for``): the planted tasks
run 10 seeds while the real datasets keep ``seeds``; the sweep plans each dataset's own seeds, the
tables and leaderboards count a record only if its seed is among its dataset's, and a bad value
exits 2 naming ``seeds_by_dataset.<dataset>``."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.records import row_slug
from harness.settings import load_params, seeds_for
from harness.sweep import grid_plans
from harness.tables.collect import collect
from harness.tables.leaderboard import write_leaderboards
from harness.tables.render import render_all
from test_params_schema import refused, setter, write_params
from test_tables import make_params, read_csv, write_record

ROOT = Path(__file__).resolve().parent.parent
PLANTED = ("planted_cross", "planted_depth", "planted_null")
LINEAR = {"method": "linear"}


def test_the_study_gives_planted_tasks_their_calibrated_seeds_and_the_real_datasets_seeds():
    """12 seeds for the cross-modal task, 10 for the null task, 5 for the depth task
    (docs/planted.md's calibration: the cross-modal power reaches 0.8 at 12 seeds, the depth
    task's is 1.00 from 3 seeds on)."""
    params = load_params(ROOT / "params.yaml")
    assert {name: seeds_for(params, name) for name in PLANTED} == {
        "planted_cross": list(range(12)), "planted_depth": list(range(5)),
        "planted_null": list(range(10))}
    assert all(seeds_for(params, name) == params["seeds"]
               for name in params["datasets"] if name not in PLANTED)


def test_grid_plans_run_each_dataset_on_its_own_seeds(tmp_path):
    params = load_params(write_params(tmp_path))
    params.update(datasets=["mosi", *PLANTED], method="linear", seeds=[0, 1, 2])
    seeds = {}
    for plan in grid_plans(params):
        seeds.setdefault(plan.dataset, []).append(plan.seed)
    assert seeds == {"mosi": [0, 1, 2], **{name: seeds_for(params, name) for name in PLANTED}}
    assert all(len(seeds[name]) >= 5 for name in PLANTED)


def write_planted_record(root: Path, dataset: str, row: dict, seed: int) -> Path:
    """A run record of a planted task (main metric ``corr``), as the sweep writes one."""
    corr = float(np.random.default_rng([seed, len(row)]).normal(0.5, 0.05))
    record = {"key": f"{dataset}-{seed:04d}", "dataset": dataset, "method": row["method"],
              "variant": row.get("variant", "paper"), "seed": seed, "row": row, "profile": "tiny",
              "metrics": {"corr": corr}, "valid_metrics": {"corr": corr},
              "tunable": {"method": 0, "head": 500}, "data_hash": f"hash-{dataset}"}
    path = root / dataset / f"{row_slug(row)}-seed{seed}-{record['key']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, sort_keys=True))
    return path


def seven_everywhere(runs: Path) -> tuple[dict, Path, Path]:
    """Records of seed 7 on mosi (seeds 0-2) and planted_cross (seeds 0-9), with the params."""
    params = {**make_params(), "seeds_by_dataset": {name: list(range(10)) for name in PLANTED}}
    mosi = {seed: write_record(runs, "mosi", LINEAR, seed) for seed in (0, 1, 2, 7)}
    planted = {seed: write_planted_record(runs, "planted_cross", LINEAR, seed) for seed in range(10)}
    return params, mosi[7], planted[7]


def test_a_record_counts_only_on_its_datasets_seeds(tmp_path):
    params, mosi_7, planted_7 = seven_everywhere(tmp_path / "runs")
    selection = collect(tmp_path / "runs", params)
    assert sorted(selection.get("planted_cross", LINEAR)) == list(range(10))
    assert selection.get("planted_cross", LINEAR)[7]["_path"] == str(planted_7)
    assert sorted(selection.get("mosi", LINEAR)) == [0, 1, 2]
    assert selection.ignored == {"seed 7 not among params.yaml seeds of mosi": 1}


def test_leaderboards_and_tables_follow_each_datasets_seeds(tmp_path):
    runs = tmp_path / "runs"
    params, mosi_7, planted_7 = seven_everywhere(runs)
    write_leaderboards(runs, tmp_path / "lb", params, headline_path=tmp_path / "metrics.json",
                       detail_path=tmp_path / "detail.json")
    planted = next(l for l in read_csv(tmp_path / "lb" / "planted_cross.csv")
                   if l["section"] == "leaderboard" and l["row"] == "linear")
    mosi = next(l for l in read_csv(tmp_path / "lb" / "mosi.csv")
                if l["section"] == "leaderboard" and l["row"] == "linear")
    assert planted["seeds"].split() == [str(s) for s in range(10)]
    assert f"planted_cross/{planted_7.name}" in planted["records"].split()
    assert mosi["seeds"].split() == ["0", "1", "2"] and mosi_7.name not in mosi["records"]
    assert "params.yaml seeds: 0, 1, 2)" in (tmp_path / "lb" / "mosi.md").read_text()
    assert ("params.yaml seeds: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"
            in (tmp_path / "lb" / "planted_cross.md").read_text())
    render_all(runs, tmp_path / "tables", params, names=["planted_effects"])
    table = (tmp_path / "tables" / "planted_effects.md").read_text()
    assert "`seeds_by_dataset`, else `seeds`): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9." in table
    assert max(len(line) for line in table.splitlines() if line.startswith("|")) <= 200
    assert planted_7.name in (tmp_path / "tables" / "planted_effects.csv").read_text()


def test_a_missing_seed_is_named_against_its_datasets_seeds(tmp_path):
    runs = tmp_path / "runs"
    params, _, planted_7 = seven_everywhere(runs)
    planted_7.unlink()
    write_leaderboards(runs, tmp_path / "lb", params, headline_path=tmp_path / "metrics.json",
                       detail_path=tmp_path / "detail.json")
    planted = next(l for l in read_csv(tmp_path / "lb" / "planted_cross.csv")
                   if l["section"] == "leaderboard" and l["row"] == "linear")
    assert planted["missing_seeds"] == "7" and planted["n"] == "9"
    mosi = next(l for l in read_csv(tmp_path / "lb" / "mosi.csv")
                if l["section"] == "leaderboard" and l["row"] == "linear")
    assert mosi["missing_seeds"] == ""


BAD = [
    ("a negative seed", setter("seeds_by_dataset.planted_null", [0, -1]),
     "seeds_by_dataset.planted_null[1]", "greater than or equal to 0"),
    ("a duplicate seed", setter("seeds_by_dataset.planted_null", [0, 1, 0]),
     "seeds_by_dataset.planted_null[2]", "seeds_by_dataset.planted_null[0] is the same"),
    ("no seeds", setter("seeds_by_dataset.planted_null", []), "seeds_by_dataset.planted_null",
     "a non-empty list"),
    ("not a list", setter("seeds_by_dataset.planted_null", 10), "seeds_by_dataset.planted_null",
     "a list"),
    ("a seed that is not an integer", setter("seeds_by_dataset.mosi", [0, "1"]),
     "seeds_by_dataset.mosi[1]", "an integer"),
    ("a dataset without a card", setter("seeds_by_dataset.mosii", [0]), "seeds_by_dataset.mosii",
     "unknown dataset"),
    ("not a mapping", setter("seeds_by_dataset", [0, 1]), "seeds_by_dataset", "a mapping"),
]


@pytest.mark.parametrize("edit, key, named", [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_bad_dataset_seeds_exit_2_naming_the_key(capsys, tmp_path, edit, key, named):
    params = write_params(tmp_path, edit)
    out = tmp_path / "runs"
    refused(capsys, ["sweep", "--params", str(params), "--out", str(out), "--executor", "sequential"],
            out, f"file {params}", f"key '{key}'", named)


def test_a_dataset_left_out_of_the_study_keeps_its_seeds_entry(tmp_path):
    """A dataset dropped from ``datasets`` (a paper-profile study drops the planted tasks) may keep
    its ``seeds_by_dataset`` entry: only a dataset without a card is refused."""
    path = write_params(tmp_path, lambda p: p.update(datasets=["mosi"]))
    assert seeds_for(load_params(path), "planted_null") == list(range(10))
    assert yaml.safe_load(path.read_text())["seeds_by_dataset"]
