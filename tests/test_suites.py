"""Suites: the shipped YAMLs agree with the data; loading, orders, errors, data root, subsampling."""
import json
from pathlib import Path

import pytest

from slm_llm.data import DataError, load_suite, load_task_split, resolve_data_root
from slm_llm.data.suites import REPO_ROOT

INSTRUCT6 = ["math_gsm8k", "finance_phrasebank", "medical_medmcqa", "law_overruling", "science_arc_easy",
             "code_codealpaca"]
CL9 = {"agnews", "amazon", "dbpedia", "mnli", "cb", "sst2", "boolq", "copa", "wic"}


def test_instruct6_matches_the_manifest(data_root):
    suite = load_suite("instruct6")
    manifest = json.loads((data_root / "instruct" / "manifest.json").read_text())["domains"]
    assert list(suite.tasks) == INSTRUCT6
    for name, spec in suite.tasks.items():
        assert (spec.format, spec.path) == ("alpaca", f"instruct/{name}")
        assert spec.metric == manifest[name]["metric"]
        assert spec.labels == manifest[name]["labels"]
        assert spec.answer_type == manifest[name]["answer_type"]
    assert suite.order_tasks() == INSTRUCT6
    assert len(suite.orders) >= 3


def test_cl9_labels_instructions_and_orders(data_root):
    suite = load_suite("cl9")
    assert set(suite.tasks) == CL9
    for name, spec in suite.tasks.items():
        assert spec.format == "cl_benchmark" and spec.metric == "exact_match"
        assert spec.labels == json.loads((data_root / spec.path / "labels.json").read_text())
        for label in spec.labels:  # the prompt lists every answer option
            assert label in spec.instruction, (name, label)
    assert sorted(suite.order_tasks("default")) == sorted(CL9)
    assert suite.order_tasks("order1") == ["dbpedia", "amazon", "agnews"]
    assert suite.order_tasks("order3") == ["amazon", "agnews", "dbpedia"]
    for order in ("order4", "order5", "order6"):
        assert sorted(suite.order_tasks(order)) == sorted(CL9)
    assert suite.order_tasks("order4")[:4] == ["mnli", "cb", "wic", "copa"]


@pytest.mark.parametrize("suite_name", ["instruct6", "cl9"])
def test_every_task_of_the_shipped_suites_loads(data_root, suite_name):
    suite = load_suite(suite_name)
    for task in suite.tasks:
        records = load_task_split(suite, task, "test", max_samples=5)
        assert len(records) == 5 and all(r.task == task for r in records)


def test_suite_by_path_equals_suite_by_name():
    by_path = load_suite(REPO_ROOT / "eval" / "suites" / "cl9.yaml")
    assert by_path.tasks == load_suite("cl9").tasks


def test_order_tasks_explicit_list_and_errors():
    suite = load_suite("instruct6")
    assert suite.order_tasks("reverse", tasks=["law_overruling", "math_gsm8k"]) == ["law_overruling", "math_gsm8k"]
    with pytest.raises(DataError, match=r"unknown order 'nope'"):
        suite.order_tasks("nope")
    with pytest.raises(DataError, match=r"unknown task\(s\) \['poetry'\]"):
        suite.order_tasks(tasks=["poetry"])


def test_unknown_suite_name_lists_known_suites():
    with pytest.raises(DataError, match=r"unknown suite 'nope'.*instruct6"):
        load_suite("nope")


def test_max_samples_is_a_deterministic_seeded_subset(data_root):
    a = load_task_split("cl9", "sst2", "train", max_samples=50, seed=1)
    b = load_task_split("cl9", "sst2", "train", max_samples=50, seed=1)
    c = load_task_split("cl9", "sst2", "train", max_samples=50, seed=2)
    assert [r.id for r in a] == [r.id for r in b]
    assert [r.id for r in a] != [r.id for r in c]
    ids = [int(r.id.rsplit("-", 1)[1]) for r in a]
    assert len(a) == 50 and ids == sorted(ids)  # file order kept
    assert len(load_task_split("cl9", "cb", "test", max_samples=10_000)) == 56


# --- a user's own suite -----------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _user_suite(tmp_path) -> Path:
    rows = lambda n, out: "\n".join(json.dumps({"instruction": "Echo", "input": f"x{i}", "output": out})
                                    for i in range(n))
    _write(tmp_path / "data" / "echo" / "train.jsonl", rows(4, "x"))
    _write(tmp_path / "data" / "echo" / "test.jsonl", rows(2, "x"))
    _write(tmp_path / "data" / "yesno.train.jsonl", rows(3, "yes"))
    _write(tmp_path / "data" / "yesno.test.jsonl", rows(1, "no"))
    return _write(tmp_path / "my_suite.yaml", """
data_root: data
tasks:
  echo:
    format: alpaca
    path: echo
    metric: rouge_l
  yesno:
    format: alpaca
    path: "yesno.{split}.jsonl"
    metric: exact_match
    labels: ["yes", "no"]
orders:
  backwards: [yesno, echo]
""")


