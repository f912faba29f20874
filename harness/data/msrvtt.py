"""MSR-VTT (seven MMT experts) and HowTo100M (s3d, vggish) loader.

Format `mmt`: one HDF5 file per video at
  vid_feat_files/mult_h5/{v[0]}/{v[1]}/{v[2]}/{video_id}.h5
with datasets features.{expert} (n x dim), features_t.{expert} (n x 2 seconds),
raw_captions.{i} (array of byte-string words) and raw_captions_t.{i} (words x 2), plus split
lists (one video id per line) at the root or in structured-symlinks/. Split schemes:
msrvtt jsfusion (train / test), miech (train / test), full (train / valid / test);
howto100m default (train / valid).

An expert is absent when its dataset is missing, has no rows, or its first value is NaN
(MMT's rule): it is zero-filled and masked, never fed. A required expert (card) that is
absent, a dim that differs from the expected one, or NaN anywhere else in a present expert
is an InputError.

Items (dicts), for each expert e:
  e            float32 (max_tokens x dim_e): up to max_tokens temporal tokens (uniformly
               subsampled when there are more), zero padded
  mask_e       bool (max_tokens): True = real token
  time_e       float32 (max_tokens x 2): start / end seconds (features_t.e, or t, t+1)
  e_max, e_avg float32 (dim_e): max / mean over all the expert's tokens (zeros if absent)
  present_e    bool scalar
plus caption (str, words joined by spaces), caption_index (int64), label and video_index
(int64: the video's index in its split), id (str: video id), index (int64).
The HDF5 file is opened in __getitem__ (lazily, per item) and what it held is kept for the
process (``_common.FILE_READS``) while the file is unchanged: a sweep worker's later runs on the
same videos read memory; the random train caption is still drawn per item, in the same order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from torch.utils.data import Dataset

from harness.errors import InputError

from ._common import (FILE_READS, LoadedDataset, LoaderOptions, decode, length_stats, load_pickle, pick_format,
                      read_manifest, require_path, split_index)
from .cards import Card

FEAT_DIR = Path("vid_feat_files") / "mult_h5"


def video_path(root: Path, vid: str) -> Path:
    return Path(root) / FEAT_DIR / vid[0] / vid[1] / vid[2] / f"{vid}.h5"


def read_video(path: Path, experts: list[str], dims: dict[str, int], required: set[str],
               max_tokens: int, *, captions: bool = True) -> dict:
    """Read one video file. Returns {'experts': {e: None | (feats n x d, times n x 2)},
    'nan_first': [e...], 'absent': [e...], 'captions': [list of words, ...]}."""
    import h5py
    fs = str(path)
    out = {"experts": {}, "nan_first": [], "absent": [], "captions": []}
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise InputError("cannot open HDF5 file (missing, truncated or corrupt)", file=fs,
                         key="(whole file)", expected="a readable HDF5 file",
                         found=str(e)[:160]) from None
    with f:
        for e in experts:
            key = f"features.{e}"
            if key not in f:
                if e in required:
                    raise InputError("required expert missing", file=fs, key=key,
                                     expected=f"{key} (n x {dims[e]}); the card lists {e} as "
                                              f"required", found="missing")
                out["experts"][e] = None
                out["absent"].append(e)
                continue
            try:
                a = np.asarray(f[key][()], dtype=np.float32)
            except (OSError, ValueError, TypeError) as err:
                raise InputError("cannot read expert features", file=fs, key=key,
                                 expected=f"n x {dims[e]} floats",
                                 found=f"{type(err).__name__}: {str(err)[:120]}") from None
            if a.ndim == 1:
                a = a[None, :]
            if a.ndim != 2 or a.shape[1] != dims[e]:
                raise InputError("expert dims differ from the expected dims", file=fs, key=key,
                                 expected=f"n x {dims[e]}", found=f"shape {a.shape}")
            if a.shape[0] == 0 or np.isnan(a.flat[0]):
                if e in required:
                    raise InputError("required expert absent", file=fs, key=key,
                                     expected=f"{key} present (n x {dims[e]}, n >= 1, a finite first "
                                              f"value) in every video: the card lists {e} as "
                                              "required (only optional experts may be absent)",
                                     found="a NaN first value" if a.shape[0] else "0 rows")
                out["experts"][e] = None
                (out["nan_first"] if a.shape[0] else out["absent"]).append(e)
                continue
            if not np.isfinite(a).all():
                raise InputError("non-finite values in a present expert", file=fs, key=key,
                                 expected="finite values (or a NaN first value = absent)",
                                 found=f"{int(np.isnan(a).sum())} NaN, "
                                       f"{int(np.isinf(a).sum())} inf")
            tkey = f"features_t.{e}"
            t = None
            if tkey in f:
                t = np.asarray(f[tkey][()], dtype=np.float32)
                if t.shape != (a.shape[0], 2):
                    t = None
            if t is None:
                n = a.shape[0]
                t = np.stack([np.arange(n), np.arange(n) + 1], 1).astype(np.float32)
            out["experts"][e] = (a, np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0))
        if captions:
            i = 0
            while f"raw_captions.{i}" in f:
                try:
                    words = np.asarray(f[f"raw_captions.{i}"][()]).reshape(-1).tolist()
                except (OSError, ValueError, TypeError) as err:
                    raise InputError("cannot read caption", file=fs, key=f"raw_captions.{i}",
                                     expected="array of byte-string words",
                                     found=str(err)[:120]) from None
                out["captions"].append([decode(w) for w in words])
                i += 1
            if not out["captions"]:
                raise InputError("video has no captions", file=fs, key="raw_captions.0",
                                 expected="raw_captions.{i} datasets", found="none")
    return out


def video_bytes(video: dict) -> int:
    """About the memory ``read_video``'s result holds: its arrays and caption words."""
    arrays = sum(a.nbytes + t.nbytes for a, t in filter(None, video["experts"].values()))
    return arrays + sum(len(word) for caption in video["captions"] for word in caption)


