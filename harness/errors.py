"""One error type for every kind of bad input, so the CLI can exit 2 with a precise message."""
from __future__ import annotations


class InputError(Exception):
    """Bad input: names where (file), what (key), what was expected and what was found."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 expected: object = None, found: object = None):
        self.file, self.key, self.expected, self.found = file, key, expected, found
        parts = []
        if file is not None:
            parts.append(f"file {file}")
        if key is not None:
            parts.append(f"key {key!r}")
        where = f" [{', '.join(parts)}]" if parts else ""
        detail = ""
        if expected is not None or found is not None:
            detail = f": expected {expected}, found {found}"
        super().__init__(f"{message}{where}{detail}")