def test_user_suite_by_path_with_its_own_data_root(tmp_path):
    suite = load_suite(_user_suite(tmp_path))
    assert suite.name == "my_suite"
    assert suite.order_tasks() == ["echo", "yesno"]  # default: file order
    assert suite.order_tasks("backwards") == ["yesno", "echo"]
    assert len(load_task_split(suite, "echo", "train")) == 4
    assert [r.output for r in load_task_split(suite, "yesno", "test")] == ["no"]
    assert {r.task for r in load_task_split(suite, "yesno", "train")} == {"yesno"}


def test_user_suite_labels_are_enforced(tmp_path):
    path = _user_suite(tmp_path)
    _write(tmp_path / "data" / "yesno.test.jsonl", json.dumps({"instruction": "Q", "output": "maybe"}))
    with pytest.raises(DataError, match=r"yesno\.test\.jsonl:1: field 'output': 'maybe'"):
        load_task_split(load_suite(path), "yesno", "test")


def test_suite_paths_resolve_against_an_explicit_data_root(tmp_path):
    _write(tmp_path / "root" / "t" / "train.jsonl", json.dumps({"instruction": "a", "output": "b"}))
    path = _write(tmp_path / "s.yaml", "tasks:\n  t: {format: alpaca, path: t, metric: exact_match}\n")
    assert load_task_split(load_suite(path), "t", "train", data_root=tmp_path / "root")[0].output == "b"


@pytest.mark.parametrize("body,message", [
    ("tasks: {t: {format: alpaca, path: p, metric: exact_match}}\nextra: 1\n", r"unknown key 'extra'"),
    ("tasks: {t: {format: alpaca, path: p, metric: exact_match, colour: red}}\n", r"unknown key 'tasks\.t\.colour'"),
    ("tasks: {t: {format: xml, path: p, metric: exact_match}}\n", r"tasks\.t\.format: 'xml' is not one of"),
    ("tasks: {t: {format: alpaca, path: p, metric: bleu}}\n", r"tasks\.t\.metric: 'bleu' is not one of"),
    ("tasks: {t: {format: alpaca, metric: exact_match}}\n", r"tasks\.t\.path: required"),
    ("tasks: {t: {format: cl_benchmark, path: p, metric: exact_match}}\n", r"tasks\.t\.instruction: required"),
    ("tasks: {t: {format: alpaca, path: p, metric: exact_match}}\norders: {o1: [t, u]}\n",
     r"orders\.o1: unknown task\(s\) \['u'\]"),
    ("tasks: {t: {format: alpaca, path: p, metric: exact_match}}\norders: {o1: [t, t]}\n",
     r"orders\.o1: lists a task more than once"),
    ("tasks: {t: {format: alpaca, path: p, metric: exact_match, labels: yes}}\n", r"tasks\.t\.labels: must be"),
    ("tasks: {}\n", r"tasks: must be a non-empty mapping"),
    ("tasks: [a, b\n", r"invalid YAML"),
])
def test_suite_errors_name_the_file_and_key(tmp_path, body, message):
    path = _write(tmp_path / "broken_suite.yaml", body)
    with pytest.raises(DataError, match=message) as err:
        load_suite(path)
    assert "broken_suite.yaml" in str(err.value)


def test_missing_task_path_names_the_key(tmp_path):
    path = _write(tmp_path / "s.yaml", "data_root: .\ntasks:\n  t: {format: alpaca, path: nowhere, metric: rouge_l}\n")
    with pytest.raises(DataError, match=r"s\.yaml: tasks\.t\.path: .*nowhere does not exist"):
        load_task_split(load_suite(path), "t", "test")


def test_single_file_task_has_no_test_split(tmp_path):
    _write(tmp_path / "one.jsonl", json.dumps({"instruction": "a", "output": "b"}))
    path = _write(tmp_path / "s.yaml", "data_root: .\ntasks:\n  t: {format: alpaca, path: one.jsonl, metric: rouge_l}\n")
    suite = load_suite(path)
    assert len(load_task_split(suite, "t", "train")) == 1
    with pytest.raises(DataError, match=r"tasks\.t\.path is a single file, so there is no 'test' split"):
        load_task_split(suite, "t", "test")


# --- data root --------------------------------------------------------------------------------

def test_data_root_precedence(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv("SLM_DATA", str(env))
    assert resolve_data_root(str(explicit)) == explicit.resolve()
    assert resolve_data_root() == env.resolve()
    monkeypatch.delenv("SLM_DATA")
    default = (REPO_ROOT.parent / "shared" / "data").resolve()
    if default.is_dir():
        assert resolve_data_root() == default


def test_missing_data_root_lists_every_place_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_DATA", str(tmp_path / "env-missing"))
    with pytest.raises(DataError) as err:
        resolve_data_root(str(tmp_path / "explicit-missing"))
    msg = str(err.value)
    assert "explicit-missing" in msg and "env-missing" in msg and "shared/data" in msg
    assert "$SLM_DATA" in msg and "--data-root" in msg
    monkeypatch.delenv("SLM_DATA")
    with pytest.raises(DataError, match=r"\$SLM_DATA: not set"):
        resolve_data_root(str(tmp_path / "explicit-missing"))
