"""Files, caches and records under hostile conditions (issue 13): OS errors while writing, damaged
run records, altered feature caches and checkpoints, `tables --out`, cells mixing inputs, and
temporaries left by a killed writer. Each case asserts the exit code (2), that the message names
the culprit, and that nothing partial was written or lost."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from harness import records
from harness.cli import main
from harness.errors import InputError
from harness.features import CacheError, content_hash
from helpers import ROOT, mmpetl, small_mosi_params
from test_extract import extract, late_fusion_items
from test_tables import write_record


# --- shared builders -------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def fixed_code_identity():
    """One code hash for the module: the study recorded first must keep its run keys while the
    tests read it back, even if a source file is edited meanwhile (code identity has its own
    tests, tests/test_code_identity.py)."""
    with pytest.MonkeyPatch.context() as patch:
        identity = records.code_hash()
        patch.setattr(records, "code_hash", lambda sources=None: identity)
        yield


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A one-run study (linear probe, seed 0, small MOSI) recorded once: (params path, records)."""
    folder = tmp_path_factory.mktemp("study")
    params = small_mosi_params(folder)
    params.update(datasets=["mosi"], seeds=[0], grid={"mosi": [{"method": "linear"}]})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    runs = folder / "runs"
    assert main(["sweep", "--params", str(path), "--out", str(runs), "--executor", "sequential"]) == 0
    return path, runs


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (hidden ones too; folders as None)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def copy_of(runs: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs"
    shutil.copytree(runs, target)
    return target


def the_record(runs: Path) -> Path:
    (path,) = sorted((runs / "mosi").glob("*-seed*-*.json"))
    return path


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a sweep starts computing (the error must come before any work)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a run was started")

    def run_nothing(plans, *args, **kwargs):
        if plans:
            refuse()
    monkeypatch.setattr("harness.sweep.run_many", run_nothing)
    monkeypatch.setattr("harness.run.fine_tune", refuse)


# --- 1. OS errors while writing ------------------------------------------------------------------
def test_sweep_with_every_run_recorded_writes_nothing(study, tmp_path, capsys, monkeypatch):
    """A read-only results folder is fine when there is nothing to compute: every call that
    would write there fails as a read-only file system would, and the sweep still succeeds."""
    params, runs = study
    runs = copy_of(runs, tmp_path)
    before = snapshot(runs)

    def read_only(original):
        def guarded(*args, **kwargs):
            if any(str(a).startswith(str(runs)) for a in args) or str(kwargs.get("dir", "")).startswith(str(runs)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0] if args else runs))
            return original(*args, **kwargs)
        return guarded

    for name in ("replace", "rename", "mkdir", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, read_only(getattr(os, name)))
    import tempfile
    monkeypatch.setattr(tempfile, "mkstemp", read_only(tempfile.mkstemp))
    code, err = mmpetl(capsys, "sweep", "--params", params, "--out", runs, "--executor", "sequential")
    assert code == 0, err
    assert snapshot(runs) == before


def test_read_only_records_folder_exits_2_before_computing(study, tmp_path, capsys, monkeypatch,
                                                          no_compute):
    params, _ = study
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if Path(path) == out and mode & os.W_OK else real_access(path, mode, **kw)))
    code, err = mmpetl(capsys, "sweep", "--params", params, "--out", out, "--executor", "sequential")
    assert code == 2 and str(out) in err and "not writable" in err
    assert snapshot(out) == {}


def test_disk_full_while_writing_a_record_exits_2_and_leaves_nothing(study, tmp_path, capsys,
                                                                    monkeypatch):
    params, _ = study
    out = tmp_path / "runs"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(records.os, "fsync", full)
    code, err = mmpetl(capsys, "sweep", "--params", params, "--out", out, "--executor", "sequential")
    assert code == 2 and "no space left" in err
    assert f"{out}/mosi/linear-seed0-" in err  # the record it could not write
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no record, no temporary, no index


