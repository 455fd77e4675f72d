"""Per-sample scores and routing metrics.

Every score is in [0, 1]; matrices and tables report them x100 (points).

    exact_match, closed label set   strict (the headline): the answer starts with the gold
                                    label, ignoring case, leading quotes, bullets and markdown;
                                    a letter label must end there ("A." or "A)" but not "A patient"),
                                    and the first clause names no other label ("positive, negative,
                                    or neutral" and "Not positive" do not score).
                                    lenient (a second column): the first valid label anywhere
                                    in the generation equals the gold label (a label is matched
                                    as a whole word, the earliest wins, a longer label beats a
                                    shorter one starting at the same place); for MCQ letters an
                                    explicit "answer is X" / "option X" wins over the first
                                    standalone letter
    exact_match, numeric (GSM8K)    the number after '####', else the last number, equals the
                                    gold number (compared as numbers: "1,234" == "1234.0")
    exact_match, free text          SQuAD-style normalised strings are equal
    rouge_l                         ROUGE-L F-measure (rouge-score) against the gold output
"""
from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from functools import lru_cache

from slm_llm.data import Record, TaskSpec

LETTERS = "ABCDE"
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:|=)?\s*(?i:option\s*)?[(\[]?\s*([A-Z])\b")


def gold(record: Record) -> str:
    """The short gold answer: ``record.answer`` when set, else the whole ``output``."""
    return record.answer or record.output


def answer_labels(spec: TaskSpec) -> list[str] | None:
    """The task's closed answer set: its labels, or the letters an MCQ ``answer_type`` names
    ("letter A-D" -> A B C D); None for open answers."""
    if spec.labels:
        return list(spec.labels)
    m = re.search(r"letter\w*\s+([A-E])\s*-\s*([A-E])", spec.answer_type, re.I)
    if m:
        lo, hi = m.group(1).upper(), m.group(2).upper()
        return list(LETTERS[LETTERS.index(lo): LETTERS.index(hi) + 1])
    return None


def is_numeric(spec: TaskSpec) -> bool:
    """GSM8K-style tasks: the answer type mentions '####' or a number."""
    return "####" in spec.answer_type or "number" in spec.answer_type.lower()


def extract_label(text: str, labels: list[str]) -> str | None:
    """The first valid label in ``text`` (its canonical spelling), or None."""
    if not text.strip():
        return None
    if all(len(lab) == 1 and lab.isalpha() for lab in labels):
        return _extract_letter(text, labels)
    low = text.casefold()
    best: tuple[int, int, str] | None = None  # (start, -length, label)
    for lab in labels:
        pat = r"(?<![\w])" + re.escape(lab.casefold()) + r"(?![\w])"
        m = re.search(pat, low)
        if m and (best is None or (m.start(), -len(lab)) < best[:2]):
            best = (m.start(), -len(lab), lab)
    return best[2] if best else None


_LEAD = re.compile(r"^[\s\"'`*_(\[#>:\-]+")
_CLAUSE_END = re.compile(r"[.!?\n]")


def strict_label(text: str, labels: list[str]) -> str | None:
    """The label the answer starts with (canonical spelling), or None (see the module docstring)."""
    body = _LEAD.sub("", text.strip())
    low = " ".join(body.casefold().split())
    found = [lab for lab in labels if re.match(re.escape(" ".join(lab.casefold().split())) + r"(?!\w)", low)]
    if not found:
        return None
    label = max(found, key=len)
    rest = low[len(" ".join(label.casefold().split())):]
    if len(label) == 1 and label.isalpha():  # a letter: "A", "A.", "A) ...", not the article in "A patient"
        return label if not rest or rest[0] in ".):,;\n" else None
    clause = _CLAUSE_END.split(rest, 1)[0]
    others = [lab for lab in labels if lab.casefold() != label.casefold()
              and re.search(r"(?<!\w)" + re.escape(lab.casefold()) + r"(?!\w)", clause)]
    return None if others else label


def _extract_letter(text: str, labels: list[str]) -> str | None:
    allowed = {lab.upper(): lab for lab in labels}
    stripped = text.strip()
    if stripped.upper().rstrip(".):") in allowed and len(stripped.rstrip(".):")) == 1:
        return allowed[stripped.upper().rstrip(".):")]
    for m in _ANSWER_PHRASE.finditer(text):
        if m.group(1).upper() in allowed:
            return allowed[m.group(1).upper()]
    for m in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text):
        if m.group(1) in allowed:
            return allowed[m.group(1)]
    return None


def extract_number(text: str) -> float | None:
    """The number after the last '####', else the last number in ``text``."""
    if "####" in text:
        after = text.rsplit("####", 1)[1]
        m = re.search(_NUMBER, after)
        if m:
            return _to_float(m.group(0))
    nums = re.findall(_NUMBER, text)
    return _to_float(nums[-1]) if nums else None


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace("$", "").replace(" ", ""))
    except ValueError:
        return None


def normalize_text(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    s = s.casefold()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def extract(spec: TaskSpec, prediction: str, strict: bool = True) -> str | None:
    """What the metric reads out of a generation (for the predictions files)."""
    if spec.metric == "rouge_l":
        return prediction
    labels = answer_labels(spec)
    if labels:
        return strict_label(prediction, labels) if strict else extract_label(prediction, labels)
    if is_numeric(spec):
        n = extract_number(prediction)
        return None if n is None else f"{n:g}"
    return normalize_text(prediction)


def score(spec: TaskSpec, prediction: str, record: Record, strict: bool = True) -> float:
    """One sample's score in [0, 1] under the task's metric (see the module docstring); ``strict``
    only changes closed label sets."""
    if spec.metric == "rouge_l":
        return rouge_l(prediction, gold(record))
    labels = answer_labels(spec)
    if labels:
        got = strict_label(prediction, labels) if strict else extract_label(prediction, labels)
        return float(got is not None and got.casefold() == gold(record).strip().casefold())
    if is_numeric(spec):
        got, want = extract_number(prediction), extract_number(gold(record))
        return float(got is not None and want is not None and abs(got - want) < 1e-6 * max(1.0, abs(want)))
    return float(normalize_text(prediction) == normalize_text(gold(record)))


# ---- routing ---------------------------------------------------------------------------
OOD = "<ood>"  # routed label of a query the router flags out of distribution


def routing_accuracy(routed: list[str], true: list[str]) -> float:
    """Fraction of queries whose routed task is the true task (x100 is points)."""
    if len(routed) != len(true):
        raise ValueError(f"{len(routed)} routed tasks for {len(true)} queries")
    return sum(r == t for r, t in zip(routed, true)) / len(true) if true else float("nan")


def routing_confusion(routed: list[str], true: list[str]) -> dict[str, dict[str, int]]:
    """``{true task: {routed task: count}}``, rows and columns in first-seen order."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r, t in zip(routed, true):
        out[t][r] += 1
    return {t: dict(c) for t, c in out.items()}
