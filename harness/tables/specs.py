"""One spec per table and figure of the Wander paper (AAAI 2025): rows (label as printed, the
params.yaml grid row it reads), columns (record metric key + convention) and the paper's
published numbers. The ``PaperValue(...)`` literals below are the only hand-typed numbers of
the harness: each is typed once, with the table it is printed in.

Conventions of the columns
- MOSI (Tables 3, 5, 7, 8): ACC-2 / F1 -> ``acc2_non0`` / ``f1_non0``, the "non0 (MulT)"
  convention (samples with label 0 dropped, p > 0 vs y > 0, weighted F1 computed as the MulT
  and Wander code call it, ``f1_score(preds, truth)``: weights = predicted class counts; the
  usual order is ``f1_non0_sklearn``, see ``harness.tasks.metrics``); ACC-7 -> ``acc7``;
  MAE -> ``mae`` (lower is better); Corr -> ``corr`` (Pearson). Accuracies are fractions in
  the records and are shown x100 as in the paper.
- IEMOCAP (Tables 2, 8, Figures 4, 5): ACC / F1 -> ``acc`` / ``f1``: in the MulT layout the
  mean over the 4 binary emotion tasks (neutral, happy, sad, angry) of accuracy and weighted F1.
  Records of the 4-class (MMIN/CGGM) layout have ``acc`` (4-class accuracy) and
  ``f1_weighted`` instead; the F1 column falls back to it and the cell says so.
- Food-101 (Table 1, Figure 5): ACC -> ``acc`` (101-class top-1), F1 -> ``f1_macro`` (macro
  over the 101 classes; ``f1_weighted`` is recorded too).
- MSR-VTT (Table 4, Figure 5): R@5 / R@10 / MdR / MnR in both directions -> ``t2v_r5`` ...
  ``v2t_mnr`` (recalls already in percent; ranks 1-based, lower is better).
- #Tunable: ours = the record's ``tunable.method + tunable.head``; the paper's as printed.

Rows
- ``role="main"``: the table's main Wander row, the one every baseline / ablation is compared
  with (Tables 1-4: the smaller-d Wander row, the paper's "fewer parameters" headline and the
  default of Figure 5; Table 5: Wander (d=16) for SF-OP / SF-VF, each "-c" ablation against
  its own Wander (d) via ``compare_to``; Table 7: Wander (SF); Table 8: Wander (d=16) under
  CMU-MOSEI pre-training).
- ``role="wander"``: another Wander row shown but not tested; ``"baseline"`` / ``"ablation"``
  / ``"extra"`` (grid rows that are not in the paper: linear probe, released-code variants)
  are compared with the main row (or ``compare_to``); ``"point"``: a figure point.
- ``reason``: the row cannot run in this harness; it renders "not run: <reason>".
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, eq=False)
class PaperValue:
    """Published numbers of one row, as printed in ``table`` (column id -> number), and its
    #Tunable as printed (None where the table has no such column)."""
    table: str
    values: MappingProxyType
    tunable: str | None

    def __init__(self, table: str, tunable: str | None = None, **values: float):
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "tunable", tunable)
        object.__setattr__(self, "values", MappingProxyType(dict(values)))


@dataclass(frozen=True)
class Column:
    id: str                 # unique within a spec; PaperValue keys use it
    label: str              # header as printed in the paper
    key: str                # record metric key
    convention: str
    scale: float = 100.0    # record value x scale = paper units
    digits: int = 1         # decimals the paper prints
    dataset: str | None = None   # for tables spanning datasets (Table 8)
    group: str | None = None     # header group (Text->Video, CMU-MOSI, ...)
    fallback: tuple = ()         # ((key, convention), ...) tried when a record lacks ``key``


# The released-code Wander row of Tables 1-4
DEAD_WANDER_NOTE = (
    "Wander (released code) starts from the released init w_t = 0, where the product over the "
    "modalities and every gradient to the adapter are zero for good: the row trains the task head "
    "on the frozen backbone, so it equals the linear probe wherever the released head is the "
    "probe's head. Equal rows are equal by construction, not by chance.")