class VideoTextDataset(Dataset):
    """(video, caption) items read lazily from the per-video HDF5 files."""

    def __init__(self, root: Path, videos: list[str], experts: list[str], dims: dict[str, int],
                 required: set[str], max_tokens: int, captions: str = "first",
                 caption_index: dict | None = None, pairs: list | None = None):
        self.root, self.videos, self.experts = Path(root), videos, experts
        self.dims, self.required, self.max_tokens = dims, required, max_tokens
        self.captions, self.caption_index = captions, caption_index or {}
        self.pairs = pairs  # [(video index, caption index)] in "all" mode

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.videos)

    @property
    def ids(self) -> list[str]:
        """The split's video ids, one per video (with captions "all" a video has several items)."""
        return self.videos

    def __getitem__(self, i: int) -> dict:
        i = split_index(i, len(self), "items")
        if self.pairs is not None:
            vi, ci = self.pairs[i]
        else:
            vi, ci = i, None
        vid = self.videos[vi]
        path = video_path(self.root, vid)
        v = FILE_READS.read(path, ("mmt", tuple(self.experts), tuple(sorted(self.dims.items())),
                                   tuple(sorted(self.required)), self.max_tokens),
                            lambda: read_video(path, self.experts, self.dims, self.required,
                                               self.max_tokens), video_bytes)
        item: dict = {}
        T = self.max_tokens
        for e in self.experts:
            d = self.dims[e]
            tok = np.zeros((T, d), dtype=np.float32)
            tim = np.zeros((T, 2), dtype=np.float32)
            mask = np.zeros(T, dtype=bool)
            mx = np.zeros(d, dtype=np.float32)
            av = np.zeros(d, dtype=np.float32)
            got = v["experts"][e]
            if got is not None:
                a, t = got
                n_tok = a.shape[0]
                idx = (np.arange(n_tok) if n_tok <= T
                       else np.linspace(0, n_tok - 1, T).round().astype(np.int64))
                tok[:len(idx)] = a[idx]
                tim[:len(idx)] = t[idx]
                mask[:len(idx)] = True
                mx, av = a.max(0), a.mean(0)
            item[e] = torch.from_numpy(tok)
            item[f"mask_{e}"] = torch.from_numpy(mask)
            item[f"time_{e}"] = torch.from_numpy(tim)
            item[f"{e}_max"] = torch.from_numpy(np.ascontiguousarray(mx, dtype=np.float32))
            item[f"{e}_avg"] = torch.from_numpy(np.ascontiguousarray(av, dtype=np.float32))
            item[f"present_{e}"] = torch.tensor(got is not None)
        caps = v["captions"]
        if ci is None:
            if self.captions == "random":
                ci = int(torch.randint(len(caps), (1,)).item())
            else:
                ci = int(self.caption_index.get(vid, 0))
        if not 0 <= ci < len(caps):
            raise InputError("caption index out of range", file=str(path),
                             key=f"raw_captions.{ci}", expected=f"0 .. {len(caps) - 1}",
                             found=ci)
        item["caption"] = " ".join(caps[ci])
        item["caption_index"] = torch.tensor(ci, dtype=torch.int64)
        item["label"] = torch.tensor(vi, dtype=torch.int64)
        item["video_index"] = torch.tensor(vi, dtype=torch.int64)
        item["id"] = vid
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item


