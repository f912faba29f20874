"""Stage ``leaderboard`` (``mmpetl leaderboard``): every method and grid row present in the run
records, per dataset, ranked by the dataset's main metric, with no table code to edit when a
method or a grid row is added.

Per dataset with records (``results/leaderboards/<dataset>.md`` and ``.csv``):
- the main metric is the dataset card's ``main_metric`` (``datasets/<name>.yaml``); every other
  column of the dataset's paper tables (``harness.tables.specs``) is shown with its interval;
- rows are ranked by the test mean of the main metric (``ranking``): means equal within the
  rounding tolerance (``stats.merge_ties``) share a rank (competition ranking: =1, =1, 3),
  listed by row slug; the same rule for every "best" choice below, whose ties the file names;
- the Wander reference is the main Wander row of the dataset's paper table (``Section.main``);
  the best baseline is the non-Wander row with the best mean VALIDATION main metric (records'
  ``valid_metrics``: chosen without looking at test, like every selection here; among tied
  rows, the first by slug);
- every row is tested against both on the main metric (paired by seed, ``harness.stats``:
  t-test, exact Wilcoxon, P(better)); Holm runs over all the tests of the leaderboard;
- the CSV is the long layout of ``harness.tables.render`` (sections ``leaderboard``,
  ``vs best baseline``, ``all metrics``), each line listing the record files behind it
  (``records``, relative to the records folder), so ``mmpetl diff`` reads it like a table.

``results/metrics.json`` (the DVC metrics file: ``dvc exp show`` / ``dvc metrics diff``): one
entry per dataset and method (method, or ``method_variant`` for a non-paper variant): the test
main metric (mean over seeds, record units) of the method's grid row with the best mean
validation main metric and its ``tunable`` (the leaderboard marks that row ``headline``, and
names the rows tied with it, the first by slug being chosen; numbers only, so ``dvc metrics
diff`` gives every change a delta). ``results/metrics_detail.json``: every grid row, every numeric
record metric's mean / std / n and the #tunable. Row slugs and method keys must name one grid row
each (``unique_names``): a method registered as another's ``method_variant`` is an error.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

from harness import stats
from harness.data.cards import load_card
from harness.errors import InputError
from harness.records import row_slug
from harness.tables import render
from harness.tables import specs as specs_module
from harness.tables.collect import Selection, collect, main_metric, row_key
from harness.tables.io import csv_text, write_json_if_changed, write_text_if_changed
from harness.tables.specs import Column, Row, Section, Spec

LEADERBOARD_DIR = "results/leaderboards"
HEADLINE = "results/metrics.json"
DETAIL = "results/metrics_detail.json"
SECTIONS = ("leaderboard", "vs best baseline", "all metrics")
VERDICTS = {stats.WANDER_BETTER: "reference better", stats.BASELINE_BETTER: "row better"}


def dataset_columns(dataset: str) -> list[Column]:
    """The columns the paper's tables show for ``dataset`` (first seen, one per metric key)."""
    found: dict = {}
    for spec in specs_module.SPECS:
        for section in spec.sections:
            for column in section.columns:
                if (column.dataset or section.dataset) == dataset and column.key not in found:
                    found[column.key] = Column(column.key, column.label, column.key,
                                               column.convention, column.scale, column.digits,
                                               fallback=column.fallback)
    return list(found.values())


def main_column(dataset: str, columns: list[Column]) -> Column:
    metric = main_metric(dataset)
    known = next((c for c in columns if c.key == metric), None)
    return known or Column(metric, metric, metric, f"record metric {metric}", scale=1.0, digits=3)


def wander_reference(dataset: str) -> dict | None:
    """The grid row of the main Wander row of the dataset's first paper table."""
    for spec in specs_module.SPECS:
        for section in spec.sections:
            main = section.main()
            if section.dataset == dataset and main is not None and main.grid is not None \
                    and main.pretrain is None:
                return dict(main.grid)
    return None


