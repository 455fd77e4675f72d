"""What routing costs: the slm − oracle gap split by where slm sent each query."""
import json

import pytest

from slm_llm.eval.routing_cost import final_predictions, routing_cost, routing_cost_markdown
from slm_llm.eval.seeds import seeds_routing_cost
from slm_llm.run import RunError


def _run(tmp_path, rows_by_task, view="paraphrase"):
    """A finished two-stage run folder holding only its manifest and final-row predictions."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"order": ["a", "b"], "suite_tasks": ["a", "b"]}))
    folder = tmp_path / "eval" / "predictions" / view
    folder.mkdir(parents=True)
    for task, rows in rows_by_task.items():
        lines = []
        for rid, (routed, slm, oracle) in enumerate(rows):
            lines.append(json.dumps({"mode": "oracle", "id": f"{task}-{rid}", "score": oracle, "lenient": oracle,
                                     "routed_task": task}))
            lines.append(json.dumps({"mode": "slm", "id": f"{task}-{rid}", "score": slm, "lenient": 1.0,
                                     "routed_task": routed}))
        (folder / f"stage1-{task}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_the_parts_sum_to_the_gap_and_name_the_costly_pairs(tmp_path):
    # task a: 4 queries, one flagged OOD that the oracle got right, one sent to b that slm got right anyway
    # task b: 2 queries, one sent to a that the oracle got right
    run = _run(tmp_path, {"a": [("a", 1.0, 1.0), ("a", 0.0, 0.0), ("<ood>", 0.0, 1.0), ("b", 1.0, 0.0)],
                          "b": [("b", 1.0, 1.0), ("a", 0.0, 1.0)]})
    c = routing_cost(run, "paraphrase")
    # AP points: a task's query weighs 100 / n_task / n_tasks
    assert c["parts"]["own"] == 0.0
    assert c["parts"]["ood"] == pytest.approx(-12.5)
    assert c["parts"]["other"] == pytest.approx(12.5 - 25.0)
    slm_ap, oracle_ap = 100 * (2 / 4 + 1 / 2) / 2, 100 * (2 / 4 + 2 / 2) / 2
    assert c["gap"] == pytest.approx(slm_ap - oracle_ap)
    assert c["shares"] == pytest.approx({"own": 50.0, "ood": 100 / 6, "other": 100 / 3})
    assert [(p["true"], p["routed"], p["n"]) for p in c["pairs"]] == [("b", "a", 1), ("a", "<ood>", 1), ("a", "b", 1)]
    assert c["pairs"][-1]["points"] == pytest.approx(12.5)  # a gain is listed last
    md = routing_cost_markdown({"paraphrase": c})
    assert "| paraphrase | -25.00 | +0.00 (50.0%) | -12.50 (16.7%) | -12.50 (33.3%) |" in md
    assert "b -> a 1 (-25.00)" in md
    # lenient: slm scores every query 1, so nothing is lost anywhere
    assert routing_cost(run, "paraphrase", "lenient")["gap"] == pytest.approx(100 - oracle_ap)


def test_over_seeds_parts_are_mean_and_sd_and_pairs_add_up(tmp_path):
    one = routing_cost(_run(tmp_path / "s0", {"a": [("<ood>", 0.0, 1.0)], "b": [("b", 1.0, 1.0)]}), "paraphrase")
    two = routing_cost(_run(tmp_path / "s1", {"a": [("a", 1.0, 1.0)], "b": [("b", 1.0, 1.0)]}), "paraphrase")
    s = seeds_routing_cost([one, two])
    assert s["gap"]["mean"] == pytest.approx(-25.0) and s["gap"]["sd"] == pytest.approx(35.355, abs=1e-3)
    assert s["parts"]["ood"]["mean"] == pytest.approx(-25.0)
    assert s["pairs"] == [{"true": "a", "routed": "<ood>", "n": 1, "points": pytest.approx(-25.0)}]


def test_missing_or_unpaired_predictions_name_the_file(tmp_path):
    run = _run(tmp_path, {"a": [("a", 1.0, 1.0)]})
    with pytest.raises(RunError, match=r"stage1-b\.jsonl: missing"):
        final_predictions(run, "paraphrase", "slm")
    path = tmp_path / "eval" / "predictions" / "paraphrase" / "stage1-b.jsonl"
    path.write_text(json.dumps({"mode": "slm", "id": "b-0", "score": 1.0, "lenient": 1.0, "routed_task": "b"}) + "\n")
    with pytest.raises(RunError, match=r"stage1-b\.jsonl: no predictions of mode 'oracle'"):
        routing_cost(run, "paraphrase")
    path.write_text("".join(json.dumps({"mode": m, "id": f"b-{m}", "score": 1.0, "lenient": 1.0, "routed_task": "b"})
                            + "\n" for m in ("slm", "oracle")))
    with pytest.raises(RunError, match="b: slm and oracle were not scored on the same records"):
        routing_cost(run, "paraphrase")
