"""The test suite has no side effects on the checkout: after it, `git status` and `dvc status`
show exactly what they showed before (tests write under pytest's temporary folders, never into
results/, datasets/ or params.yaml)."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _state() -> tuple[str, str]:
    git = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored=no"],
                         cwd=ROOT, capture_output=True, text=True, check=True, env=ENV).stdout
    dvc = subprocess.run(["dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True,
                         env=ENV).stdout
    return git, dvc


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMPETL_NESTED_SUITE") == "1", reason="inside the nested run")
def test_suite_leaves_git_and_dvc_status_unchanged():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    before = _state()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             "--ignore", str(ROOT / "tests" / "test_clean_checkout.py")],
                            cwd=ROOT, capture_output=True, text=True,
                            env={**ENV, "MMPETL_NESTED_SUITE": "1"})
    assert result.returncode == 0, result.stdout[-3000:]
    after = _state()
    assert after[0] == before[0], f"git status changed:\nbefore:\n{before[0]}\nafter:\n{after[0]}"
    assert after[1] == before[1], f"dvc status changed:\nbefore:\n{before[1]}\nafter:\n{after[1]}"
