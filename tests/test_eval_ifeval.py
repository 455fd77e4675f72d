"""IFEval: the official prompts, lm-eval's checkers (strict and loose, seeded), the four numbers,
the guard against nltk downloads, and `run_ifeval` end to end on a tiny run."""
import json
import random
import shutil

import pytest

from slm_llm.data import DataError
from slm_llm.eval import ifeval as I


@pytest.fixture(scope="module")
def prompts(data_root):
    return {r["key"]: r for r in I.load_prompts(I.load_spec(), data_root)}


@pytest.fixture(scope="module")
def checkers(data_root):
    return I.checkers(data_root / I.load_spec().nltk_data)


def test_the_official_prompts_load_and_are_checked_against_their_sha256(prompts, data_root, tmp_path):
    rows = list(prompts.values())
    assert len(rows) == 541
    assert sum(len(r["instruction_id_list"]) for r in rows) == 834
    assert len({i for r in rows for i in r["instruction_id_list"]}) == 25
    (tmp_path / "ifeval").mkdir()
    text = (data_root / "ifeval" / "input_data.jsonl").read_text()
    (tmp_path / "ifeval" / "input_data.jsonl").write_text(text.replace("300+", "200+", 1))
    with pytest.raises(DataError, match=r"input_data.jsonl: sha256 \w+ is not the one .*ifeval.yaml expects"):
        I.load_prompts(I.load_spec(), tmp_path)
    with pytest.raises(DataError, match="IFEval prompts not found: .*nowhere/ifeval/input_data.jsonl"):
        I.load_prompts(I.load_spec(), tmp_path / "nowhere")


