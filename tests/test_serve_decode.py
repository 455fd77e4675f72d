"""The hf backend's continuous batching: rows join and leave a running decode batch, each exact."""
import random

import torch

from slm_llm.dtkr import RouteDecision, routing_tensors
from slm_llm.serve.decode import DecodeBatch, Row
from test_jare import all7_model

STOP = 127


class Tok:
    """Enough of a tokenizer for the decode batch: a pad id and a decode for stop strings."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def decision(slots, weights):
    return RouteDecision(slots=slots, weights=weights, task="t", score=1.0, ood=False, scores=weights)


def alone(model, row: Row) -> list[int]:
    """The row generated on its own by transformers' generate: the reference."""
    device = next(model.parameters()).device
    if row.decision is None:
        s, w = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1)
    else:
        s, w = routing_tensors([row.decision])
    out = model.generate(torch.tensor([row.prompt_ids], device=device), slot_ids=s.to(device), slot_weights=w.to(device),
                         max_new_tokens=row.max_tokens, do_sample=False, pad_token_id=0,
                         eos_token_id=[STOP])[0, len(row.prompt_ids):].tolist()
    return out[: out.index(STOP)] if STOP in out else out


def requests(n, seed=0):
    g = random.Random(seed)
    routes = [decision([0, 1], [0.5, 0.5]), None, decision([2, 5], [0.3, 0.7]), decision([4], [1.0]),
              decision([1, 3], [0.6, 0.4])]
    return [Row([g.randrange(1, STOP) for _ in range(g.randint(2, 9))], routes[i % len(routes)], g.randint(1, 14))
            for i in range(n)]


def test_rows_joining_and_leaving_at_any_step_equal_each_row_alone():
    """Staggered arrivals, more requests than rows, tasks and base rows mixed, all seven projections."""
    model = all7_model()
    batch = DecodeBatch(model, Tok(), [STOP], max_rows=4, max_len=64)
    rows = requests(12)
    pending = list(rows)
    g = random.Random(1)
    widths = []

    def arrivals(events=None):  # between the forwards of a step, too
        k = min(g.randint(0, 2), 4 - len(batch.rows), len(pending))
        if k:
            batch.admit(pending[:k])
            del pending[:k]

    while pending or batch.rows:
        arrivals()
        widths.append(len(batch.rows))
        batch.step(chunk_rows=2, after_chunk=arrivals)
    assert max(widths) == 4 and min(widths) < 4  # the batch really filled, drained and refilled
    for row in rows:
        assert row.tokens == alone(model, row)
    assert model.order.slots == [] and batch.cache.layers[0].keys is None  # idle: routing and memory released


def test_finish_reasons_stop_strings_and_cancelled_rows():
    model = all7_model()
    batch = DecodeBatch(model, Tok(), [STOP], max_rows=8, max_len=64)
    ref = requests(3, seed=4)
    full = [alone(model, r) for r in ref]
    limited = Row(ref[0].prompt_ids, ref[0].decision, 2)
    stopped = Row(ref[1].prompt_ids, ref[1].decision, 14, stop=[str(full[1][1])])
    cancelled = Row(ref[2].prompt_ids, ref[2].decision, 14)
    finish = {}
    events = batch.admit([limited, stopped, cancelled])
    cancelled.cancelled = True  # its client went away: it leaves before the next step
    while batch.rows:
        events += batch.step()
    for e in events:
        if e.finish:
            finish[id(e.row)] = e.finish
    assert limited.tokens == full[0][:2] and finish[id(limited)] == "length"
    assert stopped.tokens == full[1][: len(stopped.tokens)] and finish[id(stopped)] == "stop"
    assert cancelled.tokens == full[2][:1] and id(cancelled) not in finish


def test_sampled_rows_follow_temperature_and_top_p():
    """top_p close to 0 keeps only the argmax; a sampled row beside greedy rows leaves them exact."""
    model = all7_model()
    batch = DecodeBatch(model, Tok(), [STOP], max_rows=8, max_len=64)
    greedy, *_ = requests(1, seed=7)
    nucleus = Row(greedy.prompt_ids, greedy.decision, greedy.max_tokens, temperature=1.5, top_p=1e-6)
    hot = Row(greedy.prompt_ids, greedy.decision, 14, temperature=2.0)
    torch.manual_seed(0)
    batch.admit([greedy, nucleus, hot])
    while batch.rows:
        batch.step()
    assert greedy.tokens == nucleus.tokens == alone(model, greedy)
    assert hot.tokens != alone(model, Row(hot.prompt_ids, hot.decision, 14))  # temperature 2 over 128 tokens


def test_ignore_eos_runs_a_row_to_max_tokens():
    model = all7_model()
    row, *_ = requests(1, seed=3)
    full = alone(model, Row(row.prompt_ids, row.decision, 12))
    eos = full[1]  # the row's second token is the stop token of this batch
    batch = DecodeBatch(model, Tok(), [eos], max_rows=4, max_len=64)
    stops, runs = Row(row.prompt_ids, row.decision, 12), Row(row.prompt_ids, row.decision, 12, ignore_eos=True)
    events = batch.admit([stops, runs])
    while batch.rows:
        events += batch.step()
    assert stops.tokens == full[:1] and runs.tokens == full
    assert [e.finish for e in events if e.finish] == ["stop", "length"]
