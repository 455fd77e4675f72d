"""Readers: every shared dataset reads with the README counts; every invalid input names file, place and field."""
import json
import re

import pytest

from slm_llm.data import DataError, Record, read_alpaca, read_cl_benchmark, read_hf_dataset

INSTRUCT = ["math_gsm8k", "finance_phrasebank", "medical_medmcqa", "law_overruling", "science_arc_easy",
            "code_codealpaca"]
CL = ["agnews", "amazon", "dbpedia", "mnli", "cb", "sst2", "boolq", "copa", "wic"]


def _cl_readme_counts(data_root):
    """task -> (train, test) from the table in cl_benchmark/README.md."""
    counts = {}
    for line in (data_root / "cl_benchmark" / "README.md").read_text().splitlines():
        m = re.match(r"\|\s*(\w+)\s*\|\s*[\w/-]+\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", line)
        if m:
            counts[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return counts


# --- every shared dataset ---------------------------------------------------------------------

@pytest.mark.parametrize("domain", INSTRUCT)
@pytest.mark.parametrize("split", ["train", "test"])
def test_instruct_domain_reads_with_manifest_counts(data_root, domain, split):
    info = json.loads((data_root / "instruct" / "manifest.json").read_text())["domains"][domain]
    path = data_root / "instruct" / domain / f"{split}.jsonl"
    expected = info[f"n_{split}"]
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert n_lines == expected
    # code_codealpaca/train has two records with an empty output (lines 1287, 1497): dropped.
    dropped = 2 if (domain, split) == ("code_codealpaca", "train") else 0
    records = read_alpaca(path, labels=info["labels"], drop_empty_output=True)
    assert len(records) == expected - dropped
    assert all(r.task == domain and r.instruction and r.output and r.id for r in records)
    if info["labels"]:
        assert {r.answer for r in records} <= set(info["labels"])
    assert len({r.id for r in records}) == len(records)


def test_codealpaca_strict_read_reports_the_empty_output(data_root):
    path = data_root / "instruct" / "code_codealpaca" / "train.jsonl"
    with pytest.raises(DataError, match=r"train\.jsonl:1287: field 'output' is empty"):
        read_alpaca(path)


@pytest.mark.parametrize("task", CL)
@pytest.mark.parametrize("split", ["train", "test"])
def test_cl_benchmark_task_reads_with_readme_counts(data_root, task, split):
    expected = _cl_readme_counts(data_root)[task][0 if split == "train" else 1]
    labels = json.loads((data_root / "cl_benchmark" / task / "labels.json").read_text())
    # MNLI's test file marks 131 records with "-" (no gold label); they are skipped.
    skip = ["-"] if task == "mnli" else []
    records = read_cl_benchmark(data_root / "cl_benchmark" / task, split, task, "Classify.", skip_labels=skip)
    assert len(records) == expected - (131 if (task, split) == ("mnli", "test") else 0)
    assert {r.output for r in records} <= set(labels)
    assert all(r.answer == r.output and r.input and r.task == task for r in records)


def test_cl_readme_lists_all_nine_tasks(data_root):
    assert sorted(_cl_readme_counts(data_root)) == sorted(CL)


def test_mnli_strict_read_reports_the_unknown_label(data_root):
    with pytest.raises(DataError, match=r"mnli/test\.json\[76\]: field 'label': unknown label '-'"):
        read_cl_benchmark(data_root / "cl_benchmark" / "mnli", "test", "mnli", "Classify.")


# --- Alpaca validation ------------------------------------------------------------------------

def _jsonl(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"instruction": "Say hi", "input": "", "output": "hi", "task": "t"})


def test_alpaca_jsonl_and_json_read_the_same_records(tmp_path):
    rows = [{"instruction": "Add", "input": "1 2", "output": "3", "answer": "3", "id": "a"},
            {"instruction": "Greet", "output": "hello"}]
    jl = _jsonl(tmp_path, "d.jsonl", [json.dumps(r) for r in rows])
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    expected = [Record("Add", "1 2", "3", "mytask", "3", "a"), Record("Greet", "", "hello", "mytask")]
    assert read_alpaca(jl, task="mytask") == expected
    assert read_alpaca(js, task="mytask") == expected


def test_alpaca_record_task_wins_over_the_argument(tmp_path):
    path = _jsonl(tmp_path, "d.jsonl", [GOOD])
    assert read_alpaca(path, task="other")[0].task == "t"


