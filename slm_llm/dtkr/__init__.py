"""DTKR: dynamic task-related knowledge retrieval (frozen encoder, per-task keys, FAISS router)."""
from slm_llm.dtkr.index import SlotIndex, group_normalise
from slm_llm.dtkr.keys import init_keys, load_keys, save_keys, score_matrix, train_keys
from slm_llm.dtkr.router import RouteDecision, Router, RouterError, format_decision, open_router, routing_tensors

__all__ = [
    "SlotIndex", "group_normalise", "init_keys", "train_keys", "score_matrix", "save_keys", "load_keys",
    "Router", "RouteDecision", "RouterError", "open_router", "routing_tensors", "format_decision",
]
