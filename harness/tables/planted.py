"""The Planted effects table (``results/tables/planted_effects.md|csv``, stage ``tables``): on the
planted-answer tasks (``harness.data.planted``, docs/planted.md) each tested grid row against the
linear probe, paired by seed, next to what the theory predicts.

Each task lists its rows and, per row, the prediction: ``better`` (the row beats the linear probe)
or ``not better`` (no difference, or worse). The test is ``harness.stats.compare`` with the row on
the "Wander" side and the linear probe as the baseline, on the dataset card's ``main_metric``, and
Holm over every comparison of the table (``harness.stats.adjust``, alpha 0.05). A prediction
holds when the verdict is "better" for ``better``, and anything else for ``not better``.
``scripts/bench_calibration.py`` applies the same comparisons to repeated studies.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from harness import stats
from harness.tables.collect import Selection, main_metric, row_key, seeds_text
from harness.tables.io import csv_text, num

BETTER, NOT_BETTER = "better", "not better"   # the predictions
OUTCOMES = {stats.WANDER_BETTER: BETTER, stats.BASELINE_BETTER: "worse",
            stats.NOT_SIGNIFICANT: stats.NOT_SIGNIFICANT, stats.UNTESTABLE: stats.UNTESTABLE}
NOT_RUN = "not run: no records of the row and the probe on common seeds"
PROBE = {"method": "linear"}
NAME = "planted_effects"
TITLE = "Planted effects: each method against the linear probe where the right answer is known"
CSV_FIELDS = ["task", "dataset", "row", "grid_row", "metric", "prediction", "n_paired", "seeds",
              "row_mean", "probe_mean", "improvement", "improvement_t_ci_low",
              "improvement_t_ci_high", "p_t", "p_holm", "verdict", "outcome", "holds", "why",
              "records"]


@dataclass(frozen=True)
class PlantedRow:
    label: str
    grid: dict          # the params.yaml grid row
    prediction: str     # BETTER | NOT_BETTER (than the linear probe)
    why: str


@dataclass(frozen=True)
class PlantedTask:
    dataset: str
    task: str
    rows: tuple


WANDER = {"method": "wander", "down_dim": 16}
WANDER_CODE = {"method": "wander", "variant": "code", "down_dim": 16}
# The released Wander model's head reads the fused token 0: text's token 0, repeated M times.
DEAD = ("released init w_t = 0: the adapter never trains, so the row is the frozen backbone under "
        "the released head, which reads text's token 0 alone")
PLANTED_TASKS = (
    PlantedTask("planted_null", "null: a sum of unimodal features", (
        PlantedRow("Wander (d=16)", WANDER, NOT_BETTER,
                   "every token, token 0 included, carries each modality's feature, and the label "
                   "is their sum: the probe's head reads all of it; fusion has nothing to add"),
        PlantedRow("Wander (d=16), released code", WANDER_CODE, NOT_BETTER,
                   DEAD + ": it sees one of the three summed features, so it is expected WORSE "
                   "than the probe (correlation about 1 / sqrt(3) of the probe's)"))),
    PlantedTask("planted_cross", "cross-modal: parity of one sign per modality", (
        PlantedRow("Wander (d=16)", WANDER, BETTER,
                   "the label is the sign of a product over the modalities of one feature each; "
                   "SF (Eq. 13) multiplies per-modality projections of the tokens, so it "
                   "computes that product; no modality or pair of them predicts the label"),
        PlantedRow("Wander (d=16), released code", WANDER_CODE, NOT_BETTER,
                   DEAD + ": no pair of modalities predicts the parity, text alone even less"),
        PlantedRow("LoRA (r=16)", {"method": "lora", "rank": 16}, NOT_BETTER,
                   "LoRA changes each modality's encoder alone; token 0 already holds each "
                   "modality's feature and the modalities still meet only in the head's MLP, "
                   "as for the probe"))),
    PlantedTask("planted_depth", "depth: features the frozen encoders' output lost", (
        PlantedRow("Wander (d=16)", WANDER, NOT_BETTER,
                   "Wander acts after the last layer, on the encoders' output, which is the same "
                   "whichever sign each modality's feature has; the label changes sign with them, "
                   "so nothing computed from that output correlates with it, the probe's head "
                   "included"),
        PlantedRow("LoRA (r=16)", {"method": "lora", "rank": 16}, BETTER,
                   "every layer's normed input holds each modality's feature (in channels the "
                   "final norm zeroes); LoRA on q and v reads it there and can write it through "
                   "the attention's output map into channels the final norm keeps"),
        PlantedRow("Adapter (d=16)", {"method": "adapter", "down_dim": 16}, BETTER,
                   "each layer's attention output carries the feature (in channels the final norm "
                   "zeroes); the adapter after it reads it there and can add it to channels the "
                   "final norm keeps"))),
)


def planted_values(selection: Selection) -> dict:
    """``values`` {(dataset, label): {seed: main-metric value}} for every planted row and the probe
    (label "Linear probe"), ``records`` {(dataset, label): [record paths]} and ``metrics``
    {dataset: the card's main metric}."""
    values, paths, metrics = {}, {}, {}
    for task in PLANTED_TASKS:
        metric = metrics[task.dataset] = main_metric(task.dataset)
        for label, grid in (("Linear probe", PROBE),) + tuple((r.label, r.grid) for r in task.rows):
            by_seed = selection.get(task.dataset, grid)
            values[(task.dataset, label)] = {seed: record["metrics"].get(metric, float("nan"))
                                             for seed, record in sorted(by_seed.items())}
            paths[(task.dataset, label)] = sorted(
                f"{task.dataset}/{Path(r['_path']).name}" for r in by_seed.values())
    return {"values": values, "records": paths, "metrics": metrics}


def planted_comparisons(values: Mapping, metrics: Mapping, seeds=None) -> list[dict]:
    """Every planted row against the linear probe on its dataset's metric (``planted_values``
    gives both), on the seeds in ``seeds`` (None: all), Holm
    over the whole table; each comparison carries its task, row, prediction, ``outcome`` (better,
    worse, no significant difference, untestable, or ``NOT_RUN``) and ``holds`` (None unless
    tested)."""
    keep = (lambda s: True) if seeds is None else set(seeds).__contains__
    found = []
    for task in PLANTED_TASKS:
        metric = metrics[task.dataset]
        probe = {s: v for s, v in values[(task.dataset, "Linear probe")].items() if keep(s)}
        for row in task.rows:
            side = {s: v for s, v in values[(task.dataset, row.label)].items() if keep(s)}
            comparison = stats.compare(side, probe, metric)
            comparison.update(task=task.task, dataset=task.dataset, row=row.label, grid_row=row.grid,
                              prediction=row.prediction, why=row.why)
            found.append(comparison)
    stats.adjust(found)
    for comparison in found:
        verdict = comparison["verdict"]
        comparison["outcome"] = OUTCOMES[verdict] if comparison["n"] else NOT_RUN
        comparison["holds"] = (None if verdict == stats.UNTESTABLE else
                               (comparison["outcome"] == BETTER) == (comparison["prediction"] == BETTER))
    return found


def _interval(low, high, digits=3) -> str:
    return "" if low is None else f"[{num(round(low, digits))}, {num(round(high, digits))}]"


def _r(x, digits=3) -> str:
    return "" if x is None else num(round(x, digits))


def _p(p) -> str:
    return "" if p is None else f"{p:.2g}"


def render_planted(selection: Selection, out_dir, banner: str | None) -> list[tuple[Path, bytes]]:
    """The table's Markdown and CSV files as (path, bytes)."""
    collected = planted_values(selection)
    comparisons = planted_comparisons(collected["values"], collected["metrics"])
    lines = [f"# {TITLE}", ""] + ([f"**{banner}**", ""] if banner else [])
    lines += ["Each row against the linear probe on the same seeds (paired t-test; Holm over the "
              "table, alpha 0.05). Predictions and the reasoning behind them: docs/planted.md.", ""]
    planned = {t.dataset: selection.seeds_of(t.dataset) for t in PLANTED_TASKS}
    if all(seeds is not None for seeds in planned.values()):
        lines += [f"Seeds (params.yaml `seeds_by_dataset`, else `seeds`): {seeds_text(planned)}.",
                  ""]
    table, csv_lines = [], []
    for c in comparisons:
        key = (c["dataset"], c["row"])
        table.append([c["dataset"], c["row"], c["n"], _r(c["wander_mean"]), _r(c["baseline_mean"]),
                      f"{_r(c['improvement'])} {_interval(c['improvement_t_ci_low'], c['improvement_t_ci_high'])}",
                      _p(c["p_t"]), _p(c["p_holm"]),
                      "not run [1]" if c["outcome"] == NOT_RUN else c["outcome"], c["prediction"],
                      {True: "yes", False: "NO", None: "untestable"}[c["holds"]]])
        csv_lines.append({
            "task": c["task"], "dataset": c["dataset"], "row": c["row"],
            "grid_row": row_key(c["grid_row"]), "metric": c["metric"], "prediction": c["prediction"],
            "n_paired": c["n"], "seeds": " ".join(map(str, c["seeds"])),
            "row_mean": c["wander_mean"], "probe_mean": c["baseline_mean"],
            "improvement": c["improvement"], "improvement_t_ci_low": c["improvement_t_ci_low"],
            "improvement_t_ci_high": c["improvement_t_ci_high"], "p_t": c["p_t"],
            "p_holm": c["p_holm"], "verdict": c["verdict"], "outcome": c["outcome"],
            "holds": c["holds"], "why": c["why"],
            "records": " ".join(collected["records"][key] + collected["records"][(c["dataset"], "Linear probe")])})
    metrics = sorted({c["metric"] for c in comparisons})
    lines += ["Tasks (named by their dataset in the table):", ""]
    lines += [f"- `{t.dataset}`: {t.task}" for t in PLANTED_TASKS] + [""]
    lines.append(tabulate(table, headers=["task", "row", "n", "row mean", "probe mean",
                                          "mean diff [95% CI]", "p", "p Holm", "found",
                                          "predicted", "as predicted"], tablefmt="github"))
    if any(c["outcome"] == NOT_RUN for c in comparisons):
        lines += ["", f"1. {NOT_RUN[len('not run: '):].capitalize()}."]
    lines += ["", f"Metric: the dataset card's main metric ({', '.join(metrics)}); mean diff = row "
              "- probe. Why each prediction:", ""]
    lines += [f"- {c['task']} / {c['row']}: {c['why']}." for c in comparisons]
    out_dir = Path(out_dir)
    return [(out_dir / f"{NAME}.md", ("\n".join(lines) + "\n").encode()),
            (out_dir / f"{NAME}.csv", csv_text(CSV_FIELDS, csv_lines).encode())]
