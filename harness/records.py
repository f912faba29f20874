"""Run records: provenance (git commit, code hash, package versions, lock), strict JSON, and the
one home of the project's file helpers: atomic writes, the streamed sha256 of a file or a tree and
the canonical-JSON hash (every module that writes a result or hashes a file uses these)."""
from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from harness.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What computes a run: every module ``harness.run`` imports, directly or not
# (tests/test_architecture.py checks it); not the stages, tables or statistics. A run key hashes
# these files outside methods/ and, of methods/, only its method's code (``code_hash``).
RUN_CODE = ("methods", "harness/backbones", "harness/data", "harness/tasks", "harness/errors.py",
            "harness/train.py", "harness/optim.py", "harness/text.py", "harness/settings.py",
            "harness/params_file.py", "harness/params_schema.py", "harness/checkpoints.py",
            "harness/features.py", "harness/run.py")
CHUNK = 1 << 20  # bytes read at a time when hashing a file
PACKAGES = ("torch", "transformers", "numpy", "scipy", "pandas", "optuna", "dvc", "ray")
# The packages whose versions can change a run's numbers: their versions are in every run key, so
# records made under another environment are never read back as these.
COMPUTE_PACKAGES = ("torch", "transformers", "numpy")
# Exact versions of every package of the install (scripts/refresh_lock.sh writes it)
LOCK_FILE = PROJECT_ROOT / "requirements-lock.txt"


def canonical_hash(document) -> str:
    """sha256 of ``document`` as JSON with sorted keys (``str`` for what JSON cannot hold)."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def update_with_file(digest, path: str | Path) -> None:
    """Feed the bytes of ``path`` to ``digest``, a block at a time."""
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()


_TREE_MEMO: dict[tuple, str] = {}
# {("tree", resolved path) | ("code", sources) | ("git",): hash or commit} while inputs are held
# fixed (``inputs_fixed``), else None
_FIXED: dict[tuple, str | None] | None = None


@contextlib.contextmanager
def inputs_fixed():
    """Within the block the data and code a run key hashes are taken as unchanged once hashed:
    ``tree_hash`` of a path and ``code_hash`` of a method's sources hashed before return that
    hash without reading the files again (and ``git_commit`` is asked once). A sweep asks for each run's key several times and each
    key hashes its data folder (a stat of every file: 7 ms for Food-101's images) and the harness
    code (3 ms), x 316 runs x 6 asks; neither changes while it runs. Worker processes forked
    inside the block inherit what was hashed. Nested blocks share the outer one."""
    global _FIXED
    if _FIXED is not None:
        yield
        return
    _FIXED = {}
    try:
        yield
    finally:
        _FIXED = None


def _fixed(key: tuple, compute) -> str | None:
    """``compute()``, memoised under ``key`` inside ``inputs_fixed``."""
    if _FIXED is None:
        return compute()
    if key not in _FIXED:
        _FIXED[key] = compute()
    return _FIXED[key]


def tree_hash(path: str | Path) -> str:
    """sha256 over the relative paths and contents of every file under ``path`` (or of one file).
    Memoised in-process on the files' names, sizes and modification times, and on the path alone
    inside ``inputs_fixed``."""
    root = Path(path)
    return _fixed(("tree", str(root.resolve())), lambda: _tree_hash(root))


PROVENANCE_SUFFIX = ".provenance.json"  # beside a checkpoint; .dvcignore leaves it out of DVC's hash


def provenance_path(checkpoint_path: str | Path) -> Path:
    """``<checkpoint>.provenance.json``: how and where the checkpoint was made (not its inputs)."""
    path = Path(checkpoint_path)
    return path.with_name(path.name + PROVENANCE_SUFFIX)


def data_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, following symlinked folders (data are often linked in
    from another disk) except into a folder that holds itself (a symlink loop)."""
    found = []

    def walk(folder: Path, ancestors: frozenset) -> None:
        for entry in os.scandir(folder):
            if entry.is_dir():  # a symlinked folder too
                real = os.path.realpath(entry.path)
                if real not in ancestors:
                    walk(Path(entry.path), ancestors | {real})
            elif entry.is_file():
                found.append(Path(entry.path))

    walk(root, frozenset({os.path.realpath(root)}))
    return sorted(found)


def _tree_hash(root: Path) -> str:
    files = data_files(root) if root.is_dir() else [root]
    signature = (str(root.resolve()),) + tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if signature not in _TREE_MEMO:
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
            update_with_file(digest, p)
        _TREE_MEMO[signature] = digest.hexdigest()
    return _TREE_MEMO[signature]


def harness_code_files() -> list[Path]:
    """The files of ``RUN_CODE`` outside ``methods/``: the harness code every run executes."""
    files = []
    for entry in RUN_CODE:
        location = PROJECT_ROOT / entry
        if entry == "methods" or entry.startswith("methods/"):
            continue  # each method's own files: ``sources`` of ``code_hash`` (per method)
        files += sorted(location.rglob("*.py")) if location.is_dir() else [location] * location.is_file()
    return files


def code_hash(sources: dict | None = None) -> str:
    """Hash of the code that computes a run: the harness code (``harness_code_files``) and
    ``sources``, {module name: source file} of the run's method (``methods.method_sources``: the
    method's modules, what they import and the shared contract). Without ``sources``: the harness
    part only. Modules are named, not located, so a user's method hashes alike on every machine.
    Memoised inside ``inputs_fixed``."""
    sources = sources or {}
    return _fixed(("code", tuple(sorted(sources.items()))), lambda: _code_hash(sources))


def _code_hash(sources: dict) -> str:
    digest = hashlib.sha256()
    for path in harness_code_files():
        digest.update(str(path.relative_to(PROJECT_ROOT)).encode())
        digest.update(path.read_bytes())
    for module, path in sorted(sources.items()):
        digest.update(f"module:{module}".encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def git_commit() -> str | None:
    """HEAD's commit, ``+dirty`` when ``RUN_CODE`` has uncommitted changes (provenance); asked
    once inside ``inputs_fixed``, whose code is taken as unchanged."""
    return _fixed(("git",), _git_commit)


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *RUN_CODE], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=None)
def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (None when not installed), read once per process:
    each read parses the package's metadata (about 20 ms), and a run reads 14 of them."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {"python": platform.python_version(), **{p: installed_version(p) for p in PACKAGES}}


