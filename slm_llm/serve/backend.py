"""What every serving backend shares: a generation request, its route, and its result.

A request reaches a backend already validated and rendered: ``prompt_ids`` are the
exact tokens to continue (chat messages rendered with the tokenizer's chat template
by the HTTP layer), ``query`` is the raw text the router embeds (DTKR routes on the
instruction, never on the template). Both backends tokenise nothing themselves, so
the hf and vllm backends see the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from slm_llm.dtkr import RouteDecision
from slm_llm.errors import SlmError


class ServeError(SlmError):
    """A request the server refuses; becomes an OpenAI-shaped JSON error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_


@dataclass
class Route:
    """How one query is served: ``decision`` drives generation (None = the base model);
    ``report`` is the ``slm_route`` field of the response (None when the base model was asked for)."""

    decision: RouteDecision | None
    report: dict | None

    @classmethod
    def of(cls, decision: RouteDecision | None, served: bool) -> Route:
        if decision is None:
            return cls(None, None)
        report = {"task": decision.task, "score": round(decision.score, 6), "slots": decision.slots,
                  "weights": [round(w, 6) for w in decision.weights], "ood": decision.ood}
        if not served:
            report["fallback"] = "base"
        return cls(decision if served else None, report)


@dataclass
class GenRequest:
    prompt: str  # the exact text to continue (chat already rendered)
    prompt_ids: list[int]  # its tokens, ``tokenizer(prompt, add_special_tokens=False)``
    query: str  # raw text for the router
    model: str  # "slm" | "base" | <task>
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: the stop token does not end the row (benchmarks)


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    route: dict | None


@dataclass
class StreamDelta:
    text: str
    finish_reason: str | None = None  # set on the last delta
    route: dict | None = None  # set on the first delta
    completion_tokens: int = 0


class Backend(Protocol):
    name: str
    base_model: str  # the manifest's base model id
    tokenizer: object
    max_model_len: int
    stop_ids: list[int]

    def models(self) -> list[str]: ...
    def tasks(self) -> list[str]: ...
    def route(self, queries: list[str], model: str) -> list[Route]: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def generate(self, req: GenRequest) -> GenResult: ...
    def stream(self, req: GenRequest) -> AsyncIterator[StreamDelta]: ...
    def reload(self) -> list[str]: ...
    def load_adapter(self, name: str, path: str) -> None: ...


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
