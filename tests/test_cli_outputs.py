"""Every command refuses bad input before any work: an output location it cannot write (a file
where a folder should be, a folder where a file should be), an input file or folder that is not
there, a device this machine lacks, an unknown method or variant. Each case asserts exit 2, a
message naming the path (or value) and the option, and that nothing was computed or written."""
from __future__ import annotations

import pytest
import torch

from harness.cli import main
from helpers import ROOT, mmpetl

PARAMS = str(ROOT / "params.yaml")


@pytest.fixture
def refuse(monkeypatch):
    """``refuse("module.function")``: fail the test if the command reaches that function (the
    error must come before any work)."""
    def patch(*targets):
        for target in targets:
            def started(*args, target=target, **kwargs):
                raise AssertionError(f"{target} was called")
            monkeypatch.setattr(target, started)
    return patch


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("keep me\n")
    return path


def only(tmp_path, *names) -> None:
    """``tmp_path`` holds ``names`` alone: nothing else was written."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_search_out_a_file(capsys, tmp_path, a_file, refuse):
    refuse("harness.search.run_search")
    code, err = mmpetl(capsys, "search", "--params", PARAMS, "--executor", "sequential",
                       "--out", a_file)
    assert code == 2 and str(a_file) in err and "'--out'" in err and "Traceback" not in err, err
    assert a_file.read_text() == "keep me\n"
    only(tmp_path, "a-file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cost_device_cuda_without_cuda(capsys, tmp_path, refuse):
    refuse("harness.cost.cost_report")
    code, err = mmpetl(capsys, "cost", "--device", "cuda", "--out", tmp_path / "out")
    assert code == 2 and "'--device'" in err and "found cuda" in err and "no CUDA" in err, err
    only(tmp_path)


@pytest.mark.parametrize("where", ["a file", "under a file", "cost.md a folder"])
def test_cost_out_not_writable(where, capsys, tmp_path, a_file, refuse):
    refuse("harness.cost.cost_report")
    out = {"a file": a_file, "under a file": a_file / "results", "cost.md a folder": tmp_path}[where]
    if where == "cost.md a folder":
        (tmp_path / "cost.md").mkdir()
    code, err = mmpetl(capsys, "cost", "--out", out)
    assert code == 2 and str(out) in err and "'--out'" in err, err
    assert a_file.read_text() == "keep me\n"
    only(tmp_path, "a-file", *(["cost.md"] if where == "cost.md a folder" else []))


@pytest.mark.parametrize("option", ["--out", "--metrics", "--detail"])
def test_leaderboard_checks_every_output_first(option, capsys, tmp_path, a_file):
    """The headline and detail files are written last: a bad one must stop the command before
    the leaderboards are written."""
    for name in ("runs", "a-folder"):
        (tmp_path / name).mkdir()
    outputs = {"--out": tmp_path / "lb", "--metrics": tmp_path / "m.json",
               "--detail": tmp_path / "d.json"}
    outputs[option] = bad = a_file if option == "--out" else tmp_path / "a-folder"
    code, err = mmpetl(capsys, "leaderboard", "--params", PARAMS, "--runs", tmp_path / "runs",
                       *(x for pair in outputs.items() for x in pair))
    assert code == 2 and str(bad) in err and f"'{option}'" in err, err
    assert a_file.read_text() == "keep me\n"
    only(tmp_path, "a-file", "a-folder", "runs")
    assert not list((tmp_path / "a-folder").iterdir())


def test_pretrain_out_a_folder(capsys, tmp_path, refuse):
    refuse("harness.pretrain.pretrain")
    out = tmp_path / "checkpoint.pt"
    out.mkdir()
    code, err = mmpetl(capsys, "pretrain", "--params", PARAMS, "--source", "mosei", "--out", out)
    assert code == 2 and str(out) in err and "'--out'" in err, err
    only(tmp_path, "checkpoint.pt")
    assert not list(out.iterdir())


def test_extract_out_a_file(capsys, tmp_path, a_file, refuse):
    refuse("harness.extract.extract_dataset")
    code, err = mmpetl(capsys, "extract", "--params", PARAMS, "--dataset", "mosi", "--out", a_file)
    assert code == 2 and str(a_file) in err and "'--out'" in err, err
    assert a_file.read_text() == "keep me\n"
    only(tmp_path, "a-file")


def test_tables_cost_not_found(capsys, tmp_path):
    (tmp_path / "runs").mkdir()
    missing = tmp_path / "nonexistent.md"
    code, err = mmpetl(capsys, "tables", "--params", PARAMS, "--runs", tmp_path / "runs",
                       "--out", tmp_path / "t", "--cost", missing)
    assert code == 2 and str(missing) in err and "'--cost'" in err and "found missing" in err, err
    only(tmp_path, "runs")


@pytest.mark.parametrize("what", ["stale", "prune"])
@pytest.mark.parametrize("where", ["missing", "a file"])
def test_records_out_not_a_folder(what, where, capsys, tmp_path, a_file):
    out = tmp_path / "nonexistent" if where == "missing" else a_file
    code, err = mmpetl(capsys, "records", what, "--out", out)
    assert code == 2 and str(out) in err and "'--out'" in err and f"found {where}" in err, err
    only(tmp_path, "a-file")


@pytest.mark.parametrize("argv, option, found", [
    (["run", "--dataset", "mosi", "--method", "nosuch"], "--method", "'nosuch'"),
    (["audit", "grads", "--method", "nosuch"], "--method", "'nosuch'"),
    (["run", "--dataset", "mosi", "--method", "lora", "--variant", "v2"], "--variant", "'v2'"),
])
def test_unknown_method_or_variant_names_the_option(argv, option, found, capsys, tmp_path):
    out = ["--out", tmp_path / "runs", "--params", PARAMS] if argv[0] == "run" else []
    code, err = mmpetl(capsys, *argv, *out)
    assert code == 2 and f"[key '{option}']" in err and f"found {found}" in err, err
    assert "expected one of [" in err
    only(tmp_path)


@pytest.mark.parametrize("key, value, named", [
    ("n_train", 0, "generate.mosi.n_train"),
    ("colour", 3, "generate.mosi.colour"),  # its expected list names n_train / n_test too
])
def test_data_names_the_params_key_of_a_bad_generator_argument(capsys, tmp_path, monkeypatch, key,
                                                               value, named):
    """``mmpetl data`` (stage data@<dataset>) names params.yaml and generate.<dataset>.<key>, not
    the generator's module."""
    import yaml
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"]["mosi"] = {**(params["generate"]["mosi"] or {}), key: value}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    code, err = mmpetl(capsys, "data", "--dataset", "mosi")
    assert code == 2 and f"file params.yaml, key '{named}'" in err and "harness.data" not in err, err
    if key == "colour":
        assert "'n_train'" in err and "'n_test'" in err, err
    only(tmp_path, "params.yaml")