def _public(version: str | None) -> str | None:
    """``2.13.0+cpu`` -> ``2.13.0``: a local build label (CPU / CUDA wheel of one release) is not
    a different release."""
    return version.split("+", 1)[0] if version else version


@functools.lru_cache(maxsize=1)
def compute_versions() -> dict:
    """{package: version} of ``COMPUTE_PACKAGES`` (public versions; None when not installed)."""
    return {package: _public(installed_version(package)) for package in COMPUTE_PACKAGES}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path = None) -> dict[str, str]:
    """{normalised name: version} of the ``name==version`` lines of the lock file."""
    pins = {}
    for line in Path(path or LOCK_FILE).read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep:
            pins[_normalised(name.split("[", 1)[0].strip())] = version.strip()
    return pins


_HEADER_FIELD = re.compile(r"^(Name|Version):[ \t]*(.*?)\s*$", re.M)


def _name_and_version(distribution: metadata.Distribution) -> tuple[str | None, str | None]:
    """A distribution's ``Name`` and ``Version`` from the header block of its core metadata
    (single-line fields before the first blank line): ``distribution.metadata`` parses the whole
    file, long description included, 10x slower (0.5 s for the ~200 packages of the lock)."""
    text = distribution.read_text("METADATA") or distribution.read_text("PKG-INFO") or ""
    fields = dict(_HEADER_FIELD.findall(re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]))
    return fields.get("Name"), fields.get("Version")


def lock_mismatches(path: str | Path = None) -> list[str]:
    """``"name installed (lock pinned)"`` / ``"name missing (lock pinned)"`` for every package of
    the lock whose installed version differs (compute packages first); [] without a lock file
    (e.g. a non-editable install)."""
    path = Path(path or LOCK_FILE)
    if not path.is_file():
        return []
    installed = {}
    for distribution in metadata.distributions():
        name, version = _name_and_version(distribution)
        if name:
            installed.setdefault(_normalised(name), version)
    differ = []
    pins = read_lock(path)
    for name in sorted(pins, key=lambda n: (n not in COMPUTE_PACKAGES, n)):
        have = installed.get(name)
        if have is None:
            differ.append(f"{name} missing (lock {pins[name]})")
        elif _public(have) != _public(pins[name]):
            differ.append(f"{name} {have} (lock {pins[name]})")
    return differ


def lock_warning(path: str | Path = None) -> str | None:
    """One line naming the installed packages that differ from the lock, or None."""
    differ = lock_mismatches(path)
    if not differ:
        return None
    shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
    held = "/".join(COMPUTE_PACKAGES)
    if any(line.split()[0] in COMPUTE_PACKAGES for line in differ):  # compute packages come first
        consequence = (f"run keys hold {held} versions, so the committed study's records may not "
                       "be reused")
    else:
        consequence = f"run keys hold only {held} versions, so the committed study's records are reused"
    return (f"mmpetl: warning: installed packages differ from {Path(path or LOCK_FILE).name}: "
            f"{shown}; {consequence} (python -m pip install -r requirements-lock.txt)")


