"""Per-sample metrics: label/letter extraction, numeric match, ROUGE-L, routing accuracy."""
import pytest

from slm_llm.data import Record, TaskSpec
from slm_llm.eval.metrics import (OOD, answer_labels, extract_label, extract_number, normalize_text, rouge_l,
                                  routing_accuracy, routing_confusion, score, strict_label)


def spec(metric="exact_match", labels=None, answer_type=""):
    return TaskSpec(name="t", format="alpaca", path="p", metric=metric, labels=labels, answer_type=answer_type,
                    instruction="")


def rec(answer, output=None):
    return Record(instruction="q", input="", output=output or answer, task="t", answer=answer)


@pytest.mark.parametrize("text,want", [
    ("The answer is B.", "B"),
    ("B", "B"),
    ("(C) because ...", "C"),
    ("Answer: D", "D"),
    ("I think the correct option is A, not C.", "A"),
    ("the answer is a mixture", None),  # lowercase article, not a letter answer
    ("E", None),  # not in A-D
    ("", None),
])
def test_mcq_letter_extraction(text, want):
    assert extract_label(text, ["A", "B", "C", "D"]) == want


@pytest.mark.parametrize("text,want", [
    ("Neutral.", "neutral"),
    ("The sentiment is positive, not negative.", "positive"),
    ("negative", "negative"),
    ("It is hard to say", None),
    ("positively", None),  # a label only counts as a whole word
])
def test_word_label_extraction(text, want):
    assert extract_label(text, ["negative", "neutral", "positive"]) == want


def test_label_that_contains_another_label():
    labels = ["entailment", "not_entailment"]
    assert extract_label("not_entailment", labels) == "not_entailment"
    assert extract_label("entailment", labels) == "entailment"
    labels = ["entailment", "not entailment"]
    assert extract_label("Not entailment.", labels) == "not entailment"  # same start: the longer label wins
    assert extract_label("Yes", ["No", "Yes"]) == "Yes"


def test_mcq_letters_from_answer_type():
    assert answer_labels(spec(answer_type="letter A-E")) == ["A", "B", "C", "D", "E"]
    assert answer_labels(spec(labels=["No", "Yes"])) == ["No", "Yes"]
    assert answer_labels(spec(answer_type="free-form code/text")) is None


@pytest.mark.parametrize("text,want", [
    ("so the total is 5 + 7 = 12\n#### 1,234", 1234.0),
    ("#### $18.50", 18.5),
    ("He has 3 apples and then 10 more, so 13.", 13.0),
    ("#### -4", -4.0),
    ("no number here", None),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


@pytest.mark.parametrize("text,labels,want", [
    ("neutral", ["negative", "neutral", "positive"], "neutral"),
    ("**Neutral**.", ["negative", "neutral", "positive"], "neutral"),
    ('"Positive" - profits doubled', ["negative", "neutral", "positive"], "positive"),
    ("Positive. The rival's news is negative for it.", ["negative", "neutral", "positive"], "positive"),
    ("positive, negative, or neutral", ["negative", "neutral", "positive"], None),  # lists the label set
    ("neutral to positive", ["negative", "neutral", "positive"], None),
    ("Not positive", ["negative", "neutral", "positive"], None),
    ("The sentiment is positive.", ["negative", "neutral", "positive"], None),  # does not start with it
    ("positively", ["negative", "neutral", "positive"], None),
    ("very negative", ["very negative", "negative", "neutral", "positive", "very positive"], "very negative"),
    ("Science or  Technology", ["World", "Sports", "Business", "Science or Technology"], "Science or Technology"),
    ("No, it does not overrule the case.", ["No", "Yes"], "No"),
    ("Yes or No", ["No", "Yes"], None),
    ("A", ["A", "B", "C", "D"], "A"),
    ("(B) because ...", ["A", "B", "C", "D"], "B"),
    ("C. Force of explosion is directional", ["A", "B", "C", "D"], "C"),
    ("A patient with fever should be ...", ["A", "B", "C", "D"], None),  # the article, not option A
    ("The answer is B.", ["A", "B", "C", "D"], None),
    ("", ["A", "B"], None),
])
def test_strict_label(text, labels, want):
    assert strict_label(text, labels) == want


def test_strict_is_the_default_and_lenient_a_second_column():
    fin = spec(labels=["negative", "neutral", "positive"])
    assert score(fin, "The sentiment is positive.", rec("positive")) == 0.0
    assert score(fin, "The sentiment is positive.", rec("positive"), strict=False) == 1.0
    assert score(fin, "positive, negative, or neutral", rec("positive"), strict=False) == 1.0
    assert score(fin, "positive, negative, or neutral", rec("positive")) == 0.0


def test_scores_by_metric():
    gsm = spec(answer_type="number after '####' (compare numerically)")
    assert score(gsm, "... #### 1,234", rec("1234")) == 1.0
    assert score(gsm, "... #### 1234.0", rec("1234")) == 1.0
    assert score(gsm, "... 12 then 1233", rec("1234")) == 0.0
    fin = spec(labels=["negative", "neutral", "positive"])
    assert score(fin, "Positive.", rec("positive")) == 1.0
    assert score(fin, "neutral, maybe positive", rec("positive"), strict=False) == 0.0  # the FIRST label counts
    mcq = spec(labels=["A", "B", "C", "D"], answer_type="letter A-D")
    assert score(mcq, "The answer is B.", rec("B"), strict=False) == 1.0
    free = spec()
    assert score(free, "The Eiffel Tower!", rec("eiffel tower")) == 1.0
    assert normalize_text("  An  Apple, please. ") == "apple please"


def test_rouge_l():
    code = spec(metric="rouge_l")
    assert score(code, "def f(x): return x", rec("def f(x): return x")) == pytest.approx(1.0)
    # LCS "a c" of "a b c" (3 tokens) and "a c d" (3 tokens): P = R = 2/3
    assert rouge_l("a c d", "a b c") == pytest.approx(2 / 3)
    assert rouge_l("", "a b") == 0.0


def test_routing_accuracy_and_confusion():
    true = ["fin", "fin", "law", "law"]
    routed = ["fin", "law", "law", OOD]
    assert routing_accuracy(routed, true) == 0.5
    assert routing_confusion(routed, true) == {"fin": {"fin": 1, "law": 1}, "law": {"law": 1, OOD: 1}}
    with pytest.raises(ValueError):
        routing_accuracy(["fin"], true)