# ----------------------------------------------------------------------------- loading

def locate(card: Card, path: Path, forced: str | None) -> tuple[str, Path]:
    path = Path(path)
    if forced is not None:
        card.fmt(forced)

    def describe(fmt: str) -> str:
        return f"{fmt} ({card.formats[fmt].get('features', '')})"

    require_path(path, "; ".join(describe(f) for f in card.formats))
    if not path.is_dir():
        raise InputError("MMT data must be a directory", file=str(path), key="path",
                         expected=describe("mmt"), found="a file")
    found = [("mmt", path)] if (path / FEAT_DIR).is_dir() else []
    return pick_format(card, found, forced, path, describe)


def _split_file(root: Path, spec: dict, name: str) -> Path | None:
    for d in spec.get("split_dirs", ["."]):
        p = root / d / name
        if p.is_file():
            return p
    return None


def expected_dims(card: Card, manifest: dict | None) -> dict[str, int]:
    dims = {e: int(s["dim"]) for e, s in card.get("experts").items()}
    if manifest and isinstance(manifest.get("dims"), dict):
        dims.update({e: int(d) for e, d in manifest["dims"].items() if e in dims})
    return dims


CaptionMode = Literal["first", "random", "all"]


class Options(LoaderOptions):
    """The keyword options of ``load``."""
    split_scheme: Optional[str] = None  # one of the card's formats' split_schemes
    max_tokens: Optional[Annotated[int, Field(gt=0)]] = None  # temporal tokens kept per expert
    # for every split, or {split: mode}; default: random for train, first otherwise
    captions: Optional[Union[CaptionMode, dict[Literal["train", "valid", "test"], CaptionMode]]] = None
    experts: Optional[Annotated[list[str], Field(min_length=1)]] = None  # a subset of the card's

    @field_validator("split_scheme")
    @classmethod
    def _scheme_of_the_card(cls, scheme, info: ValidationInfo):
        card = info.context["card"]
        known = sorted({name for spec in card.formats.values() for name in spec.get("split_schemes", {})})
        if scheme is not None and scheme not in known:
            raise ValueError(f"one of the card's split schemes {known}")
        return scheme

    @field_validator("experts")
    @classmethod
    def _experts_of_the_card(cls, experts, info: ValidationInfo):
        known = list(info.context["card"].get("experts"))
        unknown = [e for e in experts or () if e not in known]
        if unknown:
            raise ValueError(f"experts among {known}, not {unknown}")
        return experts


