"""Deterministic writes for tables, CSVs, figures and metrics, only where the content changes
(through ``harness.records.atomic_file``): re-rendering unchanged inputs leaves byte-identical files
(and their mtimes). Each ``write_*_if_changed`` returns whether it wrote."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from harness.records import atomic_file, dumps_strict


def write_bytes_if_changed(path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically; returns False when the file already held it."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    with atomic_file(path, "wb") as stream:
        stream.write(data)
    return True


def write_text_if_changed(path, text: str) -> bool:
    return write_bytes_if_changed(path, text.encode("utf-8"))


def write_json_if_changed(path, document) -> bool:
    """Sorted keys, 2-space indent, trailing newline (the layout of harness.records)."""
    return write_text_if_changed(path, dumps_strict(document, indent=2, sort_keys=True) + "\n")


def num(value) -> str:
    """A CSV cell for a number: '' for None/NaN, integers as integers, floats to 10 significant
    digits (stable across platforms), booleans as true/false, strings as they are."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.10g}"
    return str(value)


def csv_text(fields: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: num(row.get(k)) for k in fields})
    return buffer.getvalue()
