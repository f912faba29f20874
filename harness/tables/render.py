"""Render every spec of ``harness.tables.specs`` from the run records.

Per spec: ``<out_dir>/<name>.md`` and ``<name>.csv`` (figures also ``<name>.png``), then
``index.md`` (``results/metrics.json`` is ``harness.tables.leaderboard``'s). For each cell: our
mean +- std over seeds with the 95% Student-t interval of the mean (``harness.stats.INTERVAL``),
the paper's value and ours - paper;
for each compared row: the paired test against the section's main Wander row
(``Section.reference``): mean paired improvement with its t interval, paired t-test p,
Holm-adjusted p (family: every comparison of the spec), Wilcoxon exact p with its smallest
attainable p, P(Wander > baseline), and a verdict. Each CSV line lists the run records behind
it (``records``: ``<dataset>/<file>`` under the records folder). A row without usable records says why
("not run: <reason>"), never a blank; a metric that is NaN (undefined) in a record is left out
of that cell with a note, and a cell whose every value is NaN reads "undefined: ...".

CSV layout (long, one line per section x row x column; what ``harness.tables.diff`` reads):
key columns ``section, row, column``; cell fields ``status, n, seeds, undefined_seeds, mean, std,
t_ci_low, t_ci_high, paper, diff_vs_paper``; comparison fields ``compared_to, n_paired,
improvement, improvement_t_ci_low, improvement_t_ci_high, t_stat (> 0: Wander better), p_t,
p_holm, p_wilcoxon, wilcoxon_min_p, p_better, verdict``. Numbers in paper units (accuracies
x100).

All files are written atomically and only when their content changes; the same records give
byte-identical files (sorted inputs, no timestamps, PNG without software metadata).
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

from harness import stats
from harness.errors import InputError
from harness.records import row_slug
from harness.tables import planted, specs as specs_module
from harness.tables.collect import Selection, collect, row_key, seeds_text
from harness.tables.io import csv_text, write_bytes_if_changed
from harness.tables.specs import Column, Row, Section, Spec

TINY_BANNER = "tiny profile: generated data and small backbones; NOT comparable to the paper"
CSV_FIELDS = [
    "table", "section", "row", "group", "role", "dataset", "grid_row", "column", "metric_key",
    "convention", "lower_is_better", "status", "n", "seeds", "missing_seeds", "undefined_seeds",
    "mean", "std", "t_ci_low", "t_ci_high", "ci_note", "paper", "paper_table",
    "diff_vs_paper", "tunable_ours", "tunable_method", "tunable_head", "tunable_paper",
    "compared_to", "n_paired", "improvement", "improvement_t_ci_low", "improvement_t_ci_high",
    "t_stat", "p_t", "p_holm", "p_wilcoxon", "wilcoxon_min_p", "wilcoxon_note", "p_better",
    "p_better_all_pairs", "verdict", "comparison_note", "records",
]


def profile_banner(profiles) -> str | None:
    """The warning every table and figure carries when its numbers come from the tiny profile."""
    return TINY_BANNER if "tiny" in profiles else None


# ------------------------------------------------------------------------------------------
# building: records -> cells -> comparisons
# ------------------------------------------------------------------------------------------
@dataclass
class Cell:
    column: Column
    dataset: str
    status: str                     # "ok" | "not run: ..." | "not measured: ..." | "undefined: ..."
    values: dict = field(default_factory=dict)   # seed -> value in paper units (NaN: undefined)
    summary: dict | None = None
    convention: str = ""
    missing_seeds: list = field(default_factory=list)
    paper: float | None = None
    comparison: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def diff(self) -> float | None:
        if self.summary is None or self.paper is None:
            return None
        return self.summary["mean"] - self.paper


@dataclass
class RowResult:
    section: Section
    row: Row
    cells: dict                     # column id -> Cell
    tunable: dict | None            # {"total", "method", "head", "text"} or None
    records: list

    @property
    def status(self) -> str:
        if any(c.ok for c in self.cells.values()):
            return "ok"
        return next(iter(self.cells.values())).status


@dataclass
class SpecResult:
    spec: Spec
    rows: list                      # RowResult, in spec order
    comparisons: list               # (RowResult, Column, comparison dict, reference RowResult)
    provenance: dict
    skipped: list = field(default_factory=list)   # (RowResult, Column, why not compared)


def _why_not_run(row: Row, dataset: str, selection: Selection, params: Mapping | None) -> str:
    if row.reason:
        return f"not run: {row.reason}"
    stale = selection.stale_for(dataset, row.grid)
    if params:
        datasets = params.get("datasets")
        if isinstance(datasets, list) and dataset not in datasets:
            return f"not run: dataset {dataset} is not in params.yaml datasets {datasets}"
        method = params.get("method", "all")
        allowed = method if isinstance(method, list) else [method]
        if "all" not in allowed and row.grid["method"] not in allowed:
            return (f"not run: method {row.grid['method']} filtered out by params.yaml "
                    f"method={method}")
        grid = (params.get("grid") or {}).get(dataset)
        if isinstance(grid, list) and row_key(row.grid) not in {row_key(g) for g in grid
                                                                if isinstance(g, Mapping)}:
            return f"not run: row {row_key(row.grid)} is not in params.yaml grid.{dataset}"
    if stale:
        names = sorted({reason.split(":", 1)[0] for _, rs in stale for reason in rs})
        return (f"not run: {len(stale)} record(s) in {selection.records_dir}/{dataset} are stale "
                f"(resolved settings differ from params.yaml in: {', '.join(names)}; rerun "
                f"`mmpetl sweep`)")
    seeds = selection.seeds_of(dataset)
    seeds = f" for seeds {seeds} (params.yaml seeds of {dataset})" if seeds is not None else ""
    return (f"not run: no records in {selection.records_dir}/{dataset} for this row{seeds} "
            f"(run `mmpetl sweep`)")


def _source(record: Mapping) -> str:
    pretrained = record.get("pretrained")
    return str(pretrained.get("source")) if isinstance(pretrained, Mapping) else "nothing"


def _pretrained_as_required(by_seed: dict, source: str | None) -> tuple[dict, list]:
    """Keep the records whose backbone was pre-trained on ``source`` (records without a
    ``pretrained`` field predate pre-training support and are kept)."""
    if source is None:
        return by_seed, []
    kept = {s: r for s, r in by_seed.items() if "pretrained" not in r or _source(r) == source}
    wrong = sorted({_source(r) for s, r in by_seed.items() if s not in kept})
    return kept, wrong


def _metric_value(record: dict, column: Column):
    """(value, convention, key) of the first of the column's keys the record has; NaN when the
    record has it undefined (a fallback key is for a record lacking the key, not for NaN)."""
    metrics = record["metrics"]
    for key, convention in ((column.key, column.convention), *column.fallback):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), convention, key
    return None, None, None


def _tunable(records: list) -> dict | None:
    found = set()
    for r in records:
        tunable = r.get("tunable")
        if isinstance(tunable, Mapping):
            try:
                found.add((int(tunable.get("method") or 0), int(tunable.get("head") or 0)))
            except (TypeError, ValueError):
                continue
    found = sorted(found)
    if not found:
        return None
    totals = [m + h for m, h in found]
    if len(found) == 1:
        (method, head), = found
        text = f"{_count(method + head)} ({_count(method)} + {_count(head)} head)"
    else:
        method = head = None
        text = f"{_count(min(totals))}–{_count(max(totals))} (varies across seeds)"
    return {"total": totals[0] if len(found) == 1 else None, "method": method, "head": head,
            "text": text}


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def build(spec: Spec, selection: Selection, params: Mapping | None = None) -> SpecResult:
    rows = []
    by_section: dict = {}
    for section in spec.sections:
        for row in section.rows:
            cells, used = {}, []
            for column in section.columns:
                dataset = column.dataset or section.dataset
                by_seed = selection.get(dataset, row.grid) if row.grid is not None else {}
                paper = row.paper.values.get(column.id) if row.paper else None
                by_seed, wrong_source = _pretrained_as_required(by_seed, row.pretrain)
                if not by_seed:
                    status = (_why_not_run(row, dataset, selection, params) if not wrong_source
                              else f"not run: the records' backbone was pre-trained on "
                                   f"{', '.join(wrong_source)}; this row needs {row.pretrain} "
                                   f"(params.yaml pretrain.use)")
                    cells[column.id] = Cell(column, dataset, status, paper=paper)
                    continue
                values, conventions = {}, set()
                for s, record in sorted(by_seed.items()):
                    value, convention, key = _metric_value(record, column)
                    if value is not None:
                        values[s] = value * column.scale
                        conventions.add(convention if key == column.key
                                        else f"{convention} (fallback key {key})")
                        used.append(record)
                if not values:
                    keys = [column.key] + [k for k, _ in column.fallback]
                    cells[column.id] = Cell(column, dataset, "not measured: the records lack "
                                            f"metric {' / '.join(keys)}", paper=paper)
                    continue
                if not any(math.isfinite(v) for v in values.values()):
                    cells[column.id] = Cell(column, dataset, "undefined: the metric is NaN "
                                            f"(undefined) at every seed ({column.key}, e.g. a "
                                            "correlation with a constant side)", paper=paper)
                    continue
                expected = selection.seeds_of(dataset) or sorted(values)
                summary = stats.summarize(list(values.values()), list(values))
                cells[column.id] = Cell(column, dataset, "ok", values, summary,
                                        "; ".join(sorted(conventions)),
                                        [s for s in expected if s not in values], paper)
            section_dataset_records = [r for r in used if r["dataset"] == section.dataset] or used
            result = RowResult(section, row, cells, _tunable(section_dataset_records),
                               sorted({id(r): r for r in used}.values(),
                                      key=lambda r: r["_path"]))
            rows.append(result)
            by_section[(id(section), row.label, row.group)] = result
    comparisons, skipped = [], []
    for result in rows:
        section, row = result.section, result.row
        if not row.compared:
            continue
        reference_row = section.reference(row)
        if reference_row is None:
            continue
        reference = by_section[(id(section), reference_row.label, reference_row.group)]
        for column in section.columns:
            mine, theirs = result.cells[column.id], reference.cells[column.id]
            if not (mine.ok and theirs.ok):
                if mine.ok:
                    skipped.append((result, column, f"not compared: the reference row "
                                    f"{reference.row.name} has no values ({theirs.status})"))
                continue
            comparison = stats.compare(theirs.values, mine.values, column.key)
            mine.comparison = comparison
            comparisons.append((result, column, comparison, reference))
    stats.adjust([c for _, _, c, _ in comparisons])
    return SpecResult(spec, rows, comparisons, _provenance(spec, rows, selection, params),
                      skipped)


def _provenance(spec: Spec, rows: list, selection: Selection, params: Mapping | None) -> dict:
    records = sorted({r["_path"]: r for row in rows for r in row.records}.values(),
                     key=lambda r: r["_path"])
    profiles = sorted({str(r.get("profile")) for r in records})
    if params and params.get("profile"):
        profiles = sorted(set(profiles) | {str(params["profile"])})
    cells = {(row_key(r["row"]), r["dataset"]) for r in records}
    duplicates = [d for d in selection.duplicates
                  if any(d.startswith(f"{ds} {key} ") for key, ds in cells)]
    return {
        "profiles": profiles,
        "seeds": sorted({int(r["seed"]) for r in records}),
        "params_seeds": _params_seeds(spec, selection),
        "data_hashes": sorted({str(r.get("data_hash")) for r in records
                               if r.get("data_hash") is not None}),
        "data_hash_missing": sum(1 for r in records if r.get("data_hash") is None),
        "git_commits": sorted({str(r.get("git_commit")) for r in records
                               if r.get("git_commit") is not None}),
        "pretrained": sorted({_source(r) for r in records if "pretrained" in r}),
        "n_records": len(records),
        "ignored": dict(sorted(selection.ignored.items())),
        "duplicates": duplicates,
        "rows": len(cells),
        "other_code": sorted({f"{r['dataset']}/{row_slug(r['row'])}" for r in records
                              if (r["dataset"], row_key(r["row"])) in selection.other_code}),
    }


def _params_seeds(spec: Spec, selection: Selection) -> dict:
    """{dataset: the seeds params.yaml runs it with} for the datasets of ``spec``'s cells ({}
    without params.yaml)."""
    datasets = {column.dataset or section.dataset for section in spec.sections
                for column in section.columns}
    return {d: selection.seeds_of(d) for d in sorted(datasets) if selection.seeds_of(d) is not None}


# ------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------
def _f(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _p(p) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _ours(cell: Cell) -> str:
    if not cell.ok:
        return cell.status
    s, d = cell.summary, cell.column.digits + 1
    text = _f(s["mean"], d)
    if s["std"] is not None:
        text += f" ± {_f(s['std'], d)}"
    if s["t_ci_low"] is not None:
        text += f" [{_f(s['t_ci_low'], d)}, {_f(s['t_ci_high'], d)}]"
    n = f"n={s['n']}"
    if cell.missing_seeds:
        n += f"; missing seed {', '.join(map(str, cell.missing_seeds))}"
    if s["undefined_seeds"]:
        n += f"; undefined (NaN) at seed {', '.join(map(str, s['undefined_seeds']))}, left out"
    if s["t_ci_low"] is None:
        n += "; CI n/a (n<2)"
    return f"{text} ({n})"


def _signed(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _header(result: SpecResult) -> list[str]:
    spec, prov = result.spec, result.provenance
    lines = [f"# {spec.title} — ours" + (" vs the paper" if spec.kind == "table" else ""), ""]
    banner = profile_banner(prov["profiles"])
    if banner:
        lines += [f"> **{banner}**", ""]
    seeds = ", ".join(map(str, prov["seeds"])) or "none"
    expected = (f" (params.yaml seeds: {seeds_text(prov['params_seeds'])})"
                if prov["params_seeds"] else "")
    hashes = ", ".join(prov["data_hashes"]) or "none"
    if prov["data_hash_missing"]:
        hashes += f" ({prov['data_hash_missing']} record(s) carry no data hash)"
    lines += [f"- profile: {', '.join(prov['profiles']) or 'unknown'}",
              f"- seeds in the records: {seeds}{expected}",
              f"- data hash(es): {hashes}",
              f"- git commit(s): {', '.join(prov['git_commits']) or 'not recorded'}",
              "- pre-training of the backbone (record `pretrained.source`): "
              + (", ".join(prov["pretrained"]).replace("nothing", "none (random init)")
                 if prov["pretrained"] else "not recorded"),
              f"- run records used: {prov['n_records']}"]
    if prov["ignored"]:
        lines.append("- records left out (whole records folder): "
                     + "; ".join(f"{why}: {n}" for why, n in prov["ignored"].items()))
    for note in prov["duplicates"]:
        lines.append(f"- duplicate records: {note}")
    other, every = prov["other_code"], len(prov["other_code"]) == prov["rows"]
    if other:
        lines.append(f"- other code: {'all ' if every else f'{len(other)} of '}{prov['rows']} rows "
                     "were computed by code or compute packages other than this checkout's (record "
                     "`code_hash` / `packages`; `mmpetl sweep` recomputes them) and are shown and "
                     "compared as they are" + ("" if every else ": " + ", ".join(other)))
    return lines + [""]


def _columns_legend(spec: Spec) -> list[str]:
    lines = ["Columns (record metric key, convention, scale):", ""]
    seen = set()
    for section in spec.sections:
        for c in section.columns:
            where = f"{c.group} " if c.group else ""
            text = (f"- {where}{c.label}: `{c.key}`"
                    + (f" (×{c.scale:g})" if c.scale != 1 else "")
                    + f", {c.convention}"
                    + ("; lower is better" if stats.lower_is_better(c.key) else "")
                    + "".join(f"; if absent `{k}` ({conv})" for k, conv in c.fallback))
            if text not in seen:
                seen.add(text)
                lines.append(text)
    if any(s.tunable for s in spec.sections):
        lines.append("- #Tunable ours: the record's trainable parameters, method + task head; "
                     "paper: as printed")
    cells = f"Cells: ours = mean ± std over seeds [{stats.INTERVAL}] (n)"
    if spec.kind == "figure":
        cells += ". The paper's figure prints no numbers, so there is no paper column."
    else:
        cells += "; Δ = ours − paper, in the paper's units."
    return lines + ["", cells, ""]


# Metric columns per markdown table: each shows ours / paper / Δ, so a section with more metrics
# is split into several tables (a reader follows about two metrics, 120-150 characters, per line)
COLUMNS_PER_TABLE = 2


def _section_tables(result: SpecResult, section: Section, reasons: dict) -> list[str]:
    """The section as one table per ``COLUMNS_PER_TABLE`` metrics (the CSV keeps every column).
    A row's status reason ("not run: why") becomes a numbered note in ``reasons``."""
    columns = list(section.columns)
    chunks = [columns[i:i + COLUMNS_PER_TABLE] for i in range(0, len(columns), COLUMNS_PER_TABLE)]
    if len(chunks) == 1 and not section.tunable:
        return [_section_table(result, section, reasons), ""]
    lines = []
    if section.tunable:  # #Tunable and the row's status first, then the metrics
        lines += ["**#Tunable**", "", _section_table(result, section, reasons, [], status=True), ""]
    for chunk in chunks:
        groups = {c.group for c in chunk}
        names = (f"{chunk[0].group}: " + ", ".join(c.label for c in chunk)
                 if len(groups) == 1 and chunk[0].group
                 else ", ".join(f"{c.group} {c.label}" if c.group else c.label for c in chunk))
        lines += [f"**{names}**", "", _section_table(result, section, reasons, chunk,
                                                      tunable=False, status=not section.tunable),
                  ""]
    return lines