@pytest.mark.parametrize("command", ["sweep", "run", "tables", "leaderboard"])
def test_out_pointing_to_a_file_exits_2_naming_it(command, study, tmp_path, capsys, no_compute):
    params, runs = study
    target = tmp_path / "a-file"
    target.write_text("keep me\n")
    argv = {"sweep": ["sweep", "--executor", "sequential", "--out", target],
            "run": ["run", "--dataset", "mosi", "--method", "linear", "--out", target],
            "tables": ["tables", "--runs", runs, "--out", target],
            "leaderboard": ["leaderboard", "--runs", runs, "--out", target,
                            "--metrics", tmp_path / "m.json", "--detail", tmp_path / "d.json"]}[command]
    code, err = mmpetl(capsys, *argv, "--params", params)
    assert code == 2 and str(target) in err, err
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_file_where_a_dataset_folder_should_be(study, tmp_path, capsys, no_compute):
    params, _ = study
    out = tmp_path / "runs"
    out.mkdir()
    (out / "mosi").write_text("not a folder\n")
    code, err = mmpetl(capsys, "sweep", "--params", params, "--out", out, "--executor", "sequential")
    assert code == 2 and str(out / "mosi") in err and "not a folder" in err
    assert snapshot(out) == {"mosi": b"not a folder\n"}


def test_atomic_write_errors_name_the_path_and_clean_up(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(InputError, match="a file where a folder should be") as caught:
        records.write_json_atomic(blocker / "sub" / "out.json", {"a": 1})
    assert str(blocker / "sub" / "out.json") in str(caught.value)
    folder = tmp_path / "record.json"
    folder.mkdir()  # a folder named like the file to write
    with pytest.raises(InputError, match="a folder where a file should be"):
        records.write_json_atomic(folder, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "record.json"]


def test_an_input_error_inside_an_atomic_write_is_not_called_a_write_error(tmp_path):
    """An OS error about another file (an input the block reads) keeps its own type and message;
    the temporary is removed and the target is not written."""
    with pytest.raises(FileNotFoundError, match="missing-input"):
        with records.atomic_file(tmp_path / "out.json") as stream:
            stream.write((tmp_path / "missing-input").read_text())
    assert list(tmp_path.iterdir()) == []


# --- 2. damaged run records ----------------------------------------------------------------------
DAMAGE = {
    "empty": lambda p: p.write_text(""),
    "truncated": lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),
    "not an object": lambda p: p.write_text("[1, 2, 3]\n"),
    "no metrics": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "metrics": {}})),
    "metrics missing": lambda p: p.write_text(json.dumps(
        {k: v for k, v in json.loads(p.read_text()).items() if k != "metrics"})),
    "binary": lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
    "a dangling link": lambda p: (p.unlink(), p.symlink_to(p.parent / "gone.json")),
    "another run's record": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                               "key": "0" * 64})),
    # edited by hand: a metric that is not a number was left out of the tables (n - 1 seeds); a
    # seed or row changed made its run look missing, and neither sweep nor tables said a word
    "a metric not a number": lambda p: p.write_text(json.dumps(_edited_metric(p, "abc"))),
    "an infinite metric": lambda p: p.write_text(json.dumps(_edited_metric(p, float("inf")))),
    "another seed inside": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "seed": 7})),
    "another row inside": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                             "row": {"method": "lora", "rank": 2}})),
    # impossible values were averaged and ranked (an accuracy of 7.5 ranked first), a #tunable
    # that is not a count was left out, and of a key given twice the last silently counted
    "a metric out of its range": lambda p: p.write_text(json.dumps(_edited_metric(p, 7.5,
                                                                                  "acc2_non0"))),
    "a key given twice": lambda p: p.write_text('{"metrics": {"acc2_non0": 0.5},'
                                                + p.read_text()[1:]),
    "tunable missing": lambda p: p.write_text(json.dumps(_without(p, "tunable"))),
    "tunable not a mapping": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                                "tunable": "74305"})),
    "tunable negative": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                           "tunable": {"method": -5, "head": 10}})),
    "valid_metrics not a mapping": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                                      "valid_metrics": "x"})),
    "null_reasons not a mapping": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                                     "null_reasons": "x"})),
}


def _without(path: Path, key: str) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != key}