def test_alpaca_blank_lines_are_skipped_but_line_numbers_stay_true(tmp_path):
    path = _jsonl(tmp_path, "d.jsonl", [GOOD, "", GOOD, '{"instruction": "x", "output": ""}'])
    with pytest.raises(DataError, match=r"d\.jsonl:4: field 'output' is empty"):
        read_alpaca(path, task="t")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path, "bad.jsonl", [GOOD, GOOD, '{"instruction": "x", "output": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_alpaca(path)


def test_malformed_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        read_alpaca(path, task="t")


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_missing_required_field_names_file_line_and_field(tmp_path, field):
    row = {"instruction": "x", "output": "y", "task": "t"}
    del row[field]
    path = _jsonl(tmp_path, "m.jsonl", [GOOD, json.dumps(row)])
    with pytest.raises(DataError, match=rf"m\.jsonl:2: field '{field}' is missing"):
        read_alpaca(path)


def test_missing_field_in_json_list_names_the_record_index(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "b"}]))
    with pytest.raises(DataError, match=r"m\.json\[1\]: field 'instruction' is missing"):
        read_alpaca(path, task="t")


def test_empty_output_names_file_line_and_field(tmp_path):
    path = _jsonl(tmp_path, "e.jsonl", [json.dumps({"instruction": "x", "output": "  ", "task": "t"})])
    with pytest.raises(DataError, match=r"e\.jsonl:1: field 'output' is empty"):
        read_alpaca(path)


@pytest.mark.parametrize("field,value", [("input", 5), ("output", ["a"]), ("answer", 3.0), ("id", {"a": 1})])
def test_wrong_type_names_the_field(tmp_path, field, value):
    row = {"instruction": "x", "output": "y", "task": "t", field: value}
    path = _jsonl(tmp_path, "w.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=rf"w\.jsonl:1: field '{field}' must be a string"):
        read_alpaca(path)


def test_non_object_line_is_an_error(tmp_path):
    path = _jsonl(tmp_path, "l.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(DataError, match=r"l\.jsonl:2: expected a JSON object"):
        read_alpaca(path)


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", ""), ("e.json", "[]")])
def test_empty_file_is_an_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=rf"{re.escape(name)}: no records"):
        read_alpaca(path, task="t")


def test_task_missing_everywhere_is_an_error(tmp_path):
    path = _jsonl(tmp_path, "n.jsonl", [json.dumps({"instruction": "x", "output": "y"})])
    with pytest.raises(DataError, match=r"n\.jsonl:1: field 'task' is missing"):
        read_alpaca(path)


def test_answer_outside_labels_names_the_field(tmp_path):
    rows = [{"instruction": "x", "output": "Yes", "answer": "Yes"}, {"instruction": "x", "output": "Maybe"}]
    path = _jsonl(tmp_path, "lab.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"lab\.jsonl:2: field 'output': 'Maybe' is not one of the labels"):
        read_alpaca(path, task="t", labels=["Yes", "No"])


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_alpaca(tmp_path / "nope.jsonl", task="t")
    (tmp_path / "d.txt").write_text(GOOD)
    with pytest.raises(DataError, match=r"d\.txt: unsupported extension"):
        read_alpaca(tmp_path / "d.txt", task="t")


# --- CL-benchmark validation ------------------------------------------------------------------

def _cl_dir(tmp_path, rows, labels=("pos", "neg")):
    d = tmp_path / "task"
    d.mkdir()
    (d / "labels.json").write_text(json.dumps(list(labels)))
    (d / "train.json").write_text(json.dumps(rows))
    return d


def test_cl_benchmark_builds_records_from_sentence_and_label(tmp_path):
    d = _cl_dir(tmp_path, [{"sentence": "great", "label": "pos"}, {"sentence": "awful", "label": "neg"}])
    records = read_cl_benchmark(d, "train", "senti", "Sentiment? Answer pos or neg.")
    assert records[1] == Record("Sentiment? Answer pos or neg.", "awful", "neg", "senti", "neg", "senti-train-1")


def test_cl_benchmark_unknown_label_names_file_index_and_field(tmp_path):
    d = _cl_dir(tmp_path, [{"sentence": "great", "label": "pos"}, {"sentence": "meh", "label": "mixed"}])
    with pytest.raises(DataError, match=r"train\.json\[1\]: field 'label': unknown label 'mixed'"):
        read_cl_benchmark(d, "train", "senti", "Sentiment?")


def test_cl_benchmark_explicit_labels_override_labels_json(tmp_path):
    d = _cl_dir(tmp_path, [{"sentence": "meh", "label": "mixed"}])
    assert read_cl_benchmark(d, "train", "s", "Sentiment?", labels=["mixed"])[0].answer == "mixed"


@pytest.mark.parametrize("row,message", [
    ({"label": "pos"}, r"train\.json\[0\]: field 'sentence' is missing"),
    ({"sentence": "x", "label": 1}, r"train\.json\[0\]: field 'label' must be a string"),
    ({"sentence": " ", "label": "pos"}, r"train\.json\[0\]: field 'sentence' is empty"),
    ("just text", r"train\.json\[0\]: expected a JSON object"),
])
def test_cl_benchmark_record_errors(tmp_path, row, message):
    d = _cl_dir(tmp_path, [row])
    with pytest.raises(DataError, match=message):
        read_cl_benchmark(d, "train", "s", "Sentiment?")


def test_cl_benchmark_empty_split_and_missing_labels(tmp_path):
    d = _cl_dir(tmp_path, [])
    with pytest.raises(DataError, match=r"train\.json: no records"):
        read_cl_benchmark(d, "train", "s", "Sentiment?")
    (d / "labels.json").unlink()
    with pytest.raises(DataError, match=r"labels\.json: file not found"):
        read_cl_benchmark(d, "train", "s", "Sentiment?")


# --- HF datasets ------------------------------------------------------------------------------

def test_hf_jsonl_with_field_map_and_default_instruction(tmp_path):
    path = _jsonl(tmp_path, "q.jsonl", [json.dumps({"question": "2+2?", "solution": "4", "id": 7}),
                                        json.dumps({"question": "3+3?", "solution": "6", "id": 8})])
    records = read_hf_dataset(path, "math", field_map={"input": "question", "output": "solution"},
                              instruction="Solve.")
    assert records == [Record("Solve.", "2+2?", "4", "math", "", "7"), Record("Solve.", "3+3?", "6", "math", "", "8")]


def test_hf_csv_and_save_to_disk_folder(tmp_path):
    import datasets

    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input,output\nSay hi,,hi\nAdd,1 1,2\n")
    records = read_hf_dataset(csv, "t")
    assert [(r.input, r.output) for r in records] == [("", "hi"), ("1 1", "2")]

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"instruction": "a", "output": "b"}] * 3),
        "test": datasets.Dataset.from_list([{"instruction": "c", "output": "d"}]),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    assert len(read_hf_dataset(tmp_path / "ds", "t", split="train")) == 3
    assert read_hf_dataset(tmp_path / "ds", "t", split="test")[0].output == "d"
    with pytest.raises(DataError, match=r"split 'dev' not found"):
        read_hf_dataset(tmp_path / "ds", "t", split="dev")