def load(card: Card, path: Path, format: str | None = None, *, split_scheme: str | None = None,
         max_tokens: int | None = None, captions=None, experts: list[str] | None = None
         ) -> LoadedDataset:
    """Load an MMT-layout dataset (MSR-VTT, HowTo100M). Long because it validates the split lists,
    the experts and the captions in one pass that builds the report as it goes (each check
    names the file and key it read)."""
    fmt, root = locate(card, Path(path), format)
    spec = card.formats[fmt]
    schemes = spec["split_schemes"]
    scheme = split_scheme or spec.get("default_split_scheme") or next(iter(schemes))
    if scheme not in schemes:
        raise InputError("unknown split scheme", file=card.file, key="split_scheme",
                         expected=list(schemes), found=scheme)
    experts = list(experts or card.get("experts"))
    required = {e for e, s in card.get("experts").items() if s.get("required") and e in experts}
    manifest = read_manifest(root)
    dims = expected_dims(card, manifest)
    max_tokens = int(max_tokens or card.get("max_tokens", 30))
    if isinstance(captions, str) or captions is None:
        modes = {}
    else:
        modes = dict(captions)
    cap_index = {}
    ci_name = spec.get("jsfusion_caption_index")
    warnings = []
    if scheme == "jsfusion" and ci_name:
        p = _split_file(root, spec, ci_name)
        if p is not None:
            ci = load_pickle(p)
            if not isinstance(ci, dict):
                raise InputError("caption index is not a dict", file=str(p), key="(root)",
                                 expected="video id -> caption index", found=type(ci).__name__)
            cap_index = {str(k): int(v) for k, v in ci.items()}
        else:
            warnings.append(f"{ci_name} not found: test videos use caption 0")
    splits, rep, files = {}, {}, []
    for split, fname in schemes[scheme].items():
        lf = _split_file(root, spec, fname)
        if lf is None:
            raise InputError("missing split", file=str(root / fname), key=split,
                             expected=f"split list {fname} (in {spec.get('split_dirs', ['.'])})",
                             found="missing")
        files.append(str(lf))
        vids = []
        for lineno, line in enumerate(lf.read_text(encoding="utf-8-sig", errors="replace")
                                      .splitlines(), 1):
            vid = line.strip()
            if not vid:
                continue
            if len(vid) < 3 or "/" in vid:
                raise InputError("bad video id", file=str(lf), key=f"line {lineno}",
                                 expected="a video id of at least 3 characters", found=vid)
            if not video_path(root, vid).is_file():
                raise InputError("split list names a missing video", file=str(video_path(root, vid)),
                                 key=f"{lf.name} line {lineno}",
                                 expected=f"features file for {vid}", found="missing")
            vids.append(vid)
        if not vids:
            raise InputError("empty split", file=str(lf), key=split,
                             expected="at least one video id", found="0 ids")
        mode = captions if isinstance(captions, str) else modes.get(
            split, "random" if split == "train" else "first")
        pairs = None
        if mode == "all":
            import h5py
            pairs = []
            for vi, vid in enumerate(vids):
                try:
                    with h5py.File(video_path(root, vid), "r") as f:
                        nc = 0
                        while f"raw_captions.{nc}" in f:
                            nc += 1
                except OSError as e:
                    raise InputError("cannot open HDF5 file", file=str(video_path(root, vid)),
                                     key="(whole file)", expected="a readable HDF5 file",
                                     found=str(e)[:120]) from None
                pairs += [(vi, c) for c in range(nc)]
        splits[split] = VideoTextDataset(root, vids, experts, dims, required, max_tokens,
                                         mode, cap_index if split != "train" else {}, pairs)
        rep[split] = {"n_videos": len(vids), "n_items": len(splits[split]),
                      "list": str(lf), "captions": mode}
    report = {
        "dataset": card.name, "path": str(root), "format": fmt, "split_scheme": scheme,
        "files": files, "splits": rep,
        "modalities": {e: {"dim": dims[e], "max_tokens": max_tokens,
                           "required": e in required} for e in experts},
        "labels": {"kind": "retrieval (video index)"},
        "nonfinite": {"total": 0}, "audio_neg_inf_fixed": 0,
        "generated": manifest is not None, "warnings": warnings,
    }
    info = {"task": "retrieval", "modalities": experts, "experts": experts,
            "dims": {e: dims[e] for e in experts}, "max_tokens": max_tokens,
            "split_scheme": scheme, "label_kind": "video index"}
    if manifest is not None:
        info["vocab"] = manifest.get("vocab")
    return LoadedDataset(card.name, fmt, str(root), splits, report, info)


def deep_check(ld: LoadedDataset) -> dict:
    """Open every video once: presence per expert, NaN-filled experts, token and caption
    counts. Errors (corrupt file, missing required expert, NaN, dims) raise InputError."""
    seen = {}
    for ds in ld.splits.values():
        for vid in ds.videos:
            seen.setdefault(vid, ds)
    experts = next(iter(ld.splits.values())).experts
    present = {e: 0 for e in experts}
    nan_first = {e: 0 for e in experts}
    absent = {e: 0 for e in experts}
    tokens = {e: [] for e in experts}
    n_caps, cap_len = [], []
    missing_per_video = {}
    for vid, ds in seen.items():
        v = read_video(video_path(ds.root, vid), ds.experts, ds.dims, ds.required, ds.max_tokens)
        miss = []
        for e in experts:
            got = v["experts"][e]
            if got is None:
                miss.append(e)
                (nan_first if e in v["nan_first"] else absent)[e] += 1
            else:
                present[e] += 1
                tokens[e].append(got[0].shape[0])
        if miss:
            missing_per_video[vid] = miss
        n_caps.append(len(v["captions"]))
        cap_len += [len(c) for c in v["captions"]]
    return {
        "videos_read": len(seen),
        "experts": {e: {"present": present[e], "absent": absent[e], "nan_filled": nan_first[e],
                        "tokens": length_stats(tokens[e])} for e in experts},
        "missing_experts": {e: absent[e] + nan_first[e] for e in experts},
        "missing_experts_per_video": missing_per_video,
        "nonfinite": {"nan_filled_experts": int(sum(nan_first.values()))},
        "captions": {"per_video": length_stats(n_caps), "words": length_stats(cap_len)},
    }
