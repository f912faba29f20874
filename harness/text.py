"""Tokenisation of raw text fields (Food-101 titles, MSR-VTT captions).

Two vocabularies, one interface (``encode(text, max_len) -> (ids, mask)``, ``len()``,
``identity()``):

- ``WordVocab``: word level, for text towers built from configs with random weights (a word
  vocabulary from the training split serves them as well as WordPiece would). The vocabulary is
  the loader's (generated data lists it) or the training texts' words.
- ``PretrainedTokenizer``: the tokenizer shipped with a pretrained text tower (params.yaml
  ``text_model``, loaded with the weights by ``harness.backbones.pretrained``): text MUST be
  tokenised with the model's own tokenizer ([CLS] ... [SEP], padded / truncated to ``max_len``,
  as the Wander and MMT code do).
"""
from __future__ import annotations

import re

import torch
from torch.utils.data import Dataset

PAD, CLS, UNK = 0, 1, 2
SPECIALS = ("[PAD]", "[CLS]", "[UNK]")
# Tokens a text is cut to when its data block gives no ``max_text_len`` (harness.run.load_splits)
DEFAULT_MAX_TEXT_LEN = 16


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class WordVocab:
    def __init__(self, vocabulary: list[str]):
        unique = sorted(set(vocabulary) - set(SPECIALS))
        self.index = {w: i + len(SPECIALS) for i, w in enumerate(unique)}

    def __len__(self) -> int:
        return len(self.index) + len(SPECIALS)

    @classmethod
    def from_texts(cls, texts) -> "WordVocab":
        return cls([w for text in texts for w in words(text)])

    def encode(self, text: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] + word ids, padded / cut to ``max_len``; returns (ids, mask)."""
        ids = [CLS] + [self.index.get(w, UNK) for w in words(text)][: max_len - 1]
        mask = [True] * len(ids) + [False] * (max_len - len(ids))
        return torch.tensor(ids + [PAD] * (max_len - len(ids))), torch.tensor(mask)


    def identity(self) -> dict:
        """What decides the ids (for data hashes): the words in id order."""
        return {"kind": "words", "words": sorted(self.index, key=self.index.get)}


class PretrainedTokenizer:
    """A pretrained text tower's tokenizer behind ``WordVocab``'s interface. ``name`` and
    ``sha256`` identify it (``harness.backbones.pretrained.tokenizer_sha256``)."""

    def __init__(self, tokenizer, name: str, sha256: str):
        self.tokenizer, self.name, self.sha256 = tokenizer, name, sha256

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] + tokens + [SEP], padded with the pad id / cut to ``max_len``; returns (ids, mask)."""
        out = self.tokenizer(text, add_special_tokens=True, padding="max_length",
                             max_length=max_len, truncation=True, return_attention_mask=True)
        return (torch.tensor(out["input_ids"], dtype=torch.int64),
                torch.tensor(out["attention_mask"], dtype=torch.bool))

    def identity(self) -> dict:
        """What decides the ids (for data hashes): the tokenizer's content, not its name."""
        return {"kind": "pretrained", "tokenizer_sha256": self.sha256}


class Tokenized(Dataset):
    """Wraps a split whose items carry a string under ``field``: adds ``text`` ids and
    ``mask_text`` and drops the string (default collate cannot stack strings into tensors)."""

    def __init__(self, split: Dataset, vocab: "WordVocab | PretrainedTokenizer", max_len: int,
                 field: str):
        self.split, self.vocab, self.max_len, self.field = split, vocab, max_len, field

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.split[i])
        item["text"], item["mask_text"] = self.vocab.encode(item.pop(self.field), self.max_len)
        return item
