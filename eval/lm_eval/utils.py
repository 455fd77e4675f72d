"""lm-eval's per-sample score for an slm_llm suite task: ``slm_llm.eval.metrics.score``, the
function slm_llm's own evaluation calls, so both harnesses score a response the same way.

`slm-llm lm-eval-tasks` copies this file beside the task YAMLs it writes (with ``specs.json``,
the suite's task specs). lm-eval must run where ``slm_llm`` is importable (the project's venv).
"""
import json
from functools import lru_cache
from pathlib import Path

from slm_llm.data import Record, TaskSpec
from slm_llm.eval.metrics import score

RECORD_FIELDS = ("instruction", "input", "output", "task", "answer", "id")


@lru_cache(maxsize=1)
def _specs() -> dict:
    raw = json.loads(Path(__file__).with_name("specs.json").read_text())
    return {name: TaskSpec(**spec) for name, spec in raw.items()}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``{metric: score}`` of the generation; stripped, as slm_llm's pipeline returns it."""
    spec = _specs()[doc["task"]]
    record = Record(**{k: doc[k] for k in RECORD_FIELDS})
    return {spec.metric: score(spec, results[0].strip(), record)}