def strict(document, _where: str = ""):
    """A copy of ``document`` that is strict JSON: each non-finite float (NaN, inf) becomes None
    and its path is listed under ``null_reasons`` of the top-level mapping (why it is null)."""
    reasons: dict[str, str] = {}

    def walk(node, where):
        if isinstance(node, float) and not math.isfinite(node):
            reasons[where or "(value)"] = ("undefined (NaN)" if math.isnan(node)
                                           else f"not finite ({node})")
            return None
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        return node

    cleaned = walk(document, _where)
    if reasons:
        if isinstance(cleaned, dict):
            cleaned["null_reasons"] = {**(cleaned.get("null_reasons") or {}), **reasons}
        else:
            cleaned = {"value": cleaned, "null_reasons": reasons}
    return cleaned


def dumps_strict(document, **options) -> str:
    """``json.dumps`` of ``strict(document)`` (never NaN / Infinity; ``default=str``)."""
    return json.dumps(strict(document), allow_nan=False, default=str, **options)


def host() -> dict:
    """Where something was computed (provenance: kept beside artifacts, never in their bytes).
    The CPU model and torch's vector instruction set are there because float32 kernels round
    differently on other CPUs: the same run there agrees in its inputs, not in its last bits."""
    torch = sys.modules.get("torch")   # only when already imported: no import for provenance
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability() if torch else None,
            "cpus": os.cpu_count(), "python": platform.python_version()}


@functools.cache
def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's on Linux, else what ``platform`` says (read once per
    process: every run record names it)."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def restore_nan(document):
    """Inverse of ``strict`` for reading: each path listed in ``null_reasons`` becomes NaN again
    (statistics leave undefined values out with a note, as they did before JSON was strict)."""
    if not isinstance(document, dict) or not isinstance(document.get("null_reasons"), dict):
        return document  # ``read_run_record`` refuses null_reasons that are not a mapping
    for where, why in document["null_reasons"].items():
        parts = re.findall(r"([^.\[\]]+)|\[(\d+)\]", where)
        node = document
        try:
            for key, index in parts[:-1]:
                node = node[int(index)] if index else node[key]
            key, index = parts[-1]
            if (node[int(index)] if index else node[key]) is None:
                value = float("nan") if "NaN" in why else float(why.split("(")[-1].rstrip(")"))
                node[int(index) if index else key] = value
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    return document


class DuplicateKeyError(ValueError):
    """A JSON object giving one key twice: which of its values counts is not said."""

    def __init__(self, key: str):
        super().__init__(f"the key {key!r} twice in one object")
        self.key = key


def _unique_keys(pairs: list) -> dict:
    """``object_pairs_hook`` of ``read_json``: an object's pairs as a dict, each key once."""
    document = {}
    for key, value in pairs:
        if key in document:
            raise DuplicateKeyError(key)
        document[key] = value
    return document


def read_json(path: str | Path):
    """The JSON document of ``path``, NaN restored (``restore_nan``); an object giving one key
    twice raises DuplicateKeyError (a ValueError, as malformed JSON does)."""
    return restore_nan(json.loads(Path(path).read_text(), object_pairs_hook=_unique_keys))


# What a run record must hold to count as done (``read_run_record``); the rest is provenance
RECORD_FIELDS = {"dataset": str, "method": str, "seed": int, "row": dict, "metrics": dict,
                 "tunable": dict}
TUNABLE_PARTS = ("method", "head")  # the counts of ``tunable`` (``methods.base.count_parameters``)


def metric_range(name: str) -> tuple[float, float] | None:
    """(lowest, highest) value of the metric ``name`` where ``harness.tasks`` fixes it, else None:
    accuracies and F1s are fractions, ``corr`` a correlation, MAE >= 0, the retrieval recalls
    R@K percentages (``rsum`` the sum of six), the ranks MdR / MnR 1-based."""
    if name == "corr":
        return -1.0, 1.0
    if name == "mae":
        return 0.0, math.inf
    if name == "rsum":
        return 0.0, 600.0
    if name.endswith(("_mdr", "_mnr")):
        return 1.0, math.inf
    if re.fullmatch(r"(t2v|v2t)_r\d+", name):
        return 0.0, 100.0
    if any(re.fullmatch(r"acc\d*|f1", part) for part in name.split("_")):
        return 0.0, 1.0
    return None


