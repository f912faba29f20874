"""harness.tables: specs, rendering from synthetic run records, metrics.json, diff between
git revisions. No training: records are JSON files written into tmp_path."""
import csv
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from harness.errors import InputError
from harness.records import row_slug
from harness.tables import specs
from harness.tables.collect import collect, row_key
from harness.tables.diff import diff_tables
from harness.tables.io import csv_text
from harness.tables.leaderboard import write_leaderboards
from harness.tables.render import CSV_FIELDS, TINY_BANNER, render_all

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [0, 1, 2]
METRIC_KEYS = {
    "mosi": ["acc2_non0", "f1_non0", "acc2_has0", "f1_has0", "acc2_pos", "f1_pos", "acc7", "acc5",
             "mae", "corr"],
    "iemocap": ["acc", "f1", "neutral_acc", "neutral_f1"],
    "food101": ["acc", "f1_macro", "f1_weighted"],
    "msrvtt": [f"{d}_{m}" for d in ("t2v", "v2t") for m in ("r1", "r5", "r10", "mdr", "mnr")]
    + ["rsum"],
}


def all_grid_rows() -> dict:
    grid = {}
    for spec in specs.SPECS:
        for dataset, row in specs.grid_rows(spec):
            if row_key(row) not in {row_key(r) for r in grid.setdefault(dataset, [])}:
                grid[dataset].append(row)
    return grid


def make_params(profile="tiny", method="all", seeds=SEEDS) -> dict:
    grid = all_grid_rows()
    return {"profile": profile, "method": method, "seeds": list(seeds),
            "datasets": sorted(grid), "grid": grid, "_file": "params.yaml"}


def metric_values(dataset: str, row: dict, seed: int, shift: float = 0.0) -> dict:
    rng = np.random.default_rng(zlib.crc32(f"{dataset}{row_key(row)}{seed}".encode()))
    wander = row["method"] == "wander"
    out = {}
    for key in METRIC_KEYS[dataset]:
        if key in ("mae",):
            value = 0.95 - (0.05 if wander else 0.0) + rng.normal(0, 0.01)
        elif key.endswith(("_mdr", "_mnr")):
            value = 20.0 - (3.0 if wander else 0.0) + rng.normal(0, 0.5)
        elif dataset == "msrvtt":
            value = 40.0 + (5.0 if wander else 0.0) + rng.normal(0, 1.0)
        else:
            value = 0.70 + (0.05 if wander else 0.0) + rng.normal(0, 0.01)
        out[key] = float(value + (shift if wander else 0.0))
    return out


def write_record(root: Path, dataset: str, row: dict, seed: int, profile="tiny", shift=0.0,
                 **extra) -> Path:
    record = {
        "key": f"{zlib.crc32(f'{dataset}{row_key(row)}{seed}{profile}'.encode()):08x}",
        "dataset": dataset, "method": row["method"], "variant": row.get("variant", "paper"),
        "seed": seed, "row": row, "profile": profile,
        "metrics": metric_values(dataset, row, seed, shift),
        "tunable": {"method": 1000 * (1 + len(row)), "head": 500},
        "data_hash": f"hash-{dataset}", "git_commit": "abc1234", **extra,
    }
    path = root / dataset / f"{row_slug(row)}-seed{seed}-{record['key']}.json"  # as run.record_path names it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def write_all(root: Path, skip_methods=(), seeds=SEEDS, profile="tiny", shift=0.0):
    for dataset, rows in all_grid_rows().items():
        for row in rows:
            if row["method"] in skip_methods:
                continue
            for seed in seeds:
                write_record(root, dataset, row, seed, profile=profile, shift=shift)


