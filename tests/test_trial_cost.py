"""What a trial skips without changing its numbers (issues 15, 16): hashes asked for again inside a
sweep, batches of in-memory splits cut from items collated once, the validation metrics of the
selected epoch taken from its evaluation instead of a second one."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from harness import records
from harness.run import InMemory
from harness.tasks.tasks import TASKS
from harness.train import TrainSettings, batches, evaluate, fine_tune, run_loaders


def test_inputs_fixed_hashes_each_tree_and_code_once(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("first")
    before = records.tree_hash(data)
    code = records.code_hash()
    with records.inputs_fixed():
        assert records.tree_hash(data) == before
        (data / "a.txt").write_text("second, longer")  # a change inside the block is not seen
        assert records.tree_hash(data) == before
        with records.inputs_fixed():  # a nested block shares the outer memo
            assert records.tree_hash(data) == before
        assert records.code_hash() == code
        method = {"methods.base": records.PROJECT_ROOT / "methods" / "base.py"}
        assert records.code_hash(method) != code
        commit = records.git_commit()
        monkeypatch.setattr(records.subprocess, "run", lambda *a, **k: pytest.fail("git again"))
        assert records.git_commit() == commit
        monkeypatch.undo()
    after = records.tree_hash(data)  # outside: the files are listed and hashed again
    assert after != before
    (data / "a.txt").write_text("first")
    assert records.tree_hash(data) == before


class Logged(Dataset):
    """Items of every kind a loader yields (tensors, arrays, numbers, strings); logs each read."""

    def __init__(self, size: int):
        generator = np.random.default_rng(0)
        self.rows = [{"x": torch.randn(3, 2), "array": generator.normal(size=4).astype(np.float32),
                      "label": float(i) / 3, "count": i, "flag": i % 2 == 0, "id": f"item{i}"}
                     for i in range(size)]
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        self.reads.append(index)
        return self.rows[index]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_in_memory_batches_are_the_item_by_item_collation():
    source = Logged(10)
    split = InMemory(source)
    expected = {tuple(ix): default_collate([source.rows[i] for i in ix])
                for ix in ([3, 1, 4], [0, 5, 9, 2], [6, 7, 8], [9, 0])}
    # items are read in the order the batches ask for them, each once
    first_pass = [[3, 1, 4], [0, 5, 9, 2], [6, 7, 8]]
    for ix in first_pass:
        assert split.collated is None
        got = split.batch(ix)
        assert got.keys() == expected[tuple(ix)].keys()
        assert all(_same(got[k], expected[tuple(ix)][k]) for k in got)
    assert source.reads == [i for ix in first_pass for i in ix]
    for ix in ([9, 0], [3, 1, 4]):  # every item read: cut from the collated items, no read
        got = split.batch(ix)
        assert split.collated is not None
        assert all(_same(got[k], expected[tuple(ix)][k]) for k in got)
    assert len(source.reads) == 10
    # through the training loop's loader: the same batches as the plain DataLoader's
    plain = list(batches(source, 4, seed=3))
    cut = list(batches(split, 4, seed=3))
    assert len(plain) == len(cut)
    assert all(_same(p[k], c[k]) for p, c in zip(plain, cut) for k in p)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        # a buffer training changes (like running statistics), drifting the outputs: later
        # epochs validate worse, so the selected epoch is not the last
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, batch: dict) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.linear(batch["x"]).squeeze(-1) + 0.02 * self.calls


def test_fine_tune_reports_the_selected_epochs_validation_on_the_restored_model():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(64, generator=generator)
    items = [{"x": x[i], "label": y[i]} for i in range(64)]
    splits = {"train": items[:32], "valid": items[32:48], "test": items[48:]}
    settings = TrainSettings(epochs=8, batch_size=8, lr=0.2, step_size=3)
    torch.manual_seed(0)
    model = Regressor()
    task = TASKS["regression"]
    result = fine_tune(model, task, splits, settings, seed=0, progress=False)
    assert result["selected_epoch"] < settings.epochs - 1
    selected = result["history"][result["selected_epoch"]]
    assert result["valid"][task.select_metric] == selected[f"valid_{task.select_metric}"]
    # the model left behind (parameters AND buffers of the selected epoch) measures the same
    loaders = run_loaders(splits, settings, seed=0)
    assert evaluate(model, task, loaders["valid"], settings) == result["valid"]
    assert evaluate(model, task, loaders["test"], settings) == result["test"]


def test_a_checked_feature_cache_is_reused_in_process_until_its_file_changes(tmp_path, monkeypatch):
    import h5py

    from harness import features
    from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
    from methods import apply_method

    torch.manual_seed(0)
    config = LateFusionConfig()
    backbone = LateFusionBackbone(config)
    apply_method(backbone, "linear")
    generator = torch.Generator().manual_seed(1)
    items = [{**{m: torch.randn(config.seq_lens[m], d, generator=generator)
                 for m, d in config.input_dims.items()},
              "label": torch.tensor(float(i)), "index": torch.tensor(i)} for i in range(12)]
    path = tmp_path / "train.h5"

    def extract():
        return features.extract_features(backbone, items, path, "data-v1", batch_size=4,
                                         progress=False)

    computed = extract()
    assert computed.status == "computed: missing" and computed.extract_s is not None
    with monkeypatch.context() as patched:  # reused without opening the file again
        patched.setattr(features, "cache_status", lambda *a: pytest.fail("the file was re-read"))
        again = extract()
    assert again is computed and again.status == "reused" and again.extract_s is None
    with h5py.File(path, "r+") as f:  # an altered array: the file changed, so it is checked again
        field = next(k for k in f if k.startswith("feat_"))
        f[field][0] = f[field][0] + 1
    rechecked = extract()
    assert rechecked.status.startswith("recomputed: stored arrays altered")
    assert torch.equal(rechecked.batch([0])[field], computed.batch([0])[field])


def pipeline_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_pipeline", records.PROJECT_ROOT / "scripts" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_pipeline_bench_sums_each_datasets_run_costs(tmp_path, capsys):
    import json

    bench = pipeline_bench()
    walls = {"mosi": [(1.5, 1.25), (2.0, 1.5)], "msrvtt": [(4.0, 2.5)]}
    for dataset, costs in walls.items():
        (tmp_path / dataset).mkdir()
        for seed, (wall, train) in enumerate(costs):
            (tmp_path / dataset / f"wander_d8-seed{seed}-abc.json").write_text(
                json.dumps({"wall_s": wall, "train_wall_s": train}))
    (tmp_path / ".stale").mkdir()  # records set aside are not the study's
    (tmp_path / "index.json").write_text("{}")
    bench.print_run_costs(tmp_path)
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"mosi", "msrvtt", "all"}
    assert lines["mosi"] == ["2", f"{3.5:.1f}", "s", f"{2.75:.1f}", "s"]
    assert lines["all"][:2] == ["3", f"{7.5:.1f}"]


def test_pipeline_bench_finds_a_recomputed_study_that_is_not_the_committed_one(tmp_path, capsys):
    """From scratch, the bench compares the recomputed study with the commit: the same run records
    (by name, so by key) with the same results, and the same checkpoints, tables and leaderboards,
    less where and when they were made (timings, the commit a table names, provenance files)."""
    import json
    import os
    import subprocess

    bench = pipeline_bench()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    record = tmp_path / "results" / "runs" / "mosi" / "wander-seed0-0123456789ab.json"
    table = tmp_path / "results" / "tables" / "table3_mosi.md"
    checkpoint = tmp_path / "datasets" / "checkpoints" / "mosei" / "tiny-late_fusion.pt"
    for path in (record, table, checkpoint):
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(commit: str, mae: float, wall: float, cell: str, weights: bytes) -> None:
        record.write_text(json.dumps({"metrics": {"mae": mae}, "history": [1, 2], "wall_s": wall,
                                      "git_commit": commit}))
        table.write_text(f"# Table 3\n- git commit(s): {commit}\n| wander | {cell} |\n")
        checkpoint.write_bytes(weights)
        checkpoint.with_name(checkpoint.name + ".provenance.json").write_text(commit)

    write("aaa", 1.0, 3.0, "1.00", b"w")
    subprocess.run("git init -q && git add -A && git commit -qm study", shell=True, cwd=tmp_path,
                   env=env, check=True)
    write("bbb", 1.0, 4.5, "1.00", b"w")  # made again elsewhere, later: the same study
    assert bench.same_as_committed(tmp_path, env)
    assert "1 of 1 run records" in capsys.readouterr().out
    for changed in ({"mae": 1.1}, {"cell": "1.10"}, {"weights": b"v"}):
        write(**{"commit": "bbb", "mae": 1.0, "wall": 4.5, "cell": "1.00", "weights": b"w", **changed})
        assert not bench.same_as_committed(tmp_path, env), changed
    write("bbb", 1.0, 4.5, "1.00", b"w")
    record.unlink()
    assert not bench.same_as_committed(tmp_path, env)
    assert "1 not recomputed under that key" in capsys.readouterr().out
