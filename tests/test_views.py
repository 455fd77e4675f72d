"""Query views and the phrasing pools: the split, what training may see, what each view sends."""
import dataclasses

import pytest

from slm_llm.config import DataConfig
from slm_llm.data import (DataError, Record, dev_split, load_suite, load_task_split, phrasing_split, query_text,
                          records_in_view, rendered_record, router_records, task_split, training_records)
from slm_llm.data.views import phrase, placement, view_record

SUITES = ("instruct6", "cl9")


def all_specs():
    return [(s, t, spec) for s in SUITES for t, spec in load_suite(s).tasks.items()]


@pytest.mark.parametrize("suite,task,spec", all_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_task_has_a_pool_split_into_disjoint_train_and_heldout(suite, task, spec):
    assert len(spec.phrasings) >= 8
    split = phrasing_split(spec, seed=0, heldout_share=0.25)
    assert set(split.train) | set(split.heldout) == set(spec.phrasings)
    assert not set(split.train) & set(split.heldout)
    assert len(split.heldout) == 3 and len(split.train) == len(spec.phrasings) - 3
    # stratified: the held-out phrasings span every placement the pool has (content first / middle / after)
    assert {placement(p) for p in split.heldout} == {placement(p) for p in spec.phrasings}
    assert phrasing_split(spec, seed=0, heldout_share=0.25) == split  # a recorded, reproducible rule
    dev = dev_split(split)  # selection on dev never sees a held-out phrasing
    assert set(dev.train) | set(dev.heldout) == set(split.train) and not set(dev.heldout) & set(split.heldout)


def test_another_seed_gives_another_split():
    spec = load_suite("cl9").tasks["agnews"]
    assert phrasing_split(spec, seed=0).heldout != phrasing_split(spec, seed=1).heldout


@pytest.mark.parametrize("task", ["finance_phrasebank", "code_codealpaca"])
def test_no_heldout_phrasing_reaches_training(data_root, task):
    """Every training sample is its content alone or inside a train phrasing; none uses a held-out one."""
    suite = load_suite("instruct6")
    spec, data = suite.tasks[task], DataConfig(input_only_share=0.25)
    records = load_task_split(suite, task, "train", str(data_root), max_samples=400, seed=0)
    trained = training_records(records, spec, data)
    split = task_split(spec, data)
    from slm_llm.data.views import content

    n_input_only = 0
    for raw, r in zip(records, trained):
        text, body = r.instruction, content(raw, spec.content)
        assert r.input == "" and r.output == raw.output and r.task == task
        assert all(text != phrase(h, body) for h in split.heldout)
        assert text == body or any(text == phrase(p, body) for p in split.train)
        n_input_only += text == body
    assert 0.18 < n_input_only / len(records) < 0.32  # input_only_share of them, seeded
    assert training_records(records, spec, data) == trained  # the same draw on a rerun (resume)
    assert len({r.instruction.replace(content(x, spec.content), "") for x, r in zip(records, trained)}) >= 8


def test_router_records_add_wordings_of_the_same_records_in_train_phrasings_only(data_root):
    """dtkr.renderings: the training samples first, then further wordings of each record, drawn
    like training draws (train phrasings or input alone), never a held-out phrasing."""
    from slm_llm.data.views import content

    suite = load_suite("instruct6")
    spec, data = suite.tasks["law_overruling"], DataConfig(input_only_share=0.25)
    records = load_task_split(suite, "law_overruling", "train", str(data_root), max_samples=60, seed=0)
    trained = training_records(records, spec, data)
    assert router_records(records, spec, data, 1) == trained
    fit = router_records(records, spec, data, 3)
    assert len(fit) == 3 * len(records) and fit[: len(records)] == trained
    split = task_split(spec, data)
    for i, r in enumerate(fit):
        body = content(records[i % len(records)], spec.content)
        assert r.instruction == body or any(r.instruction == phrase(p, body) for p in split.train)
        assert r.output == records[i % len(records)].output
    # each further draw is a new wording for most records, and a rerun draws the same ones (resume)
    first, second = fit[: len(records)], fit[len(records) : 2 * len(records)]
    assert sum(a.instruction != b.instruction for a, b in zip(first, second)) > len(records) // 2
    assert router_records(records, spec, data, 3) == fit
    assert router_records(records, spec, DataConfig(phrasing="fixed"), 3) == records * 3  # the dataset's one wording
    assert rendered_record(6, 3) == [0, 1, 0, 1, 0, 1]  # query i words record i % len(records)


def test_router_wordings_name_the_wording_of_every_router_query(data_root):
    """router_wordings says which wording each router query has: a train phrasing's index, the
    input alone (BARE), a record's own words (one wording per record), or, with the dataset's
    instruction, one wording for all; the Gaussian's leave-wording-out folds rely on it."""
    from slm_llm.data import router_wordings
    from slm_llm.data.views import BARE, OWN, content

    suite = load_suite("instruct6")
    spec, data = suite.tasks["law_overruling"], DataConfig(input_only_share=0.25)
    records = load_task_split(suite, "law_overruling", "train", str(data_root), max_samples=60, seed=0)
    fit, wordings = router_records(records, spec, data, 2), router_wordings(records, spec, data, 2)
    train = task_split(spec, data).train
    assert len(wordings) == len(fit)
    for i, (r, w) in enumerate(zip(fit, wordings)):
        body = content(records[i % len(records)], spec.content)
        assert r.instruction == (body if w == BARE else phrase(train[w], body))
    assert BARE in wordings and len(set(wordings)) == len(train) + 1
    assert router_wordings(records, spec, DataConfig(phrasing="fixed"), 2) == [0] * 120
    own = dataclasses.replace(spec, phrasings=())
    mine = [dataclasses.replace(r, instruction=f"Question {i}: does this overrule?") for i, r in enumerate(records)]
    words = router_wordings(mine, own, data)
    assert all(w == BARE or w == OWN - i for i, w in enumerate(words)) and words.count(BARE) < 30


def test_router_queries_add_calibration_records_after_the_sample_in_train_wordings_only(data_root):
    """dtkr.calibration_records: the router's queries are the training sample (renderings of each
    record, first: keys and training use them), then one wording of each calibration record, drawn
    as training draws (train phrasings or input alone, never a held-out phrasing); each query names
    its record (calibration folds) and its wording, and each record has its bare input."""
    from slm_llm.config import load_config
    from slm_llm.data import bare_records, run_records
    from slm_llm.data.views import BARE
    from slm_llm.dtkr.evaluate import task_queries

    suite = load_suite("instruct6")
    cfg = load_config(None, ["data.tasks=[law_overruling]", "data.max_train_samples=40", "dtkr.calibration_records=30",
                             f"data.data_root={data_root}"])
    spec = suite.tasks["law_overruling"]
    q = task_queries(cfg, suite, "law_overruling", renderings=2)
    sample = run_records(suite, "law_overruling", "train", cfg.data)
    extra = run_records(suite, "law_overruling", "calibration", cfg.data, calibration=30)
    assert q.n_sample == 80 and q.sample == router_records(sample, spec, cfg.data, 2)
    assert q.records[80:] == training_records(extra, spec, cfg.data) and len(q.records) == 110
    assert q.record_of.tolist() == [i % 40 for i in range(80)] + list(range(40, 70))
    assert q.bare == [query_text(r) for r in bare_records(sample + extra, spec)]
    train, held = task_split(spec, cfg.data).train, task_split(spec, cfg.data).heldout
    for r, w, i in zip(q.records[80:], q.wordings[80:], range(30)):
        body = q.bare[40 + i]
        assert r.instruction == (body if w == BARE else phrase(train[w], body))
        assert not any(r.instruction == phrase(h, body) for h in held)
    assert task_queries(cfg, suite, "law_overruling", 2, calibration=False).records == q.sample


def test_views_of_a_record():
    suite = load_suite("instruct6")
    spec = suite.tasks["finance_phrasebank"]
    rec = Record(instruction="Classify the sentiment. Answer positive, negative or neutral.",
                 input="Profits doubled.", output="positive", task="finance_phrasebank", answer="positive", id="x1")
    data = DataConfig()
    fixed, only, para = (records_in_view([rec], spec, v, data)[0] for v in ("fixed", "input-only", "paraphrase"))
    assert fixed == rec and query_text(fixed) == f"{rec.instruction}\n\n{rec.input}"
    assert query_text(only) == "Profits doubled." and only.output == "positive"
    assert "Classify the sentiment" not in query_text(para) and "Profits doubled." in query_text(para)
    assert any(query_text(para) == phrase(h, rec.input) for h in task_split(spec, data).heldout)
    # code: the per-record instruction is the content; phrasings wrap the whole request
    code = suite.tasks["code_codealpaca"]
    req = Record(instruction="Write a function that adds two numbers.", input="", output="def add(a, b): ...",
                 task="code_codealpaca", id="c1")
    assert query_text(records_in_view([req], code, "input-only", data)[0]) == req.instruction
    assert req.instruction in query_text(records_in_view([req], code, "paraphrase", data)[0])
    with pytest.raises(DataError, match="unknown query view"):
        view_record(rec, "templated")


def test_phrase_places_the_content():
    assert phrase("{input}\n\nGood or bad?", "X") == "X\n\nGood or bad?"
    assert phrase("Is this good news?", "X") == "Is this good news?\n\nX"
    assert placement("Here: {input} - ok?") == "middle" and placement("{input} ok?") == "first"


def test_fixed_phrasing_trains_on_the_dataset_instruction(data_root):
    suite = load_suite("instruct6")
    records = load_task_split(suite, "law_overruling", "train", str(data_root), max_samples=5, seed=0)
    assert training_records(records, suite.tasks["law_overruling"], DataConfig(phrasing="fixed")) == records


def test_a_task_without_a_pool_is_a_clear_error(tmp_path):
    (tmp_path / "s.yaml").write_text("tasks:\n  t:\n    format: alpaca\n    path: x\n    metric: exact_match\n")
    spec = load_suite(tmp_path / "s.yaml").tasks["t"]
    with pytest.raises(DataError, match="task 't' has 0 phrasings.*data.phrasing=fixed"):
        phrasing_split(spec)
    (tmp_path / "bad.yaml").write_text("tasks:\n  t:\n    format: alpaca\n    path: x\n    metric: exact_match\n"
                                       "    phrasings: ['{input} {input}', 'b']\n")
    with pytest.raises(DataError, match=r"bad.yaml: tasks.t.phrasings\[0\]: holds \{input\} more than once"):
        load_suite(tmp_path / "bad.yaml")


def _no_pool_task(tmp_path):
    (tmp_path / "own.yaml").write_text("tasks:\n  t:\n    format: alpaca\n    path: x\n    metric: rouge_l\n")
    return load_suite(tmp_path / "own.yaml").tasks["t"]


def _records(instructions, split="train"):
    return [Record(instruction=ins, input=f"{split} text {i}", output="o", task="t", id=f"{split}{i}")
            for i, ins in enumerate(instructions)]


def test_a_task_without_a_pool_uses_its_records_own_words(tmp_path):
    """Alpaca-style data whose rows word their own requests needs no pool: training sends each
    record in its own words (or its input alone), and the paraphrase view is each test record's
    own words, never the words of a training record."""
    from slm_llm.data import own_wordings_record

    spec, data = _no_pool_task(tmp_path), DataConfig(input_only_share=0.25)
    train = _records([f"Please handle request number {i} with care." for i in range(40)])
    out = training_records(train, spec, data)
    own = [o for r, o in zip(train, out) if o.instruction == f"{r.instruction}\n\n{r.input}"]
    bare = [o for r, o in zip(train, out) if o.instruction == r.input]
    assert len(own) + len(bare) == 40 and 4 <= len(bare) <= 18 and all(o.input == "" for o in out)
    assert router_records(train, spec, data, renderings=2)[:40] == out
    test = _records([f"Could you sort out case {i}?" for i in range(5)], "test")
    para = records_in_view(test, spec, "paraphrase", data)
    assert [r.instruction for r in para] == [f"{r.instruction}\n\n{r.input}" for r in test]
    assert records_in_view(test, spec, "fixed", data) == test
    assert own_wordings_record(spec, train) == {"source": "records", "train_records": 40, "distinct_instructions": 40}


@pytest.mark.parametrize("kinds", [1, 3])
def test_a_task_without_a_pool_and_a_constant_instruction_is_refused(tmp_path, kinds):
    """One instruction (or a few templates) on every record is a task id users never type."""
    spec = _no_pool_task(tmp_path)
    train = _records([f"Classify this ticket, variant {i % kinds}." for i in range(40)])
    with pytest.raises(DataError, match=rf"task 't' has no 'phrasings' list and its 40 training records share "
                                        rf"{kinds} distinct instruction.*Add a 'phrasings' list"):
        training_records(train, spec, DataConfig())
    assert training_records(train, spec, DataConfig(phrasing="fixed")) == train


def test_the_manifest_records_how_each_task_is_worded(tmp_path, caplog):
    """Training's record of a suite with a pool task and an own-words task; a constant-instruction
    task without a pool stops the run before its folder exists."""
    import json

    from slm_llm.config import Config
    from slm_llm.train.continual import phrasing_record

    for name, instruction in [("own", "Please handle request {i} with care."), ("const", "Classify this.")]:
        for split, n in [("train", 30), ("test", 8)]:  # 3 test records repeat a training instruction
            rows = [{"instruction": instruction.format(i=i if split == "train" or i < 3 else 100 + i),
                     "input": f"{split} text {i}", "output": "o"} for i in range(n)]
            (tmp_path / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.yaml").write_text(
        "data_root: .\ntasks:\n"
        "  own: {format: alpaca, path: 'own.{split}.jsonl', metric: rouge_l}\n"
        "  own_train_only: {format: alpaca, path: own.train.jsonl, metric: rouge_l}\n"
        "  const: {format: alpaca, path: 'const.{split}.jsonl', metric: rouge_l}\n"
        "  pooled: {format: alpaca, path: 'const.{split}.jsonl', metric: rouge_l,"
        " phrasings: ['a {input}', 'b {input}']}\n")
    suite, cfg = load_suite(tmp_path / "s.yaml"), Config()
    cfg.data.dev_samples = 0  # every train record is trained on
    with caplog.at_level("WARNING", logger="slm_llm.data"):
        record = phrasing_record(cfg, suite, "own")
    assert record == {"source": "records", "train_records": 30, "distinct_instructions": 30, "eval_records": 8,
                      "eval_instructions_seen_in_training": 3}
    assert "3 of its 8 evaluation records repeat a training record's instruction" in caplog.text
    assert "eval_records" not in phrasing_record(cfg, suite, "own_train_only")  # no test split: nothing to count
    assert phrasing_record(cfg, suite, "pooled")["heldout"] in (["a {input}"], ["b {input}"])
    with pytest.raises(DataError, match="task 'const' has no 'phrasings' list"):
        phrasing_record(cfg, suite, "const")


@pytest.mark.slow
def test_a_paraphrased_query_is_routed_to_its_task_and_not_flagged(served_run, data_root):
    """End to end on the tiny run: test records worded with held-out phrasings (never trained on),
    routed by the run's router as the server routes them, reach their own task and are not OOD."""
    import json

    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.dtkr.router import open_router
    from slm_llm.pipeline import route_queries
    from slm_llm.run import RunDir

    cfg = load_config(served_run / "run.yaml")
    manifest = json.loads((served_run / "manifest.json").read_text())
    suite = load_suite(cfg.data.suite)
    router = open_router(RunDir(served_run), cfg, build_encoder(cfg, cache=False))
    for task in manifest["order"]:
        heldout = manifest["phrasings"][task]["heldout"]
        records = records_in_view(load_task_split(suite, task, "test", str(data_root), 6, 0), suite.tasks[task],
                                  "paraphrase", cfg.data)
        assert all(any(all(part.strip() in r.instruction for part in p.split("{input}") if part.strip())
                       for p in heldout) for r in records)  # worded with held-out phrasings only
        routed = route_queries(router, build_encoder(cfg, cache=False), [query_text(r) for r in records], "slm",
                               ood_fallback=True)
        assert [r.raw.task for r in routed] == [task] * len(records)
        assert sum(r.decision is not None for r in routed) >= len(records) - 1  # at most one OOD flag
