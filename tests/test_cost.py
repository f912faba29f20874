"""Cost analysis: the Sec. 4.4 formulas, the Wander module's counts and the Table 6 measurements."""
import json
import math

import pytest
import torch

from harness.cost import (FORMS, SEC44_PAPER, TABLE6_PAPER, Table6Setting, cost_markdown,
                          crosscheck, fusion_parameters, make_fusion, sec44, step_flops, table6,
                          write_cost)
from methods import count_parameters

SMALL = dict(batch=4, width=8, length=6, down_dim=4, warmup=1, repeats=2)


def test_sec44_reproduces_the_papers_orders_of_magnitude():
    report = sec44()
    setting = report["setting"]
    # The exact setting: 3 modalities of shape (10, 768), d_h = 768, d_t = 10, R_h = R_t = 8.
    assert setting == {"modalities": 3, "length": 10, "dim": 768, "d_h": 768, "d_t": 10,
                       "rank_h": 8, "rank_t": 8}
    counts = report["counts"]
    assert counts["sf_op"] == 768 * 768 ** 3 + 10 * 10 ** 3
    assert counts["sf_op"] == pytest.approx(348e9, rel=0.01)
    assert counts["sf"] == 8 * 768 * 3 * 768 + 8 * 10 * 3 * 10 == 14_158_176
    assert counts["sf"] == pytest.approx(14e6, rel=0.03)
    assert counts["sf_vf"] == 8 * 768 * 3 * 768 + 10 * 10 ** 3
    assert report["paper"] == SEC44_PAPER
    assert round(report["d_h_for_348B"]) == 768
    assert "14,155,776 + 2,400 = 14,158,176" in report["arithmetic"]["sf"]
    # The d_t-free part alone is already ~14.16M; every unit of d_t adds R_t * sum(l) = 240.
    assert report["wander_fixed_part"] == 14_155_776 and report["wander_per_d_t"] == 240
    assert report["d_t_max_within"]["0.05"] == math.floor((14e6 * 1.05 - 14_155_776) / 240)


def test_formulas_match_the_wander_module():
    rows = crosscheck()
    assert {r["form"] for r in rows} == set(FORMS)
    for r in rows:
        assert r["equal"], r
        assert r["count_parameters"] == r["down"] + r["formula"]


def test_formula_shapes():
    dims, lengths = [3, 4], [5, 6]
    assert fusion_parameters("sf_op", dims, lengths, 7, 2, 9, 9) == 7 * 12 + 2 * 30
    assert fusion_parameters("sf_vf", dims, lengths, 7, 2, 3, 9) == 3 * 7 * 7 + 2 * 30
    assert fusion_parameters("sf", dims, lengths, 7, 2, 3, 4) == 3 * 7 * 7 + 4 * 2 * 11
    with pytest.raises(ValueError):
        fusion_parameters("vf", dims, lengths, 7, 2, 3, 4)


def test_flop_counter_orders_sf_op_above_sf():
    setting = Table6Setting(**SMALL)
    flops = {}
    for form in ("sf_op", "sf"):
        module, states = make_fusion(form, setting)
        forward, step = step_flops(module, states)
        assert 0 < forward < step
        flops[form] = step
    assert flops["sf_op"] > flops["sf"]


def test_table6_small_case():
    report = table6("cpu", **SMALL)
    rows = {r["form"]: r for r in report["rows"]}
    assert list(rows) == list(FORMS)
    assert report["device"] == "cpu" and report["setting"]["batch"] == 4
    assert "batch 4" in report["dimensions"] and "d_t = 4" in report["dimensions"]
    sf = rows["sf"]
    assert sf["ratio_time"] == 1 and sf["ratio_memory"] == 1 and sf["ratio_flops"] == 1
    for form, r in rows.items():
        assert r["time_s"] > 0 and len(r["times_s"]) == 2
        assert r["memory_bytes"] > 0 and r["flops_step"] > 0
        assert r["paper_time_s"] == TABLE6_PAPER[form]["time_s"]
        assert r["paper_memory_mb"] == TABLE6_PAPER[form]["memory_mb"]
        assert r["paper_ratio_time"] == pytest.approx(TABLE6_PAPER[form]["time_s"] / 0.015)
    assert rows["sf_op"]["parameters"] > rows["sf"]["parameters"]
    module, _ = make_fusion("sf_op", Table6Setting(**SMALL))
    assert rows["sf_op"]["parameters"] == count_parameters(module)["method"]
    # The memory figure includes at least the parameters and the inputs.
    assert rows["sf_op"]["memory_bytes"] >= 4 * rows["sf_op"]["parameters"] + 4 * 3 * 4 * 6 * 8


def test_paper_table6_typed_once():
    assert TABLE6_PAPER == {
        "sf_op": {"time_s": 9.16, "memory_mb": 3300.0, "flops": 0.003},
        "sf_vf": {"time_s": 7.87, "memory_mb": 622.0, "flops": 0.002},
        "sf": {"time_s": 0.015, "memory_mb": 348.0, "flops": 0.002},
    }


def test_write_cost(tmp_path):
    report = write_cost(tmp_path / "results", "cpu", **SMALL)
    document = json.loads((tmp_path / "results" / "cost.json").read_text())
    assert [r["form"] for r in document["table6"]["rows"]] == list(FORMS)
    assert document["sec44"]["counts"]["sf"] == 14_158_176
    text = (tmp_path / "results" / "cost.md").read_text()
    assert "Table 6" in text and "348B" in text and "14,158,176" in text
    for form in FORMS:
        assert f"| {form} |" in text
    # ours and the paper's in two tables: one was 228 characters wide
    assert max(len(line) for line in text.splitlines() if line.startswith("|")) <= 200
    assert text.count("| sf_vf | ") >= 2 and "Wander paper, Table 6, beside it:" in text
    assert text == cost_markdown(report)
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="cuda"):
        table6("cuda", **SMALL)