def _edited_metric(path: Path, value, name: str | None = None) -> dict:
    record = json.loads(path.read_text())
    name = name or sorted(record["metrics"])[0]
    return {**record, "metrics": {**record["metrics"], name: value}}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_record_stops_the_sweep_naming_it(damage, study, tmp_path, capsys, no_compute):
    """Decision: a record that cannot be read is never taken as a done run, and never silently
    recomputed over either: exit 2 naming the file (delete it to recompute)."""
    params, runs = study
    runs = copy_of(runs, tmp_path)
    record = the_record(runs)
    DAMAGE[damage](record)
    before = snapshot(runs)
    code, err = mmpetl(capsys, "sweep", "--params", params, "--out", runs, "--executor", "sequential")
    assert code == 2 and str(record) in err and "delete the file to recompute" in err, err
    assert snapshot(runs) == before


@pytest.mark.parametrize("damage", ["truncated", "no metrics", "a folder", "a metric not a number",
                                    "another seed inside", "another run's record",
                                    "a metric out of its range", "a key given twice",
                                    "tunable missing", "valid_metrics not a mapping",
                                    "null_reasons not a mapping"])
def test_damaged_record_stops_tables_leaderboard_and_run(damage, study, tmp_path, capsys,
                                                         no_compute):
    params, runs = study
    runs = copy_of(runs, tmp_path)
    record = the_record(runs)
    DAMAGE[damage](record)
    code, err = mmpetl(capsys, "tables", "--params", params, "--runs", runs, "--out", tmp_path / "t")
    assert code == 2 and str(record) in err
    code, err = mmpetl(capsys, "leaderboard", "--params", params, "--runs", runs,
                       "--out", tmp_path / "lb", "--metrics", tmp_path / "m.json",
                       "--detail", tmp_path / "d.json")
    assert code == 2 and str(record) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    code, err = mmpetl(capsys, "run", "--params", params, "--dataset", "mosi", "--method", "linear",
                       "--out", runs)
    assert code == 2 and str(record) in err


@pytest.mark.parametrize("damage, key, expected", [
    ("a metric out of its range", "metrics.acc2_non0", "a number in [0, 1]"),
    ("a key given twice", "metrics", "each key once"),
    ("tunable missing", "tunable", "dict"),
    ("tunable not a mapping", "tunable", "dict"),
    ("tunable negative", "tunable.method", "a count >= 0"),
    ("valid_metrics not a mapping", "valid_metrics", "a mapping"),
    ("null_reasons not a mapping", "null_reasons", "a mapping")])
def test_a_record_of_impossible_values_names_the_key_and_what_it_should_hold(damage, key, expected,
                                                                            study, tmp_path):
    record = the_record(copy_of(study[1], tmp_path))
    DAMAGE[damage](record)
    with pytest.raises(InputError) as caught:
        records.read_run_record(record)
    assert caught.value.file == str(record) and caught.value.key == key, caught.value
    assert expected in str(caught.value.expected), caught.value


def test_read_json_refuses_a_key_given_twice_at_any_depth(tmp_path):
    path = tmp_path / "document.json"
    path.write_text('{"a": {"b": 1, "b": 2}}')
    with pytest.raises(ValueError, match="'b' twice"):
        records.read_json(path)


def test_record_of_data_changed_since_is_not_reused(study, tmp_path, capsys):
    """A run key holds the data's content (tree hash): after the data at the same path changed,
    the old record is not this run's; the sweep computes the run anew and sets the old record
    aside as stale (it comes back if the data are restored)."""
    params, runs = study
    runs = copy_of(runs, tmp_path)
    record = the_record(runs)
    recorded = json.loads(record.read_text())
    data = Path(yaml.safe_load(params.read_text())["data"]["tiny"]["mosi"]["path"])
    manifest = data / "generated.json"
    original = manifest.read_bytes()
    try:
        manifest.write_bytes(original + b"\n")  # the data regenerated: other bytes, same path
        code, err = mmpetl(capsys, "sweep", "--params", params, "--out", runs,
                           "--executor", "sequential")
        assert code == 0, err
        assert not record.exists() and (runs / ".stale" / record.parent.name / record.name).exists()
        fresh = [json.loads(p.read_text()) for p in record.parent.glob("*.json")
                 if p.name.startswith(record.name.split("-seed")[0])]
        assert fresh and all(r["data_hash"] == records.tree_hash(data) != recorded["data_hash"]
                             for r in fresh)
        assert all(r["key"] != recorded["key"] for r in fresh)
    finally:
        manifest.write_bytes(original)
    assert records.tree_hash(data) == recorded["data_hash"]