def test_check_data_reads_with_the_loader_options_of_params(capsys, tmp_path):
    """MSR-VTT under params.yaml's split scheme, not the card's default: generated data whose
    default (jsfusion) test list is gone is usable under params' ``split_scheme: full``, and
    check-data says which options it used (before, it always checked jsfusion)."""
    from harness.data import generate

    data = tmp_path / "msrvtt"
    generate("msrvtt", data, n_train=8, n_valid=2, n_test=4)
    (data / "val_list_jsfusion.txt").unlink()  # jsfusion's test list; full tests on test_list.txt
    code = main(["check-data", "--dataset", "msrvtt", "--path", str(data), "--params", PARAMS])
    out = capsys.readouterr().out
    assert code == 0 and "{'split_scheme': 'full'}" in out and "data.paper.msrvtt" in out, out
    splits = next(line for line in out.splitlines() if "splits:" in line)
    assert splits.split("splits: ")[1] == "train 8, valid 2, test 4", out  # videos, not "?"
    code, err = mmpetl(capsys, "check-data", "--dataset", "msrvtt", "--path", data, "--params",
                       tmp_path / "none.yaml")  # a params file named but absent: refused
    assert code == 2 and "none.yaml" in err, err


@pytest.mark.parametrize("key, value", [("image_size", "big"), ("format", "zip")])
def test_check_data_names_the_params_key_of_a_bad_loader_option(capsys, tmp_path, key, value):
    """check-data reads the data block of --params: a bad option there is named in that file (it
    named the dataset's card)."""
    import yaml
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["tiny"]["food101"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    code, err = mmpetl(capsys, "check-data", "--dataset", "food101", "--path", tmp_path, "--params",
                       path, "--profile", "tiny")
    assert code == 2 and f"file {path}, key 'data.tiny.food101.{key}'" in err, err
    only(tmp_path, "params.yaml")
