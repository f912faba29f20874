"""Shared pieces of the data layer: the loaded-dataset object, safe readers, array checks,
atomic output directories and checksums. Everything that goes wrong raises InputError."""
from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict

from harness.errors import InputError
from harness.records import remove_stale_temporaries, sha256_file, write_error

MANIFEST = "generated.json"   # written by the generators next to the data they write


class LoaderOptions(BaseModel):
    """A family's loader options: the keys of a params.yaml data block (``data.<profile>.<dataset>``)
    besides path / format / max_text_len / in_memory, checked before any data is read (by
    ``params_schema`` for params.yaml, by ``load.load_dataset`` for a direct call). Validators
    that need the dataset's card get it as ``info.context["card"]``, and the format forced by
    ``load_dataset`` (or None) as ``info.context.get("format")``."""
    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)


@dataclass
class LoadedDataset:
    """What every loader returns.

    name    dataset name (a card name: mosi, mosei, iemocap, food101, msrvtt, howto100m)
    format  the on-disk format that was read (e.g. "mult", "mmsa_unaligned", "raw", "mmt")
    path    the file or directory that was read
    splits  split name ("train", "valid", "test") -> torch Dataset yielding dicts
    report  what was found and fixed (counts, dims, lengths, label range, warnings)
    info    what a model needs to know: task, modalities, dims, sequence lengths,
            classes / label range, experts ...
    """

    name: str
    format: str
    path: str
    splits: dict
    report: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def split(self, name: str):
        if name not in self.splits:
            raise InputError("split not available", file=self.path, key=name,
                             expected=sorted(self.splits), found=name)
        return self.splits[name]

    def __repr__(self) -> str:  # short: the splits hold the data
        sizes = {k: len(v) for k, v in self.splits.items()}
        return f"LoadedDataset(name={self.name!r}, format={self.format!r}, splits={sizes})"


# ----------------------------------------------------------------------------- readers

_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError,
                  IndexError, TypeError, KeyError, MemoryError, OverflowError)


def load_pickle(path: Path) -> Any:
    """Read a (trusted, community-format) pickle; truncated or corrupt files -> InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path), key="(file)",
                         expected="an existing pickle file", found="missing")
    try:
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:       # pickles written by Python 2 / old numpy
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except _PICKLE_ERRORS as e:
        raise InputError("cannot read pickle (truncated or corrupt)", file=str(path),
                         key="(whole file)", expected="a complete pickle",
                         found=f"{type(e).__name__}: {str(e)[:200]}") from None


def load_json(path: Path, *, lines: bool = False) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path), key="(file)",
                         expected="an existing JSON file", found="missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError("cannot read file", file=str(path), key="(whole file)",
                         expected="UTF-8 JSON", found=f"{type(e).__name__}: {e}") from None
    if not lines:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError("invalid JSON", file=str(path), key=f"line {e.lineno}",
                             expected="valid JSON", found=e.msg) from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError("invalid JSON line", file=str(path), key=f"line {i}",
                             expected="one JSON object per line", found=e.msg) from None
    return out


def load_npy(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path), key="(file)",
                         expected="an existing .npy file", found="missing")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError("cannot read .npy (truncated or corrupt)", file=str(path),
                         key="(whole file)", expected="a valid .npy array",
                         found=f"{type(e).__name__}: {str(e)[:200]}") from None


def read_manifest(root: Path) -> dict | None:
    """The generator's manifest, when the data was generated by harness.data.generate."""
    root = Path(root)
    p = (root if root.is_dir() else root.parent) / MANIFEST
    if not p.is_file():
        return None
    m = load_json(p)
    if not isinstance(m, dict):
        raise InputError("generator manifest is not a mapping", file=str(p), key="(root)",
                         expected="a JSON object", found=type(m).__name__)
    return m


# ----------------------------------------------------------------------------- reads kept in memory