def _check_metrics(metrics: dict, field: str, path: Path, remedy: str) -> None:
    """Each value of ``metrics`` (a record's ``field``) a finite number within its
    ``metric_range``, or NaN (null in the file, its reason under ``null_reasons``)."""
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            raise InputError("a run record's metric is not a number", file=str(path),
                             key=f"{field}.{name}", expected=f"a finite number ({remedy})",
                             found=repr(value))
        low, high = metric_range(name) or (-math.inf, math.inf)
        if not (math.isnan(value) or low <= value <= high):
            span = f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
            raise InputError("a run record's metric is out of its range", file=str(path),
                             key=f"{field}.{name}", expected=f"a number {span} ({remedy})",
                             found=repr(value))


def read_run_record(path: str | Path) -> dict:
    """A run record, checked: a JSON object, each key once, with ``RECORD_FIELDS`` of their types,
    at least one metric, metrics and validation metrics that are numbers within their range
    (``metric_range``), ``tunable`` counts and ``null_reasons`` a mapping. Anything else (a folder,
    unreadable bytes, truncated or non-object JSON, no metrics) raises InputError naming the file:
    a record that cannot be read is never taken as a done run, nor silently recomputed over
    (delete it to recompute that run)."""
    path = Path(path)
    remedy = "a run record written by mmpetl (delete the file to recompute its run)"
    if path.is_dir():
        raise InputError("a folder where a run record should be", file=str(path),
                         expected=remedy, found="a folder")
    try:
        record = read_json(path)
    except DuplicateKeyError as error:
        raise InputError("a run record gives a key twice", file=str(path), key=error.key,
                         expected=f"each key once ({remedy})", found="twice") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        found = "an empty file" if path.is_file() and path.stat().st_size == 0 else \
            f"{type(error).__name__}: {error}"
        raise InputError("unreadable run record", file=str(path), expected=remedy,
                         found=found) from None
    if not isinstance(record, dict):
        raise InputError("a run record must be a JSON object", file=str(path), expected=remedy,
                         found=type(record).__name__)
    for key, kind in RECORD_FIELDS.items():
        value = record.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError("incomplete run record", file=str(path), key=key,
                             expected=f"{kind.__name__} ({remedy})", found=repr(value))
    if not record["metrics"]:
        raise InputError("a run record without metrics is not a done run", file=str(path),
                         key="metrics", expected=remedy, found="{}")
    for field in ("null_reasons", "valid_metrics"):
        if not isinstance(record.get(field, {}), dict):
            raise InputError("incomplete run record", file=str(path), key=field,
                             expected=f"a mapping ({remedy})", found=repr(record[field]))
    for field in ("metrics", "valid_metrics"):
        _check_metrics(record.get(field, {}), field, path, remedy)
    for part in sorted({*TUNABLE_PARTS, *record["tunable"]}):
        count = record["tunable"].get(part)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InputError("a run record's #tunable is not a count", file=str(path),
                             key=f"tunable.{part}", expected=f"a count >= 0 ({remedy})",
                             found=repr(count))
    # the name says which run it holds (run.record_path: the start of its key last): a record
    # copied, renamed or edited into another run's place would stand in for that run, or leave it
    # missing without a word
    named = f"{row_slug(record['row'])}-seed{record['seed']}-"
    key = str(record.get("key"))
    if path.parent.name != record["dataset"] or not path.stem.startswith(named) \
            or not key.startswith(path.stem[len(named):] or "-"):
        raise InputError("a run record under another run's name", file=str(path),
                         key="dataset, row, seed, key",
                         expected=f"{record['dataset']}/{named}{key[:12]}.json for the run it holds "
                                  f"({remedy})", found=f"{path.parent.name}/{path.name}")
    return record


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is running (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: Path, prefix: str) -> list[Path]:
    """Remove the entries ``<folder>/<prefix><pid>-*`` left by a writer that was killed (its pid
    is no longer running); those of live processes stay. Returns what was removed."""
    import shutil

    removed = []
    for entry in sorted(Path(folder).glob(f"{glob.escape(prefix)}*")):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_error(path: Path, error: OSError):
    """The InputError for an OS error while writing ``path``: names the path and the cause (a
    read-only or full disk, a file where a folder should be, missing permission)."""
    causes = {errno.ENOSPC: "no space left on the device", errno.EROFS: "a read-only file system",
              errno.EACCES: "no permission to write", errno.EPERM: "no permission to write",
              errno.ENOTDIR: "a file where a folder should be",
              errno.EEXIST: "a file where a folder should be",
              errno.EISDIR: "a folder where a file should be",
              errno.EDQUOT: "disk quota exceeded"}
    where = error.filename or path
    return InputError("cannot write", file=str(path), expected="a writable location",
                      found=f"{causes.get(error.errno, error.strerror or type(error).__name__)} "
                            f"({where})")


