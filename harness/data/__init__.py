"""Data layer: dataset cards, loaders for the real on-disk formats, checks and generators.

Main API
--------
list_cards() -> list[str]
    Names of the cards in datasets/*.yaml (food101, howto100m, iemocap, mosei, mosi, msrvtt).
load_card(name) -> Card
    Validated card (title, family, task, modalities, splits, formats, path, checksums, raw).
describe_datasets() -> list[dict]
    One row per card: name, title, task, modalities, path, present (bool), format (detected
    or None), generated_path, generated_present. For `mmpetl datasets [--json]`.
load_dataset(name, path=None, format=None, **options) -> LoadedDataset
load_block(name, block) -> LoadedDataset
    The same, from a params.yaml data block (path, format and the loader options among its keys).
    Reads `path` (default: the card's `path:`); the format is detected unless `format=`
    forces one (forcing a wrong one raises InputError). Options:
      mosi / mosei / iemocap: fold=1, max_len={modality: n}, feature_types={modality: name}
                              (IEMOCAP mmin only; refused for any other format)
      food101: image_size=None (resize to a square), valid_fraction=0.0 (carve a stratified
               valid split from train), check_images_exist=True
    (each family's ``Options``: the types and ranges, checked before any data is read)
      msrvtt / howto100m: split_scheme (jsfusion | miech | full; howto100m: default),
               max_tokens=30, captions ("first" | "random" | "all", or {split: mode};
               default random for train, first otherwise), experts=[subset]
detect_format(name, path=None) -> str
check_data(dataset, path=None, format=None, **options) -> dict
    Full validation (every image / video file is opened) and a JSON-able report. Raises
    InputError (file, key, expected, found) when unusable; writes nothing.
generate(dataset, out_dir, seed=0, n_train=None, n_valid=None, n_test=None, seq_len=None,
         interaction_order=2, noise=0.1, format=None, **options) -> dict (manifest)
    Writes a small deterministic data set in one of the dataset's real formats (plus
    out_dir/generated.json), atomically.

LoadedDataset(name, format, path, splits, report, info)
    splits: {"train" | "valid" | "test": torch.utils.data.Dataset}; report: what was found
    and fixed; info: task, modalities, dims, lengths, classes / label_range, experts.

Item schema (each split Dataset yields a dict; torch's default collate batches it)
------------------------------------------------------------------------------------
mosi / mosei (regression):
    text, audio, vision  float32 [L_m, D_m]   (zero padded)
    mask_text, mask_audio, mask_vision  bool [L_m]  (True = real step; all True when
                         aligned; unaligned: from lengths / non-zero rows)
    label  float32 []  in [-3, 3]
    text_bert  int64 [3, L]  (MMSA files that have it: ids, mask, segment ids)
    id  str,  index  int64 []
iemocap: as above, plus
    label  int64 [4] (MulT: binary per emotion neutral, happy, sad, angry) or int64 []
           (mmin: class 0..3);  label_class  int64 [] (the class, -1 if not exactly one
           emotion is positive in MulT labels)
food101:
    image  float32 [3, H, W] in [0, 1] (opened lazily), text  str, label  int64 [],
    id  str, index  int64 []
msrvtt / howto100m, for each expert e (info["experts"]):
    e  float32 [max_tokens, D_e], mask_e  bool [max_tokens], time_e  float32 [max_tokens, 2],
    e_max, e_avg  float32 [D_e], present_e  bool []
    caption  str, caption_index  int64 [], label = video_index  int64 [], id  str (video id),
    index  int64 []
"""
from __future__ import annotations

from ._common import LoadedDataset
from .cards import Card, cards_dir, list_cards, load_card
from .check import check_data
from .generate import generate
from .load import block_options, detect_format, load_block, load_dataset, resolve_path

__all__ = ["Card", "LoadedDataset", "block_options", "cards_dir", "check_data", "describe_datasets",
           "detect_format", "generate", "list_cards", "load_block", "load_card", "load_dataset",
           "resolve_path"]


def describe_datasets() -> list[dict]:
    """Cards and whether their data is present (format detection only; nothing is read)."""
    from harness.errors import InputError
    rows = []
    for name in list_cards():
        card = load_card(name)
        row = {"name": name, "title": card.title, "task": card.task,
               "modalities": list(card.modalities), "formats": card.format_names,
               "licence": " ".join(str(card.get("licence", "")).split())}
        for kind, gen in (("", False), ("generated_", True)):
            p = resolve_path(card, None, generated=gen)
            row[f"{kind}path"] = str(p)
            try:
                row[f"{kind}format"] = detect_format(name, p) if p.exists() else None
            except InputError:
                row[f"{kind}format"] = None
            row[f"{kind}present"] = row[f"{kind}format"] is not None
        rows.append(row)
    return rows
