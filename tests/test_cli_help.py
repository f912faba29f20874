"""The command line tells the truth: every option of every subcommand has help text (and its
choices), `mmpetl --version`, `mmpetl datasets` has a header, `check-data` prints a summary
unless --json, and --json output is strict JSON."""
import argparse
import json
import math
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from harness.cli import build_parser, main
from harness.data import generate


def test_every_option_has_help_and_lists_its_choices():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        for option in command._actions:
            if isinstance(option, argparse._HelpAction):
                continue
            assert option.help, f"mmpetl {name} {option.option_strings or option.dest}: no help"
            for choice in option.choices or ():
                assert str(choice) in option.help, (name, option.dest, choice)


def test_the_dataset_and_method_help_name_every_card_and_every_built_in_method():
    from harness.data.cards import list_cards
    from methods import method_names, method_origin

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {o.dest: set(o.help.split(": ")[-1].split(", ")) for o in sub.choices["run"]._actions
              if o.dest in ("dataset", "method")}
    assert listed["dataset"] == set(list_cards())
    assert listed["method"] == {m for m in method_names() if method_origin(m)["source"] == "built-in"}


def test_datasets_lines_up_its_columns_for_the_longest_name(capsys):
    assert main(["datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len({line.index(" regression ") for line in lines if " regression " in line}) == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("mmpetl ")


def test_datasets_has_a_header(capsys):
    assert main(["datasets"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.split()[:3] == ["dataset", "task", "real"]


def test_check_data_summary_and_strict_json(tmp_path, capsys):
    generate("mosi", tmp_path / "mosi", seed=0, n_train=24, n_valid=8, n_test=8)
    assert main(["check-data", "--dataset", "mosi", "--path", str(tmp_path / "mosi")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("mosi: usable") and "splits: train 24, valid 8, test 8" in text
    assert not text.lstrip().startswith("{")
    assert main(["check-data", "--dataset", "mosi", "--path", str(tmp_path / "mosi"), "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


def test_json_output_has_no_nan():
    from harness.records import dumps_strict, restore_nan

    text = dumps_strict({"metrics": {"corr": math.nan, "mae": 1.0}})
    document = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert document["metrics"]["corr"] is None and "NaN" in document["null_reasons"]["metrics.corr"]
    assert math.isnan(restore_nan(document)["metrics"]["corr"])


def test_the_mmpetl_program_collects_in_full_rarely_and_freezes_its_objects_before_exit():
    """The console script and ``python -m harness.cli`` run ``command``: ``main`` with full
    collections after 100 younger ones, then every object frozen out of the collector (the exit's
    final collections then skip them), its exit code passed on."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mmpetl"]
    assert script.value == "harness.cli:command"
    probe = ("import gc, sys; from harness.cli import command; sys.argv = ['mmpetl'] + sys.argv[1:]; "
             "code = command(); print(code, gc.get_freeze_count() > 1000, gc.get_threshold()[2])")
    done = subprocess.run([sys.executable, "-c", probe, "methods"], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "0 True 100", done.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", probe, "run", "--dataset", "mosi", "--method", "linear",
                          "--params", "no-such-params.yaml"],
                         capture_output=True, text=True)
    assert bad.stdout.splitlines()[-1] == "2 True 100", bad.stderr[-2000:]


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``mmpetl diff | head``: the closed pipe stops the command with the shell's 141, no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "datasets"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the command writes its first line
    err = process.stderr.read()
    assert process.wait() == 141 and b"Traceback" not in err, err.decode()
