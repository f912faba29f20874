"""The user's main job through DVC, in a temporary git + DVC copy of the project: `dvc repro`
twice (the second does nothing), `dvc exp run -S method=wander`, a queue of two experiments run
by `dvc queue start -j 2`, `dvc exp show` and `dvc metrics diff` between two commits."""
import json
import time

import pytest
import yaml

from helpers import copy_project, sh


@pytest.fixture(scope="module")
def repo(reproduced_inputs, tmp_path_factory):
    """The project with a small study, committed; its input stages already reproduced."""
    return copy_project(reproduced_inputs, tmp_path_factory.mktemp("repo"), datasets=["mosi"],
                        seeds=[0, 1], method="all",
                        grid={"mosi": [{"method": "linear"}, {"method": "lora", "rank": 4},
                                       {"method": "adapter", "down_dim": 8},
                                       {"method": "wander", "down_dim": 8}]})


@pytest.mark.slow
def test_repro_then_nothing_to_do(repo):
    sh("dvc", "repro", cwd=repo)
    assert (repo / "results/tables/table3_mosi.md").is_file()
    assert (repo / "results/metrics.json").is_file()
    again = sh("dvc", "repro", cwd=repo)
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout.lower()
    for stage in ("finetune", "tables", "search", "leaderboard"):
        assert f"Running stage '{stage}'" not in again.stdout
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "first results", cwd=repo)


@pytest.mark.slow
def test_metrics_diff_between_commits(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["seeds"] = [0, 2]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "seeds 0 and 2", cwd=repo)
    diff = json.loads(sh("dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json", cwd=repo).stdout)
    changes = diff["results/metrics.json"]
    assert changes and all(isinstance(v["diff"], (int, float)) for v in changes.values()
                           if v.get("diff") is not None)
    markdown = sh("mmpetl", "diff", "HEAD~1", "HEAD", cwd=repo).stdout
    assert "table3_mosi" in markdown


@pytest.mark.slow
def test_exp_run_and_queue(repo):
    sh("dvc", "exp", "run", "-S", "method=wander", cwd=repo)
    sh("dvc", "exp", "run", "--queue", "-S", "method=lora,adapter", cwd=repo)
    sh("dvc", "queue", "start", "-j", "2", cwd=repo)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = sh("dvc", "queue", "status", cwd=repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    methods = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                data = revision.get("data") or {}
                method = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("method")
                metrics = data.get("metrics", {}).get("results/metrics.json", {}).get("data")
                if method and metrics:
                    methods.append(method)
    assert {"wander", "lora", "adapter"} <= set(methods), json.dumps(shown)[:3000]
