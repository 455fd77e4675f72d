"""Per-query routing for the server: the ``model`` field decides the mode.

    "slm"   DTKR top-K over every task's slots; an OOD query (score below its
            task's calibrated threshold) falls back to the base model when
            ``serve.ood_fallback`` (its ``slm_route`` still says why)
    <task>  that task's own top-K slots (the vllm backend serves its adapter)
    "base"  no increments; ``slm_route`` is null
"""
from __future__ import annotations

from slm_llm.dtkr import Router
from slm_llm.dtkr.encoder import Encoder
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
        if model == BASE:
            return [Route(None, None) for _ in queries]
        emb = self.encoder.encode(list(queries))  # [B, D]
        if model == SLM:
            return [Route.of(d, served=not (d.ood and self.ood_fallback)) for d in self.router.route(emb)]
        return [Route.of(d, served=True) for d in self.router.route(emb, restrict_task=model)]