def card_with_main_metric(folder: Path, monkeypatch, dataset: str, metric: str) -> Path:
    """A copy of the dataset cards in ``folder``/cards (``MMPETL_DATASETS_DIR``) where
    ``dataset``'s ``main_metric`` is ``metric``; returns that card's path."""
    cards = folder / "cards"
    cards.mkdir()
    for card in (ROOT / "datasets").glob("*.yaml"):
        shutil.copy(card, cards)
    path = cards / f"{dataset}.yaml"
    path.write_text(re.sub(r"(?m)^main_metric: .*$", f"main_metric: {metric}", path.read_text()))
    monkeypatch.setenv("MMPETL_DATASETS_DIR", str(cards))
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    base = tmp_path_factory.mktemp("render")
    runs, out = base / "runs", base / "tables"
    write_all(runs, skip_methods=("pmf",))
    result = render_all(runs, out, make_params())
    write_leaderboards(runs, base / "leaderboards", make_params(),
                       headline_path=base / "metrics.json", detail_path=base / "detail.json")
    return base, runs, out, result


# ------------------------------------------------------------------ specs
def test_specs_are_consistent():
    names = [s.name for s in specs.SPECS]
    assert len(names) == len(set(names))
    refs = {s.paper_ref for s in specs.SPECS}
    assert refs == {"Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 7", "Table 8",
                    "Figure 4", "Figure 5"}
    for spec in specs.SPECS:
        for section in spec.sections:
            ids = {c.id for c in section.columns}
            assert section.main() is not None, (spec.name, section.dataset)
            assert len({r.name for r in section.rows}) == len(section.rows)
            for row in section.rows:
                assert (row.grid is None) == (row.reason is not None), row.name
                if row.paper:
                    assert row.paper.table == spec.paper_ref
                    assert set(row.paper.values) <= ids, (spec.name, row.name)
                if row.compared:
                    assert section.reference(row) is not None
            if spec.kind == "figure":
                assert all(r.paper is None for r in section.rows)  # no numbers invented


def test_table8_howto_rows_match_tables_2_and_3():
    """The paper prints the HowTo100M rows of Table 8 again in Tables 2 and 3: typed once per
    table, they must agree."""
    t8 = {r.label: r.paper.values for r in specs.TABLE8.sections[0].rows if r.group == "HowTo100M"}
    t3 = {r.label.replace(" ", ""): r.paper.values for r in specs.TABLE3.sections[0].rows if r.paper}
    t2 = {r.label.replace(" ", ""): r.paper.values for r in specs.TABLE2.sections[0].rows if r.paper}
    for label, values in t8.items():
        key = label.replace(" ", "")
        assert values["mosi_acc2"] == t3[key]["acc2"] and values["mosi_f1"] == t3[key]["f1"]
        assert values["iemocap_acc"] == t2[key]["acc"] and values["iemocap_f1"] == t2[key]["f1"]


def test_spec_rows_are_in_the_params_grid():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for spec in specs.SPECS:
        for dataset, row in specs.grid_rows(spec):
            assert row_key(row) in {row_key(r) for r in params["grid"][dataset]}, (spec.name, row)


def test_row_slug():
    assert row_slug({"method": "wander", "down_dim": 16}) == "wander_d16"
    assert row_slug({"method": "wander", "variant": "code", "down_dim": 16}) == "wander_code_d16"
    assert row_slug({"method": "wander", "down_dim": 16, "nonlinearity": False}) == \
        "wander_d16_nonlinearity-off"
    assert row_slug({"method": "lora", "rank": 16}) == "lora_r16"


# ------------------------------------------------------------------ rendering
def test_every_spec_row_appears_filled_or_with_reason(rendered):
    _, _, out, _ = rendered
    for spec in specs.SPECS:
        md = (out / f"{spec.name}.md").read_text()
        lines = read_csv(out / f"{spec.name}.csv")
        by_row = {}
        for line in lines:
            by_row.setdefault(line["row"], []).append(line)
        for section in spec.sections:
            for row in section.rows:
                assert row.name in by_row, (spec.name, row.name)
                assert row.name in md
                for line in by_row[row.name]:
                    status = line["status"]
                    assert status == "ok" or status.startswith("not run: "), status
                    if status == "ok":
                        assert line["mean"] != "" and int(line["n"]) == 3
                    else:
                        assert line["mean"] == "" and len(status) > len("not run: ")
                    if row.grid is not None and row.grid["method"] == "pmf":
                        assert status.startswith("not run: no records")
                    if row.reason:
                        assert "HowTo100M" in status