@dataclass(frozen=True)
class Row:
    label: str
    grid: dict | None                    # the params.yaml grid row (a record's ``row``)
    paper: PaperValue | None = None
    role: str = "baseline"               # main | wander | baseline | ablation | extra | point
    compare_to: str | None = None        # label of the reference row (default: the main row)
    reason: str | None = None            # why this row cannot run here
    group: str | None = None             # row group (Table 8: pre-training corpus)
    x: float | None = None               # figure x value
    series: tuple = ()                   # figure series the point belongs to
    pretrain: str | None = None          # required pre-training source of the records' backbone

    @property
    def name(self) -> str:
        return f"{self.group} / {self.label}" if self.group else self.label

    @property
    def compared(self) -> bool:
        return self.role in ("baseline", "ablation", "extra") or self.compare_to is not None


@dataclass(frozen=True)
class Section:
    dataset: str
    columns: tuple
    rows: tuple
    title: str | None = None
    tunable: bool = True                 # show the #Tunable columns

    def main(self) -> Row | None:
        return next((r for r in self.rows if r.role == "main"), None)

    def reference(self, row: Row) -> Row | None:
        if row.compare_to is not None:
            return next(r for r in self.rows if r.label == row.compare_to)
        return self.main()


@dataclass(frozen=True)
class Spec:
    name: str               # output file stem under results/tables/
    title: str
    paper_ref: str          # "Table 3", "Figure 5"
    kind: str               # table | figure
    sections: tuple
    notes: tuple = ()
    figure: str | None = None   # figure layout: "d" | "rank"


def _g(method: str, **settings) -> dict:
    return {"method": method, **settings}


# ------------------------------------------------------------------------------------------
# columns
# ------------------------------------------------------------------------------------------
NON0 = "non0 (MulT): label-0 samples dropped, p > 0 vs y > 0"
F1_REFERENCE_ORDER = (", weighted F1 as the MulT / Wander code computes it, f1_score(preds, truth): "
                      "weights = predicted class counts (usual order: f1_non0_sklearn)")


def mosi_columns(prefix: str = "", dataset: str | None = None, group: str | None = None,
                 full: bool = True) -> tuple:
    cols = [Column(f"{prefix}acc2", "ACC-2" if full else "ACC", "acc2_non0", NON0,
                   dataset=dataset, group=group),
            Column(f"{prefix}f1", "F1", "f1_non0", NON0 + F1_REFERENCE_ORDER, dataset=dataset,
                   group=group)]
    if full:
        cols += [Column("acc7", "ACC-7", "acc7", "7-class accuracy, clip to [-3, 3] and round"),
                 Column("mae", "MAE", "mae", "mean absolute error", scale=1.0,
                        digits=2),
                 Column("corr", "Corr", "corr", "Pearson correlation", scale=1.0, digits=2)]
    return tuple(cols)


IEMOCAP_ACC = "mean of the 4 binary emotion tasks (MulT layout: neutral, happy, sad, angry)"


def iemocap_columns(prefix: str = "", dataset: str | None = None, group: str | None = None
                    ) -> tuple:
    return (Column(f"{prefix}acc", "ACC", "acc", IEMOCAP_ACC + ", accuracy", dataset=dataset,
                   group=group),
            Column(f"{prefix}f1", "F1", "f1", IEMOCAP_ACC + ", weighted F1 per task "
                   "(f1_score(truth, preds), as MulT's eval_iemocap)",
                   dataset=dataset, group=group,
                   fallback=(("f1_weighted", "4-class weighted F1 (MMIN/CGGM layout)"),)))


FOOD_COLUMNS = (Column("acc", "ACC", "acc", "101-class top-1 accuracy"),
                Column("f1", "F1", "f1_macro", "macro F1 over the 101 classes"))

T2V, V2T = "Text→Video", "Video→Text"
MSRVTT_COLUMNS = tuple(
    Column(f"{d}_{m}", label, f"{d}_{m}", conv, scale=1.0, digits=1, group=group)
    for d, group in (("t2v", T2V), ("v2t", V2T))
    for m, label, conv in (("r5", "R@5", "recall at 5, percent"),
                           ("r10", "R@10", "recall at 10, percent"),
                           ("mdr", "MdR", "median rank, 1-based"),
                           ("mnr", "MnR", "mean rank, 1-based")))

EXTRA = "not in the paper"


def _standard_rows(paper_rows, wander_rows, extras) -> tuple:
    return tuple(paper_rows) + tuple(wander_rows) + tuple(extras)