def _mean(values) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float))
              and not isinstance(v, bool) and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def _better(metric: str):
    """Sort key: best first for ``metric``'s direction, missing values last."""
    sign = 1.0 if stats.lower_is_better(metric) else -1.0
    return lambda item: (item[1] is None, sign * (item[1] or 0.0), item[0])


def ranking(means: Mapping[str, float | None], metric: str) -> list[tuple[str, int | None]]:
    """[(name, rank)] best first for ``metric``: means equal within the rounding tolerance
    (``stats.merge_ties``) share the rank of the first (=1, =1, 3) and are listed by name;
    names without a value last, rank None."""
    valued = [name for name, value in means.items() if value is not None]
    merged = dict(zip(valued, stats.merge_ties([means[name] for name in valued]))) if valued else {}
    order = sorted(means, key=lambda name: _better(metric)((name, merged.get(name))))
    ranks = []
    for position, name in enumerate(order):
        if name not in merged:
            ranks.append((name, None))
        elif position and merged[name] == merged[order[position - 1]]:
            ranks.append((name, ranks[-1][1]))
        else:
            ranks.append((name, position + 1))
    return ranks


def best_of(means: Mapping[str, float | None], metric: str) -> list[str]:
    """The names with the best value of ``metric`` (several when tied, first by name); [] when no
    name has a value."""
    return [name for name, rank in ranking(means, metric) if rank == 1]


def unique_names(dataset: str, rows, name=row_slug) -> dict[str, dict]:
    """{``name(row)``: row}; two different grid rows of one name (a method registered as
    ``wander_code`` next to Wander's ``code`` variant) are an error naming both."""
    named: dict[str, dict] = {}
    for row in rows:
        other = named.setdefault(name(row), dict(row))
        if other != dict(row):
            raise InputError(f"grid rows {row_key(other)} and {row_key(row)} of {dataset} have one "
                             "name in the leaderboard and results/metrics*.json; rename a method",
                             key=name(row), expected="one grid row per name", found="two")
    return named


def dataset_rows(selection: Selection, dataset: str) -> dict[str, dict]:
    """{row slug: grid row} of ``dataset``'s cells (``unique_names``)."""
    return unique_names(dataset, (next(iter(by_seed.values()))["row"]
                                  for (d, _), by_seed in selection.cells().items() if d == dataset))


def valid_mean(by_seed: Mapping, metric: str) -> float | None:
    return _mean((r.get("valid_metrics") or {}).get(metric) for r in by_seed.values())


def mean_test(by_seed: Mapping, metric: str) -> float | None:
    return _mean(r["metrics"].get(metric) for r in by_seed.values())


def leaderboard_spec(dataset: str, selection: Selection) -> tuple[Spec, dict]:
    """The leaderboard of ``dataset`` as a ``Spec`` that ``render.build`` computes; and what it
    chose (main column, Wander reference row, best baseline row)."""
    columns = dataset_columns(dataset)
    main = main_column(dataset, columns)
    columns = [main] + [c for c in columns if c.key != main.key]
    grids = dataset_rows(selection, dataset)
    ranks = dict(ranking({slug: mean_test(selection.get(dataset, row), main.key)
                          for slug, row in grids.items()}, main.key))
    # the best baseline: the non-Wander row with the best mean validation main metric; when
    # tied, the first by slug is tested against and the others are named
    best = best_of({slug: valid_mean(selection.get(dataset, row), main.key)
                    for slug, row in grids.items() if row["method"] != "wander"}, main.key)
    wander = wander_reference(dataset)
    rows = [grids[slug] for slug in ranks]
    if wander is not None and wander not in rows:
        rows.append(wander)  # shown, "not run", so the reader sees why no test was made
        ranks[row_slug(wander)] = None

    best_row = grids[best[0]] if best else None

    def section(title, cols, reference, compared=True):
        return Section(dataset, tuple(cols), tuple(
            Row(row_slug(g), g, role="main" if g == reference else
                ("baseline" if compared and reference is not None else "wander"))
            for g in rows), title=title, tunable=title != "all metrics")

    card = load_card(dataset)
    spec = Spec(f"leaderboard_{dataset}", f"Leaderboard: {card.title} ({dataset})", dataset,
                "leaderboard", (section(SECTIONS[0], [main], wander),
                                section(SECTIONS[1], [main], best_row),
                                section(SECTIONS[2], columns, None, compared=False)))
    return spec, {"main": main, "wander": wander, "best": best_row, "card": card,
                  "best_tied": best[1:], "ranks": ranks,
                  "headline": headline_rows(selection, dataset, main.key)}