def test_paper_values_and_difference(rendered):
    _, _, out, _ = rendered
    lines = read_csv(out / "table3_mosi.csv")
    cell = next(l for l in lines if l["row"] == "Wander (d=16)" and l["column"] == "ACC-2")
    assert float(cell["paper"]) == 82.5 and cell["paper_table"] == "Table 3"
    assert float(cell["diff_vs_paper"]) == pytest.approx(float(cell["mean"]) - 82.5)
    assert 60 < float(cell["mean"]) < 90  # fraction x 100
    assert cell["tunable_paper"] == "0.3M" and cell["tunable_ours"] == "3500"
    md = (out / "table3_mosi.md").read_text()
    assert "non0 (MulT)" in md and "#Tunable ours" in md


def test_comparisons_direction_and_holm(rendered):
    _, _, out, _ = rendered
    lines = read_csv(out / "table3_mosi.csv")
    compared = [l for l in lines if l["compared_to"]]
    assert compared and all(l["compared_to"] == "Wander (d=16)" for l in compared)
    mae = next(l for l in compared if l["row"] == "LoRA (r=16)" and l["column"] == "MAE")
    assert mae["lower_is_better"] == "true"
    assert float(mae["improvement"]) > 0 and float(mae["p_better"]) == 1.0  # lower MAE wins
    assert float(mae["wilcoxon_min_p"]) == pytest.approx(0.25)
    p_t = [float(l["p_t"]) for l in compared if l["p_t"]]
    p_holm = [float(l["p_holm"]) for l in compared if l["p_t"]]
    assert all(h >= p - 1e-12 for h, p in zip(p_holm, p_t))
    order = np.argsort(p_t, kind="stable")
    assert all(p_holm[a] <= p_holm[b] + 1e-12 for a, b in zip(order, order[1:]))
    md = (out / "table3_mosi.md").read_text()
    assert "cannot reach significance" in md and "P(Wander > row)" in md
    t5 = read_csv(out / "table5_mosi_forms.csv")
    ablation = next(l for l in t5 if l["row"] == "–residual (d=32)")
    assert ablation["compared_to"] == "Wander (d=32)"


def test_tiny_banner_and_header(rendered):
    _, _, out, _ = rendered
    for spec in specs.SPECS:
        md = (out / f"{spec.name}.md").read_text()
        assert TINY_BANNER in md
        assert "hash-" in md and "abc1234" in md and "profile: tiny" in md
    index = (out / "index.md").read_text()
    assert "Table 6" in index and "cost stage" in index


def test_no_banner_for_paper_profile(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, 0, profile="paper")
    render_all(runs, tmp_path / "t", make_params(profile="paper"), names=["table3_mosi"])
    md = (tmp_path / "t" / "table3_mosi.md").read_text()
    assert TINY_BANNER not in md and "profile: paper" in md
    assert "CI n/a (n<2)" in md and "missing seed 1, 2" in md