# ------------------------------------------------------------------------------------------
# Table 1: UPMC-Food 101
# ------------------------------------------------------------------------------------------
T1 = "Table 1"
TABLE1 = Spec(
    name="table1_food101", paper_ref=T1, kind="table",
    title="Table 1: Comparison of performance on the UPMC-Food 101 dataset",
    sections=(Section("food101", FOOD_COLUMNS, _standard_rows(
        [Row("Full fine-tuning", _g("full"), PaperValue(T1, "220M", acc=91.8, f1=91.9)),
         Row("LoRA (r=64)", _g("lora", rank=64), PaperValue(T1, "26.4M", acc=88.7, f1=88.7)),
         Row("Adapter (d=64)", _g("adapter", down_dim=64), PaperValue(T1, "24.9M", acc=88.4, f1=84.3)),
         Row("Adapter (d=128)", _g("adapter", down_dim=128),
             PaperValue(T1, "50.1M", acc=89.2, f1=89.3)),
         Row("P-tuning", _g("ptuning"), PaperValue(T1, "6.2M", acc=83.1, f1=83.0)),
         Row("MaPLe", _g("maple", source="text"), PaperValue(T1, "6.5M", acc=84.6, f1=84.7)),
         Row("PMF", _g("pmf"), PaperValue(T1, "5.2M", acc=89.1, f1=89.1)),
         Row("UniAdapter (d=128)", _g("uniadapter", down_dim=128),
             PaperValue(T1, "35.9M", acc=90.8, f1=90.8)),
         Row("Aurora (d=128)", _g("aurora", rank=128), PaperValue(T1, "2.6M", acc=90.2, f1=90.1))],
        [Row("Wander (d=64)", _g("wander", down_dim=64), PaperValue(T1, "3.1M", acc=91.1, f1=91.1),
             role="main"),
         Row("Wander (d=128)", _g("wander", down_dim=128),
             PaperValue(T1, "4.9M", acc=91.8, f1=91.8), role="wander")],
        [Row(f"Linear probe ({EXTRA})", _g("linear"), role="extra"),
         Row(f"UniAdapter (d=128), released-code variant ({EXTRA})",
             _g("uniadapter", variant="code", down_dim=128), role="extra"),
         Row(f"Aurora (d=128), released-code variant ({EXTRA})",
             _g("aurora", variant="code", rank=128), role="extra"),
         Row(f"Wander (d=64), released-code variant ({EXTRA})",
             _g("wander", variant="code", down_dim=64), role="extra")])),),
    notes=(DEAD_WANDER_NOTE, "Aurora's 'd=128' is its CP rank (grid field rank=128).",
           "MaPLe on Food-101 conditions the image prompts on the text prompts (source: text)."),
)

# ------------------------------------------------------------------------------------------
# Table 2: IEMOCAP
# ------------------------------------------------------------------------------------------
T2 = "Table 2"
TABLE2 = Spec(
    name="table2_iemocap", paper_ref=T2, kind="table",
    title="Table 2: Comparison of performance on IEMOCAP",
    sections=(Section("iemocap", iemocap_columns(), _standard_rows(
        [Row("Full fine-tuning", _g("full"), PaperValue(T2, "80M", acc=74.8, f1=74.3)),
         Row("LoRA (r=16)", _g("lora", rank=16), PaperValue(T2, "4.0M", acc=71.5, f1=71.1)),
         Row("Adapter (d=16)", _g("adapter", down_dim=16), PaperValue(T2, "4.0M", acc=70.8, f1=71.7)),
         Row("Adapter (d=64)", _g("adapter", down_dim=64), PaperValue(T2, "15.8M", acc=72.0, f1=71.7)),
         Row("P-tuning", _g("ptuning"), PaperValue(T2, "5.0M", acc=72.5, f1=72.4)),
         Row("MaPLe", _g("maple"), PaperValue(T2, "5.2M", acc=73.2, f1=73.1)),
         Row("PMF", _g("pmf"), PaperValue(T2, "4.8M", acc=72.9, f1=72.6))],
        [Row("Wander (d=16)", _g("wander", down_dim=16), PaperValue(T2, "0.3M", acc=74.2, f1=73.8),
             role="main"),
         Row("Wander (d=64)", _g("wander", down_dim=64), PaperValue(T2, "1.0M", acc=74.7, f1=74.4),
             role="wander")],
        [Row(f"Linear probe ({EXTRA})", _g("linear"), role="extra"),
         Row(f"Wander (d=16), released-code variant ({EXTRA})",
             _g("wander", variant="code", down_dim=16), role="extra")])),),
    notes=(DEAD_WANDER_NOTE, "The paper's IEMOCAP numbers (72-75%) fit the 4-class MMIN/CGGM setup better than the "
           "MulT 4 x binary layout; the convention our records used is named per column.",
           "The paper's Tables 2-3 backbone is pre-trained on HowTo100M; ours on what the "
           "header's 'pre-training' line says (CMU-MOSEI by default, see Table 8)."),
)

