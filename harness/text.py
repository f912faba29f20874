"""Word-level tokenisation of raw text fields (Food-101 titles, MSR-VTT captions).

No tokenizer can be downloaded here, and the paper presets' BERT encoders are built from configs
with random weights, so a word vocabulary from the training split serves them as well as WordPiece
would. The vocabulary is the loader's (generated data lists it) or the training texts' words.
"""
from __future__ import annotations

import re

import torch
from torch.utils.data import Dataset

PAD, CLS, UNK = 0, 1, 2
SPECIALS = ("[PAD]", "[CLS]", "[UNK]")


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


class Tokenized(Dataset):
    """Wraps a split whose items carry a string under ``field``: adds ``text`` ids and
    ``mask_text`` and drops the string (default collate cannot stack strings into tensors)."""

    def __init__(self, split: Dataset, vocab: WordVocab, max_len: int, field: str):
        self.split, self.vocab, self.max_len, self.field = split, vocab, max_len, field

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.split[i])
        item["text"], item["mask_text"] = self.vocab.encode(item.pop(self.field), self.max_len)
        return item