def test_outputs_and_numeric_metrics_json(rendered):
    base, _, out, result = rendered
    for spec in specs.SPECS:
        assert (out / f"{spec.name}.md").is_file() and (out / f"{spec.name}.csv").is_file()
        if spec.kind == "figure":
            assert (out / f"{spec.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_headline_and_detail_metrics(rendered):
    """results/metrics.json: one main metric (the card's) and #tunable per dataset and method;
    metrics_detail.json: every row, every metric. Numbers only."""
    base, _, _, _ = rendered
    metrics = json.loads((base / "metrics.json").read_text())
    assert set(metrics["mosi"]["wander"]) == {"acc2_non0", "tunable"}
    assert set(metrics["msrvtt"]["lora"]) == {"t2v_r5", "tunable"}
    assert "wander_code" in metrics["mosi"] and "pmf" not in metrics["mosi"]
    detail = json.loads((base / "detail.json").read_text())

    def leaves(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from leaves(value)
        else:
            yield node

    values = list(leaves(detail))
    assert values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    assert detail["mosi"]["wander_d16"]["acc2_non0_n"] == 3
    assert 0 < detail["mosi"]["wander_d16"]["acc2_non0_mean"] < 1
    assert "t2v_r1_mean" in detail["msrvtt"]["wander_d8"]
    assert "pmf" not in detail["mosi"]


def test_rerender_is_byte_identical(rendered, tmp_path):
    base, runs, out, _ = rendered
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = render_all(runs, out, make_params())
    assert again["written"] == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    fresh = tmp_path / "fresh"
    render_all(runs, fresh, make_params())
    assert {p.name: p.read_bytes() for p in fresh.iterdir()} == before


def test_missing_seed_reduces_n_and_is_reported(tmp_path):
    runs = tmp_path / "runs"
    for seed in SEEDS:
        write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, seed)
    for seed in (0, 1):
        write_record(runs, "mosi", {"method": "lora", "rank": 16}, seed)
    render_all(runs, tmp_path / "t", make_params(), names=["Table 3"])
    lines = read_csv(tmp_path / "t" / "table3_mosi.csv")
    lora = next(l for l in lines if l["row"] == "LoRA (r=16)" and l["column"] == "ACC-2")
    assert lora["n"] == "2" and lora["missing_seeds"] == "2" and lora["n_paired"] == "2"
    # n = 2 still has a Student-t interval: mean +- t_{0.975, 1} * s / sqrt(2)
    values = [metric_values("mosi", {"method": "lora", "rank": 16}, s)["acc2_non0"] * 100
              for s in (0, 1)]
    half = sps.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
    assert float(lora["t_ci_low"]) == pytest.approx(np.mean(values) - half)
    assert float(lora["t_ci_high"]) == pytest.approx(np.mean(values) + half)
    md = (tmp_path / "t" / "table3_mosi.md").read_text()
    assert "missing seed 2" in md and "unpaired seeds [2]" in md


def test_reasons_filtered_method_and_stale(tmp_path):
    runs = tmp_path / "runs"
    params = make_params(method="wander")
    params["train"] = {"mosi": {"epochs": 40}}
    params["profiles"] = {"tiny": {"train": {"epochs": 6}}}
    write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, 0,
                 train={"epochs": 6, "lr": 0.001})
    write_record(runs, "mosi", {"method": "wander", "down_dim": 64}, 0,
                 train={"epochs": 3, "lr": 0.001})
    render_all(runs, tmp_path / "t", params, names=["table3_mosi"])
    status = {l["row"]: l["status"] for l in read_csv(tmp_path / "t" / "table3_mosi.csv")}
    assert status["Wander (d=16)"] == "ok"
    assert "stale" in status["Wander (d=64)"] and "train.epochs" in status["Wander (d=64)"]
    assert "filtered out by params.yaml method=wander" in status["LoRA (r=16)"]


def test_duplicates_and_other_profiles_are_left_out(tmp_path):
    runs = tmp_path / "runs"
    row = {"method": "wander", "down_dim": 16}
    write_record(runs, "mosi", row, 0)
    write_record(runs, "mosi", row, 0, shift=0.01, key="zzz")
    write_record(runs, "mosi", row, 1, profile="paper")
    selection = collect(runs, make_params())
    assert list(selection.get("mosi", row)) == [0]
    assert selection.duplicates and selection.ignored
    with pytest.raises(InputError, match="several profiles"):
        collect(runs, None)


def test_a_duplicate_made_by_the_current_code_wins(tmp_path):
    from harness.run import run_code_hash

    runs = tmp_path / "runs"
    row = {"method": "wander", "down_dim": 16}
    write_record(runs, "mosi", row, 0, key="aaa", code_hash="old code")
    current = write_record(runs, "mosi", row, 0, shift=0.01, key="zzz",
                           code_hash=run_code_hash("wander"))
    selection = collect(runs, make_params())
    assert selection.get("mosi", row)[0]["_path"] == str(current)
    assert "(current code hash)" in selection.duplicates[0]