# ------------------------------------------------------------------------------------------
# Table 3: CMU-MOSI
# ------------------------------------------------------------------------------------------
T3 = "Table 3"
TABLE3 = Spec(
    name="table3_mosi", paper_ref=T3, kind="table",
    title="Table 3: Comparison of performance on the CMU-MOSI dataset",
    sections=(Section("mosi", mosi_columns(), _standard_rows(
        [Row("Full fine-tuning", _g("full"),
             PaperValue(T3, "80M", acc2=82.6, f1=82.5, acc7=33.2, mae=0.93, corr=0.70)),
         Row("LoRA (r=16)", _g("lora", rank=16),
             PaperValue(T3, "4.0M", acc2=81.2, f1=81.0, acc7=29.3, mae=0.96, corr=0.67)),
         Row("Adapter (d=16)", _g("adapter", down_dim=16),
             PaperValue(T3, "3.9M", acc2=81.1, f1=80.9, acc7=29.4, mae=0.97, corr=0.66)),
         Row("Adapter (d=64)", _g("adapter", down_dim=64),
             PaperValue(T3, "15.7M", acc2=81.6, f1=81.6, acc7=30.1, mae=0.95, corr=0.68)),
         Row("P-tuning", _g("ptuning"),
             PaperValue(T3, "5.0M", acc2=81.3, f1=81.2, acc7=28.4, mae=0.98, corr=0.66)),
         Row("MaPLe", _g("maple"),
             PaperValue(T3, "5.2M", acc2=82.1, f1=82.0, acc7=31.2, mae=0.95, corr=0.68)),
         Row("PMF", _g("pmf"),
             PaperValue(T3, "4.8M", acc2=81.9, f1=81.8, acc7=30.9, mae=0.95, corr=0.67))],
        [Row("Wander (d=16)", _g("wander", down_dim=16),
             PaperValue(T3, "0.3M", acc2=82.5, f1=82.4, acc7=32.8, mae=0.93, corr=0.68),
             role="main"),
         Row("Wander (d=64)", _g("wander", down_dim=64),
             PaperValue(T3, "0.9M", acc2=83.2, f1=82.9, acc7=33.6, mae=0.92, corr=0.71),
             role="wander")],
        [Row(f"Linear probe ({EXTRA})", _g("linear"), role="extra"),
         Row(f"Wander (d=16), released-code variant ({EXTRA})",
             _g("wander", variant="code", down_dim=16), role="extra")])),),
    notes=(DEAD_WANDER_NOTE, "The paper's Table 3 backbone is pre-trained on HowTo100M; ours on what the header's "
           "'pre-training' line says (params.yaml pretrain.use; CMU-MOSEI by default, see "
           "Table 8).",),
)

# ------------------------------------------------------------------------------------------
# Table 4: MSR-VTT
# ------------------------------------------------------------------------------------------
T4 = "Table 4"


def _t4(tunable, *numbers) -> PaperValue:
    return PaperValue(T4, tunable, **dict(zip([c.id for c in MSRVTT_COLUMNS], numbers)))