def _vs(cell: render.Cell, digits: int) -> str:
    c = cell.comparison
    if c is None:
        return "—"
    verdict = {stats.WANDER_BETTER: "reference better", stats.BASELINE_BETTER: "row better",
               stats.NOT_SIGNIFICANT: "n.s.", stats.UNTESTABLE: "untestable"}[c["verdict"]]
    return f"{render._signed(c['improvement'], digits)}, p={render._p(c['p_holm'])}, {verdict}"


def render_leaderboard(result: render.SpecResult, chose: dict) -> str:
    main, by_title = chose["main"], {}
    for row_result in result.rows:
        by_title.setdefault(row_result.section.title, []).append(row_result)
    lines = render._header(result)
    direction = "lower" if stats.lower_is_better(main.key) else "higher"
    wander = row_slug(chose["wander"]) if chose["wander"] else None
    best = row_slug(chose["best"]) if chose["best"] else None
    lines += [f"Main metric: {main.label} (`{main.key}`, {main.convention}"
              + (f", ×{main.scale:g}" if main.scale != 1 else "") + f"; {direction} is better), "
              f"the card's `main_metric` (datasets/{chose['card'].name}.yaml). Rows are ranked "
              f"by its test mean over seeds; means equal within {stats.RELATIVE_TOLERANCE:g} of the "
              "largest |mean| are tied: they share a rank, marked `=` (=1, =1, 3), and are listed "
              "by row name.", "",
              "- Wander reference: " + (f"`{wander}` (the main Wander row of the paper's table)"
                                        if wander else "none (no paper table for this dataset)")
              + _no_values(by_title[SECTIONS[0]], wander, main),
              "- best baseline: " + (f"`{best}` (the non-Wander row with the best mean "
                                     f"validation {main.key})" if best else
                                     "none (no non-Wander row has validation values)")
              + _tied(chose["best_tied"]), ""]
    d = main.digits + 1
    vs_best = {r.row.label: r.cells[main.id] for r in by_title[SECTIONS[1]]}
    marked = {slug: group for group, (slug, _, _) in chose["headline"].items()}
    ranks = list(chose["ranks"].values())
    body = []
    for row_result in by_title[SECTIONS[0]]:
        cell = row_result.cells[main.id]
        label = row_result.row.label
        rank = chose["ranks"][label]
        shown = "—" if rank is None else ("=" if ranks.count(rank) > 1 else "") + str(rank)
        body.append([shown, label + (f" (headline `{marked[label]}`)" if label in marked else ""),
                     row_result.tunable["text"] if row_result.tunable else "—",
                     render._ours(cell), _vs(cell, d), _vs(vs_best[row_result.row.label], d)])
    lines += [tabulate(body, ["#", "Row", "#Tunable", f"{main.label} ours",
                              "vs Wander: Δ, p (Holm)", "vs best baseline: Δ, p (Holm)"],
                       tablefmt="github", disable_numparse=True), "",
              f"- ours: mean ± std over seeds [{stats.INTERVAL}] (n).",
              "- Δ: mean paired improvement of the REFERENCE (Wander, or the best baseline) over "
              f"the row, > 0 when the reference is better ({direction} is better for "
              f"{main.key}); paired by seed.",
              "- headline `<method>`: the method's row in results/metrics.json (its best mean "
              f"validation {main.key}; among tied rows, the first by name)."
              + "".join(f" `{group}`: `{slug}`{_tied(tied)}."
                        for group, (slug, _, tied) in chose["headline"].items() if tied),
              f"- p (Holm): paired t-test, Holm-adjusted over all {len(result.comparisons)} tests "
              "of this leaderboard; a verdict needs p <= 0.05 (n.s.: not significant). "
              "The CSV has the exact Wilcoxon p, its smallest attainable p and P(better).", ""]
    rest = [c for c in result.spec.sections[2].columns]
    if len(rest) > 1:
        lines += ["## Other metrics", ""]
        for columns in _fitting(rest[1:], lambda part: _other_metrics(by_title[SECTIONS[2]], part)):
            lines += [_other_metrics(by_title[SECTIONS[2]], columns), ""]
    lines += ["## Run records", ""]
    for row_result in by_title[SECTIONS[2]]:
        names = ", ".join(_record_names(row_result.records)) or "none"
        lines.append(f"- `{row_result.row.label}`: {names}")
    return "\n".join(lines).rstrip("\n") + "\n"


