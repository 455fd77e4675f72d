"""The CL matrix and its metrics against hand-computed values."""
import json

import pytest

from slm_llm.eval.matrix import cl_metrics, get_cell, metrics_of, new_matrix, save_matrix, load_matrix, set_cell

# Rows: after stage 0, 1, 2. Columns: tasks 0, 1, 2. Above-diagonal cells are FWT cells.
R = [
    [80.0, 30.0, None],
    [60.0, 90.0, 40.0],
    [50.0, 70.0, 85.0],
]
BASE = [20.0, 25.0, 35.0]


def test_metrics_of_a_known_3x3_matrix():
    m = cl_metrics(R, BASE)
    assert m["ap"] == pytest.approx((50 + 70 + 85) / 3)  # 68.333
    # BWT = mean(R[2][0] - R[0][0], R[2][1] - R[1][1]) = mean(-30, -20)
    assert m["bwt"] == pytest.approx(-25.0)
    # forgetting = mean(max(80, 60) - 50, max(90) - 70) = mean(30, 20)
    assert m["forgetting"] == pytest.approx(25.0)
    # FWT = mean(R[0][1] - base[1], R[1][2] - base[2]) = mean(5, 5)
    assert m["fwt"] == pytest.approx(5.0)


def test_forgetting_uses_the_best_earlier_score_not_the_first():
    # task 0 improves after stage 1 (positive backward transfer), then drops
    m = cl_metrics([[50.0, None, None], [70.0, 60.0, None], [40.0, 60.0, 80.0]])
    assert m["bwt"] == pytest.approx(((40 - 50) + (60 - 60)) / 2)
    assert m["forgetting"] == pytest.approx(((70 - 40) + (60 - 60)) / 2)
    assert m["fwt"] is None  # no FWT cells and no base


def test_one_row_and_partial_runs():
    assert cl_metrics([[40.0, 60.0]]) == {"ap": 50.0, "bwt": None, "forgetting": None, "fwt": None}
    # a run stopped after stage 1 of 3: the last finished row is the final one
    m = cl_metrics([[80.0, None, None], [70.0, 90.0, None], None])
    assert m["ap"] == pytest.approx(80.0) and m["bwt"] == pytest.approx(-10.0)
    assert cl_metrics([]) == {"ap": None, "bwt": None, "forgetting": None, "fwt": None}


def test_matrix_file_cells_round_trip(tmp_path):
    m = new_matrix("slm", ["a", "b"], ["a", "b"])
    set_cell(m, "slm", 1, 0, 12.345678)
    set_cell(m, "oracle", 0, 0, 50.0)
    assert m["R"]["slm"] == [None, [12.3457, None]]
    assert get_cell(m, "slm", 1, 0) == 12.3457 and get_cell(m, "slm", 0, 0) is None
    assert get_cell(m, "seq_lora", 0, 0) is None
    save_matrix(tmp_path / "matrix.json", m)
    assert load_matrix(tmp_path / "matrix.json") == json.loads((tmp_path / "matrix.json").read_text()) == m
    assert load_matrix(tmp_path / "missing.json") is None
    m["routing_accuracy"] = [100.0, 75.0]
    assert metrics_of(m)["routing_accuracy"] == 75.0