def test_a_row_of_other_code_is_named_in_the_header(tmp_path):
    """Decision: a whole row made by other code than the current (no sweep since the code
    changed) is compared as it is, and the header names it."""
    from harness.run import run_code_hash

    runs = tmp_path / "runs"
    for seed in SEEDS:
        write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, seed,
                     code_hash=run_code_hash("wander"))
        write_record(runs, "mosi", {"method": "lora", "rank": 16}, seed, code_hash="older-code")
    write_leaderboards(runs, tmp_path / "lb", make_params(), headline_path=None, detail_path=None)
    md = (tmp_path / "lb" / "mosi.md").read_text()
    assert "- other code: 1 of 2 rows were computed by code or compute packages other than this " \
           "checkout's (record `code_hash` / `packages`; `mmpetl sweep` recomputes them) and are " \
           "shown and compared as they are: mosi/lora_r16\n" in md


def test_corrupt_record_names_the_file(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, 0)
    bad = runs / "mosi" / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="broken.json"):
        render_all(runs, tmp_path / "t", make_params())
    bad.write_text(json.dumps({"dataset": "mosi", "method": "x", "seed": "0", "row": {},
                               "metrics": {}}))
    with pytest.raises(InputError, match="seed"):
        render_all(runs, tmp_path / "t", make_params())
    assert not (tmp_path / "t").exists()


def test_no_records_at_all_still_renders_reasons(tmp_path):
    (tmp_path / "none").mkdir()  # an empty records folder (a missing one is an error)
    result = render_all(tmp_path / "none", tmp_path / "t", make_params())
    assert all(t["rows_not_run"] == t["rows"] for t in result["tables"].values())
    write_leaderboards(tmp_path / "none", tmp_path / "l", make_params(),
                       headline_path=tmp_path / "m.json", detail_path=tmp_path / "d.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {}
    lines = read_csv(tmp_path / "t" / "table1_food101.csv")
    assert all(l["status"].startswith("not run: ") for l in lines)


# ------------------------------------------------------------------ diff
def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   cwd=repo, check=True, capture_output=True)


def test_diff_tells_apart_columns_of_one_name_by_their_metric():
    """MSR-VTT's R@5 is a column of text-to-video and of video-to-text: a change of the one is
    reported under its metric key (keyed by column alone, one line hid the other)."""
    from harness.tables.diff import _table_diff

    def line(metric, mean):
        return {"table": "Table 4", "section": "msrvtt", "row": "Wander", "column": "R@5",
                "metric_key": metric, "status": "ok", "mean": str(mean), "n": "3"}
    old = [line("t2v_R5", 9.8), line("v2t_R5", 11.0)]
    new = [line("t2v_R5", 9.8), line("v2t_R5", 12.5)]
    report = "\n".join(_table_diff("table4_msrvtt", old, new))
    assert "1 cell(s) changed, 0 added, 0 removed" in report, report
    assert "| R@5 (v2t_R5) |" in report and "t2v_R5" not in report, report


def test_diff_tells_apart_the_planted_tasks_rows_of_one_name():
    """The planted tasks' table has one "Wander (d=16)" line per task: keyed by row alone they
    collapsed into one, and the cross-modal task's change went unreported."""
    from harness.tables.diff import _table_diff

    def line(task, mean, p_holm):
        return {"task": task, "dataset": f"planted_{task}", "row": "Wander (d=16)", "n_paired": "12",
                "metric": "corr", "row_mean": str(mean), "p_holm": str(p_holm), "verdict": "-"}
    old = [line("cross", 0.302, 0.054), line("null", 0.95, 0.55), line("depth", 0.4, 0.45)]
    new = [line("cross", 0.343, 0.064), line("null", 0.95, 0.55), line("depth", 0.4, 1.0)]
    report = "\n".join(_table_diff("planted_effects", old, new))
    assert "2 cell(s) changed, 0 added, 0 removed" in report, report
    assert "| cross | Wander (d=16) | corr | 0.302 (n=12) | 0.343 (n=12) | +0.041 |" in report, report
    with pytest.raises(InputError, match="share a key"):
        _table_diff("planted_effects", old + old[:1], new)