# --- 3. feature caches verified by content -------------------------------------------------------
@pytest.fixture
def cache(tmp_path):
    """A linear-probe late-fusion cache of 20 items: (backbone, items, path)."""
    from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
    from methods import apply_method

    torch.manual_seed(0)
    config = LateFusionConfig()
    backbone = LateFusionBackbone(config)
    apply_method(backbone, "linear")
    items = late_fusion_items(config)
    path = tmp_path / "train.h5"
    assert extract(backbone, items, path).status == "computed: missing"
    return backbone, items, path


def alter(path: Path, field: str, value: float, forge_hash: bool = False) -> None:
    with h5py.File(path, "r+") as f:
        array = f[field][...]
        array.flat[0] = value
        f[field][...] = array
        if forge_hash:  # the hash recorded as if the altered arrays had been written
            meta = json.loads(f.attrs["meta"])
            meta["content_hash"] = content_hash(f, meta["fields"])[0]
            f.attrs["meta"] = json.dumps(meta, sort_keys=True)


@pytest.mark.parametrize("field", ["label", "feat_text", "mask_audio"])
def test_altered_cache_is_detected_and_rebuilt(field, cache):
    backbone, items, path = cache
    original = extract(backbone, items, path)
    assert original.status == "reused"
    first = {k: v.clone() for k, v in original[0].items()}
    alter(path, field, 99.0 if field != "mask_audio" else 0)
    rebuilt = extract(backbone, items, path)
    assert rebuilt.status.startswith("recomputed") and "altered" in rebuilt.status
    assert all(torch.equal(first[k], rebuilt[0][k]) for k in first)
    assert extract(backbone, items, path).status == "reused"


def test_nan_in_a_cache_is_refused_with_its_path(cache):
    backbone, items, path = cache
    alter(path, "feat_text", float("nan"), forge_hash=True)
    before = path.read_bytes()
    with pytest.raises(CacheError, match="NaN or infinity") as caught:
        extract(backbone, items, path)
    assert str(path) in str(caught.value) and "feat_text" in str(caught.value)
    assert path.read_bytes() == before


def test_cache_hash_matches_what_is_stored(cache):
    _, _, path = cache
    with h5py.File(path, "r") as f:
        meta = json.loads(f.attrs["meta"])
        digest = hashlib.sha256()  # restated: name|dtype|shape, then the C-order bytes
        for name in sorted(meta["fields"]):
            array = np.ascontiguousarray(f[name][...])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
            digest.update(array.tobytes())
    assert meta["content_hash"] == digest.hexdigest()