def _section_table(result: SpecResult, section: Section, reasons: dict, columns=None,
                   tunable: bool = True, status: bool = True) -> str:
    columns = section.columns if columns is None else columns
    has_paper = any(r.paper and r.paper.values for r in section.rows)
    has_paper_tunable = any(r.paper and r.paper.tunable for r in section.rows)
    headers = ["Method"]
    tunable = tunable and section.tunable
    if tunable:
        headers += ["#Tunable ours"] + (["#Tunable paper"] if has_paper_tunable else [])
    shared = {c.group for c in columns} if len(section.columns) > len(columns) else set()
    for c in columns:  # a split section's tables are headed by their columns' group
        name = f"{c.group} {c.label}" if c.group and len(shared) != 1 else c.label
        headers += [f"{name} ours"] + ([f"{name} paper", f"{name} Δ"] if has_paper else [])
    if status:
        headers.append("Status")
    body = []
    for row_result in (r for r in result.rows if r.section is section):
        row = row_result.row
        statuses = {c.status for c in row_result.cells.values()}
        whole_row = len(statuses) == 1 and "ok" not in statuses
        line = [row.name + (" **(main)**" if row.role == "main" else "")]
        if tunable:
            line.append(row_result.tunable["text"] if row_result.tunable else "—")
            if has_paper_tunable:
                line.append(row.paper.tunable if row.paper and row.paper.tunable else "—")
        for c in columns:
            cell = row_result.cells[c.id]
            line.append(cell.status.split(":", 1)[0] if whole_row else _ours(cell))
            if has_paper:
                line += [_f(cell.paper, c.digits) if cell.paper is not None else "—",
                         _signed(cell.diff, c.digits + 1) if cell.ok and cell.paper is not None
                         else "—"]
        if not status:
            pass
        elif whole_row:
            state, _, why = next(iter(statuses)).partition(": ")
            line.append(f"{state} [{reasons.setdefault(why, len(reasons) + 1)}]" if why
                        else state)
        elif statuses == {"ok"}:
            line.append("ok")
        else:
            line.append("partial: see the cells")
        body.append(line)
    return tabulate(body, headers, tablefmt="github", disable_numparse=True)