def test_diff_between_two_commits(tmp_path):
    repo = tmp_path / "repo"
    runs, tables = repo / "results" / "runs", repo / "results" / "tables"
    repo.mkdir()
    _git(repo, "init", "-q")
    row = {"method": "wander", "down_dim": 16}
    for seed in SEEDS:
        write_record(runs, "mosi", row, seed)
        write_record(runs, "mosi", {"method": "lora", "rank": 16}, seed)
    render_all(runs, tables, make_params(), names=["table3_mosi"])
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    for path in (runs / "mosi").glob("wander_d16-*.json"):
        path.unlink()
    for seed in SEEDS:
        write_record(runs, "mosi", row, seed, shift=0.2)
    render_all(runs, tables, make_params(), names=["table3_mosi", "Table 7"])
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "second")
    report = diff_tables("HEAD~1", "HEAD", repo=repo)
    assert "table3_mosi" in report and "Tables added: table7_mosi_vf_sf" in report
    assert "Wander (d=16)" in report and "→" in report
    wander_line = next(l for l in report.splitlines() if l.startswith("| mosi | Wander (d=16) | ACC-2"))
    assert "+20" in wander_line  # shift 0.2 x 100
    assert "Tables removed: table7_mosi_vf_sf" in diff_tables("HEAD", "HEAD~1", repo=repo)
    assert "No table" in diff_tables("HEAD", "HEAD", repo=repo)
    with pytest.raises(InputError, match="unknown revision"):
        diff_tables("HEAD", "no-such-rev", repo=repo)
    # the workspace (the files on disk, the default REV_B) and a DVC experiment's name
    assert "No table" in diff_tables("HEAD", repo=repo)
    write_leaderboards(runs, repo / "results" / "leaderboards", make_params(),
                       headline_path=None, detail_path=None)
    assert "Tables added: leaderboards/mosi" in diff_tables("HEAD", "workspace", repo=repo)
    first = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.strip()
    _git(repo, "update-ref", f"refs/exps/ab/cdef/{first}/tiny-exp", first)
    by_name = diff_tables("tiny-exp", "HEAD", repo=repo)
    assert "tiny-exp" in by_name and "+20" in by_name and "Tables added: table7" in by_name
    elsewhere = tmp_path / "not_a_repo"
    elsewhere.mkdir()
    with pytest.raises(InputError, match="not a git repository"):
        diff_tables("HEAD", "HEAD", repo=elsewhere)


def _committed_leaderboard(tmp_path) -> Path:
    """A git repository whose one commit holds results/leaderboards/mosi.csv (two lines)."""
    repo = tmp_path / "repo"
    table = repo / "results" / "leaderboards" / "mosi.csv"
    table.parent.mkdir(parents=True)
    table.write_text(csv_text(CSV_FIELDS, [
        {"table": "Leaderboard", "section": "leaderboard", "row": row, "column": "ACC-2",
         "metric_key": "acc2_non0", "status": "ok", "mean": mean, "n": 3}
        for row, mean in (("lora_r16", 0.71), ("wander_d16", 0.75))]))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "study")
    return repo


def _damaged(data: bytes, damage: str) -> bytes:
    header, first, second = data.splitlines(keepends=True)
    return {"a truncated line": header + first + second[:len(second) // 2],
            "bytes that are not UTF-8": header + first.replace(b"lora", b"lo\xffra") + second,
            "merge-conflict markers": header + b"<<<<<<< HEAD\n" + first + b"=======\n" + second
            + b">>>>>>> theirs\n",
            "a header missing columns": header.replace(b",column,metric_key", b"") + first + second,
            }[damage]


@pytest.mark.parametrize("damage, line", [("a truncated line", 3), ("bytes that are not UTF-8", 2),
                                          ("merge-conflict markers", 2),
                                          ("a header missing columns", 1)])
def test_diff_of_a_damaged_table_names_the_file_its_revision_and_the_line(damage, line, tmp_path):
    """A damaged CSV (cut short, other bytes, a merge left unresolved, columns lost) was a
    traceback or a misleading "share a key": an InputError naming where it was read."""
    repo = _committed_leaderboard(tmp_path)
    table = repo / "results" / "leaderboards" / "mosi.csv"
    table.write_bytes(_damaged(table.read_bytes(), damage))
    with pytest.raises(InputError, match="at the workspace") as caught:
        diff_tables("HEAD", "workspace", repo=repo)
    assert caught.value.file == str(table) and caught.value.key == f"line {line}", caught.value
    _git(repo, "commit", "-q", "-a", "-m", "damaged")
    with pytest.raises(InputError, match=r"at revision HEAD \(") as caught:
        diff_tables("HEAD~1", "HEAD", repo=repo)
    assert caught.value.file == "results/leaderboards/mosi.csv", caught.value
    assert caught.value.key == f"line {line}", caught.value


def test_a_planted_card_whose_main_metric_its_task_lacks_stops_the_tables(tmp_path, monkeypatch):
    """The planted table compares each row on its card's main metric: a typo there gave NaN
    everywhere ("untestable") and exit 0; now an error naming the card, before any file."""
    runs = tmp_path / "runs"
    for seed in SEEDS:
        write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, seed)
    card = card_with_main_metric(tmp_path, monkeypatch, "planted_null", "corrr")
    with pytest.raises(InputError) as caught:
        render_all(runs, tmp_path / "tables", make_params())
    assert caught.value.file == str(card) and caught.value.key == "main_metric", caught.value
    assert caught.value.found == "'corrr'" and "corr" in caught.value.expected, caught.value
    assert not (tmp_path / "tables").exists()