# The widest table line a reader follows without scrolling: wider tables are split by column
MAX_TABLE_WIDTH = 200


def _other_metrics(rows: list, columns: list[Column]) -> str:
    body = [[r.row.label] + [render._ours(r.cells[c.id]) for c in columns] for r in rows]
    return tabulate(body, ["Row"] + [f"{c.label} (`{c.key}`)" for c in columns],
                    tablefmt="github", disable_numparse=True)


def _fitting(columns: list[Column], table) -> list[list[Column]]:
    """``columns`` in consecutive groups, each as many as ``table(group)`` renders within
    ``MAX_TABLE_WIDTH`` characters (at least one)."""
    groups = [[]]
    for column in columns:
        wider = groups[-1] + [column]
        if groups[-1] and len(table(wider).splitlines()[0]) > MAX_TABLE_WIDTH:
            groups.append([column])
        else:
            groups[-1] = wider
    return groups


def _tied(slugs: list[str]) -> str:
    """'' or the note naming the rows tied with a chosen one."""
    return (f"; tied with {', '.join(f'`{s}`' for s in slugs)}, the first by name is chosen"
            if slugs else "")


def _no_values(rows: list, slug: str | None, main: Column) -> str:
    """Why no row is tested against the reference ``slug``: '' when it has values."""
    cell = next((r.cells[main.id] for r in rows if r.row.label == slug), None)
    return "" if cell is None or cell.ok else f"; no test against it: {cell.status}"


def _record_names(records: list) -> list[str]:
    return [f"{r['dataset']}/{Path(r['_path']).name}" for r in records]


def leaderboard_csv_rows(result: render.SpecResult) -> list[dict]:
    out = []
    for line in render.csv_rows(result):
        if line.get("verdict") in VERDICTS:
            line["verdict"] = VERDICTS[line["verdict"]]
        out.append(line)
    return out


def _method_variant(row: Mapping) -> dict:
    return {"method": row["method"], "variant": row.get("variant", "paper")}


def headline_rows(selection: Selection, dataset: str, metric: str) -> dict:
    """{method[_variant]: (row slug, records by seed, slugs of the rows tied with it)}: per method,
    its grid row with the best mean validation ``metric`` (tied within the rounding tolerance: the
    first by slug)."""
    rows = list(dataset_rows(selection, dataset).values())
    unique_names(dataset, map(_method_variant, rows))
    out = {}
    for group in sorted({row_slug(_method_variant(row)) for row in rows}):
        mine = {row_slug(row): selection.get(dataset, row) for row in rows
                if row_slug(_method_variant(row)) == group}
        best = best_of({slug: valid_mean(by_seed, metric) for slug, by_seed in mine.items()},
                       metric) or sorted(mine)[:1]
        out[group] = (best[0], mine[best[0]], best[1:])
    return out


