"""Tiny models run fastest single-threaded; two threads on a 2-core machine only add contention.

The suite has no side effects on the checkout: in a git checkout, `git status`, `dvc status` and
the names, sizes and modification times of the files git ignores under datasets/ and results/
(the pipeline's outputs: generated data, feature caches; a rewrite in place changes no status)
are read when the session starts and again when it ends, and a difference fails the run with
both states printed (tests write under pytest's temporary folders, never into results/,
datasets/ or params.yaml). This covers every test the session ran, the slow ones included."""
import difflib
import os
import subprocess

import pytest
import torch

from helpers import DVC_ENV, ROOT, project_with_inputs

torch.set_num_threads(1)

ENV = {**os.environ, **DVC_ENV}
BEFORE = pytest.StashKey[tuple]()


def ignored_outputs() -> str:
    """One line per file git ignores under datasets/ and results/: path, size, mtime (lock files
    left by a sweep's run locks excepted)."""
    listed = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "-z",
                             "datasets", "results"], cwd=ROOT, capture_output=True, text=True,
                            check=True, env=ENV).stdout
    lines = []
    for name in sorted(filter(None, listed.split("\0"))):
        if "/.locks/" in name or "__pycache__" in name:
            continue
        try:
            stat = (ROOT / name).stat()
        except FileNotFoundError:  # removed while listed
            continue
        lines.append(f"{name} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(lines)


def checkout_state() -> tuple[str, str, str]:
    git = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored=no"],
                         cwd=ROOT, capture_output=True, text=True, check=True, env=ENV).stdout
    dvc = subprocess.run(["dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True,
                         env=ENV).stdout
    return git, dvc, ignored_outputs()


def pytest_sessionstart(session):
    if (ROOT / ".git").exists():
        session.stash[BEFORE] = checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = session.stash.get(BEFORE, None)
    if before is None:
        return
    after = checkout_state()
    if after != before:
        for what, old, new in zip(("git status", "dvc status", "ignored outputs"), before, after):
            if old != new:
                changes = difflib.unified_diff(old.splitlines(), new.splitlines(), "before",
                                               "after", lineterm="", n=0)
                print(f"\nthe test session changed the checkout ({what}):\n" + "\n".join(changes))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def reproduced_inputs(tmp_path_factory):
    """The project with its data@, pretrain@ and extract@ stages reproduced
    (``helpers.project_with_inputs``), shared by the end-to-end DVC tests."""
    return project_with_inputs(tmp_path_factory.mktemp("project"))