def _skipped_lines(result: SpecResult) -> list[str]:
    reasons = {}
    for row_result, _, why in result.skipped:
        reasons.setdefault(row_result.row.name, why)
    return [f"- {name}: {why}" for name, why in reasons.items()]


def _comparison_table(result: SpecResult) -> list[str]:
    """One table per Wander reference row (its name in the heading, not in every line); the
    CSV keeps every field (t statistic, Wilcoxon's smallest attainable p, all-pairs P)."""
    if not result.comparisons:
        compared = [r for r in result.rows if r.row.compared]
        if not compared:
            return []
        return (["## Paired comparisons with Wander (by seed)", "",
                 "No comparison could be made: the compared rows or their Wander reference "
                 "lack runs.", ""] + _skipped_lines(result) + ([""] if result.skipped else []))
    headers = ["Row", "Metric", "n", "Δ [95% t CI]", "p (t)", "p (Holm)", "p (Wilcoxon)",
               "P(Wander > row)", "verdict"]
    by_reference, notes, every = {}, {}, []
    for row_result, column, c, reference in result.comparisons:
        d = column.digits + 1
        ci = (f" [{_f(c['improvement_t_ci_low'], d)}, {_f(c['improvement_t_ci_high'], d)}]"
              if c["improvement_t_ci_low"] is not None else "")
        missing = c["missing_in_wander"] + c["missing_in_baseline"]
        n = str(c["n"]) + (f" (unpaired seeds {sorted(set(missing))})" if missing else "")
        metric = f"{column.group} {column.label}" if column.group else column.label
        by_reference.setdefault(reference.row.name, []).append(
            [row_result.row.name, metric, n, _signed(c["improvement"], d) + ci, _p(c["p_t"]),
             _p(c["p_holm"]), _p(c["p_wilcoxon"]), _f(c["p_better"], 2), c["verdict"]])
        every.append(f"{row_result.row.name} vs {reference.row.name}, {metric}")
        for test, note in (("", c["note"]), ("Wilcoxon: ", c["wilcoxon_note"])):
            if note:  # {note: the comparisons it is about}
                notes.setdefault(test + note, []).append(every[-1])
    lines = ["## Paired comparisons with Wander (by seed)", ""]
    for reference, body in by_reference.items():
        lines += [f"**vs {reference}**", "",
                  tabulate(body, headers, tablefmt="github", disable_numparse=True), ""]
    lines += [
        "- Δ: mean over paired seeds of the improvement, signed so that > 0 means Wander is "
        f"better (lower is better for MAE, MdR, MnR); [..]: {stats.INTERVAL} improvement.",
        "- p (t): paired t-test of the improvement (two-sided; t > 0 means Wander better, in "
        f"the CSV's t_stat). p (Holm): Holm-adjusted over all {len(result.comparisons)} "
        "comparisons of this table; verdict: significant when p (Holm) <= 0.05.",
        "- p (Wilcoxon): exact signed-rank p; the CSV's wilcoxon_min_p is the smallest p "
        "attainable with that n (0.25 at n = 3, 0.0625 at n = 5: such a test can never reach "
        "0.05 and is not evidence either way).",
        "- P(Wander > row): fraction of paired seeds where Wander is better, ties 0.5.", ""]
    if notes:
        lines += ["Comparison notes:", ""] + [
            f"- {note} ({_which(about, every)})" for note, about in sorted(notes.items())] + [""]
    if result.skipped:
        lines += ["Not compared:", ""] + _skipped_lines(result) + [""]
    return lines


