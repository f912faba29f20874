"""The parameter audit against closed-form counts written out from first principles."""
import socket
import time

import pytest

from harness.audit_params import (PAPER_ROWS, audit_params, audit_params_markdown, audit_row,
                                  parse_count, printed_bounds, rounds_to)

# Released late-fusion backbone (MOSI): width D, 32 layers, 3 modalities, 50 tokens each.
D, LAYERS, M, L_MOSI, L_IEMOCAP = 40, 32, 3, 50, 20
R = 8  # Wander's R_h = R_t


def late_fusion_head(width=D, modalities=M, out=1):
    n = width * modalities  # MulT head: proj1, proj2 (n -> n) and out (n -> out), with biases
    return 2 * (n * n + n) + n * out + out


def released_head(width=D, modalities=M, out=1):
    # released AdapterModel head: proj0 (M*D -> D), proj1, proj2 (D -> D), out_layer (D -> out)
    return (modalities * width * width + width) + 2 * (width * width + width) + width * out + out


def released_adapter_per_modality(width, d, length, drank=8, trank=12):
    return (width * d + d) + drank * d * width + trank * length * d  # down, factor_dim, factor_t


def wander_per_modality(width, d, length, r_h=R, r_t=R, d_t=None):
    d_t = d if d_t is None else d_t
    return (width * d + d) + r_h * width * d + r_t * d_t * length  # Down + w_h + w_t


def _refuse(*args, **kwargs):
    raise OSError("network access attempted during the parameter audit")