def test_hf_rows_are_validated_with_index_and_field(tmp_path):
    path = _jsonl(tmp_path, "h.jsonl", [json.dumps({"instruction": "a", "output": "b"}),
                                        json.dumps({"instruction": "a", "output": ""})])
    with pytest.raises(DataError, match=r"h\.jsonl\[1\]: field 'output' is empty"):
        read_hf_dataset(path, "t")
    with pytest.raises(DataError, match=r"h\.jsonl\[0\]: column 'question' \(field_map\['input'\]\) is missing"):
        read_hf_dataset(path, "t", field_map={"input": "question"})


def test_hf_unknown_id_offline_says_the_hub_was_not_tried(tmp_path):
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE"):
        read_hf_dataset("someone/not-a-local-dataset", "t")


def test_requests_files_read_one_request_per_line_and_name_bad_lines(tmp_path):
    from slm_llm.data import read_requests

    txt = tmp_path / "chat.txt"
    txt.write_text("# everyday requests\nWrite a haiku.\n\n  What's the capital of Peru?  \n")
    assert read_requests(txt) == ["Write a haiku.", "What's the capital of Peru?"]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text('{"prompt": "Write a haiku."}\n\n{"query": "Name a river.", "x": 1}\n')
    assert read_requests(jsonl) == ["Write a haiku.", "Name a river."]
    for text, message in [('{"prompt": "a"}\n{"prompt": \n', r"chat\.jsonl:2: invalid JSON"),
                          ('{"prompt": "a"}\n["b"]\n', r"chat\.jsonl:2: expected an object with a non-empty string"),
                          ('{"text": "a"}\n', r"chat\.jsonl:1: expected an object"),
                          ("\n\n", r"chat\.jsonl: no requests")]:
        jsonl.write_text(text)
        with pytest.raises(DataError, match=message):
            read_requests(jsonl)
    with pytest.raises(DataError, match=r"missing\.txt: cannot read the requests file"):
        read_requests(tmp_path / "missing.txt")