def test_figure_markdown_says_no_paper_numbers(rendered):
    _, _, out, _ = rendered
    md = (out / "figure4_iemocap_d.md").read_text()
    assert "no numbers" in md and "paper" not in md.split("| Method", 1)[1].split("\n", 1)[0]
    assert "![Figure 4](figure4_iemocap_d.png)" in md
    rows = read_csv(out / "figure5_ranks.csv")
    assert {r["section"] for r in rows} == {"UPMC-Food 101 (d=64)", "IEMOCAP (d=16)",
                                            "CMU-MOSI (d=16)", "MSR-VTT (d=8)"}
    assert all(r["paper"] == "" for r in rows)


def test_row_without_reference_says_not_compared(tmp_path):
    runs = tmp_path / "runs"
    for seed in SEEDS:
        write_record(runs, "mosi", {"method": "lora", "rank": 16}, seed)
    render_all(runs, tmp_path / "t", make_params(), names=["table3_mosi"])
    lines = read_csv(tmp_path / "t" / "table3_mosi.csv")
    lora = next(l for l in lines if l["row"] == "LoRA (r=16)" and l["column"] == "MAE")
    assert lora["status"] == "ok" and lora["p_t"] == ""
    assert lora["comparison_note"].startswith("not compared: the reference row Wander (d=16)")
    assert "not compared" in (tmp_path / "t" / "table3_mosi.md").read_text()


def test_table8_needs_mosei_pretraining(tmp_path):
    runs = tmp_path / "runs"
    for seed in SEEDS:
        write_record(runs, "mosi", {"method": "full"}, seed, pretrained=None)
        write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, seed,
                     pretrained={"source": "mosei", "sha256": "x"})
    render_all(runs, tmp_path / "t", make_params(), names=["Table 8"])
    status = {(l["row"], l["column"]): l["status"]
              for l in read_csv(tmp_path / "t" / "table8_pretraining.csv")}
    assert status[("CMU-MOSEI / Wander(d=16)", "CMU-MOSI ACC")] == "ok"
    assert "pre-trained on nothing; this row needs mosei" in \
        status[("CMU-MOSEI / Full fine-tuning", "CMU-MOSI ACC")]
    md = (tmp_path / "t" / "table8_pretraining.md").read_text()
    assert "pre-training of the backbone (record `pretrained.source`): mosei" in md
    params = make_params()
    params["pretrain"] = {"use": {"mosi": "mosei"}}
    render_all(runs, tmp_path / "t2", params, names=["Table 3"])
    t3 = {l["row"]: l["status"] for l in read_csv(tmp_path / "t2" / "table3_mosi.csv")}
    assert "stale" in t3["Full fine-tuning"] and "pretrain.use" in t3["Full fine-tuning"]
    assert t3["Wander (d=16)"] == "ok"


