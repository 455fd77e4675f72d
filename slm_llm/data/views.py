"""Query views: the words a user wraps around a task's input, and which of them training may see.

A dataset gives each task one constant instruction. A user never types it: they ask in
their own words, or paste the input alone. A *view* turns a dataset record into the
request a user would send:

    fixed        the record as the dataset has it (its constant instruction); for comparison only
    paraphrase   the record's content inside one of the task's *held-out* phrasings
    input-only   the content alone, with no instruction

The content is the record's ``input`` (``content: input``, the default), or the whole
request (instruction and input) for tasks whose instruction differs per record, such as
code (``content: request``). A phrasing is a sentence of the suite's ``phrasings`` pool; it
holds ``{input}`` where the content goes, or the content follows it after a blank line.
A viewed record carries the whole user turn in ``instruction`` and an empty ``input``, so
templates, the router and tokenisation see exactly what the user typed.

The pool of every task is split once, by a seeded rule recorded in the run's manifest
(:func:`phrasing_split`), into *train* phrasings (training samples, keys, thresholds,
whitening statistics) and *held-out* phrasings (the ``paraphrase`` view only). Choosing
settings on dev splits the train phrasings once more (:func:`dev_split`), so selection
never sees a held-out phrasing either.

Every draw is a pure function of (seed, task, record id), so a resumed run, another
world size or another process draws the same phrasing for the same record.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass

from slm_llm.config import PHRASING_MODES, VIEWS  # noqa: F401 (re-exported)

from .schema import DataError, Record

log = logging.getLogger("slm_llm.data")

CONTENT_KINDS = ("input", "request")
PLACEHOLDER = "{input}"
BARE, OWN = -1, -2  # training_wording: the content alone; a record in its own words
OWN_WORDING_SHARE = 0.5  # a task without a pool: least share of its training records with an instruction of their own


@dataclass(frozen=True)
class PhrasingSplit:
    task: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    seed: int
    heldout_share: float

    def record(self) -> dict:
        """What the manifest keeps: the rule and the held-out texts (no training step may use them)."""
        return {"seed": self.seed, "heldout_share": self.heldout_share, "train": list(self.train),
                "heldout": list(self.heldout)}


def phrasing_split(spec, seed: int = 0, heldout_share: float = 0.25) -> PhrasingSplit:
    """Split ``spec.phrasings`` into train and held-out phrasings.

    ``ceil(n * heldout_share)`` phrasings (at least 1, at most n - 1) are held out, stratified
    by where the content sits (first, in the middle, after the phrasing): each placement is
    shuffled (seeded by the task's name), and the placements take turns, so the held-out set
    spans them whenever it is large enough.
    """
    pool = list(spec.phrasings or ())
    if len(pool) < 2:
        raise DataError(f"task '{spec.name}' has {len(pool)} phrasings; a pool needs at least 2 (one to train "
                        f"on, one to hold out). Add a 'phrasings' list to its suite entry, or train with "
                        f"data.phrasing=fixed")
    if not 0.0 < heldout_share < 1.0:
        raise DataError(f"heldout_share must be in (0, 1), got {heldout_share}")
    rng = random.Random(f"phrasings:{spec.name}:{seed}")
    buckets: dict[str, list[int]] = {}
    for i, text in enumerate(pool):
        buckets.setdefault(placement(text), []).append(i)
    lists = [rng.sample(b, len(b)) for _, b in sorted(buckets.items())]
    rng.shuffle(lists)
    order = [i for turn in range(len(pool)) for b in lists if turn < len(b) for i in [b[turn]]]
    n_held = min(len(pool) - 1, max(1, math.ceil(len(pool) * heldout_share)))
    held = set(order[:n_held])
    return PhrasingSplit(spec.name, tuple(p for i, p in enumerate(pool) if i not in held),
                         tuple(p for i, p in enumerate(pool) if i in held), seed, heldout_share)


def placement(phrasing: str) -> str:
    """Where a phrasing puts the content: ``first``, ``middle`` or ``after``."""
    text = phrasing.strip()
    if text.startswith(PLACEHOLDER):
        return "first"
    return "middle" if PLACEHOLDER in text and not text.endswith(PLACEHOLDER) else "after"


def dev_split(split: PhrasingSplit) -> PhrasingSplit:
    """For selection on dev: the train phrasings split again, the same way (a third held out as
    dev phrasings), so choosing settings never sees a held-out phrasing."""
    if len(split.train) < 2:
        raise DataError(f"task '{split.task}' has {len(split.train)} train phrasings; a dev split needs 2")
    dev = phrasing_split(_PoolSpec(split.task + ":dev", split.train), split.seed, 1 / 3)
    return PhrasingSplit(split.task, dev.train, dev.heldout, split.seed, split.heldout_share)


@dataclass(frozen=True)
class _PoolSpec:
    name: str
    phrasings: tuple[str, ...]


def content(record: Record, kind: str = "input") -> str:
    """What the user brings: the input, or (``request``) instruction and input together."""
    if kind == "request" or not record.input:
        return f"{record.instruction}\n\n{record.input}" if record.input else record.instruction
    return record.input


def phrase(phrasing: str, text: str) -> str:
    """``text`` placed at ``{input}`` in ``phrasing``, or after it following a blank line."""
    if PLACEHOLDER in phrasing:
        return phrasing.replace(PLACEHOLDER, text)
    return f"{phrasing}\n\n{text}"


def as_request(record: Record, request: str) -> Record:
    """The record with ``request`` as its whole user turn."""
    return dataclasses.replace(record, instruction=request, input="")


def view_record(record: Record, view: str, phrasings: tuple[str, ...] | list[str] = (), kind: str = "input",
                seed: int = 0) -> Record:
    """One record in one view; ``phrasings`` are the pool the paraphrase view draws from."""
    if view == "fixed":
        return record
    if view == "input-only":
        return as_request(record, content(record, kind))
    if view == "paraphrase":
        if not phrasings:
            raise DataError(f"task '{record.task}': the paraphrase view needs phrasings")
        return as_request(record, phrase(_draw(phrasings, seed, "view", record), content(record, kind)))
    raise DataError(f"unknown query view {view!r} (known: {', '.join(VIEWS)})")


def view_records(records: list[Record], view: str, phrasings=(), kind: str = "input", seed: int = 0
                 ) -> list[Record]:
    return [view_record(r, view, phrasings, kind, seed) for r in records]


def training_record(record: Record, phrasings: tuple[str, ...] | list[str], input_only_share: float,
                    kind: str = "input", seed: int = 0, draw: int = 0) -> Record:
    """A training sample as a user might have sent it: input-only with probability
    ``input_only_share``, else inside one of the train ``phrasings`` (seeded by the record id;
    ``draw`` > 0 gives the record's further, independent wordings), or in its own words when the
    task has no pool (``phrasings`` empty)."""
    choice = training_wording(record, phrasings, input_only_share, seed, draw)
    if choice == BARE:
        return as_request(record, content(record, kind))
    if not phrasings:
        return own_request(record)
    return as_request(record, phrase(phrasings[choice], content(record, kind)))


def training_wording(record: Record, phrasings: tuple[str, ...] | list[str], input_only_share: float,
                     seed: int = 0, draw: int = 0) -> int:
    """Which wording :func:`training_record` gives ``record``: ``BARE`` (its content alone), the
    index of its train phrasing, or ``OWN`` (its own words, a task without a pool)."""
    rng = random.Random(f"train:{seed}:{record.task}:{record.id}:{record.input[:64]}" + (f":{draw}" if draw else ""))
    if rng.random() < input_only_share:
        return BARE
    if not phrasings:
        return OWN
    return rng.choice(range(len(phrasings)))


def own_request(record: Record) -> Record:
    """The record as one user turn in its own words: its instruction, then its input."""
    return as_request(record, content(record, "request"))


def own_wordings(spec) -> bool:
    """A task without a ``phrasings`` pool: its records' own instructions are how users word it."""
    return not spec.phrasings


def own_wordings_record(spec, records: list[Record], eval_records: list[Record] | None = None) -> dict:
    """What the manifest keeps for a task without a pool; refused (DataError) unless at least
    ``OWN_WORDING_SHARE`` of its training records have an instruction of their own: a constant or
    templated instruction is a task id that users do not type, and the router would learn it.
    With ``eval_records``, it also counts those whose instruction a training record has (their
    paraphrase view is not held out) and warns when they are more than a tenth."""
    distinct = len({r.instruction.strip() for r in records})
    if distinct < OWN_WORDING_SHARE * len(records):
        raise DataError(f"task '{spec.name}' has no 'phrasings' list and its {len(records)} training records share "
                        f"{distinct} distinct instruction(s): the router would learn that wording, which users do not "
                        f"type. Add a 'phrasings' list of how users ask for this task (at least 2; docs/views.md), "
                        f"or train with data.phrasing=fixed")
    out = {"source": "records", "train_records": len(records), "distinct_instructions": distinct}
    if eval_records is not None:
        seen = {r.instruction.strip() for r in records}
        repeated = sum(r.instruction.strip() in seen for r in eval_records)
        out.update(eval_records=len(eval_records), eval_instructions_seen_in_training=repeated)
        if repeated > 0.1 * len(eval_records):
            log.warning(f"task '{spec.name}': {repeated} of its {len(eval_records)} evaluation records repeat a "
                        f"training record's instruction; their paraphrase view is not held out")
    return out


def _draw(phrasings, seed: int, salt: str, record: Record) -> str:
    rng = random.Random(f"{salt}:{seed}:{record.task}:{record.id}:{record.input[:64]}")
    return rng.choice(list(phrasings))


def task_split(spec, data) -> PhrasingSplit:
    """The run's split of ``spec``'s pool (``data`` is a DataConfig); a dev-selection run
    (``data.eval_split`` "dev") trains on and evaluates with the dev split of the train phrasings."""
    split = phrasing_split(spec, data.phrasing_seed, data.heldout_share)
    return dev_split(split) if data.eval_split == "dev" else split


def training_records(records: list[Record], spec, data) -> list[Record]:
    """A task's training records as the run trains on them (``data.phrasing``): in its train
    phrasings or input-only (``pool``), or with the dataset's instruction (``fixed``)."""
    if data.phrasing == "fixed":
        return list(records)
    if own_wordings(spec):
        own_wordings_record(spec, records)
    train = _train_phrasings(spec, data)
    return [training_record(r, train, data.input_only_share, spec.content, data.seed) for r in records]


def _train_phrasings(spec, data) -> tuple[str, ...]:
    return () if own_wordings(spec) else task_split(spec, data).train


def router_records(records: list[Record], spec, data, renderings: int = 1) -> list[Record]:
    """The queries the router is fitted on (keys, whitening, OOD test): the task's training
    records as training words them, then ``renderings - 1`` further wordings of each, drawn
    the same way (train phrasings or input alone). Query ``i`` words record ``i % len(records)``
    (:func:`rendered_record`), so the first ``len(records)`` are the training samples themselves;
    with ``data.phrasing=fixed`` every rendering is the dataset's one wording."""
    trained = training_records(records, spec, data)
    if data.phrasing == "fixed":
        return trained * renderings
    train = _train_phrasings(spec, data)
    return trained + [training_record(r, train, data.input_only_share, spec.content, data.seed, draw)
                      for draw in range(1, renderings) for r in records]


def router_wordings(records: list[Record], spec, data, renderings: int = 1) -> list[int]:
    """The wording of each of :func:`router_records`' queries, in its order: a train phrasing's
    index, ``BARE``, or, for a record in its own words, ``OWN - position`` (each record's
    instruction is a wording of its own); all 0 with ``data.phrasing=fixed`` (one wording)."""
    if data.phrasing == "fixed":
        return [0] * (len(records) * renderings)
    train = _train_phrasings(spec, data)
    out = []
    for draw in range(renderings):
        for i, r in enumerate(records):
            w = training_wording(r, train, data.input_only_share, data.seed, draw)
            out.append(OWN - i if w == OWN else w)
    return out


def bare_records(records: list[Record], spec) -> list[Record]:
    """Each record's content alone (its input-only wording), one per record, in order."""
    return [as_request(r, content(r, spec.content)) for r in records]


def rendered_record(n_queries: int, renderings: int) -> list[int]:
    """The record (its position) each of :func:`router_records`' ``n_queries`` queries words."""
    return [i % (n_queries // renderings) for i in range(n_queries)]


def records_in_view(records: list[Record], spec, view: str, data) -> list[Record]:
    """A task's evaluation records in ``view``; ``paraphrase`` draws only held-out phrasings, or,
    for a task without a pool, keeps each test record's own words."""
    if view == "paraphrase" and own_wordings(spec):
        return [own_request(r) for r in records]
    phrasings = task_split(spec, data).heldout if view == "paraphrase" else ()
    return view_records(records, view, phrasings, spec.content, data.seed)