def _which(about: list[str], every: list[str]) -> str:
    """The comparisons a note is about, named the short way: all, all but a few, or each."""
    if len(about) == len(every):
        return "every comparison"
    if len(about) > len(every) / 2:
        return "every comparison but " + "; ".join(c for c in every if c not in about)
    return "; ".join(about)


def render_markdown(result: SpecResult, figure_file: str | None = None) -> str:
    spec = result.spec
    lines, reasons = _header(result) + _columns_legend(spec), {}
    for section in spec.sections:
        if section.title or len(spec.sections) > 1:
            lines += [f"## {section.title or section.dataset}", ""]
        lines += _section_tables(result, section, reasons)
    if reasons:
        lines += ["Why a row has no numbers:", ""]
        lines += [f"{number}. {why}" for why, number in reasons.items()] + [""]
    lines += _comparison_table(result)
    if figure_file:
        lines += [f"![{spec.paper_ref}]({figure_file})", ""]
    if spec.notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in spec.notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def csv_rows(result: SpecResult) -> list[dict]:
    out = []
    for row_result in result.rows:
        row, section = row_result.row, row_result.section
        for column in section.columns:
            cell = row_result.cells[column.id]
            s = cell.summary or {}
            c = cell.comparison or {}
            tun = row_result.tunable or {}
            line = {
                "table": result.spec.paper_ref, "section": section.title or section.dataset,
                "row": row.name, "group": row.group, "role": row.role, "dataset": cell.dataset,
                "grid_row": row_key(row.grid) if row.grid is not None else "",
                "column": f"{column.group} {column.label}" if column.group else column.label,
                "metric_key": column.key, "convention": cell.convention or column.convention,
                "lower_is_better": stats.lower_is_better(column.key), "status": cell.status,
                "n": s.get("n", 0), "seeds": " ".join(map(str, s.get("seeds") or [])),
                "missing_seeds": " ".join(map(str, cell.missing_seeds)),
                "undefined_seeds": " ".join(map(str, s.get("undefined_seeds") or [])),
                **{k: s.get(k) for k in ("mean", "std", "t_ci_low", "t_ci_high", "ci_note")},
                "paper": cell.paper, "paper_table": row.paper.table if row.paper else None,
                "diff_vs_paper": cell.diff,
                "tunable_ours": tun.get("total"), "tunable_method": tun.get("method"),
                "tunable_head": tun.get("head"),
                "tunable_paper": row.paper.tunable if row.paper else None,
                # the run records behind the cell, <dataset>/<file> under the records folder
                "records": " ".join(f"{r['dataset']}/{Path(r['_path']).name}"
                                    for r in row_result.records
                                    if r["dataset"] == cell.dataset and r["seed"] in cell.values),
            }
            skip = next((why for r, col, why in result.skipped
                         if r is row_result and col is column), None)
            if skip:
                line["comparison_note"] = skip
            if c:
                reference = section.reference(row)
                line.update({
                    "compared_to": reference.name if reference else None, "n_paired": c["n"],
                    "improvement": c["improvement"],
                    "improvement_t_ci_low": c["improvement_t_ci_low"],
                    "improvement_t_ci_high": c["improvement_t_ci_high"], "t_stat": c["t_stat"],
                    "p_t": c["p_t"], "p_holm": c["p_holm"], "p_wilcoxon": c["p_wilcoxon"],
                    "wilcoxon_min_p": c["wilcoxon_min_p"], "wilcoxon_note": c["wilcoxon_note"],
                    "p_better": c["p_better"], "p_better_all_pairs": c["p_better_all_pairs"],
                    "verdict": c["verdict"], "comparison_note": c["note"]})
            out.append(line)
    return out


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _plot_points(ax, points: list, label: str | None, shift: float = 1.0) -> bool:
    """points: [(x, Cell)]; draws mean with CI bars where a CI exists, at x * ``shift`` (series
    side by side on the log axis). True if anything drawn."""
    ok = sorted((x, cell) for x, cell in points if cell.ok)
    if not ok:
        return False
    xs = [x * shift for x, _ in ok]
    ys = [cell.summary["mean"] for _, cell in ok]
    lo = [(cell.summary["mean"] - cell.summary["t_ci_low"])
          if cell.summary["t_ci_low"] is not None else 0.0 for _, cell in ok]
    hi = [(cell.summary["t_ci_high"] - cell.summary["mean"])
          if cell.summary["t_ci_high"] is not None else 0.0 for _, cell in ok]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
    return True