def test_interval_is_named_in_table_and_csv(rendered):
    _, _, out, _ = rendered
    md = (out / "table3_mosi.md").read_text()
    assert "[95% Student-t interval of the mean]" in md and "[95% t CI]" in md
    assert "bootstrap" not in md
    header = (out / "table3_mosi.csv").read_text().splitlines()[0].split(",")
    assert {"t_ci_low", "t_ci_high", "improvement_t_ci_low", "undefined_seeds"} <= set(header)
    assert "ci_low" not in header


def test_undefined_metric_is_left_out_with_a_note(tmp_path):
    runs = tmp_path / "runs"
    wander, lora = {"method": "wander", "down_dim": 16}, {"method": "lora", "rank": 16}
    for seed in SEEDS:
        record = write_record(runs, "mosi", wander, seed)
        document = json.loads(record.read_text())
        if seed == 1:
            document["metrics"]["corr"] = float("nan")  # constant prediction at this seed
        record.write_text(json.dumps(document))
        record = write_record(runs, "mosi", lora, seed)
        document = json.loads(record.read_text())
        document["metrics"]["corr"] = float("nan")
        record.write_text(json.dumps(document))
    render_all(runs, tmp_path / "t", make_params(), names=["table3_mosi"])
    lines = read_csv(tmp_path / "t" / "table3_mosi.csv")
    corr = {l["row"]: l for l in lines if l["column"] == "Corr"}
    main = corr["Wander (d=16)"]
    assert main["status"] == "ok" and main["n"] == "2" and main["undefined_seeds"] == "1"
    kept = [metric_values("mosi", wander, s)["corr"] for s in (0, 2)]
    assert float(main["mean"]) == pytest.approx(np.mean(kept))
    assert corr["LoRA (r=16)"]["status"].startswith("undefined:")
    assert corr["LoRA (r=16)"]["verdict"] == ""  # nothing compared, no tie invented
    md = (tmp_path / "t" / "table3_mosi.md").read_text()
    assert "undefined (NaN) at seed 1, left out" in md


def test_table_titles_notes_and_equal_rows(rendered):
    """Table 4's title spells MSR-VTT; notes render as a list; the released-code Wander row says
    why it can equal the linear probe."""
    _, _, out, _ = rendered
    table4 = (out / "table4_msrvtt.md").read_text()
    assert table4.startswith("# Table 4: Comparison of performance on the MSR-VTT dataset")
    for name in ("table1_food101", "table2_iemocap", "table3_mosi", "table4_msrvtt"):
        md = (out / f"{name}.md").read_text()
        assert "equals the linear probe" in md and "by construction" in md, name
        assert not any(line.startswith("Notes: ") and " | " in line for line in md.splitlines())


def test_no_table_wider_than_a_reader_follows(rendered):
    """Sections with more metrics than fit a line are split by metric (ours / paper / Δ); a
    row's long status reason is a numbered note under the table; the paired comparisons are
    one table per Wander reference, without the reference repeated in each line."""
    base, _, out, _ = rendered
    for path in [*out.glob("table*.md"), *(base / "leaderboards").glob("*.md")]:
        lines = path.read_text().splitlines()
        widest = max((len(line) for line in lines if line.startswith("|")), default=0)
        # was 820-834 (results), 520 (Table 8), 277 (MSR-VTT leaderboard's other metrics)
        assert widest <= 200, (path.name, widest)
    table8 = (out / "table8_pretraining.md").read_text()
    assert "| not run [1] |" in table8 and "\n1. HowTo100M pre-training is not available" in table8


def test_comparison_notes_name_their_row_metric_and_test(rendered):
    """Each comparison note says which comparison it is about ("1 zero difference(s) dropped" and
    "cannot reach significance" named no row and read as the whole table's)."""
    _, _, out, _ = rendered
    found = []
    for md in out.glob("*.md"):
        lines = md.read_text().splitlines()
        if "Comparison notes:" in lines:
            notes = lines[lines.index("Comparison notes:") + 2:]
            found += notes[:next((i for i, line in enumerate(notes) if not line.startswith("- ")),
                                 len(notes))]
    assert found and all(note.endswith("(every comparison)") or " vs " in note for note in found), found
    assert any(note.startswith("- Wilcoxon: n=3: smallest attainable") for note in found), found