def test_the_benchmark_definition_is_validated(tmp_path):
    good = I.BENCHMARK.read_text()
    (tmp_path / "a.yaml").write_text(good + "temperature: 0\n")
    with pytest.raises(DataError, match="a.yaml: unknown key 'temperature'"):
        I.load_spec(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(good.replace("max_new_tokens: 1280", "max_new_tokens: many"))
    with pytest.raises(DataError, match="b.yaml: max_new_tokens: required, a non-empty int"):
        I.load_spec(tmp_path / "b.yaml")
    assert I.load_spec().max_new_tokens == 1280


def test_missing_nltk_tables_fail_before_lm_eval_could_download_them(tmp_path):
    with pytest.raises(DataError, match=r"punkt_tab tables are missing: .*/tokenizers/punkt_tab/english"):
        I.use_nltk_data(tmp_path / "nltk_data")


def test_strict_and_loose_verdicts_come_from_lm_evals_checkers(checkers, prompts):
    assert I.check_response(checkers, prompts[1001], "Day one we sail to Kyoto.") == ([True], [True])
    assert I.check_response(checkers, prompts[1001], "Day one, we sail to Kyoto.") == ([False], [False])
    # lowercase only: a capitalised first line fails strict; loose drops the first line
    reply = "Sure! Here is my letter:\ndear sam, please go and vote on tuesday. it matters a lot to all of us."
    assert I.check_response(checkers, prompts[1051], reply) == ([False], [True])
    words = " ".join(["hammock"] * 401)  # at least 400 words
    assert I.check_response(checkers, prompts[1072], words) == ([True], [True])
    assert I.check_response(checkers, prompts[1072], words[:800]) == ([False], [False])
    assert I.check_response(checkers, prompts[1072], "") == ([False], [False])


def test_the_random_letter_checks_are_seeded_by_prompt_and_leave_random_alone(checkers, prompts):
    """Keys 1122 and 1129 make lm-eval draw a random letter: unseeded, the verdict follows the global
    random state; ours must not, and must leave the caller's stream untouched."""
    reply = "Sunnis ice cream! " * 8 + "".join(chr(c) * 30 for c in range(ord("a"), ord("n")))  # n..z rare
    row = prompts[1129]
    inp = checkers.InputExample(row["key"], row["instruction_id_list"], row["prompt"], row["kwargs"])
    unseeded, ours = set(), set()
    for seed in range(12):
        random.seed(seed)
        unseeded.add(checkers.test_instruction_following_strict(inp, reply).follow_instruction_list[0])
        random.seed(seed)
        before = random.getstate()
        ours.add(json.dumps([I.check_response(checkers, prompts[k], reply.lower()) for k in (1122, 1129)]))
        assert random.getstate() == before
    assert unseeded == {True, False}  # the draw matters for this reply
    assert len(ours) == 1


def test_aggregate_gives_lm_evals_four_numbers():
    verdicts = [([True, True], [True, True]), ([True, False], [True, True]), ([False], [False])]
    assert I.aggregate(verdicts) == pytest.approx({
        "prompt_strict": 100 / 3, "instruction_strict": 60.0, "prompt_loose": 200 / 3, "instruction_loose": 80.0})


@pytest.mark.slow
def test_run_ifeval_scores_every_mode_and_writes_the_report(served_run, tmp_path, checkers, prompts):
    from lm_eval.tasks.ifeval.utils import process_results

    run = tmp_path / "run"
    shutil.copytree(served_run, run)
    result = I.run_ifeval(run, max_new_tokens=6, limit=3, batch_size=2)
    tasks = json.loads((run / "manifest.json").read_text())["order"]
    assert list(result["modes"]) == ["base", "slm", *(f"slm_forced:{t}" for t in tasks)]
    assert result["prompts"] == 3 and result["max_new_tokens"] == 6 and result["budget"] == 1280
    for r in result["modes"].values():
        assert all(0.0 <= r[k] <= 100.0 for k in I.SCORES)
    slm = result["modes"]["slm"]
    assert sum(slm["routed"].values()) == 3 and 0.0 <= slm["ood_share"] <= 100.0
    assert json.loads((run / "eval" / "ifeval.json").read_text())["modes"] == result["modes"]
    md = (run / "eval" / "ifeval.md").read_text()
    assert "capped from IFEval's 1280" in md and "| slm_forced:" in md

    lines = [json.loads(x) for x in (run / "eval" / "predictions" / "ifeval.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * len(result["modes"])
    for line in lines:  # the stored verdicts are lm-eval's own, re-derived from the stored response
        random.seed(line["key"])
        official = process_results(prompts[line["key"]], [line["response"]])
        assert line["strict"] == official["inst_level_strict_acc"]
        assert 0 < line["new_tokens"] <= 6
    for mode, r in result["modes"].items():
        rows = [line for line in lines if line["mode"] == mode]
        assert I.aggregate([(x["strict"], x["loose"]) for x in rows]) == {k: r[k] for k in I.SCORES}
    base = {x["key"]: x["response"] for x in lines if x["mode"] == "base"}
    for x in lines:  # a prompt the router sends to the base model gets the base model's answer
        if x["mode"] == "slm" and x["routed_task"] is None:
            assert x["response"] == base[x["key"]]
    assert not list((run / "eval").rglob(".*tmp"))  # no half-written file left behind

    # a rerun resumes from the journal: a generation found there is not redone, a torn line is skipped
    journal = run / "eval" / I.JOURNAL
    entries = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(entries) == result["generations"]
    entries[0]["text"] = "REUSED"
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"fingerprint": "torn')
    again = I.run_ifeval(run, max_new_tokens=6, limit=3, batch_size=2)
    reused = [json.loads(x) for x in (run / "eval" / "predictions" / "ifeval.jsonl").read_text().splitlines()]
    assert sum(x["response"] == "REUSED" for x in reused) >= 1
    assert len(journal.read_text().splitlines()) == len(entries)
    assert again["prompts"] == 3
    I.run_ifeval(run, max_new_tokens=5, limit=3, batch_size=2)  # another token limit: nothing reused
    fresh = [json.loads(x) for x in (run / "eval" / "predictions" / "ifeval.jsonl").read_text().splitlines()]
    assert all(x["response"] != "REUSED" and x["new_tokens"] <= 5 for x in fresh)
    assert len(journal.read_text().splitlines()) == len(entries)  # the old limit's lines are dropped
