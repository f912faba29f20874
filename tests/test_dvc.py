"""The user's main job through DVC, in a temporary git + DVC copy of the project: `dvc repro`
twice (the second does nothing), `dvc exp run -S method=wander`, a queue of two experiments run
by `dvc queue start -j 2`, `dvc exp show` and `dvc metrics diff` between two commits."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def sh(*command, cwd, check=True):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The tracked files of the project, with a small study, committed in a fresh git repo."""
    folder = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if name.startswith("results/"):
            continue  # start from no results
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params.update(datasets=["mosi"], seeds=[0, 1], method="all")
    params["grid"] = {"mosi": [{"method": "linear"}, {"method": "lora", "rank": 4},
                               {"method": "adapter", "down_dim": 8}, {"method": "wander", "down_dim": 8}]}
    params["profiles"]["tiny"]["train"].update(epochs=1)
    params["pretrain"]["profiles"]["tiny"].update(epochs=1)
    params["search"].update(trials=2, space={"wander": {"down_dim": [4, 8]}})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=folder)
    sh("git", "config", "user.email", "test@example.com", cwd=folder)
    sh("git", "config", "user.name", "test", cwd=folder)
    sh("git", "add", "-A", cwd=folder)
    sh("git", "commit", "-qm", "small study", cwd=folder)
    return folder


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