def test_extract_stage_rebuilds_an_altered_cache_and_refuses_nan(study, tmp_path, capsys):
    params, _ = study
    out = tmp_path / "features"
    code, err = mmpetl(capsys, "extract", "--params", params, "--dataset", "mosi", "--out", out)
    assert code == 0, err
    (train,) = out.glob("mosi/*/train.h5")
    alter(train, "label", 42.0)
    capsys.readouterr()
    assert main(["extract", "--params", str(params), "--dataset", "mosi", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "altered" in summary["splits"]["train"]["status"]
    alter(train, "feat_text", float("inf"), forge_hash=True)
    code, err = mmpetl(capsys, "extract", "--params", params, "--dataset", "mosi", "--out", out)
    assert code == 2 and str(train) in err and "NaN or infinity" in err


# --- 4. checkpoint bytes verified against the recorded sha256 -------------------------------------
def test_committed_checkpoints_match_their_recorded_hash():
    from harness.checkpoints import verify_checkpoint_bytes

    found = sorted((ROOT / "datasets" / "checkpoints").glob("*/*.pt"))
    assert found
    for path in found:
        assert verify_checkpoint_bytes(path)["sha256"] == records.sha256_file(path)


def test_a_checkpoint_without_provenance_is_used_with_a_warning(tmp_path, capsys):
    """A checkpoint with no provenance file (one not written by ``mmpetl pretrain``, or whose file
    was deleted) cannot be checked: said once, on stderr."""
    from harness.checkpoints import verify_checkpoint_bytes

    checkpoint = tmp_path / "tiny-late_fusion.pt"
    shutil.copy(ROOT / "datasets" / "checkpoints" / "mosei" / checkpoint.name, checkpoint)
    assert verify_checkpoint_bytes(checkpoint) is None and verify_checkpoint_bytes(checkpoint) is None
    warned = capsys.readouterr().err
    assert warned.count("warning") == 1 and str(checkpoint) in warned and "not checked" in warned, warned


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_altered_checkpoint_exits_2_with_both_hashes(command, study, tmp_path, capsys, no_compute):
    params_path, _ = study
    source = ROOT / "datasets" / "checkpoints" / "mosei" / "tiny-late_fusion.pt"
    checkpoint = tmp_path / "ckpt" / source.name
    checkpoint.parent.mkdir()
    shutil.copy(source, checkpoint)
    shutil.copy(source.with_name(source.name + ".provenance.json"),
                checkpoint.with_name(checkpoint.name + ".provenance.json"))
    recorded = json.loads(checkpoint.with_name(checkpoint.name + ".provenance.json").read_text())["sha256"]
    document = torch.load(checkpoint, weights_only=True)
    name = next(iter(document["state_dict"]))
    document["state_dict"][name] = document["state_dict"][name] + 1e-3  # a replaced checkpoint
    torch.save(document, checkpoint)
    params = yaml.safe_load(params_path.read_text())
    params["pretrain"]["use"] = {"mosi": "mosei"}
    params["pretrain"]["checkpoints"]["mosei"] = str(checkpoint)
    altered_params = tmp_path / "params.yaml"
    altered_params.write_text(yaml.safe_dump(params))
    out = tmp_path / "runs"
    argv = (["sweep", "--executor", "sequential"] if command == "sweep"
            else ["run", "--dataset", "mosi", "--method", "linear"])
    code, err = mmpetl(capsys, *argv, "--params", altered_params, "--out", out)
    assert code == 2, err
    assert str(checkpoint) in err and recorded in err and records.sha256_file(checkpoint) in err
    assert not out.exists()


# --- 5. tables --out writes nothing outside it; a missing --runs is an error ----------------------
def test_tables_out_writes_only_there(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        write_record(runs, "mosi", {"method": "wander", "down_dim": 16}, seed)
    params = ROOT / "params.yaml"
    results_before = snapshot(ROOT / "results")
    runs_before = snapshot(runs)
    code, err = mmpetl(capsys, "tables", "--params", params, "--runs", runs, "--out", tmp_path / "t")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "t"]
    assert snapshot(runs) == runs_before and snapshot(ROOT / "results") == results_before
    code, err = mmpetl(capsys, "tables", "--params", params, "--runs", tmp_path / "typo",
                       "--out", tmp_path / "t2")
    assert code == 2 and str(tmp_path / "typo") in err and "not found" in err
    assert not (tmp_path / "t2").exists() and snapshot(ROOT / "results") == results_before


# --- 6. statistics never pool records of different inputs ------------------------------------------
PACKAGES = {"numpy": "1.26.4", "torch": "2.3.0", "transformers": "4.44.0"}


@pytest.mark.parametrize("field, differing, shown", [
    ("data_hash", {"data_hash": "hash-of-regenerated-data"}, "hash-of-regenera"),
    ("checkpoint sha256", {"pretrained": {"source": "mosei", "sha256": "another-checkpoint"}},
     "another-checkpoi"),
    ("code_hash", {"code_hash": "the-new-code"}, "the-new-code"),
    ("packages", {"packages": {**PACKAGES, "torch": "2.4.0"}}, "torch 2.4.0"),
])
def test_a_cell_mixing_inputs_is_an_error(field, differing, shown, tmp_path, capsys):
    """Decision: error (naming both files and the field), not a split cell: a cell is one grid
    row of the study, and records of two data, checkpoint, code or package versions mean the
    study is mid-way between them (a sweep computes every seed under one code and sets other
    code's records aside; a Ray node of other code or packages refuses)."""
    runs = tmp_path / "runs"
    row = {"method": "wander", "down_dim": 16}
    same = {"pretrained": {"source": "mosei", "sha256": "the-checkpoint"},
            "code_hash": "the-old-code", "packages": PACKAGES}
    for seed in (0, 1):
        write_record(runs, "mosi", row, seed, **same)
    odd = write_record(runs, "mosi", row, 2, **{**same, **differing})
    code, err = mmpetl(capsys, "tables", "--params", ROOT / "params.yaml", "--runs", runs, "--out", tmp_path / "t")
    assert code == 2 and str(odd) in err and repr(field) in err and "different inputs" in err
    assert f"found {shown}" in err and "(as wander_d16-seed0-" in err
    assert not (tmp_path / "t").exists()


# --- 7. temporaries of a killed writer -------------------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_data_stage_removes_what_a_killed_run_left(tmp_path, capsys):
    generated = tmp_path / "datasets" / "generated"
    generated.mkdir(parents=True)
    dead = dead_pid()
    leftovers = [generated / f".mosi.tmp-{dead}-abc123", generated / f".mosi.old-{dead}"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "partial.pkl").write_bytes(b"half")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    in_progress = generated / f".mosi.tmp-{alive.pid}-xyz789"  # another live generation: kept
    in_progress.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"]["mosi"] = {**params["generate"]["mosi"], "n_train": 24, "n_valid": 8,
                                  "n_test": 8}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        code, err = mmpetl(capsys, "data", "--dataset", "mosi")
    finally:
        os.chdir(cwd)
        alive.kill()
        alive.wait()
    assert code == 0, err
    assert sorted(p.name for p in generated.iterdir()) == sorted(["mosi", in_progress.name])


def test_atomic_write_removes_a_killed_writers_temporary(tmp_path):
    target = tmp_path / "index.json"
    stale = tmp_path / f".index.json.{dead_pid()}-abcd.tmp"
    stale.write_text("{\"half\": ")
    records.write_json_atomic(target, {"whole": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_a_stop_signal_right_after_the_temporary_is_created_leaves_no_temporary(tmp_path, monkeypatch):
    """A sweep's worker stopped by SIGTERM while it starts writing a record: the signal's handler
    raises (``concurrency.Stopped``) at the first bytecode after the temporary file exists. Before,
    the file was created inside tempfile.mkstemp, whose name was not yet known to the cleanup."""
    from harness.concurrency import Stopped

    real_open = os.open

    def open_then_stopped(path, flags, *args, **kwargs):
        descriptor = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT and str(path).endswith(".tmp"):
            os.close(descriptor)
            raise Stopped(signal.SIGTERM)
        return descriptor

    monkeypatch.setattr(os, "open", open_then_stopped)
    with pytest.raises(Stopped):
        records.write_json_atomic(tmp_path / "run.json", {"metrics": {}})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_data_killed_midway_is_cleaned_by_the_next_run(tmp_path):
    """A real SIGKILL during generation leaves its temporary folder; the next run removes it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"]["mosi"] = {**params["generate"]["mosi"], "n_train": 20000}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    generated = tmp_path / "datasets" / "generated"
    command = [sys.executable, "-m", "harness.cli", "data", "--dataset", "mosi"]
    child = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not list(generated.glob(".mosi.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert list(generated.glob(".mosi.tmp-*")), "the generation ended before it was killed"
    params["generate"]["mosi"]["n_train"] = 24
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(command, cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert sorted(p.name for p in generated.iterdir()) == ["mosi"]


def test_data_behind_a_symlinked_folder_is_hashed(tmp_path):
    """Data linked in from another disk (a symlinked folder) counts in the data hash, so a changed
    image behind the link is a new run key; a link back to a folder above it (a loop) is not
    followed."""
    store, data = tmp_path / "store", tmp_path / "data"
    (store / "images").mkdir(parents=True)
    (store / "images" / "a.jpg").write_bytes(b"one")
    data.mkdir()
    (data / "labels.txt").write_text("x")
    (data / "images").symlink_to(store / "images", target_is_directory=True)
    (data / "images_loop").symlink_to(data, target_is_directory=True)
    assert [p.relative_to(data).as_posix() for p in records.data_files(data)] == [
        "images/a.jpg", "labels.txt"]
    before = records.tree_hash(data)
    (store / "images" / "a.jpg").write_bytes(b"two")
    assert records.tree_hash(data) != before
