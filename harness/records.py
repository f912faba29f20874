"""Run records: keys, provenance (git commit, code hash, versions) and atomic JSON writes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What computes a run (its record key hashes these sources): not the CLI, tables or statistics.
RUN_CODE = ("methods", "harness/backbones", "harness/data", "harness/tasks", "harness/train.py",
            "harness/run.py", "harness/text.py", "harness/settings.py", "harness/pretrain.py",
            "harness/extract.py")
PACKAGES = ("torch", "transformers", "peft", "numpy", "scipy", "pandas", "optuna", "dvc", "ray")


def canonical_hash(document) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def code_hash() -> str:
    """Hash of the Python sources that compute a run (``RUN_CODE``)."""
    digest = hashlib.sha256()
    for entry in RUN_CODE:
        location = PROJECT_ROOT / entry
        files = sorted(location.rglob("*.py")) if location.is_dir() else [location] * location.is_file()
        for path in files:
            digest.update(str(path.relative_to(PROJECT_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *RUN_CODE], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """A stream to a temporary file in ``path``'s folder, renamed over ``path`` when the block
    ends without error (and removed when it fails): readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as stream:
        stream.write(text)


def write_json_atomic(path: str | Path, document) -> None:
    write_text_atomic(path, json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