class ReadMemo:
    """What this process has read from files, reused while the file is unchanged: a sweep worker
    runs many rows on the same data, and a loader that reads a file per item (MSR-VTT's HDF5
    videos, Food-101's images) would otherwise read every file again for every run. Up to
    ``limit`` bytes of values are kept; the least recently used are dropped first."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.kept: collections.OrderedDict = collections.OrderedDict()  # key: (file, value, bytes)

    def read(self, path: Path, how: tuple, read: Callable[[], Any],
             nbytes: Callable[[Any], int]) -> Any:
        """``read()``: the value read from the file at ``path`` in the way ``how`` names (the
        reader's options), memoised while the file is the same (inode, size, modification and
        change times: any write changes them). The value is shared by every caller: they must
        not modify it. A file that cannot be stat'ed is read as without the memo (its error
        raised by ``read``)."""
        try:
            stat = os.stat(path)
        except OSError:
            return read()
        key = (str(path), how)
        file = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        kept = self.kept.get(key)
        if kept is not None and kept[0] == file:
            self.kept.move_to_end(key)
            return kept[1]
        value = read()
        self.forget(key)
        self.kept[key] = (file, value, nbytes(value))
        self.used += self.kept[key][2]
        while self.used > self.limit:
            self.forget(next(iter(self.kept)))
        return value

    def forget(self, key: tuple) -> None:
        entry = self.kept.pop(key, None)
        if entry is not None:
            self.used -= entry[2]


FILE_READS = ReadMemo(limit=1 << 30)  # the loaders' per-item file reads, per process


# ----------------------------------------------------------------------------- arrays

def decode(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if isinstance(x, np.ndarray):
        if x.ndim == 0:
            return decode(x.item())
        return "/".join(decode(v) for v in x.tolist())
    if isinstance(x, (list, tuple)):
        return "/".join(decode(v) for v in x)
    return str(x)


def float_array(x: Any, *, file: str, key: str, ndim: int, what: str) -> np.ndarray:
    """Numeric array of the given rank as float32 (writable; copied only when needed)."""
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise InputError("not an array", file=file, key=key, expected=what,
                         found=f"{type(x).__name__} ({e})") from None
    if a.dtype.kind not in "fiub":
        raise InputError("not a numeric array", file=file, key=key, expected=what,
                         found=f"dtype {a.dtype}, shape {a.shape}")
    if a.ndim != ndim:
        raise InputError("wrong array rank", file=file, key=key, expected=what,
                         found=f"shape {a.shape}")
    out = a.astype(np.float32, copy=False)
    if not out.flags.writeable:
        out = out.copy()
    return out


def check_finite(a: np.ndarray, *, file: str, key: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        n_nan = int(np.isnan(a).sum())
        n_pinf = int(np.isposinf(a).sum())
        n_ninf = int(np.isneginf(a).sum())
        raise InputError("non-finite feature values", file=file, key=key,
                         expected="finite values",
                         found=f"{n_nan} NaN, {n_pinf} +inf, {n_ninf} -inf")


def length_stats(lengths: Iterable[int]) -> dict:
    arr = np.asarray(list(lengths), dtype=np.int64)
    if arr.size == 0:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(arr.min()), "max": int(arr.max()), "mean": round(float(arr.mean()), 3)}


def list_dir(path: Path, limit: int = 12) -> str:
    path = Path(path)
    if not path.exists():
        return "path does not exist"
    if path.is_file():
        return f"a file ({path.name})"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "an empty directory"
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return "entries " + ", ".join(names[:limit]) + more


def split_index(i: int, n: int, unit: str = "samples") -> int:
    """Item ``i`` of a split of ``n`` (negative counts from the end), or IndexError."""
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a split of {n} {unit}")
    return i


# ----------------------------------------------------------------------------- checksums

def verify_checksums(checksums: dict, root: Path, card_file: str) -> dict:
    """checksums: {relative path: sha256}. Every listed file must exist and match."""
    root = Path(root)
    base = root if root.is_dir() else root.parent
    done = {}
    for rel, want in (checksums or {}).items():
        p = base / rel
        if not p.is_file():
            raise InputError("file listed in the card's checksums is missing", file=str(p),
                             key=f"checksums.{rel}", expected=f"a file with sha256 {want}",
                             found="missing")
        got = sha256_file(p)
        if got != str(want).lower():
            raise InputError("checksum mismatch", file=str(p), key=f"checksums.{rel}",
                             expected=f"sha256 {want} (card {card_file})", found=f"sha256 {got}")
        done[rel] = "ok"
    return done


# ----------------------------------------------------------------------------- output

class AtomicDir:
    """Build a directory under a temporary name, then move it into place in one step.

    On any exception the temporary directory is removed (and so is any parent directory
    this object created), so a failed generation leaves nothing behind. A process killed
    midway (SIGKILL) cannot clean up: its ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>``
    folders are removed by the next ``AtomicDir`` of the same name, once that pid is gone."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir).absolute()
        self.tmp: Path | None = None
        self._created: list[Path] = []

    def __enter__(self) -> Path:
        missing = []
        p = self.out_dir.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                self._created.append(d)
            for kind in ("tmp", "old"):
                remove_stale_temporaries(self.out_dir.parent, f".{self.out_dir.name}.{kind}-")
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-{os.getpid()}-",
                                             dir=self.out_dir.parent))
        except OSError as error:
            raise write_error(self.out_dir, error) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    pass
            if issubclass(exc_type, OSError):  # disk full, permissions: named, exit 2
                raise write_error(self.out_dir, exc) from None
            return False
        try:
            if self.out_dir.exists():
                old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
                os.replace(self.out_dir, old)
                os.replace(self.tmp, self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.out_dir)
        except OSError as error:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise write_error(self.out_dir, error) from None
        return False


def check_replaceable(out_dir: Path) -> None:
    """Generators only replace an empty directory or one they generated before."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output path is a file", file=str(out_dir), key="out_dir",
                         expected="a directory (new, empty or previously generated)",
                         found="a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise InputError("refusing to overwrite a non-generated data directory",
                         file=str(out_dir), key="out_dir",
                         expected=f"an empty directory or one holding {MANIFEST}",
                         found=list_dir(out_dir))


# ----------------------------------------------------------------------------- format detection

def require_path(path: Path, expected: str) -> None:
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()}: " \
                                               "run from the project folder, or `dvc repro` first)"
        raise InputError(f"data path not found{where}", file=str(path), key="path",
                         expected=expected, found="missing")


def pick_format(card, found: list[tuple[str, Any]], forced: str | None, where: Path,
                describe) -> tuple[str, Any]:
    """The (format, location) to read among the ``found`` layouts: the forced one if given (an
    error when its layout is not there), else the first; ``describe(fmt)`` says what a format's
    layout looks like."""
    if forced is not None:
        for fmt, location in found:
            if fmt == forced:
                return fmt, location
        other = [fmt for fmt, _ in found]
        raise InputError(f"forced format {forced!r} not found (wrong format forced?)",
                         file=str(where), key="format", expected=describe(forced),
                         found=(f"the layout of format(s) {other}" if other else list_dir(where)))
    if not found:
        raise InputError(f"no {card.name} format recognised", file=str(where), key="format",
                         expected="one of: " + "; ".join(describe(f) for f in card.formats),
                         found=list_dir(where))
    return found[0]
