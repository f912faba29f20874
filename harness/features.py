"""The feature cache: frozen encoders' outputs, computed once (the ``extract@<dataset>`` stage,
``harness.extract``, fills it before fine-tuning; a run fills what is missing).

When a method leaves every encoder untouched (Wander with ``insert: last``, the linear probe), the
per-modality token states the encoders produce for an item never change during fine-tuning: they
are computed once, stored in fp16, and fine-tuning reads them instead of re-running the encoders.

What is stored, per item: the token states right BEFORE the last-layer fusion hook point, i.e. what
``backbone.encode(batch)`` returns with no method attached (after the last layer and the final
norms), in eval mode (dropout inside the frozen encoders is off: fine-tuning from the cache trains
the head as if the encoders ran in eval mode), plus the masks the head needs, the label and the
item index.

Main API
--------
cacheable(backbone) -> bool
    True when the backbone's attached method leaves the encoders untouched: no prompts, no
    adapters, every linear site still a plain ``nn.Linear`` (no LoRA / Aurora), no foreign forward
    hooks inside the encoders, fusion hooks only after the last layer, and every parameter outside
    ``head.*`` and that last fusion hook frozen. ``cache_problems(backbone)`` lists why not;
    ``require_cacheable(backbone)`` raises ``NotCacheable`` (an ``InputError``) with the reasons.
encoder_hash(backbone) -> str
    sha256 of the backbone's class, config (and its HF towers' configs), the backbone code, the
    torch / transformers versions, the identity of every pretrained tower it was built from
    (model name, ``weights_sha256`` of the loaded state dict, ``tokenizer_sha256``; see
    ``harness.backbones.pretrained``) and every parameter and buffer outside ``head.*`` and
    ``fusion_hooks.*`` (the frozen encoder state).
extract_features(backbone, dataset_split, cache_path, data_hash, batch_size=64, progress=True)
    -> CachedFeatures
    Reuses ``cache_path`` when its stored encoder hash and data hash equal the current ones;
    otherwise (missing, stale or unreadable) computes the states, with a tqdm progress bar on
    stderr, and writes the file atomically (temporary file in the same folder, then rename).
    ``.status`` on the result says which ("reused", "computed: missing", "recomputed: ...").
CachedFeatures(path, in_memory=None)
    ``torch.utils.data.Dataset`` over one cache file; items are dicts with ``feat_<m>``
    (L_m, D_m) float16, ``mask_<m>`` (L_m,) bool where the backbone has a mask for ``m``,
    ``label`` and ``index``. Torch's default collate batches them; ``batch(indices)`` gives the
    same batch by indexing the in-memory arrays once (``harness.train.batches`` uses it).
FromCache(backbone)
    ``nn.Module`` whose ``forward(batch)`` takes a batch of ``CachedFeatures`` items and runs only
    the last-depth fusion hook (if any) and the head; it shares them with ``backbone`` (training
    it trains the backbone's head and hook) and holds no reference to the encoders as
    sub-modules, so ``.to(device)`` moves only what trains. Refuses non-cacheable backbones.
cached_splits(backbone, splits, cache_dir, data_hashes, batch_size=64, progress=True)
    -> (FromCache, {split: CachedFeatures}, info)
    Everything fine-tuning needs to train from the cache: files at
    ``cache_dir/<encoder_hash[:16]>-<data[:8]>/<split>.h5`` (``data``: the hash of the splits'
    data hashes; one folder per encoder state and data, so seeds with different random towers,
    and a run on another data folder of the dataset, do not overwrite each other's caches).
plan_data_hashes(plan, data, vocab) -> dict
    The per-split data hashes a run plan's caches are keyed on.
split_hash(data, split, **options) -> str
    The data hash of one split: the dataset's content hash (``data.report["data_hash"]`` when the
    loader provides one, else a sha256 over every file under ``data.path``) + format + split name +
    whatever else shapes the items (loader options, vocabulary, ``max_text_len``).

File format: one HDF5 file per split (h5py). Datasets ``feat_<m>`` (N, L_m, D_m) float16,
``mask_<m>`` (N, L_m) bool, ``label`` (N, ...), ``index`` (N,); attribute ``meta``: JSON with
format, version, encoder_hash, data_hash, backbone class, modalities, n, shapes, dtype, the
fields and ``content_hash`` (``content_hash``: sha256 of the stored arrays, computed when the file
is written; a cache whose arrays no longer match it (labels or features altered) is recomputed,
and one holding NaN or infinity where the hash matches is refused, CacheError naming the file).
No time, host or installed versions: the same encoder and data give the same bytes. Files
up to ``IN_MEMORY_LIMIT`` bytes are read into memory; larger ones are read item by item
(paper-size Food-101 features do not fit in RAM).

Backbones: two-tower (Food-101) and late-fusion (MOSI / IEMOCAP / MOSEI), both implement
``encode``. MMT is not supported (it has no ``encode``; ``cacheable`` says so).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from harness.backbones.pretrained import tensors_sha256
from harness.errors import InputError
from harness.records import atomic_path, canonical_hash, installed_version, tree_hash

log = logging.getLogger(__name__)

FORMAT = "mmpetl-features"
VERSION = 2  # 2: meta holds content_hash
FEATURE_PREFIX = "feat_"
MASK_PREFIX = "mask_"
KEEP_FIELDS = ("label", "index", "label_class")  # per-item fields carried into the cache
TRAINABLE_PREFIXES = ("head.", "fusion_hooks.")  # never part of the encoder state
FEATURES_DIR = Path("datasets/features")        # where the pipeline keeps the caches
IN_MEMORY_LIMIT = 4 << 30                        # bytes; larger caches are read lazily
STORAGE_DTYPE = torch.float16
ENCODER_CODE = ("base.py", "layers.py")          # harness/backbones files every encoder uses


class NotCacheable(InputError):
    """The method attached to a backbone changes what its encoders compute."""


class CacheError(InputError):
    """A feature cache file is unreadable, of another format, or stale where freshness is required."""


# --- what may be cached --------------------------------------------------------------------------
def _last(backbone: nn.Module) -> str:
    return str(backbone.depth - 1)


def _outside_head(name: str) -> bool:
    return not name.startswith(TRAINABLE_PREFIXES)


def _count(names: list[str], what: str) -> str:
    return f"{len(names)} {what} ({names[0]}{', ...' if len(names) > 1 else ''})"


def cache_problems(backbone: nn.Module, require_frozen: bool = True) -> list[str]:
    """Why the encoders' outputs of ``backbone`` cannot be computed once (empty list: they can).

    ``require_frozen=False`` checks the structure only (what extraction needs: a backbone fresh
    from its builder has every parameter trainable, but its encoders compute the same thing).
    """
    kind = type(backbone).__name__
    missing = [a for a in ("encode", "modalities", "depth", "fusion_hooks", "head")
               if not hasattr(backbone, a)]
    if missing:
        return [f"backbone {kind} has no {', '.join(missing)}: feature caching supports backbones "
                f"that implement encode() (two-tower, late-fusion), not MMT"]
    problems = []
    if getattr(backbone, "prompts", None) is not None:
        problems.append(f"prompts are attached ({type(backbone.prompts).__name__}): they are "
                        f"prepended inside every encoder layer (P-tuning, MaPLe, PMF)")
    last = _last(backbone)
    for depth in backbone.fusion_hooks:
        if depth != last:
            problems.append(f"fusion hook after layer {depth} (only a hook after the last layer, "
                            f"{last}, sees the encoders' final outputs; Wander insert=every)")
    changed: dict[str, list[str]] = {}
    for site in backbone.linear_sites():
        module = backbone.get_submodule(site.path)
        if type(module) is not nn.Linear:
            changed.setdefault(f"{type(module).__module__}.{type(module).__name__}", []).append(site.path)
    for kind_name, paths in changed.items():
        problems.append(f"{_count(paths, 'linear site(s)')} replaced by {kind_name}, not a "
                        f"plain nn.Linear (LoRA, Aurora)")
    own = type(backbone).__module__
    adapters: dict[str, list[str]] = {}
    hooks: dict[str, list[str]] = {}
    for name, module in backbone.named_modules():
        if not name or not _outside_head(name + "."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("adapter") and not isinstance(module, nn.Identity):
            adapters.setdefault(type(module).__name__, []).append(name)
        for kind_, registered in (("forward hook", module._forward_hooks),
                                  ("forward pre-hook", module._forward_pre_hooks)):
            for hook in registered.values():
                if getattr(hook, "__module__", None) != own:
                    key = (f"{kind_} {getattr(hook, '__qualname__', hook)!r} "
                           f"({getattr(hook, '__module__', '?')})")
                    hooks.setdefault(key, []).append(name)
    for kind_name, paths in adapters.items():
        problems.append(f"{_count(paths, f'{kind_name} adapter(s)')} inside the encoders")
    for key, paths in hooks.items():
        problems.append(f"{key} on {_count(paths, 'encoder module(s)')}")
    if require_frozen:
        trainable = [n for n, p in backbone.named_parameters()
                     if p.requires_grad and _outside_head(n)
                     and not n.startswith(f"fusion_hooks.{last}.")]
        if trainable:
            problems.append(f"{_count(trainable, 'encoder parameter(s)')} train under this method")
    return problems


def cacheable(backbone: nn.Module) -> bool:
    """Whether fine-tuning ``backbone`` (with its method attached) can read cached encoder states."""
    return not cache_problems(backbone)


def require_cacheable(backbone: nn.Module, require_frozen: bool = True) -> None:
    problems = cache_problems(backbone, require_frozen)
    if problems:
        raise NotCacheable("the encoders' outputs cannot be cached for this backbone and method: "
                           + "; ".join(problems), key="features",
                           expected="frozen, unmodified encoders (Wander insert=last, linear)",
                           found=f"{len(problems)} problem(s)")


# --- hashes --------------------------------------------------------------------------------------
def _config_document(backbone: nn.Module) -> dict:
    config = getattr(backbone, "config", None)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    towers = {}
    encoders = getattr(backbone, "encoders", {})
    for name in sorted(encoders.keys()) if hasattr(encoders, "keys") else []:
        tower_config = getattr(encoders[name], "config", None)
        if hasattr(tower_config, "to_dict"):  # a transformers tower: its own config matters too
            towers[name] = {k: v for k, v in tower_config.to_dict().items()
                            if not k.startswith("_") and k != "transformers_version"}
    return {"config": config, "towers": towers}


def _code_hash(backbone: nn.Module) -> str:
    import inspect

    digest = hashlib.sha256()
    files = [Path(inspect.getsourcefile(type(backbone)))]
    files += [files[0].parent / name for name in ENCODER_CODE]
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def encoder_state_hash(backbone: nn.Module) -> str:
    """``tensors_sha256`` of every parameter and buffer outside ``head.*`` / ``fusion_hooks.*``."""
    tensors = {**dict(backbone.named_parameters()), **dict(backbone.named_buffers())}
    return tensors_sha256({name: t for name, t in tensors.items() if _outside_head(name)})


def pretrained_identity(backbone: nn.Module) -> dict:
    """{module path: identity} of the pretrained towers inside ``backbone`` (their
    ``load_report`` carries the loader's weights / tokenizer hashes); empty when none."""
    found = {}
    for name, module in backbone.named_modules():
        report = getattr(module, "load_report", None)
        if isinstance(report, dict) and "weights_sha256" in report:
            found[name] = {k: report[k] for k in ("model", "architecture", "weights_sha256",
                                                  "tokenizer_sha256") if k in report}
    return found


def encoder_hash(backbone: nn.Module) -> str:
    """The encoder config hash a cache is valid for (see the module docstring)."""
    document = {"backbone": type(backbone).__name__, **_config_document(backbone),
                "code": _code_hash(backbone), "torch": torch.__version__.split("+")[0],
                # the installed version, read once per process without importing transformers
                "transformers": installed_version("transformers"),
                "state": encoder_state_hash(backbone), "pretrained": pretrained_identity(backbone),
                "storage": str(STORAGE_DTYPE), "format_version": VERSION}
    return canonical_hash(document)


def split_hash(data, split: str, **options) -> str:
    """Data hash of split ``split`` of a ``LoadedDataset`` (see the module docstring)."""
    content = data.report.get("data_hash") or tree_hash(data.path)
    return canonical_hash({"content": content, "dataset": data.name, "format": data.format,
                           "split": split, "options": options})


# --- extraction ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _bare(backbone: nn.Module):
    """Eval mode, no grad, and the last-depth fusion hook detached (restored afterwards)."""
    was_training = backbone.training
    last = _last(backbone)
    hook = backbone.fusion_hooks[last] if last in backbone.fusion_hooks else None
    if hook is not None:
        del backbone.fusion_hooks[last]
    backbone.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if hook is not None:
            backbone.fusion_hooks[last] = hook
        backbone.train(was_training)


def _encode_with_masks(backbone: nn.Module, batch: dict) -> tuple[dict, dict]:
    """States before the last fusion hook point and the masks the head reads (None dropped)."""
    if hasattr(backbone, "_encode"):  # two-tower: the text mask padded to max_text_len
        states, valid = backbone._encode(batch)
    else:
        states = backbone.encode(batch)
        valid = {m: batch.get(f"{MASK_PREFIX}{m}") for m in backbone.modalities}
    return states, {m: v for m, v in valid.items() if v is not None}


def _device_of(backbone: nn.Module) -> torch.device:
    parameter = next(backbone.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _read_meta(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            meta = json.loads(f.attrs["meta"])
            for field in meta["fields"]:
                if f[field].shape[0] != meta["n"]:
                    raise ValueError(f"{field} has {f[field].shape[0]} rows, meta says {meta['n']}")
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CacheError(f"unreadable feature cache ({type(error).__name__}: {error})",
                         file=str(path)) from error
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CacheError("not a feature cache of this version", file=str(path), key="meta.format",
                         expected=f"{FORMAT} v{VERSION}",
                         found=f"{meta.get('format')} v{meta.get('version')}")
    return meta


ROWS_PER_BLOCK = 4096  # items read at a time when hashing a cache


def content_hash(f, fields) -> tuple[str, str | None]:
    """(sha256 over each stored array of the open HDF5 file ``f``: its name, dtype, shape and
    C-order bytes, fields in sorted order; the first float field holding NaN or infinity, or
    None). Read ``ROWS_PER_BLOCK`` items at a time, so paper-size caches need not fit in memory."""
    digest, non_finite = hashlib.sha256(), None
    for name in sorted(fields):
        stored = f[name]
        digest.update(f"{name}|{stored.dtype.str}|{tuple(stored.shape)}".encode())
        for start in range(0, stored.shape[0], ROWS_PER_BLOCK):
            block = np.ascontiguousarray(stored[start: start + ROWS_PER_BLOCK])
            digest.update(block.tobytes())
            if non_finite is None and block.dtype.kind == "f" and not np.isfinite(block).all():
                non_finite = name
    return digest.hexdigest(), non_finite


def verify_content(path: Path, meta: dict) -> str | None:
    """None when the arrays stored in ``path`` hash to its ``meta["content_hash"]``, else why not;
    CacheError (naming the file and field) when they match but hold NaN or infinity."""
    import h5py

    with h5py.File(path, "r") as f:
        found, non_finite = content_hash(f, meta["fields"])
    if found != meta.get("content_hash"):
        return (f"stored arrays altered: content hash {found[:12]} != recorded "
                f"{str(meta.get('content_hash'))[:12]}")
    if non_finite is not None:
        raise CacheError("NaN or infinity in a feature cache (delete the file to recompute it)",
                         file=str(path), key=non_finite, expected="finite values",
                         found="non-finite values")
    return None


def cache_status(cache_path: str | Path, encoder_hash_: str, data_hash: str) -> str | None:
    """None when ``cache_path`` is a valid cache for these hashes and its stored arrays are the
    ones written (``verify_content``), else why it is not."""
    path = Path(cache_path)
    if not path.is_file():
        return "missing"
    try:
        meta = _read_meta(path)
    except CacheError as error:
        return str(error)
    stale = [f"{key} {str(meta.get(key))[:12]} != current {value[:12]}"
             for key, value in (("encoder_hash", encoder_hash_), ("data_hash", data_hash))
             if meta.get(key) != value]
    return "; ".join(stale) or verify_content(path, meta)


# Caches this process has read and checked, reused while their file is unchanged: a sweep worker
# runs many rows on one cache, and each check reads and hashes every array (3 file opens per split)
_LOADED: collections.OrderedDict = collections.OrderedDict()  # {path: (key, CachedFeatures)}


def _loaded_key(path: Path, encoder_hash_: str, data_hash: str) -> tuple:
    """What a loaded cache is valid for: the hashes asked for and the file as it was read (inode,
    size, modification and change times: any write changes them)."""
    stat = path.stat()
    return encoder_hash_, data_hash, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _remember(features: "CachedFeatures", key: tuple) -> None:
    """Keep an in-memory cache for this process, oldest dropped first beyond IN_MEMORY_LIMIT."""
    if not features.in_memory:
        return
    _LOADED.pop(str(features.path), None)
    _LOADED[str(features.path)] = (key, features)
    while sum(f.nbytes for _, f in _LOADED.values()) > IN_MEMORY_LIMIT:
        _LOADED.popitem(last=False)


def extract_features(backbone: nn.Module, dataset_split: Dataset, cache_path: str | Path,
                     data_hash: str, batch_size: int = 64, progress: bool = True, *,
                     force: bool = False, device: str | torch.device | None = None,
                     encoder_hash_: str | None = None, desc: str | None = None,
                     checked: bool = False) -> "CachedFeatures":
    """Per-item token states of ``backbone``'s encoders (before the last fusion hook) for every
    item of ``dataset_split``, cached at ``cache_path``; see the module docstring. A cache this
    process read and checked before is reused without reading its file again while the file is
    unchanged (``_LOADED``). ``checked``: the caller found the encoders cacheable already."""
    if not checked:
        require_cacheable(backbone, require_frozen=False)
    path = Path(cache_path)
    current = encoder_hash_ or encoder_hash(backbone)
    remembered = _LOADED.get(str(path))
    if not force and remembered and path.is_file() and \
            remembered[0] == _loaded_key(path, current, data_hash):
        features = remembered[1]
        features.status, features.extract_s = "reused", None
        return features
    reason = "forced" if force else cache_status(path, current, data_hash)
    if reason is None:
        features = CachedFeatures(path)
        features.status = "reused"
        _remember(features, _loaded_key(path, current, data_hash))
        return features
    verb = "computed" if reason == "missing" else "recomputed"
    if verb == "recomputed":
        log.warning("feature cache %s is recomputed: %s", path, reason)
    started = time.perf_counter()
    _write_cache(backbone, dataset_split, path, current, data_hash, batch_size, progress,
                 torch.device(device) if device is not None else _device_of(backbone),
                 desc or f"extract {path.stem}")
    features = CachedFeatures(path)
    features.status = f"{verb}: {reason}"
    features.extract_s = time.perf_counter() - started
    _remember(features, _loaded_key(path, current, data_hash))
    return features


def _write_cache(backbone, dataset_split, path: Path, encoder_hash_: str, data_hash: str,
                 batch_size: int, progress: bool, device: torch.device, desc: str) -> None:
    import h5py

    n = len(dataset_split)
    if n == 0:
        raise InputError("nothing to extract: the split is empty", file=str(path))
    loader = DataLoader(dataset_split, batch_size=batch_size, shuffle=False)
    bar = tqdm(total=n, desc=desc, unit="item", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    try:
        with atomic_path(path) as temporary:
            # no timestamps, no timings: the same encoder and data give the same bytes (DVC hashes them)
            with _bare(backbone), h5py.File(temporary, "w") as f:
                datasets: dict[str, h5py.Dataset] = {}
                done = 0
                for batch in loader:
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                             for k, v in batch.items()}
                    states, masks = _encode_with_masks(backbone, batch)
                    rows = {}
                    for m in backbone.modalities:
                        half = states[m].to(STORAGE_DTYPE)
                        if not torch.isfinite(half).all():
                            bad = int((~torch.isfinite(half)).flatten(1).any(1).nonzero()[0])
                            sample = batch["id"][bad] if "id" in batch else f"item {done + bad}"
                            raise InputError(
                                f"the frozen encoders' {m} outputs on the data's sample {sample!r} "
                                "are NaN or beyond float16's range (the cache's dtype): check the "
                                "inputs' scale (mmpetl check-data warns of values beyond float16)",
                                file=str(path), key=f"{FEATURE_PREFIX}{m}",
                                expected="finite values", found=f"non-finite at item {done + bad}")
                        rows[f"{FEATURE_PREFIX}{m}"] = half
                    rows.update({f"{MASK_PREFIX}{m}": mask.bool() for m, mask in masks.items()})
                    rows.update({k: batch[k] for k in KEEP_FIELDS if isinstance(batch.get(k), torch.Tensor)})
                    size = next(iter(rows.values())).shape[0]
                    for key, value in rows.items():
                        array = value.detach().cpu().numpy()
                        if key not in datasets:
                            datasets[key] = f.create_dataset(key, shape=(n, *array.shape[1:]),
                                                             dtype=array.dtype, track_times=False)
                        target = datasets[key]
                        if array.shape[1:] != target.shape[1:] or array.shape[0] != size:
                            raise InputError("item shapes change within the split", file=str(path),
                                             key=key, expected=target.shape[1:], found=array.shape[1:])
                        target[done: done + size] = array
                    done += size
                    bar.update(size)
                if done != n:
                    raise InputError("the split yielded fewer items than its length", file=str(path),
                                     expected=n, found=done)
                shapes = {k: list(d.shape) for k, d in datasets.items()}
                stored_hash, _ = content_hash(f, datasets)  # states were checked finite above
                f.attrs["meta"] = json.dumps({
                    "format": FORMAT, "version": VERSION, "encoder_hash": encoder_hash_,
                    "data_hash": data_hash, "backbone": type(backbone).__name__,
                    "modalities": list(backbone.modalities), "n": n, "fields": sorted(datasets),
                    "shapes": shapes, "dtype": str(STORAGE_DTYPE).replace("torch.", ""),
                    "dtypes": {k: str(d.dtype) for k, d in datasets.items()},
                    "content_hash": stored_hash,
                    "encoder_mode": "eval (no dropout), before the last-layer fusion hook",
                    # no installed versions or build labels (torch 2.13.0+cpu vs +cu128): the bytes
                    # depend on what computes them only (encoder_hash holds torch's public version)
                }, sort_keys=True)
    finally:
        bar.close()


# --- reading -------------------------------------------------------------------------------------
class CachedFeatures(Dataset):
    """One cache file as a Dataset (see the module docstring)."""

    def __init__(self, path: str | Path, in_memory: bool | None = None):
        import h5py

        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self.fields = tuple(self.meta["fields"])
        self.modalities = tuple(self.meta["modalities"])
        self.status = "loaded"
        self.extract_s: float | None = None
        with h5py.File(self.path, "r") as f:
            self.nbytes = sum(f[k].size * f[k].dtype.itemsize for k in self.fields)
            self.in_memory = self.nbytes <= IN_MEMORY_LIMIT if in_memory is None else in_memory
            self._arrays = ({k: torch.from_numpy(np.ascontiguousarray(f[k][...])) for k in self.fields}
                            if self.in_memory else None)
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return self.meta["n"]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a {len(self)}-item feature cache")
        if self._arrays is not None:
            return {k: self._arrays[k][i] for k in self.fields}
        if self._file is None or self._pid != os.getpid():  # one handle per DataLoader worker
            import h5py
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return {k: torch.from_numpy(np.asarray(self._file[k][i])) for k in self.fields}

    def batch(self, indices: list[int]) -> dict:
        """The items ``indices`` stacked (what ``default_collate`` of the items gives), indexed at
        once in memory, without building an item at a time; item by item from the file otherwise."""
        if self._arrays is None:
            return default_collate([self[i] for i in indices])
        if len(indices) and not (0 <= min(indices) and max(indices) < len(self)):
            raise IndexError(f"items {indices} of a {len(self)}-item feature cache")
        rows = torch.as_tensor(indices)  # index_select copies what ``[rows]`` does, several times faster
        return {k: torch.index_select(self._arrays[k], 0, rows) for k in self.fields}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None
        return state

    def check(self, encoder_hash_: str | None = None, data_hash: str | None = None) -> None:
        """Raise CacheError unless the stored hashes equal the given ones."""
        for key, value in (("encoder_hash", encoder_hash_), ("data_hash", data_hash)):
            if value is not None and self.meta[key] != value:
                raise CacheError("stale feature cache", file=str(self.path), key=f"meta.{key}",
                                 expected=value, found=self.meta[key])


def load_features(cache_path: str | Path, encoder_hash_: str | None = None,
                  data_hash: str | None = None) -> CachedFeatures:
    """A cache file, checked against the given hashes and its content hash (CacheError when
    stale, altered, non-finite or unreadable)."""
    features = CachedFeatures(cache_path)
    features.check(encoder_hash_, data_hash)
    altered = verify_content(features.path, features.meta)
    if altered:
        raise CacheError(f"feature cache {altered}", file=str(features.path), key="meta.content_hash")
    return features


class FromCache(nn.Module):
    """The backbone's last fusion hook + head on cached encoder states (see the module docstring)."""

    def __init__(self, backbone: nn.Module, checked: bool = False):
        super().__init__()
        if not checked:  # ``checked``: the caller found the encoders cacheable already
            require_cacheable(backbone)
        self.modalities = tuple(backbone.modalities)
        self.last = _last(backbone)
        self.head = backbone.head                  # shared: training here trains the backbone's
        self.fusion_hooks = backbone.fusion_hooks  # shared; only the last depth's may be set
        object.__setattr__(self, "_backbone", backbone)  # not a sub-module: encoders stay put

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        reference = next(self.head.parameters())
        states = {m: batch[f"{FEATURE_PREFIX}{m}"].to(reference.dtype) for m in self.modalities}
        masks = {m: batch.get(f"{MASK_PREFIX}{m}") for m in self.modalities}
        if self.last in self.fusion_hooks:
            states = self.fusion_hooks[self.last](states)
        if hasattr(self._backbone, "pool"):  # lock-step backbones: head(pool(states))
            return self.head(self._backbone.pool(states))
        return self.head(states, masks)      # two-tower: the fusion head reads the masks


def cached_splits(backbone: nn.Module, splits: dict[str, Dataset], cache_dir: str | Path,
                  data_hashes: dict[str, str], batch_size: int = 64, progress: bool = True,
                  device: str | torch.device | None = None, checked: bool = False):
    """``(FromCache(backbone), {split: CachedFeatures}, info)``; raises NotCacheable when the
    method changes the encoders (``checked``: the caller found no ``cache_problems`` already).
    ``info``: encoder_hash, folder, per-split path / status / n and the extraction seconds spent
    (0 when every split was reused)."""
    if not checked:
        require_cacheable(backbone)
    current = encoder_hash(backbone)
    folder = Path(cache_dir) / f"{current[:16]}-{canonical_hash(data_hashes)[:8]}"
    cached, info = {}, {"encoder_hash": current, "folder": str(folder), "splits": {},
                        "extract_s": 0.0}
    for name, split in splits.items():
        if name not in data_hashes:
            raise InputError("no data hash for a split", key=f"data_hashes.{name}",
                             expected="a sha256 hex digest", found="nothing")
        features = extract_features(backbone, split, folder / f"{name}.h5", data_hashes[name],
                                    batch_size, progress, device=device, encoder_hash_=current,
                                    desc=f"extract {name}", checked=True)
        cached[name] = features
        info["splits"][name] = {"path": str(features.path), "status": features.status,
                                "n": len(features)}
        info["extract_s"] += features.extract_s or 0.0
    return FromCache(backbone, checked=True), cached, info


def plan_data_hashes(plan, data, vocab) -> dict[str, str]:
    """Per-split data hashes for a run plan: the dataset content + the loader options of
    ``plan.data`` (all but ``path``) + the vocabulary used to tokenise raw text (the word list,
    or a pretrained tokenizer's identity, its ``tokenizer_sha256``)."""
    options = {k: v for k, v in plan.data.items() if k != "path"}
    if vocab is None:
        options["vocab"] = None
    elif hasattr(vocab, "index"):  # WordVocab
        options["vocab"] = sorted(vocab.index)
    else:
        options["vocab"] = vocab.identity()
    return {name: split_hash(data, name, **options) for name in data.splits}


__all__ = ["CacheError", "CachedFeatures", "FromCache", "NotCacheable", "cache_problems",
           "cache_status", "cacheable", "cached_splits", "encoder_hash", "encoder_state_hash",
           "extract_features", "load_features", "plan_data_hashes", "require_cacheable",
           "split_hash"]
