"""The CL matrix and its metrics against hand-computed values."""
import json

import pytest

from slm_llm.eval.matrix import (MatrixError, cl_metrics, get_cell, load_matrix, metrics_of, new_matrix, save_matrix,
                                 set_cell, view_matrix)

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
    assert m["n_bwt"] == 2 and m["n_fwt"] == 2  # how many tasks each metric averaged


def test_forgetting_uses_the_best_earlier_score_not_the_first():
    # task 0 improves after stage 1 (positive backward transfer), then drops
    m = cl_metrics([[50.0, None, None], [70.0, 60.0, None], [40.0, 60.0, 80.0]])
    assert m["bwt"] == pytest.approx(((40 - 50) + (60 - 60)) / 2)
    assert m["forgetting"] == pytest.approx(((70 - 40) + (60 - 60)) / 2)
    assert m["fwt"] is None  # no FWT cells and no base


def test_one_row_and_partial_runs():
    assert cl_metrics([[40.0, 60.0]]) == {"ap": 50.0, "bwt": None, "forgetting": None, "fwt": None, "n_bwt": 0,
                                          "n_fwt": 0}
    # a run stopped after stage 1 of 3: the last finished row is the final one
    m = cl_metrics([[80.0, None, None], [70.0, 90.0, None], None])
    assert m["ap"] == pytest.approx(80.0) and m["bwt"] == pytest.approx(-10.0) and m["n_bwt"] == 1
    assert cl_metrics([])["ap"] is None


def test_a_missing_row_or_diagonal_cell_is_an_error_not_a_smaller_average():
    with pytest.raises(MatrixError, match="row 1 is missing"):
        cl_metrics([[80.0, None, None], None, [50.0, 70.0, 85.0]])
    with pytest.raises(MatrixError, match=r"R\[1\]\[1\] is missing"):
        cl_metrics([[80.0, None, None], [60.0, None, None], [50.0, 70.0, 85.0]])
    with pytest.raises(MatrixError, match=r"R\[2\]\[0\] is missing"):
        cl_metrics([[80.0, None, None], [60.0, 90.0, None], [None, 70.0, 85.0]])


def test_matrix_file_cells_round_trip(tmp_path):
    m = new_matrix("slm", ["a", "b"], ["a", "b"], ["paraphrase", "fixed"])
    flat = view_matrix(m, "paraphrase")
    set_cell(flat, "slm", 1, 0, 12.345678)
    set_cell(flat, "oracle", 0, 0, 50.0)
    assert m["views"]["paraphrase"]["strict"]["R"]["slm"] == [None, [12.3457, None]]  # written through
    assert get_cell(flat, "slm", 1, 0) == 12.3457 and get_cell(flat, "slm", 0, 0) is None
    assert get_cell(flat, "seq_lora", 0, 0) is None
    assert view_matrix(m, "fixed")["R"] == {} and view_matrix(m, "paraphrase", "lenient")["R"] == {}
    save_matrix(tmp_path / "matrix.json", m)
    assert load_matrix(tmp_path / "matrix.json") == json.loads((tmp_path / "matrix.json").read_text()) == m
    assert load_matrix(tmp_path / "missing.json") is None
    m["views"]["paraphrase"]["routing_accuracy"] = [100.0, 75.0]
    assert metrics_of(m)["paraphrase"]["routing_accuracy"] == 75.0
    (tmp_path / "old.json").write_text(json.dumps({"method": "slm", "R": {}}))
    with pytest.raises(ValueError, match="predates query views"):
        load_matrix(tmp_path / "old.json")