TABLE4 = Spec(
    name="table4_msrvtt", paper_ref=T4, kind="table",
    title="Table 4: Comparison of performance on the MSR-VTT dataset",
    sections=(Section("msrvtt", MSRVTT_COLUMNS, _standard_rows(
        [Row("Full fine-tuning", _g("full"),
             _t4("134M", 57.2, 69.3, 4.0, 22.4, 57.8, 68.5, 4.0, 20.1)),
         Row("LoRA (r=16)", _g("lora", rank=16),
             _t4("5.8M", 53.8, 66.9, 5.0, 27.3, 54.1, 66.2, 5.0, 24.4)),
         Row("Adapter (d=8)", _g("adapter", down_dim=8),
             _t4("4.6M", 51.2, 64.2, 5.0, 29.6, 51.6, 63.9, 5.0, 26.0)),
         Row("Adapter (d=16)", _g("adapter", down_dim=16),
             _t4("9.2M", 53.1, 66.4, 5.0, 27.4, 53.8, 65.8, 5.0, 24.8)),
         Row("P-tuning", _g("ptuning"),
             _t4("1.0M", 54.1, 67.3, 4.0, 26.9, 54.8, 66.9, 4.0, 23.9)),
         Row("MaPLe", _g("maple"),
             _t4("1.1M", 55.3, 68.2, 4.0, 25.8, 56.1, 67.8, 4.0, 23.6)),
         Row("PMF", _g("pmf"),
             _t4("1.0M", 54.6, 67.8, 4.0, 26.4, 55.3, 67.2, 4.0, 23.7))],
        [Row("Wander (d=8)", _g("wander", down_dim=8),
             _t4("0.4M", 56.4, 69.4, 4.0, 22.8, 57.3, 68.9, 4.0, 21.4), role="main"),
         Row("Wander (d=16)", _g("wander", down_dim=16),
             _t4("0.8M", 57.2, 69.4, 4.0, 22.4, 58.0, 68.9, 4.0, 20.1), role="wander")],
        [Row(f"Linear probe ({EXTRA})", _g("linear"), role="extra"),
         Row(f"Wander (d=8), released-code variant ({EXTRA})",
             _g("wander", variant="code", down_dim=8), role="extra")])),),
    notes=(DEAD_WANDER_NOTE, "The paper prints no R@1; ours is in results/metrics_detail.json and "
           "results/leaderboards/msrvtt.md.",
           "The paper's Full fine-tuning row equals MMT's published 1k-A result.",
           "Pre-training: the paper's MMT backbone is pre-trained on HowTo100M (2 experts).")
)

# ------------------------------------------------------------------------------------------
# Table 5: Wander and its original forms (MOSI)
# ------------------------------------------------------------------------------------------
T5 = "Table 5"


def _t5(tunable, acc2, f1, acc7, mae, corr) -> PaperValue:
    return PaperValue(T5, tunable, acc2=acc2, f1=f1, acc7=acc7, mae=mae, corr=corr)


TABLE5 = Spec(
    name="table5_mosi_forms", paper_ref=T5, kind="table",
    title="Table 5: Comparison of Wander and its two original forms on CMU-MOSI",
    sections=(Section("mosi", mosi_columns(), (
        Row("SF-OP", _g("wander", down_dim=16, form="sf_op"), _t5("3.5M", 81.6, 81.2, 29.9, 0.96, 0.67)),
        Row("SF-VF", _g("wander", down_dim=16, form="sf_vf"), _t5("1.2M", 81.5, 81.3, 29.6, 0.96, 0.67)),
        Row("Wander (d=16)", _g("wander", down_dim=16), _t5("0.1M", 81.8, 81.4, 30.6, 0.95, 0.67),
            role="main"),
        Row("–nonlinearity (d=16)", _g("wander", down_dim=16, nonlinearity=False),
            _t5("0.2M", 81.6, 81.3, 29.8, 0.96, 0.67), role="ablation"),
        Row("–residual (d=16)", _g("wander", down_dim=16, residual=False),
            _t5("0.1M", 81.5, 81.2, 29.6, 0.96, 0.67), role="ablation"),
        Row("Wander (d=32)", _g("wander", down_dim=32), _t5("0.1M", 82.2, 82.1, 31.0, 0.94, 0.68),
            role="wander"),
        Row("–nonlinearity (d=32)", _g("wander", down_dim=32, nonlinearity=False),
            _t5("0.2M", 82.1, 82.1, 31.1, 0.94, 0.68), role="ablation", compare_to="Wander (d=32)"),
        Row("–residual (d=32)", _g("wander", down_dim=32, residual=False),
            _t5("0.2M", 81.9, 81.7, 30.9, 0.94, 0.68), role="ablation", compare_to="Wander (d=32)"),
    )),),
    notes=("The paper prints the ablation rows as '–nonlinearity' / '–residual' under their "
           "Wander (d) row; the d is added to the label here.",
           "The paper reduced the feature dimensions for this table (its Wander (d=16) differs "
           "from Table 3's); our grid runs these rows on the same features as Table 3, so the "
           "Wander (d=16) row reads the same runs as Table 3's.",
           "SF-OP / SF-VF / –nonlinearity / –residual (d=16) are compared with Wander (d=16); "
           "the d=32 ablations with Wander (d=32)."),
)

