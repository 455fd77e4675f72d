"""The lm-evaluation-harness hand-off: task folders whose per-sample score is ours, and lm-eval
itself (python API, offline) on an exported adapter giving the same outputs and scores as
slm_llm's pipeline with the same slots and weights."""
import importlib.util
import json
import shutil

import pytest

from slm_llm.data import Record, load_suite
from slm_llm.eval.lm_eval_tasks import SHARED_FILES, TEMPLATES_DIR, task_name
from slm_llm.eval.metrics import score


def _utils(folder):
    spec = importlib.util.spec_from_file_location("slm_lm_eval_utils", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_process_results_is_our_score(tmp_path):
    """The utils.py copied beside the YAMLs scores a response exactly as metrics.score does."""
    import dataclasses

    for name in SHARED_FILES:
        shutil.copy(TEMPLATES_DIR / name, tmp_path / name)
    suite = load_suite("instruct6")
    specs = {t: dataclasses.asdict(suite.tasks[t]) for t in ("finance_phrasebank", "medical_medmcqa", "math_gsm8k")}
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    utils = _utils(tmp_path)
    cases = [  # (task, gold answer, response, our score)
        ("finance_phrasebank", "positive", "  Positive. The outlook improved.\n", 1.0),
        ("finance_phrasebank", "positive", "  The sentiment is positive.\n", 0.0),  # strict: starts with the label
        ("finance_phrasebank", "positive", "negative, not positive", 0.0),
        ("medical_medmcqa", "C", "C. Hepatitis", 1.0),
        ("medical_medmcqa", "C", "The answer is C.", 0.0),
        ("medical_medmcqa", "C", "A", 0.0),
        ("math_gsm8k", "1234", "so #### 1,234", 1.0),
    ]
    for task, gold, text, want in cases:
        rec = Record(instruction="q", input="", output=gold, task=task, answer=gold, id="1")
        got = utils.process_results(dataclasses.asdict(rec), [text])
        assert got == {"exact_match": want} == {"exact_match": score(suite.tasks[task], text.strip(), rec)}


def test_task_names_are_lm_eval_identifiers():
    assert task_name("instruct6", "finance_phrasebank", "input-only") == "slm_instruct6_finance_phrasebank_input_only"
    assert task_name("cl9", "fixed") == "slm_cl9_fixed"


PHRASINGS = ["What is the sentiment of this financial news: {input}",
             "Is this headline good, bad or neutral for investors?",
             "Classify the tone of the following sentence as positive, negative or neutral.",
             "{input}\nHow would a trader read this: positive, negative or neutral?"]


@pytest.mark.slow
def test_lm_eval_on_an_exported_adapter_equals_our_pipeline(served_run, data_root, tmp_path):
    """lm-eval (hf model + peft adapter, chat template, greedy) and slm_llm's RunPipeline with the
    adapter's own slots and mean weights answer the same paraphrased test records with the same
    text and score."""
    import dataclasses

    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from slm_llm.config import load_config
    from slm_llm.data import load_task_split
    from slm_llm.data.views import task_split
    from slm_llm.dtkr import RouteDecision
    from slm_llm.eval.lm_eval_tasks import max_new_tokens, write_lm_eval_tasks
    from slm_llm.jare.export import base_model_folder
    from slm_llm.pipeline import RunPipeline
    from slm_llm.run import RunDir

    run = tmp_path / "run"
    shutil.copytree(served_run, run)
    task = "finance_phrasebank"  # the run's first task
    spec = dataclasses.replace(load_suite("instruct6").tasks[task], phrasings=PHRASINGS)
    entry = {k: v for k, v in dataclasses.asdict(spec).items() if k != "name" and v is not None}
    suite = tmp_path / "fin.yaml"
    suite.write_text(yaml.safe_dump({"name": "fin", "data_root": str(data_root), "tasks": {task: entry}}))
    overrides = ["eval.max_new_tokens=12", "eval.max_samples=4"]  # longer answers: the adapter shows
    out = write_lm_eval_tasks(run, str(suite), "paraphrase", None, overrides)
    name = task_name("fin", task, "paraphrase")
    readme = (out / "README.md").read_text()
    assert f"--tasks {name} " in readme and f"peft={(run / 'tasks').resolve()}" in readme

    cfg = load_config(run / "run.yaml", overrides)
    rows = [json.loads(x) for x in (out / f"{task}.jsonl").read_text().splitlines()]
    records = [Record(**{k: r[k] for k in ("instruction", "input", "output", "task", "answer", "id")}) for r in rows]
    matrix = load_task_split(load_suite(suite), task, "test", None, cfg.eval.max_samples, cfg.data.seed)
    assert [r.id for r in records] == [r.id for r in matrix]  # the matrix's records, reworded
    split = task_split(spec, cfg.data)  # the run's own split (data.phrasing_seed), whatever its data.seed
    for r, m, row in zip(records, matrix, rows):
        assert r.input == "" and r.instruction == row["query"] and m.input in r.instruction
        assert any(p.replace("{input}", m.input) == r.instruction or r.instruction == f"{p}\n\n{m.input}"
                   for p in split.heldout)

    adapter = RunDir(run).task_dir(task) / "adapter"
    base = base_model_folder(cfg, RunDir(run))  # the copy's own base (the adapter's config names the original)
    manager = TaskManager(include_path=str(out), include_defaults=False)

    def lm_eval(model_args):
        res = simple_evaluate(model="hf", model_args=model_args, tasks=[name], task_manager=manager,
                              apply_chat_template=True, batch_size=2, device="cpu", log_samples=True)
        return res, sorted(res["samples"][name], key=lambda s: s["doc_id"])

    res, samples = lm_eval(f"pretrained={base},peft={adapter},dtype=float32")
    _, base_samples = lm_eval(f"pretrained={base},dtype=float32")

    manifest = json.loads((run / "manifest.json").read_text())
    pipe = RunPipeline.load(run, overrides)
    fixed = RouteDecision(slots=list(pipe.model.slot_range(task)), weights=manifest["tasks"][task]["mean_weights"],
                          task=task, score=1.0, ood=False, scores=[1.0] * cfg.jare.slots_per_task)
    prompts = pipe.prompts(records)
    ours = pipe.generate(prompts, [fixed] * len(records), max_new_tokens(cfg, spec), batch_size=2)
    base_texts = [g.text for g in pipe.generate(prompts, pipe.route(records, "base"), max_new_tokens(cfg, spec))]

    assert len(samples) == len(records) == 4
    for s, prompt, g, rec in zip(samples, prompts, ours, records):
        assert s["arguments"][0][0] == prompt  # lm-eval rendered our chat prompt
        assert s["resps"][0][0].strip() == g.text
        assert s[spec.metric] == score(spec, g.text, rec)
    mean = sum(score(spec, g.text, r) for g, r in zip(ours, records)) / len(records)
    assert res["results"][name][f"{spec.metric},none"] == pytest.approx(mean)
    assert [s["resps"][0][0].strip() for s in base_samples] == base_texts
    assert [g.text for g in ours] != base_texts  # the adapter changed the answers: lm-eval applied it
