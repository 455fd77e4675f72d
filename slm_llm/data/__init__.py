"""Records, readers, task suites, prompt templates, tokenisation and batching."""
from slm_llm.config import REQUEST_FILES

from .collate import Collator
from .readers import read_alpaca, read_cl_benchmark, read_hf_dataset, read_requests
from .schema import DataError, Record
from .suites import (Suite, TaskSpec, load_suite, load_task_split, resolve_data_root, run_records,
                     train_and_calibration)
from .templates import TEMPLATES, end_of_turn_text, query_text, render_prompt, render_response, stop_token_ids
from .tokenize import IGNORE_INDEX, cut_prompt, tokenize_example, tokenize_prompt
from .views import (VIEWS, PhrasingSplit, bare_records, dev_split, own_wordings, own_wordings_record, phrasing_split,
                    records_in_view, rendered_record, router_records, router_wordings, task_split, training_record,
                    training_records, view_records)

__all__ = [
    "Collator", "DataError", "IGNORE_INDEX", "Record", "Suite", "TEMPLATES", "TaskSpec",
    "cut_prompt", "end_of_turn_text", "load_suite", "load_task_split", "query_text",
    "REQUEST_FILES", "read_alpaca", "read_cl_benchmark", "read_hf_dataset", "read_requests", "render_prompt",
    "render_response",
    "resolve_data_root", "run_records", "stop_token_ids", "tokenize_example", "tokenize_prompt",
    "train_and_calibration",
    "VIEWS", "PhrasingSplit", "bare_records", "dev_split", "own_wordings", "own_wordings_record",
    "phrasing_split",
    "records_in_view", "rendered_record", "router_records", "router_wordings", "task_split", "training_record",
    "training_records",
    "view_records",
]
