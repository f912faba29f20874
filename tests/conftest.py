"""Tiny models run fastest single-threaded; two threads on a 2-core machine only add contention.

The suite has no side effects on the checkout: in a git checkout, `git status` and `dvc status`
are read when the session starts and again when it ends, and a difference fails the run with
both states printed (tests write under pytest's temporary folders, never into results/,
datasets/ or params.yaml). This covers every test the session ran, the slow ones included."""
import os
import subprocess

import pytest
import torch

from helpers import ROOT

torch.set_num_threads(1)

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
BEFORE = pytest.StashKey[tuple]()


def checkout_state() -> tuple[str, str]:
    git = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored=no"],
                         cwd=ROOT, capture_output=True, text=True, check=True, env=ENV).stdout
    dvc = subprocess.run(["dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True,
                         env=ENV).stdout
    return git, dvc


def pytest_sessionstart(session):
    if (ROOT / ".git").exists():
        session.stash[BEFORE] = checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = session.stash.get(BEFORE, None)
    if before is None:
        return
    after = checkout_state()
    if after != before:
        for what, old, new in zip(("git status", "dvc status"), before, after):
            if old != new:
                print(f"\nthe test session changed the checkout ({what}):\nbefore:\n{old}\n"
                      f"after:\n{new}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