def render_figure(result: SpecResult) -> bytes:
    from matplotlib.figure import Figure

    spec = result.spec
    panels = ([(section, column) for section in spec.sections for column in section.columns])
    fig = Figure(figsize=(4.2 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (section, column) in zip(axes, panels):
        section_rows = [r for r in result.rows if r.section is section]
        drawn = False
        if spec.figure == "rank":
            for series, shift in (("R_h", 0.94), ("R_t", 1.06)):  # side by side: bars apart
                points = [(r.row.x, r.cells[column.id]) for r in section_rows
                          if series in r.row.series]
                drawn |= _plot_points(ax, points, series, shift)
            ax.set_xlabel("rank (log scale)")
        else:
            points = [(r.row.x, r.cells[column.id]) for r in section_rows]
            drawn = _plot_points(ax, points, None)
            ax.set_xlabel("d (down-projection dimension, log scale)")
        xs = sorted({r.row.x for r in section_rows if r.row.x is not None})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_ylabel(f"{column.label} (ours, mean, 95% t CI)")
        title = section.title or section.dataset
        ax.set_title(f"{title}: {column.label}" if len(section.columns) > 1 else title,
                     fontsize=10)
        if not drawn:
            reason = next(iter(section_rows[0].cells.values())).status if section_rows else ""
            ax.text(0.5, 0.5, "no runs\n" + reason[:60], ha="center", va="center", fontsize=7,
                    transform=ax.transAxes, wrap=True)
    caption = "Paper curve not drawn: no numbers in the paper's text."
    banner = profile_banner(result.provenance["profiles"])
    if banner:
        caption = banner + ". " + caption
    fig.suptitle(spec.title, fontsize=10)
    handles, labels = next((found for found in (ax.get_legend_handles_labels() for ax in axes)
                            if found[0]), ([], []))
    if handles:  # one legend for every panel, above them: none covers a panel's bars
        fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8)
    fig.text(0.5, 0.01, caption, ha="center", fontsize=7)
    fig.subplots_adjust(bottom=0.2, top=0.85, wspace=0.35)
    return _png(fig)


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def render_all(records_dir="results/runs", out_dir="results/tables", params: Mapping | None = None,
               *, names=None,
               cost_table: str | None = None, progress: bool = False) -> dict:
    """Render every spec (or those in ``names``) from ``records_dir`` into ``out_dir``, write the
    index (results/metrics.json is the leaderboard stage's). ``params``: the loaded params.yaml
    (selects the profile and seeds, flags stale records and explains rows that did not run); without it
    every record is used. ``progress``: a bar on stderr, one step per table or figure. Returns
    {"written": [...], "unchanged": [...], "tables": {...}}. Every file is computed before any is
    written (bad input leaves none written)."""
    selection = collect(records_dir, params)
    out_dir = Path(out_dir)
    chosen = specs_module.SPECS
    if names:
        try:
            chosen = tuple(specs_module.spec_by_name(n) for n in names if n != planted.NAME)
        except KeyError as error:
            raise InputError("unknown table", key="names",
                             expected=[s.name for s in specs_module.SPECS] + [planted.NAME],
                             found=str(error)) from error
    files, summary = {}, {}  # {path: bytes} to write
    for spec in tqdm(chosen, desc="tables", unit="table", disable=not progress):
        result = build(spec, selection, params)
        figure_file = None
        if spec.kind == "figure":
            figure_file = f"{spec.name}.png"
            files[out_dir / figure_file] = render_figure(result)
        files[out_dir / f"{spec.name}.md"] = render_markdown(result, figure_file).encode()
        files[out_dir / f"{spec.name}.csv"] = csv_text(CSV_FIELDS, csv_rows(result)).encode()
        summary[spec.name] = {
            "rows": len(result.rows),
            "rows_not_run": sum(1 for r in result.rows if r.status != "ok"),
            "comparisons": len(result.comparisons),
        }
    if not names or planted.NAME in names:
        banner = profile_banner({selection.profile})
        files.update(planted.render_planted(selection, out_dir, banner))
    index = ["# Wander paper: tables and figures", ""]
    for spec in specs_module.SPECS:
        if spec.paper_ref == "Table 7":
            index.append(_table6_line(cost_table, out_dir))
        index.append(f"- [{spec.title}]({spec.name}.md)"
                     + (f" ([figure]({spec.name}.png))" if spec.kind == "figure" else ""))
    index.append(f"- [{planted.TITLE}]({planted.NAME}.md) (not in the paper: planted-answer tasks)")
    files[out_dir / "index.md"] = ("\n".join(index) + "\n").encode()
    written, unchanged = [], []
    for path, data in files.items():
        (written if write_bytes_if_changed(path, data) else unchanged).append(str(path))
    return {"written": written, "unchanged": unchanged, "tables": summary}


def _table6_line(cost_table: str | None, out_dir: Path) -> str:
    source = cost_table or specs_module.TABLE6_SOURCE
    if source:
        link = Path(os.path.relpath(Path(source), out_dir)).as_posix()
        return f"- [Table 6: Computational analysis of SF-OP / SF-VF / SF (cost stage)]({link})"
    return f"- Table 6: not rendered here. {specs_module.TABLE6_NOTE}"
