"""Each verifiable-instruction checker on a passing and a failing response."""
import pytest

from slm_llm.eval.ifeval import CHECKERS, PROMPTS, check

CASES = [  # (checker, kwargs, passing response, failing response)
    ("max_words", {"n": 5}, "Bonds pay a fixed coupon.", "A bond yield is the return an investor earns."),
    ("min_words", {"n": 6}, "Nurses care for patients every single day.", "Nurses care."),
    ("max_sentences", {"n": 2}, "Plants use light. They make sugar.", "One. Two. Three."),
    ("include_keywords", {"words": ["investors", "revenue"]}, "Investors watch revenue.", "Investors watch sales."),
    ("exclude_words", {"words": ["array"]}, "A list holds items.", "A list is like an array."),
    ("json_format", {}, '```json\n{"capital": "Paris"}\n```', "The capital is Paris."),
    ("bullet_count", {"n": 3}, "* thirst\n* headache\n- dizziness", "* thirst\n* headache"),
    ("no_commas", {}, "A contract is a binding agreement.", "A contract, in short, binds."),
    ("lowercase", {}, "water evaporates and falls as rain.", "Water evaporates."),
    ("uppercase", {}, "CHECK YOUR BLOOD PRESSURE!", "Check your blood pressure!"),
    ("ends_with", {"phrase": "Any other questions?"}, "Rayleigh scattering. Any other questions?",
     "Rayleigh scattering."),
    ("starts_with", {"phrase": "Markets"}, "Markets move daily.", "The market moves daily."),
    ("paragraphs", {"n": 2}, "First paragraph.\n***\nSecond paragraph.", "Only one paragraph."),
    ("quoted", {}, '"Water boils at 100 C."', "Water boils at 100 C."),
    ("title", {}, "<<Rates>>\nRates rise, bonds fall.", "Rates\nRates rise, bonds fall."),
    ("keyword_frequency", {"word": "court", "n": 2}, "A judge runs the court. The court decides.",
     "A judge runs the court."),
]


@pytest.mark.parametrize("name,kwargs,good,bad", CASES, ids=[c[0] for c in CASES])
def test_checker_passes_and_fails(name, kwargs, good, bad):
    assert CHECKERS[name](good, **kwargs) is True
    assert CHECKERS[name](bad, **kwargs) is False


def test_every_checker_is_tested_and_every_prompt_is_checkable():
    assert {c[0] for c in CASES} == set(CHECKERS)
    assert 20 <= len(PROMPTS) <= 40
    for prompt, instructions in PROMPTS:
        assert instructions and all(name in CHECKERS for name, _ in instructions), prompt
        assert len(check("", instructions)) == len(instructions)


def test_empty_response_fails_length_and_format_checks():
    for name in ("max_words", "max_sentences", "no_commas", "lowercase", "uppercase", "json_format"):
        kwargs = {"n": 5} if name in ("max_words", "max_sentences") else {}
        assert CHECKERS[name]("", **kwargs) is False, name