# ------------------------------------------------------------------------------------------
# Table 6: computational cost (produced by the cost stage, not here)
# ------------------------------------------------------------------------------------------
TABLE6_NOTE = ("Table 6 (GPU time, memory and FLOPs of SF-OP / SF-VF / SF on CMU-MOSI) is "
               "produced by the cost stage (harness cost analysis), not by harness.tables.")
#: Hook for the lead: set to the path of the cost stage's Table 6 output (e.g.
#: "results/tables/table6_cost.md") and ``render_all`` links it from results/tables/index.md.
TABLE6_SOURCE: str | None = None

# ------------------------------------------------------------------------------------------
# Table 7: vector fusion vs sequence fusion (MOSI)
# ------------------------------------------------------------------------------------------
T7 = "Table 7"
TABLE7 = Spec(
    name="table7_mosi_vf_sf", paper_ref=T7, kind="table",
    title="Table 7: Benefits of sequence fusion on CMU-MOSI (down-projection d = 64)",
    sections=(Section("mosi", mosi_columns(), (
        Row("Wander (VF)", _g("wander", down_dim=64, form="vf"),
            PaperValue(T7, acc2=80.9, f1=80.4, acc7=29.3, mae=0.98, corr=0.67)),
        Row("Wander (SF)", _g("wander", down_dim=64),
            PaperValue(T7, acc2=83.2, f1=82.9, acc7=33.6, mae=0.92, corr=0.71), role="main"),
    ), tunable=False),),
    notes=("VF fuses the first (CLS) token of each modality; SF is Wander's sequence fusion.",
           "Wander (SF) reads the same runs as Table 3's Wander (d=64)."),
)

# ------------------------------------------------------------------------------------------
# Table 8: pre-training corpus (MOSI + IEMOCAP)
# ------------------------------------------------------------------------------------------
T8 = "Table 8"
HOWTO_REASON = ("HowTo100M pre-training is not available for the late-fusion MOSI/IEMOCAP "
                "backbone: HowTo100M is a video-text retrieval corpus whose (MMT) checkpoint has "
                "2 video experts (s3d, vggish) and a caption encoder, not text/audio/vision "
                "sentiment encoders, so it cannot initialise this backbone; only the CMU-MOSEI "
                "rows run")
TABLE8_COLUMNS = (mosi_columns("mosi_", "mosi", "CMU-MOSI", full=False)
                  + iemocap_columns("iemocap_", "iemocap", "IEMOCAP"))


def _t8(mosi_acc, mosi_f1, iemocap_acc, iemocap_f1) -> PaperValue:
    return PaperValue(T8, mosi_acc2=mosi_acc, mosi_f1=mosi_f1, iemocap_acc=iemocap_acc,
                      iemocap_f1=iemocap_f1)


TABLE8 = Spec(
    name="table8_pretraining", paper_ref=T8, kind="table",
    title="Table 8: The impact of the pre-training datasets on CMU-MOSI and IEMOCAP",
    sections=(Section("mosi", TABLE8_COLUMNS, (
        Row("Full fine-tuning", None, _t8(82.6, 82.5, 74.8, 74.3), role="point",
            reason=HOWTO_REASON, group="HowTo100M"),
        Row("Wander(d=16)", None, _t8(82.5, 82.4, 74.2, 73.8), role="point",
            reason=HOWTO_REASON, group="HowTo100M"),
        Row("Wander(d=64)", None, _t8(83.2, 82.9, 74.7, 74.4), role="point",
            reason=HOWTO_REASON, group="HowTo100M"),
        Row("Full fine-tuning", _g("full"), _t8(83.3, 83.2, 75.3, 74.9), group="CMU-MOSEI",
            pretrain="mosei"),
        Row("Wander(d=16)", _g("wander", down_dim=16), _t8(83.2, 83.1, 75.1, 74.8), role="main",
            group="CMU-MOSEI", pretrain="mosei"),
        Row("Wander(d=64)", _g("wander", down_dim=64), _t8(83.6, 83.4, 75.6, 75.3), role="wander",
            group="CMU-MOSEI", pretrain="mosei"),
    ), tunable=False),),
    notes=("MOSI ACC/F1 use the non0 (MulT) convention as Table 3; IEMOCAP as Table 2.",
           "The CMU-MOSEI rows read the same runs as Tables 2 and 3 (params.yaml pretrain.use "
           "starts the late-fusion backbone from the CMU-MOSEI checkpoint); a record whose "
           "``pretrained.source`` is not mosei is not used here."),
)