@pytest.fixture(scope="module")
def timed_rows():
    """The whole audit, once, with every socket connection refused (no network)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        result = audit_params()
        return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def rows(timed_rows):
    return timed_rows[0]


def find(rows, table, label, variant="paper"):
    hits = [r for r in rows if r["table"] == table and r["row"] == label and r["variant"] == variant]
    assert len(hits) == 1, (table, label, variant, len(hits))
    return hits[0]


def test_every_printed_row_is_reported(rows):
    assert len(rows) == len(PAPER_ROWS)
    keys = {"table", "row", "setting", "ours_method", "ours_head", "ours_total", "paper",
            "paper_value", "ratio", "explanation", "status"}
    for r in rows:
        assert keys <= set(r)
        assert r["explanation"]
        assert r["paper_value"] == pytest.approx(parse_count(r["paper"]))
        if r["ours_total"] is not None:
            assert r["ours_total"] == r["ours_method"] + r["ours_head"]
            assert r["ratio"] == pytest.approx(r["ours_total"] / r["paper_value"])
    for table, n in (("Wander Table 1", 11), ("Wander Table 2", 9), ("Wander Table 3", 9),
                     ("Wander Table 4", 9), ("Wander Table 5", 8)):
        assert len({r["row"] for r in rows if r["table"] == table}) == n, table


def test_wander_on_late_fusion(rows):
    r = find(rows, "Wander Table 3", "Wander (d=16)")
    assert r["ours_method"] == M * wander_per_modality(D, 16, L_MOSI)
    assert r["ours_method"] == 36_528
    assert r["ours_head"] == late_fusion_head() == 29_161
    r = find(rows, "Wander Table 2", "Wander (d=16)")  # IEMOCAP: 20 tokens, 8 outputs
    assert r["ours_method"] == M * wander_per_modality(D, 16, L_IEMOCAP)
    assert r["ours_head"] == late_fusion_head(out=8)
    r = find(rows, "Wander Table 5", "Wander (d=32)")
    assert r["ours_method"] == M * wander_per_modality(D, 32, L_MOSI)


def test_wander_full_tensor_forms(rows):
    down = M * (D * 16 + 16)
    r = find(rows, "Wander Table 5", "SF-OP")  # W_h (d, d, d, D) and W_t (d_t, l, l, l)
    assert r["ours_method"] == down + 16 ** 3 * D + 16 * L_MOSI ** 3
    r = find(rows, "Wander Table 5", "SF-VF")  # CP W_h per modality, full W_t
    assert r["ours_method"] == down + M * R * D * 16 + 16 * L_MOSI ** 3


def test_lora_and_adapter_on_late_fusion(rows):
    matrices = 2 * LAYERS * M  # q and v of every layer of every modality
    r = find(rows, "Wander Table 3", "LoRA (r=16)")
    assert r["ours_method"] == matrices * 2 * 16 * D  # A (r x D) + B (D x r), no bias
    r = find(rows, "Wander Table 3", "Adapter (d=16)")
    d = 16
    layer_norms = (LAYERS * M * 2 + M) * 2 * D  # two per layer and a final one per modality (Houlsby)
    assert r["ours_method"] == LAYERS * M * 2 * (D * d + d + d * D + D) + layer_norms
    r = find(rows, "Wander Table 3", "P-tuning")
    assert r["ours_method"] == 10 * LAYERS * M * D


def test_full_fine_tuning_late_fusion(rows):
    layer = 4 * (D * D + D) + 2 * 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
    projections = (768 + 5 + 20) * D + M * D  # Conv1d(k=1) with bias, as released
    r = find(rows, "Wander Table 3", "Full fine-tuning")
    assert r["ours_method"] == LAYERS * M * layer + projections + M * 2 * D
    assert r["ours_head"] == late_fusion_head()
    assert r["ratio"] < 0.05  # 1.95M against the printed 80M


def test_two_tower_and_mmt_rows(rows):
    r = find(rows, "Wander Table 1", "LoRA (r=64)")
    assert r["ours_method"] == 2 * 12 * 2 * (2 * 64 * 768)  # 2 towers x 12 layers x (q, v)
    r = find(rows, "Wander Table 1", "Wander (d=64)")
    d = 64
    assert r["ours_method"] == (2 * (768 * d + d) + 2 * R * 768 * d
                                + R * d * (14 * 14 + 1) + R * d * 50)
    r = find(rows, "Wander Table 4", "Wander (d=8)")
    assert r["ours_method"] == 7 * wander_per_modality(512, 8, 31)
    geu = 768 * 512 + 512 + 512 * 512 + 512
    assert r["ours_head"] == 7 * (geu + 768 + 1) == 4_600_071


def test_adapter_wider_than_the_backbone_is_counted(rows):
    """The paper's "Adapter (d=64)" rows on the width-40 backbone: two adapters in each of the
    3 x 32 layers, 40 -> 64 -> 40, no bottleneck but buildable; with the LayerNorms (Houlsby)."""
    layer_norms = (LAYERS * M * 2 + M) * 2 * D
    for table, out in (("Wander Table 2", 8), ("Wander Table 3", 1)):
        r = find(rows, table, "Adapter (d=64)")
        assert r["status"] == "ok"
        assert r["ours_method"] == 2 * LAYERS * M * (2 * D * 64 + 64 + D) + layer_norms == 1_018_608
        assert r["ours_head"] == late_fusion_head(out=out)


def test_infeasible_rows_are_reported_not_raised(rows):
    for variant in ("paper", "code"):  # IEMOCAP: 64 fused tokens, 3 x 20 tokens
        r = find(rows, "Wander Table 2", "Wander (d=64)", variant)
        assert r["status"] == "infeasible" and r["ours_total"] is None
        assert f"total number of tokens ({M * L_IEMOCAP})" in r["explanation"]
    r = find(rows, "Wander Table 2", "Wander (d=64)")
    assert r["unchecked_total"] == M * wander_per_modality(D, 64, L_IEMOCAP) + late_fusion_head(out=8)


def test_wander_d_larger_than_width_on_mosi(rows):
    r = find(rows, "Wander Table 3", "Wander (d=64)")  # d = 64 > width 40 is accepted
    assert r["status"] == "ok"
    assert r["ours_method"] == M * wander_per_modality(D, 64, L_MOSI)


def test_wander_code_rows_are_the_released_model(rows):
    r = find(rows, "Wander Table 3", "Wander (d=16)", "code")
    # 3 x (40*16+16 + 8*16*40 + 12*50*16) = 3 x (656 + 5,120 + 9,600) = 46,128
    assert r["ours_method"] == M * released_adapter_per_modality(D, 16, L_MOSI) == 46_128
    # 120*40+40 + 2*(40*40+40) + 40*1+1 = 4,840 + 3,280 + 41 = 8,161
    assert r["ours_head"] == released_head() == 8_161
    assert r["ours_total"] == 54_289  # what the released get_parameter_number reports trainable
    paper = find(rows, "Wander Table 3", "Wander (d=16)")
    assert f"the paper variant counts {paper['ours_method']:,} + head {paper['ours_head']:,}" \
        in r["explanation"]
    r = find(rows, "Wander Table 3", "Wander (d=64)", "code")
    # 3 x (40*64+64 + 8*64*40 + 12*50*64) = 3 x (2,624 + 20,480 + 38,400) = 184,512
    assert r["ours_method"] == M * released_adapter_per_modality(D, 64, L_MOSI) == 184_512
    assert r["ours_head"] == released_head()
    r = find(rows, "Wander Table 2", "Wander (d=16)", "code")
    assert r["ours_method"] == M * released_adapter_per_modality(D, 16, L_IEMOCAP)
    assert r["ours_head"] == released_head(out=8)


def test_blip_base_closed_forms(rows):
    r128 = find(rows, "UniAdapter Sec. 4.1", "UniAdapter (r=128)", "code")
    r512 = find(rows, "UniAdapter Sec. 4.1", "UniAdapter (r=512)", "code")
    layers, width = 12, 768

    def uniadapter_code(r):  # per depth: LN + down (biased), 3 ups (biased), cross-modal LN
        return layers * ((2 * width + width * r + r) + 3 * (r * width + width) + 2 * width)

    assert r128["ours_total"] == uniadapter_code(128) == 4_784_640
    assert r512["ours_total"] == uniadapter_code(512) == 18_945_024
    assert r128["status"] == "closed_form" and "not built" in r128["explanation"]
    assert r128["match"] == "total"
    for r, rank in ((find(rows, "Aurora Table 1", "Aurora (r=64)"), 64),
                    (find(rows, "Aurora Table 1", "Aurora (r=128)"), 128)):
        # Aurora's own formula: L (3 + 6) 2r + 2dr + 2Ld
        assert r["ours_total"] == layers * 9 * 2 * rank + 2 * width * rank + 2 * layers * width
    lora = find(rows, "Aurora Table 1", "LoRA (r=32)")
    assert lora["ours_total"] == layers * 9 * 2 * width * 32
    assert lora["ratio"] == pytest.approx(0.5, abs=0.01)


def test_meta_and_cpu_builds_count_the_same():
    picked = [row for row in PAPER_ROWS if row.backbone == "mosi"
              and row.row in ("LoRA (r=16)", "Wander (d=16)", "Adapter (d=16)", "Adapter (d=64)")
              and row.table == "Wander Table 3"]
    assert len(picked) == 5  # Wander (d=16) twice: paper and code variants
    for row in picked:
        meta, cpu = audit_row(row, "meta"), audit_row(row, "cpu")
        for key in ("ours_method", "ours_head", "ours_total", "status", "unchecked_total"):
            assert meta[key] == cpu[key], (row.row, key)


def test_runs_offline_and_fast(timed_rows):
    rows, seconds = timed_rows
    assert seconds < 60
    assert len(rows) == len(PAPER_ROWS)


def test_markdown(rows):
    text = audit_params_markdown(rows)
    assert text.count("\n| ") >= len(rows) + 1
    assert "| Wander Table 3 | Wander (d=64) |" in text and "infeasible" in text
    assert "datasets/iemocap.yaml" in text


def test_printed_numbers():
    assert parse_count("3.1M") == pytest.approx(3.1e6)
    assert parse_count("348B") == pytest.approx(3.48e11)
    assert parse_count("80M") == pytest.approx(8e7)
    low, high = printed_bounds("0.1M")
    assert (low, high) == (pytest.approx(50_000), pytest.approx(150_000))
    assert rounds_to(102_217, "0.1M") and not rounds_to(151_000, "0.1M")
    assert rounds_to(4_784_640, "4.8M") and not rounds_to(18_945_024, "19.0M")
    with pytest.raises(ValueError):
        parse_count("7.1 / 4.8M")


def test_the_method_option_restricts_the_rows(capsys):
    import json

    from harness.cli import main

    capsys.readouterr()
    assert main(["audit", "params", "--method", "lora", "--method", "pmf", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["method"] for r in rows} == {"lora", "pmf"}


def test_out_writes_the_rows_to_the_file(tmp_path, capsys):
    """``--out`` (the audit stage's): the rows as JSON in the file (``records.write_json_atomic``,
    where the stage's shell redirect left an empty file when stopped), nothing on stdout."""
    import json

    from harness.cli import main

    out = tmp_path / "audit_params.json"
    out.write_text('["the previous audit"]\n')
    assert main(["audit", "params", "--method", "lora", "--out", str(out)]) == 0
    assert not capsys.readouterr().out
    assert {r["method"] for r in json.loads(out.read_text())} == {"lora"}
