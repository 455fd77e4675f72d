"""Per-query routing for the server: the ``model`` field decides the mode.

    "slm"   DTKR: the routed task's top-K slots; an OOD query (score below its
            task's calibrated threshold) falls back to the base model when
            ``serve.ood_fallback`` (its ``slm_route`` still says why)
    <task>  that task's own top-K slots (the vllm backend serves its adapter)
    "base"  no increments; ``slm_route`` is null

The modes are :func:`slm_llm.pipeline.route_queries`, the function evaluation uses, so a
served query is routed exactly as the benchmark's queries were.
"""
from __future__ import annotations

from slm_llm.dtkr import Router
from slm_llm.dtkr.encoder import Encoder
from slm_llm.pipeline import route_queries
from slm_llm.serve.backend import Route, ServeError

SLM, BASE = "slm", "base"


class QueryRouter:
    def __init__(self, encoder: Encoder, router: Router, ood_fallback: bool):
        self.encoder, self.router, self.ood_fallback = encoder, router, ood_fallback

    @property
    def tasks(self) -> list[str]:
        return list(self.router.task_names)

    def check_model(self, model: str) -> None:
        if model not in (SLM, BASE, *self.tasks):
            raise ServeError(f"The model `{model}` does not exist. Known: {', '.join([SLM, BASE, *self.tasks])}",
                             status=404, param="model", code="model_not_found")

    def route(self, queries: list[str], model: str) -> list[Route]:
        self.check_model(model)
        return [Route.of(r.raw, served=r.decision is not None or r.raw is None)
                for r in route_queries(self.router, self.encoder, queries, model, self.ood_fallback)]