def _about_writing(error: OSError, path: Path, temporary: Path | None) -> bool:
    """Whether ``error`` concerns writing ``path``: it names no file (a failed write, fsync) or
    names ``path``, its temporary or one of its folders."""
    if error.filename is None:
        return True
    named = Path(os.fsdecode(error.filename)).absolute()
    ours = {path.absolute(), *path.absolute().parents}
    return named in ours or (temporary is not None and named == temporary.absolute())


def require_writable_folder(folder: str | Path, key: str = "--out") -> None:
    """InputError unless ``folder`` is (or can be created as) a folder this process may write,
    checked before any work whose result would go there."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise InputError("the output folder is a dangling link", file=str(existing), key=key,
                             expected="a writable folder", found=f"a link to {os.readlink(existing)}")
        existing = existing.parent
    if not existing.is_dir():
        raise InputError("the output folder is not a folder", file=str(folder), key=key,
                         expected="a writable folder",
                         found=f"{existing} is a file" if existing != folder else "a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError("the output folder is not writable", file=str(folder), key=key,
                         expected="a writable folder", found=f"no write permission on {existing}")


def require_writable_file(path: str | Path, key: str = "--out") -> None:
    """InputError unless ``path`` can be written as a file (written atomically: no folder there,
    its folder writable or creatable), checked before any work whose result would go there."""
    path = Path(path)
    if path.is_dir():
        raise InputError("the output file is a folder", file=str(path), key=key,
                         expected="a writable file", found="a folder")
    try:
        require_writable_folder(path.parent, key)
    except InputError as error:
        raise InputError("the output file's folder cannot be written", file=str(path), key=key,
                         expected="a writable folder", found=f"{error.file}: {error.found}") from None


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary file name in ``path``'s folder for the block to write (by name: h5py, or
    ``atomic_file``'s stream); when the block ends without error the file is synced, given the
    umask's permissions and renamed over ``path``, else removed: readers never see a partial file.
    An OS error while writing (disk full, read-only, a file where a folder should be) becomes an
    InputError naming ``path``. Temporaries are named ``.<name>.<pid>-*.tmp``: those of a killed
    writer are removed by the next write of ``path``."""
    path = Path(path)
    prefix = f".{path.name}."
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        remove_stale_temporaries(path.parent, prefix)
        # named before it is created (one os.open, where tempfile.mkstemp runs Python code between
        # creating the file and returning its name): a stop signal raising at any point from here
        # on leaves no temporary behind, the finally below removes it
        temporary = path.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(8)}.tmp"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            temporary = None  # another writer's file of the same name: not ours to remove
            raise
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())  # created 0600 above: follow the umask
        os.replace(temporary, path)
    except OSError as error:
        if not _about_writing(error, path, temporary):
            raise  # e.g. an input the block reads: not this write's error
        raise write_error(path, error) from None
    finally:
        if temporary is not None and temporary.exists():
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """A stream to a temporary file, renamed over ``path`` when the block ends without error."""
    with atomic_path(path) as temporary, open(temporary, mode) as stream:
        yield stream


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as stream:
        stream.write(text)


def write_json_atomic(path: str | Path, document) -> None:
    write_text_atomic(path, dumps_strict(document, indent=2, sort_keys=True) + "\n")


# How a grid row's config fields read in a row slug (record file names, leaderboards, metrics.json)
SLUG_ABBREV = {"down_dim": "d", "rank": "r", "rank_h": "rh", "rank_t": "rt"}


def row_slug(row) -> str:
    """Short readable name of a grid row: wander_d16, lora_r16, wander_code_d16,
    maple_source-text, wander_d16_nonlinearity-off, wander_d16_rt4. Used in record file names
    (``harness.run.record_path``), the leaderboards and results/metrics*.json."""
    parts = [str(row["method"])]
    if row.get("variant", "paper") != "paper":
        parts.append(str(row["variant"]))
    for key in sorted(k for k in row if k not in ("method", "variant")):
        value = row[key]
        if key in SLUG_ABBREV:
            parts.append(f"{SLUG_ABBREV[key]}{value}")
        elif isinstance(value, bool):
            parts.append(f"{key}-{'on' if value else 'off'}")
        else:
            parts.append(f"{key}-{value}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", "_".join(parts))