def headline(selection: Selection, datasets) -> dict:
    """{dataset: {method[_variant]: {<main metric>, tunable}}}: per method, its grid row with the
    best mean validation main metric (test mean in record units; the leaderboard names it)."""
    out: dict = {}
    for dataset in datasets:
        metric = main_column(dataset, []).key
        for group, (_, by_seed, _) in headline_rows(selection, dataset, metric).items():
            entry = {metric: mean_test(by_seed, metric)}
            tunable = render._tunable(list(by_seed.values()))
            if tunable and tunable["total"] is not None:
                entry["tunable"] = tunable["total"]
            out.setdefault(dataset, {})[group] = entry
    return out


def detail(selection: Selection) -> dict:
    """{dataset: {row slug: {<key>_mean, <key>_std, <key>_n, tunable}}}, every numeric metric."""
    out: dict = {}
    for dataset in sorted({d for d, _ in selection.cells()}):
        dataset_rows(selection, dataset)  # refuses two rows of one slug
    for (dataset, _), by_seed in sorted(selection.cells().items()):
        records = [r for _, r in sorted(by_seed.items())]
        entry = out.setdefault(dataset, {}).setdefault(row_slug(records[0]["row"]), {})
        keys = sorted({k for r in records for k, v in r["metrics"].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for key in keys:
            values = [float(r["metrics"][key]) for r in records
                      if isinstance(r["metrics"].get(key), (int, float))
                      and math.isfinite(float(r["metrics"][key]))]
            if not values:
                continue
            summary = stats.summarize(values)
            entry[f"{key}_mean"], entry[f"{key}_n"] = summary["mean"], summary["n"]
            if summary["std"] is not None:
                entry[f"{key}_std"] = summary["std"]
        tunable = render._tunable(records)
        if tunable and tunable["total"] is not None:
            entry["tunable"] = tunable["total"]
    return out


def write_leaderboards(records_dir="results/runs", out_dir=LEADERBOARD_DIR,
                       params: Mapping | None = None, *, headline_path=HEADLINE,
                       detail_path=DETAIL, progress: bool = False) -> dict:
    """The ``leaderboard`` stage. Returns {"written", "unchanged", "leaderboards": {dataset:
    {"rows", "tests"}}}. Every file is computed before any is written (bad input leaves none
    written), and written only when its content changes. ``progress``: a bar on stderr, one
    step per dataset."""
    selection = collect(records_dir, params)
    datasets = sorted({d for d, _ in selection.cells()})
    out_dir = Path(out_dir)
    texts, documents, summary = {}, {}, {}
    for dataset in tqdm(datasets, desc="leaderboards", unit="dataset", disable=not progress):
        spec, chose = leaderboard_spec(dataset, selection)
        result = render.build(spec, selection, params)
        texts[out_dir / f"{dataset}.md"] = render_leaderboard(result, chose)
        texts[out_dir / f"{dataset}.csv"] = csv_text(render.CSV_FIELDS,
                                                     leaderboard_csv_rows(result))
        summary[dataset] = {"rows": len(result.spec.sections[0].rows),
                            "tests": len(result.comparisons)}
    index = ["# Leaderboards: every grid row in the run records", ""] + [
        f"- [{dataset}]({dataset}.md)" for dataset in datasets]
    texts[out_dir / "index.md"] = "\n".join(index) + "\n"
    if headline_path is not None:
        documents[headline_path] = headline(selection, datasets)
    if detail_path is not None:
        documents[detail_path] = detail(selection)
    written, unchanged = [], []
    for path, text in texts.items():
        (written if write_text_if_changed(path, text) else unchanged).append(str(path))
    for path, document in documents.items():
        (written if write_json_if_changed(path, document) else unchanged).append(str(path))
    return {"written": written, "unchanged": unchanged, "leaderboards": summary}