# ------------------------------------------------------------------------------------------
# Figures 4 and 5 (the paper's figures print no numbers in the text: no PaperValue)
# ------------------------------------------------------------------------------------------
NO_FIGURE_NUMBERS = ("The paper's figure gives no numbers in its text, so its curve is not drawn "
                     "and no values are read off it.")

FIGURE4 = Spec(
    name="figure4_iemocap_d", paper_ref="Figure 4", kind="figure", figure="d",
    title="Figure 4: The impact of d on the performance on IEMOCAP",
    sections=(Section("iemocap", iemocap_columns(), title="IEMOCAP", rows=tuple(
        Row(f"d={d}", _g("wander", down_dim=d), role="main" if d == 16 else "point", x=d,
            series=("d",))
        for d in (8, 16, 32, 64))),),
    notes=(NO_FIGURE_NUMBERS, "R_h = R_t = 8 (the paper's default) for every point."),
)

RANK_DEFAULT = 8
FIGURE5_PANELS = (
    ("food101", "UPMC-Food 101", 64, Column("acc", "ACC", "acc", "101-class top-1 accuracy")),
    ("iemocap", "IEMOCAP", 16, iemocap_columns()[0]),
    ("mosi", "CMU-MOSI", 16, mosi_columns()[0]),
    ("msrvtt", "MSR-VTT", 8, Column("t2v_r10", "R@10 (text→video)", "t2v_r10",
                                   "recall at 10, text→video, percent (the paper does not say "
                                   "which direction)", scale=1.0)),
)


def _rank_rows(d: int) -> tuple:
    """The default point (R_h = R_t = 8, shared by both series), then R_h, then R_t."""
    rows = [Row(f"R_h = R_t = {RANK_DEFAULT} (default)", _g("wander", down_dim=d), role="main",
                x=RANK_DEFAULT, series=("R_h", "R_t"))]
    for series, field_name in (("R_h", "rank_h"), ("R_t", "rank_t")):
        rows += [Row(f"{series}={rank}", _g("wander", down_dim=d, **{field_name: rank}),
                     role="point", x=rank, series=(series,)) for rank in (1, 4, 16)]
    return tuple(rows)


FIGURE5 = Spec(
    name="figure5_ranks", paper_ref="Figure 5", kind="figure", figure="rank",
    title="Figure 5: The impact of the rank of CP decomposition on the performance",
    sections=tuple(Section(dataset, (column,), _rank_rows(d), title=f"{title} (d={d})")
                   for dataset, title, d, column in FIGURE5_PANELS),
    notes=(NO_FIGURE_NUMBERS,
           "Binary accuracy in the paper's caption: ACC for UPMC-Food 101 (101-class top-1), "
           "ACC-2 non0 for CMU-MOSI, ACC (mean of 4 binary tasks) for IEMOCAP, R@10 for MSR-VTT.",
           "One rank varies, the other stays at the default 8."),
)

SPECS: tuple = (TABLE1, TABLE2, TABLE3, TABLE4, TABLE5, TABLE7, TABLE8, FIGURE4, FIGURE5)


def printed_tunable(table: str, label: str) -> str:
    """The #Tunable the Wander paper prints in ``table`` (``T1`` ... ``T5``) for the row ``label``
    (``harness.audit_params`` reads it here: typed once)."""
    for spec in SPECS:
        for section in spec.sections:
            for row in section.rows:
                if row.paper is not None and row.paper.table == table and row.label == label \
                        and row.paper.tunable:
                    return row.paper.tunable
    raise KeyError(f"{table} has no row {label!r} with a printed #Tunable")


def spec_by_name(name: str) -> Spec:
    for spec in SPECS:
        if name in (spec.name, spec.paper_ref):
            return spec
    raise KeyError(name)


def grid_rows(spec: Spec) -> list[tuple[str, dict]]:
    """(dataset, grid row) pairs a spec reads."""
    out = []
    for section in spec.sections:
        datasets = sorted({c.dataset or section.dataset for c in section.columns})
        for row in section.rows:
            if row.grid is not None:
                out.extend((dataset, row.grid) for dataset in datasets)
    return out
