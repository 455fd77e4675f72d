"""Verifiable instruction following, in the style of IFEval (Zhou et al. 2023), written by us.

Each prompt carries instructions a program can check (word and sentence limits, required
and forbidden words, JSON, bullet count, no commas, letter case, start/end phrases,
paragraphs, a wrapping quotation). The question is not whether the answer is right but
whether the format instruction is followed, so it shows whether the task increments
(which learnt short, fixed-format answers) damage the model's general instruction following.

    prompt-level strict      % of prompts whose every instruction passes
    instruction-level strict % of all instructions that pass

Modes: ``base`` (no increments); for an slm run ``slm`` (served routing: an
out-of-distribution prompt falls back to the base) and ``slm_forced`` (the router's
top-K slots even when it flags the prompt OOD: the increments' own effect); for a
baseline run its shared adapter. Results: ``eval/ifeval.json`` and ``eval/ifeval.md``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from slm_llm.data import Record
from slm_llm.run import RunDir
from slm_llm.utils.io import write_json, write_text


# ---- checkers: (response, **kwargs) -> bool -------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\b[\w'-]+\b", text)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if re.search(r"\w", s)]


def max_words(r: str, n: int) -> bool:
    return 0 < len(_words(r)) <= n


def min_words(r: str, n: int) -> bool:
    return len(_words(r)) >= n


def max_sentences(r: str, n: int) -> bool:
    return 0 < len(_sentences(r)) <= n


def include_keywords(r: str, words: list[str]) -> bool:
    return all(re.search(r"\b" + re.escape(w) + r"\b", r, re.I) for w in words)


def exclude_words(r: str, words: list[str]) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, re.I) for w in words)


def json_format(r: str) -> bool:
    """The whole response is JSON (a ```json fence around it is allowed, as in IFEval)."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", r.strip(), flags=re.I).strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return bool(body)


def bullet_count(r: str, n: int) -> bool:
    """Exactly ``n`` markdown bullets (lines starting with '* ' or '- ')."""
    return len(re.findall(r"^\s*[*-]\s+\S", r, re.M)) == n


def no_commas(r: str) -> bool:
    return bool(r.strip()) and "," not in r


def lowercase(r: str) -> bool:
    return bool(re.search(r"[a-z]", r)) and r == r.lower()


def uppercase(r: str) -> bool:
    return bool(re.search(r"[A-Z]", r)) and r == r.upper()


def ends_with(r: str, phrase: str) -> bool:
    return r.strip().lower().endswith(phrase.lower())


def starts_with(r: str, phrase: str) -> bool:
    return r.strip().lower().startswith(phrase.lower())


def paragraphs(r: str, n: int) -> bool:
    """Exactly ``n`` paragraphs separated by the markdown divider ``***``."""
    parts = [p for p in re.split(r"\n\s*\*\*\*\s*\n", r.strip()) if p.strip()]
    return len(parts) == n and r.count("***") == n - 1


def quoted(r: str) -> bool:
    s = r.strip()
    return len(s) >= 2 and s[0] == '"' and s[-1] == '"'


def title(r: str) -> bool:
    """A title wrapped in double angular brackets, e.g. <<Rates and bonds>>."""
    return bool(re.search(r"<<[^<>\n]+>>", r))


def keyword_frequency(r: str, word: str, n: int) -> bool:
    """``word`` appears at least ``n`` times."""
    return len(re.findall(r"\b" + re.escape(word) + r"\b", r, re.I)) >= n


CHECKERS: dict[str, Callable[..., bool]] = {f.__name__: f for f in (
    max_words, min_words, max_sentences, include_keywords, exclude_words, json_format, bullet_count, no_commas,
    lowercase, uppercase, ends_with, starts_with, paragraphs, quoted, title, keyword_frequency)}

# ---- prompts: (prompt, [(checker, kwargs), ...]); content from our six domains ---------------
PROMPTS: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = [
    ("Explain what a bond yield is in at most 40 words.", [("max_words", {"n": 40})]),
    ("Describe photosynthesis in no more than 2 sentences.", [("max_sentences", {"n": 2})]),
    ("Write a short note on why companies report quarterly earnings. Include the words 'investors' and "
     "'revenue'.", [("include_keywords", {"words": ["investors", "revenue"]})]),
    ("Give the capital of France as JSON with the key \"capital\". Output only the JSON.", [("json_format", {})]),
    ("List exactly 3 symptoms of dehydration as markdown bullet points, using '* ' for each bullet.",
     [("bullet_count", {"n": 3})]),
    ("Explain what a contract is without using any commas.", [("no_commas", {})]),
    ("Describe the water cycle. Your entire response must be in lowercase letters, no capitals at all.",
     [("lowercase", {})]),
    ("Write a one-line warning about high blood pressure. Your entire response must be in uppercase letters.",
     [("uppercase", {})]),
    ("Explain why the sky is blue. End your response with the exact phrase 'Any other questions?'",
     [("ends_with", {"phrase": "Any other questions?"})]),
    ("Tell me about the stock market. Start your response with the word 'Markets'.",
     [("starts_with", {"phrase": "Markets"})]),
    ("Write two paragraphs about the history of the bicycle. Separate the paragraphs with the markdown "
     "divider ***.", [("paragraphs", {"n": 2})]),
    ("Wrap your entire response in double quotation marks. What is the boiling point of water?",
     [("quoted", {})]),
    ("Write a short poem about interest rates. Give it a title wrapped in double angular brackets, such as "
     "<<my title>>.", [("title", {})]),
    ("Explain what a judge does. Use the word 'court' at least 2 times.",
     [("keyword_frequency", {"word": "court", "n": 2})]),
    ("Describe the role of a nurse in at least 50 words.", [("min_words", {"n": 50})]),
    ("Explain what a Python list is. Do not use the words 'array' or 'simple'.",
     [("exclude_words", {"words": ["array", "simple"]})]),
    ("Solve: what is 12 times 7? Answer in at most 10 words and without commas.",
     [("max_words", {"n": 10}), ("no_commas", {})]),
    ("List exactly 4 planets of the solar system as markdown bullets ('* ') and include the word 'Mars'.",
     [("bullet_count", {"n": 4}), ("include_keywords", {"words": ["Mars"]})]),
    ("Return a JSON object with keys \"name\" and \"age\" for a fictional patient. Output only JSON.",
     [("json_format", {}), ("include_keywords", {"words": ["name", "age"]})]),
    ("In lowercase letters only, describe a cat in at most 30 words.",
     [("lowercase", {}), ("max_words", {"n": 30})]),
    ("Is inflation good or bad for savers? Answer in at most 3 sentences and end with the phrase 'That is all.'",
     [("max_sentences", {"n": 3}), ("ends_with", {"phrase": "That is all."})]),
    ("Write a product description for a reusable water bottle without commas, in at most 60 words.",
     [("no_commas", {}), ("max_words", {"n": 60})]),
    ("Explain what an atom is. Start your answer with 'An atom' and include the word 'electrons'.",
     [("starts_with", {"phrase": "An atom"}), ("include_keywords", {"words": ["electrons"]})]),
    ("Give 2 tips for studying for an exam as markdown bullets using '* '. Do not use the word 'sleep'.",
     [("bullet_count", {"n": 2}), ("exclude_words", {"words": ["sleep"]})]),
    ("Write a haiku about the ocean. Your entire response must be in uppercase letters.", [("uppercase", {})]),
    ("Summarise what a court appeal is in one sentence.", [("max_sentences", {"n": 1})]),
    ("Write a function name for adding two numbers in Python, as JSON {\"function\": <name>}. Only the JSON.",
     [("json_format", {})]),
    ("Describe a healthy breakfast in at least 40 words and mention 'fruit'.",
     [("min_words", {"n": 40}), ("include_keywords", {"words": ["fruit"]})]),
    ("Tell me a fact about the Moon. Wrap your whole answer in double quotation marks and keep it under 25 "
     "words.", [("quoted", {}), ("max_words", {"n": 25})]),
    ("Explain the difference between revenue and profit. End your response with 'Hope this helps.'",
     [("ends_with", {"phrase": "Hope this helps."})]),
]


def check(response: str, instructions: list[tuple[str, dict[str, Any]]]) -> list[bool]:
    return [CHECKERS[name](response, **kwargs) for name, kwargs in instructions]


def run_ifeval(run_dir: str | Path, overrides: list[str] | None = None, max_new_tokens: int | None = None,
               limit: int = 0) -> dict[str, Any]:
    """Generate every prompt in each mode, check it, write ``eval/ifeval.{json,md}``."""
    from slm_llm.eval.continual import generate_modes
    from slm_llm.pipeline import RunPipeline

    pipe = RunPipeline.load(run_dir, overrides)
    prompts = PROMPTS[:limit] if limit else PROMPTS
    records = [Record(instruction=p, input="", output="-", task="ifeval", id=f"ifeval-{k}")
               for k, (p, _) in enumerate(prompts)]
    decisions = {"base": pipe.route(records, "base")}
    if pipe.router is not None:
        decisions["slm"] = pipe.route(records, "slm")
        decisions["slm_forced"] = pipe.router.route(pipe.encoder.encode(pipe.queries(records)))
    else:
        decisions[pipe.method] = pipe.route(records, pipe.method)
    n_new = max_new_tokens or pipe.cfg.eval.ifeval_max_new_tokens
    texts = generate_modes(pipe, pipe.prompts(records), decisions, n_new, pipe.cfg.eval.batch_size, desc="ifeval")
    result: dict[str, Any] = {"max_new_tokens": n_new, "prompts": len(prompts), "modes": {}, "responses": []}
    for md, outs in texts.items():
        passed = [check(text, instr) for text, (_, instr) in zip(outs, prompts)]
        flat = [ok for row in passed for ok in row]
        result["modes"][md] = {"prompt_strict": 100.0 * sum(all(r) for r in passed) / len(passed),
                               "instruction_strict": 100.0 * sum(flat) / len(flat)}
        if md == "slm":
            result["modes"][md]["ood_fallback_rate"] = 100.0 * sum(d is None for d in decisions[md]) / len(records)
        for k, (text, ok) in enumerate(zip(outs, passed)):
            result["responses"].append({"mode": md, "prompt": prompts[k][0], "instructions": prompts[k][1],
                                        "response": text, "passed": ok})
    run = RunDir(run_dir)
    path = run.eval_dir / "ifeval.json"
    write_json(path, result)
    write_text(run.eval_dir / "ifeval.md", ifeval_markdown(result))
    result["path"] = str(path)
    return result


def ifeval_markdown(result: dict[str, Any]) -> str:
    lines = [f"Verifiable instruction following on {result['prompts']} prompts "
             f"(max {result['max_new_tokens']} new tokens; slm_llm/eval/ifeval.py).", "",
             "| mode | prompt-level strict | instruction-level strict |", "|---|---|---|"]
    for md, r in result["modes"].items():
        extra = f" (OOD fallback on {r['ood_fallback_rate']:.0f}% of prompts)" if "ood_fallback_rate" in r else ""
        lines.append(f"| {md}{extra} | {r['prompt_strict']:.1f} | {r['instruction_strict']:.1f} |")
    return "\n".join(lines) + "\n"
