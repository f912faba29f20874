"""Stage leaderboard: every grid row of the records reaches results/leaderboards and
results/metrics.json with no table code edited (a method no spec names included), ranked by the
card's main metric, tested against Wander and the best baseline with Holm over the leaderboard;
every CSV line names its records; record file names carry dataset, grid row and seed."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import stats
from harness.data.cards import load_card
from harness.errors import InputError
from harness.records import row_slug
from harness.run import record_path
from harness.tables.leaderboard import write_leaderboards
from test_tables import (card_with_main_metric, make_params, metric_values, read_csv, write_all,
                         write_record)

NEW = {"method": "bitfit"}   # a method no table spec names


def _render(tmp_path, params=None):
    runs = tmp_path / "runs"
    write_all(runs, skip_methods=("pmf",))
    for seed in (0, 1, 2):
        write_record(runs, "mosi", NEW, seed, valid_metrics={"acc2_non0": 0.99})
    params = params or make_params()
    summary = write_leaderboards(runs, tmp_path / "lb", params,
                                 headline_path=tmp_path / "metrics.json",
                                 detail_path=tmp_path / "detail.json")
    return runs, summary


def test_cards_name_their_main_metric():
    for name in ("mosi", "mosei", "iemocap", "food101", "msrvtt", "howto100m"):
        assert load_card(name).main_metric


def test_a_new_method_reaches_leaderboard_and_metrics(tmp_path):
    runs, summary = _render(tmp_path)
    assert set(summary["leaderboards"]) == {"food101", "iemocap", "mosi", "msrvtt"}
    md = (tmp_path / "lb" / "mosi.md").read_text()
    assert "Main metric: ACC-2 (`acc2_non0`" in md
    # the best baseline is chosen on validation: bitfit has the best valid acc2_non0
    assert "- best baseline: `bitfit`" in md and "- Wander reference: `wander_d16`" in md
    headline = json.loads((tmp_path / "metrics.json").read_text())
    assert set(headline["mosi"]["bitfit"]) == {"acc2_non0", "tunable"}
    assert headline["mosi"]["bitfit"]["tunable"] == 2500 and "| bitfit (headline `bitfit`) " in md
    assert "bitfit" in json.loads((tmp_path / "detail.json").read_text())["mosi"]
    lines = read_csv(tmp_path / "lb" / "mosi.csv")
    mine = [l for l in lines if l["row"] == "bitfit"]
    assert {l["section"] for l in mine} == {"leaderboard", "vs best baseline", "all metrics"}
    vs_wander = next(l for l in mine if l["section"] == "leaderboard")
    assert vs_wander["compared_to"] == "wander_d16" and vs_wander["p_holm"] != ""
    assert vs_wander["records"].split() == sorted(
        f"mosi/{p.name}" for p in (runs / "mosi").glob("bitfit-*.json"))


def test_ranking_direction_and_holm_family(tmp_path):
    _render(tmp_path)
    lines = read_csv(tmp_path / "lb" / "mosi.csv")
    board = [l for l in lines if l["section"] == "leaderboard"]
    means = [float(l["mean"]) for l in board if l["mean"]]
    assert means == sorted(means, reverse=True)   # acc2_non0: higher is better, best first
    tested = [l for l in lines if l["p_t"]]
    adjusted = stats.holm([float(l["p_t"]) for l in tested])
    # one family: the leaderboard (CSV numbers have 10 significant digits)
    assert [float(l["p_holm"]) for l in tested] == pytest.approx(adjusted, rel=1e-8)
    assert {l["verdict"] for l in tested} <= {"reference better", "row better",
                                              "no significant difference", "untestable"}
    msrvtt = [l for l in read_csv(tmp_path / "lb" / "msrvtt.csv") if l["section"] == "leaderboard"]
    assert msrvtt[0]["metric_key"] == "t2v_r5"


def test_paper_table_csv_lines_name_their_records(tmp_path):
    from harness.tables.render import render_all

    runs, _ = _render(tmp_path)
    render_all(runs, tmp_path / "t", make_params(), names=["table3_mosi"])
    line = next(l for l in read_csv(tmp_path / "t" / "table3_mosi.csv") if l["status"] == "ok")
    names = line["records"].split()
    assert len(names) == int(line["n"]) and all((runs / n).is_file() for n in names)


def test_missing_wander_reference_says_why(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        write_record(runs, "mosi", {"method": "lora", "rank": 16}, seed)
    write_leaderboards(runs, tmp_path / "lb", make_params(), headline_path=None, detail_path=None)
    md = (tmp_path / "lb" / "mosi.md").read_text()
    assert "- Wander reference: `wander_d16` (the main Wander row of the paper's table); no test " \
           "against it: not run: no records" in md


def test_tied_means_share_a_rank_and_every_choice_names_its_ties(tmp_path):
    """Means equal but for float noise share a rank (=1, =1, =1, 4); the best baseline and the
    headline row, chosen among tied rows by name, name the rows tied with them."""
    runs = tmp_path / "runs"
    rows = {"wander_d16": ({"method": "wander", "down_dim": 16}, 0.7),
            "lora_r16": ({"method": "lora", "rank": 16}, 0.8),
            "lora_r8": ({"method": "lora", "rank": 8}, 0.8000000000000002),
            "adapter_d16": ({"method": "adapter", "down_dim": 16}, 0.8)}
    for row, value in rows.values():
        for seed in (0, 1, 2):
            write_record(runs, "mosi", row, seed,
                         metrics={**metric_values("mosi", row, seed), "acc2_non0": value + seed / 100},
                         valid_metrics={"acc2_non0": value})
    write_leaderboards(runs, tmp_path / "lb", make_params(),
                       headline_path=tmp_path / "metrics.json", detail_path=None)
    md = (tmp_path / "lb" / "mosi.md").read_text()
    ranks = [line.split("|")[1:3] for line in md.splitlines() if line.startswith("| ")][1:5]
    assert [(r.strip(), n.split()[0]) for r, n in ranks] == [
        ("=1", "adapter_d16"), ("=1", "lora_r16"), ("=1", "lora_r8"), ("4", "wander_d16")]
    assert "they share a rank" in md
    assert "- best baseline: `adapter_d16` (the non-Wander row with the best mean validation " \
           "acc2_non0); tied with `lora_r16`, `lora_r8`, the first by name is chosen" in md
    assert "`lora`: `lora_r16`; tied with `lora_r8`, the first by name is chosen" in md
    headline = json.loads((tmp_path / "metrics.json").read_text())
    assert headline["mosi"]["lora"]["acc2_non0"] == pytest.approx(0.81)


@pytest.mark.parametrize("user_row", [{"method": "wander_code", "down_dim": 8},    # headline key
                                      {"method": "wander_code", "down_dim": 16}])  # row slug too
def test_a_method_named_like_another_rows_key_is_an_error(tmp_path, user_row):
    """A method registered as ``wander_code`` would take Wander's ``code`` variant's headline key
    (metrics.json ``mosi.wander_code``) or row name: an error naming both rows, not an overwrite."""
    runs = tmp_path / "runs"
    for row in ({"method": "wander", "variant": "code", "down_dim": 16}, user_row):
        for seed in (0, 1, 2):
            write_record(runs, "mosi", row, seed)
    with pytest.raises(InputError, match="have one name") as error:
        write_leaderboards(runs, tmp_path / "lb", make_params(),
                           headline_path=tmp_path / "metrics.json", detail_path=None)
    assert '"method": "wander_code"' in str(error.value) and '"variant": "code"' in str(error.value)


def test_a_main_metric_the_task_does_not_record_stops_before_any_file(tmp_path, monkeypatch):
    """A typo in a card's main_metric gave "not measured" everywhere, nulls in metrics.json and
    exit 0: now an error naming the card, the metrics its task records and the typo."""
    runs = tmp_path / "runs"
    write_all(runs, skip_methods=("pmf",))
    card = card_with_main_metric(tmp_path, monkeypatch, "mosi", "acc2_nonzero")
    with pytest.raises(InputError) as caught:
        write_leaderboards(runs, tmp_path / "lb", make_params(),
                           headline_path=tmp_path / "metrics.json",
                           detail_path=tmp_path / "detail.json")
    error = caught.value
    assert error.file == str(card) and error.key == "main_metric", error
    assert error.found == "'acc2_nonzero'" and "'acc2_non0'" in error.expected, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cards", "runs"]


@pytest.mark.parametrize("field", ["valid_metrics", "null_reasons"])
def test_a_damaged_record_stops_the_leaderboards_before_any_file(tmp_path, field):
    """Every record is read and checked before a leaderboard is written: a damaged MOSI record
    was a traceback after Food-101's and IEMOCAP's leaderboards had been written."""
    runs = tmp_path / "runs"
    write_all(runs, skip_methods=("pmf",))
    (record,) = (runs / "mosi").glob("lora_r16-seed0-*.json")
    record.write_text(json.dumps({**json.loads(record.read_text()), field: "x"}))
    with pytest.raises(InputError) as caught:
        write_leaderboards(runs, tmp_path / "lb", make_params(),
                           headline_path=tmp_path / "metrics.json",
                           detail_path=tmp_path / "detail.json")
    assert caught.value.file == str(record) and caught.value.key == field, caught.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_rerun_writes_nothing(tmp_path):
    runs, first = _render(tmp_path)
    again = write_leaderboards(runs, tmp_path / "lb", make_params(),
                               headline_path=tmp_path / "metrics.json",
                               detail_path=tmp_path / "detail.json")
    assert first["written"] and again["written"] == []


def test_record_file_name_says_dataset_row_and_seed():
    plan = SimpleNamespace(dataset="mosi", seed=2,
                           row={"method": "wander", "variant": "code", "down_dim": 16,
                                "rank_t": 4})
    path = record_path(plan, "0123456789abcdef", Path("results/runs"))
    assert path == Path("results/runs/mosi/wander_code_d16_rt4-seed2-0123456789ab.json")
    assert row_slug({"method": "maple", "source": "text"}) == "maple_source-text"
    assert row_slug({"method": "x", "path": "a/b c"}) == "x_path-a-b-c"


@pytest.mark.parametrize("command, bar", [("leaderboard", "leaderboards: 100%"),
                                          ("tables", "tables: 100%")])
def test_the_stage_commands_show_progress_unless_asked_for_json(tmp_path, capsys, monkeypatch,
                                                                command, bar):
    """`mmpetl leaderboard` and `mmpetl tables` take seconds: a bar on stderr, one step per
    dataset or table; with --json, stdout is the summary alone and stderr has no bar."""
    from harness.cli import main

    runs = tmp_path / "runs"
    write_all(runs, skip_methods=("pmf",))
    monkeypatch.setattr("harness.settings.load_params", lambda path: make_params())
    (tmp_path / "cost.md").write_text("# Table 6\n")  # tables --cost: an existing file
    out = ["--out", str(tmp_path / "out")] + (
        ["--metrics", str(tmp_path / "m.json"), "--detail", str(tmp_path / "d.json")]
        if command == "leaderboard" else ["--cost", str(tmp_path / "cost.md")])
    argv = [command, "--runs", str(runs), *out]
    assert main(argv) == 0
    assert bar in capsys.readouterr().err
    assert main(argv + ["--json"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "written" in json.loads(stdout) and bar not in stderr
