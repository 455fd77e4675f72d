"""JARe math: per-sample mixing equals the dense formula; zero init; isolation; persistence."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slm_llm.config import JareConfig
from slm_llm.jare import JareLinear, JareModel


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def randomise_slots(model: JareModel, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # A_t / B_t
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_mixed_batch_equals_dense_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    layer = JareLinear(base, rank=3, slots_per_task=2)
    layer.add_task("a")
    layer.add_task("b")
    with torch.no_grad():
        for p in (layer.A_0, layer.B_0, layer.A_1, layer.B_1):
            p.normal_()
    x = torch.randn(3, 5, 16)
    s = torch.tensor([[0, 1], [2, 3], [1, 2]])  # row 0: task a, row 1: task b, row 2: mixed
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]])
    layer.set_routing(s, w)
    y = layer(x)
    A = torch.cat([layer.A_0, layer.A_1])  # [4, r, in]
    B = torch.cat([layer.B_0, layer.B_1])  # [4, out, r]
    for b in range(3):
        dW = sum(w[b, k] * B[s[b, k]] @ A[s[b, k]] for k in range(2))
        ref = x[b] @ (base.weight + dW).T + base.bias
        torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=1e-5)


def test_inference_cache_is_dropped_when_routing_changes():
    torch.manual_seed(0)
    layer = JareLinear(torch.nn.Linear(16, 8, bias=False), rank=4, slots_per_task=3)
    layer.add_task("a")
    with torch.no_grad():
        layer.A_0.normal_(), layer.B_0.normal_()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        layer.set_routing(torch.tensor([[0, 2], [0, 2]]), torch.tensor([[0.6, 0.4], [0.1, 0.9]]))
        first, again = layer(x), layer(x)
        layer.set_routing(torch.tensor([[1, 2], [1, 0]]), torch.tensor([[0.5, 0.5], [0.3, 0.7]]))
        second = layer(x)
    torch.testing.assert_close(first, again)
    s, w = layer.routing.slot_ids, layer.routing.slot_weights
    ref = torch.stack([x[b] @ (layer.base.weight + sum(w[b, k] * layer.B_0[s[b, k]] @ layer.A_0[s[b, k]] for k in range(2))).T
                       for b in range(2)])
    torch.testing.assert_close(second, ref, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 128, (2, 9))
    s, w = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama()
        if checkpointing:
            base.train()
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = JareModel(base, JareConfig(rank=4, slots_per_task=2))
        model.add_task("a")
        randomise_slots(model)
        model(ids, labels=ids, slot_ids=s, slot_weights=w).backward()
        grads.append([p.grad.clone() for p in model.task_parameters("a")])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_zero_init_leaves_base_logits_unchanged():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    ref = base(input_ids=ids).logits.clone()
    model = JareModel(base, JareConfig(rank=4, slots_per_task=2, top_k=2))
    model.add_task("a")
    s, w = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    out = model(ids, slot_ids=s, slot_weights=w)
    assert torch.equal(out, ref)
    assert model.layer_names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_only_newest_task_is_trainable_and_old_task_is_untouched():
    model = JareModel(tiny_llama(), JareConfig(rank=4, slots_per_task=2, targets=["o_proj", "v_proj"]))
    model.add_task("a")
    randomise_slots(model)
    before = {k: v.clone() for k, v in model.task_state_dict("a").items()}
    model.add_task("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("A_1", "B_1")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 8))
    for _ in range(3):
        loss = model(ids, labels=ids, slot_ids=torch.tensor([[2, 3], [3, 2]]), slot_weights=torch.full((2, 2), 0.5))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.task_state_dict("a")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.task_state_dict("b")[f"{model.layer_names[0]}.B"], torch.zeros(2, 32, 4))


def test_loss_on_loss_positions_matches_full_logits():
    model = JareModel(tiny_llama(), JareConfig(rank=4, slots_per_task=2))
    model.add_task("a")
    randomise_slots(model)
    ids = torch.randint(0, 128, (2, 10))
    labels = ids.clone()
    labels[:, :6] = -100
    s, w = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    loss = model(ids, labels=labels, slot_ids=s, slot_weights=w)
    logits = model(ids, slot_ids=s, slot_weights=w)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_generation_keeps_routing_for_every_step():
    model = JareModel(tiny_llama(), JareConfig(rank=4, slots_per_task=2))
    model.add_task("a")
    model.add_task("b")
    randomise_slots(model, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.mul_(30)
    ids = torch.randint(0, 128, (2, 5))
    s, w = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    out = model.generate(ids, slot_ids=s, slot_weights=w, max_new_tokens=6, do_sample=False)
    assert all(layer.routing is None for layer in model.jare_layers())  # the block's routing is gone
    # Greedy decode by hand without a cache, re-routing every full forward.
    seq = ids
    for _ in range(6):
        nxt = model(seq, slot_ids=s, slot_weights=w)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_save_load_round_trip_and_shape_errors(tmp_path):
    model = JareModel(tiny_llama(), JareConfig(rank=4, slots_per_task=2))
    model.add_task("a")
    randomise_slots(model)
    model.save_task("a", tmp_path / "increments.safetensors")
    other = JareModel(tiny_llama(), JareConfig(rank=4, slots_per_task=2))
    other.load_task("a", tmp_path / "increments.safetensors")
    for k, v in model.task_state_dict("a").items():
        assert torch.equal(v, other.task_state_dict("a")[k])
    assert not any(p.requires_grad for p in other.parameters())
    wrong = JareModel(tiny_llama(), JareConfig(rank=2, slots_per_task=2))
    with pytest.raises(ValueError, match="shape"):
        wrong.load_task("a", tmp_path / "increments.safetensors")


def test_routing_validation():
    model = JareModel(tiny_llama(), JareConfig(rank=4, slots_per_task=2))
    model.add_task("a")
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(ValueError, match="out of range"):
        model(ids, slot_ids=torch.tensor([[5, 0]]), slot_weights=torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="matched no"):
        JareModel(torch.nn.Sequential(torch.nn.ReLU()), JareConfig())


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merged_copy(model: JareModel, slots, weights) -> LlamaForCausalLM:
    """A plain copy of the base with row-specific ΔW = scale Σ_k w_k B_k A_k merged into every
    target: the dense formula JARe must equal (None -> the base itself)."""
    import copy

    dense = copy.deepcopy(model.model)
    for name in model.layer_names:
        parent, leaf = name.rsplit(".", 1)
        layer = dense.get_submodule(name)
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.base.weight)
            for s, w in zip(slots or [], weights or []):
                A, B = layer.slot_factors(s)
                linear.weight += model.scale * w * (B @ A)
            if layer.base.bias is not None:
                linear.bias.copy_(layer.base.bias)
        setattr(dense.get_submodule(parent), leaf, linear)
    return dense.eval()


def all7_model(bias=False):
    base = tiny_llama()
    if bias:  # a Qwen-like base with biased q/k/v: the packed bias must follow its members
        for layer in base.model.layers:
            for leaf in ("q_proj", "k_proj", "v_proj"):
                old = getattr(layer.self_attn, leaf)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
                with torch.no_grad():
                    new.weight.copy_(old.weight)
                    new.bias.normal_()
                setattr(layer.self_attn, leaf, new)
    model = JareModel(base, JareConfig(rank=4, slots_per_task=2, targets=ALL7, alpha=8))
    for t in "abc":
        model.add_task(t)
    randomise_slots(model, seed=5)
    return model.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_packed_projections_equal_the_dense_formula_per_row(bias):
    """q/k/v and gate/up run as packs at inference; every row still equals its own merged model."""
    model = all7_model(bias)
    attn = model.model.model.layers[0].self_attn
    assert attn.q_proj.pack is attn.k_proj.pack is attn.v_proj.pack and len(attn.q_proj.pack.members) == 3
    mlp = model.model.model.layers[0].mlp
    assert mlp.gate_proj.pack is mlp.up_proj.pack and mlp.down_proj.pack.members == [mlp.down_proj]
    rows = [([0, 1], [0.7, 0.3]), ([2, 5], [0.5, 0.5]), None, ([4, 4], [0.6, 0.4])]  # tasks mixed, a base row, a repeat
    s = torch.tensor([r[0] if r else [0, 0] for r in rows])
    w = torch.tensor([r[1] if r else [0.0, 0.0] for r in rows])
    ids = torch.randint(0, 128, (4, 6))
    with torch.no_grad():
        out = model(ids, slot_ids=s, slot_weights=w)
    assert attn.q_proj.base.weight.data_ptr() == attn.q_proj.pack.weight.data_ptr()  # the base weight is the pack's
    for b, r in enumerate(rows):
        ref = merged_copy(model, *(r or (None, None)))(input_ids=ids[b:b + 1]).logits[0]
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-4)
    with torch.enable_grad():  # the unpacked (training) path: the same numbers
        torch.testing.assert_close(model(ids, slot_ids=s, slot_weights=w), out, atol=1e-5, rtol=1e-4)


def test_routing_changes_between_decode_steps_keep_rows_exact():
    """Rows leave and join a KV-cached batch; the routing follows the new row order each step."""
    from transformers import DynamicCache

    model = all7_model()
    routes = {0: ([0, 1], [0.5, 0.5]), 1: ([2, 3], [0.2, 0.8]), 2: ([4, 5], [0.9, 0.1])}
    prompts = torch.randint(0, 128, (3, 5))
    with torch.no_grad():
        cache = DynamicCache()
        model.set_routing(torch.tensor([routes[b][0] for b in range(3)]), torch.tensor([routes[b][1] for b in range(3)]))
        logits = model.model(input_ids=prompts, past_key_values=cache).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        keep = torch.tensor([2, 0])  # row 1 leaves, rows reordered
        cache.batch_select_indices(keep)
        model.set_routing(torch.tensor([routes[2][0], routes[0][0]]), torch.tensor([routes[2][1], routes[0][1]]))
        step = model.model(input_ids=nxt[keep], past_key_values=cache).logits[:, -1]
        model.set_routing(None, None)
    for row, b in enumerate([2, 0]):
        dense = merged_copy(model, *routes[b])
        seq = torch.cat([prompts[b:b + 1], nxt[b:b + 1]], 1)
        torch.testing.assert_close(step[row], dense(input_ids=seq).logits[0, -1], atol=1e-5, rtol=1e-4)


def test_pack_follows_moved_weights_and_new_tasks():
    model = all7_model()
    s, w = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        before = model(ids, slot_ids=s, slot_weights=w)
        model.double()  # every weight moves: the packs rebuild from the members' new weights
        torch.testing.assert_close(model(ids, slot_ids=s, slot_weights=w.double()).float(), before, atol=1e-5, rtol=1e-4)
        model.float()
        model.add_task("d")  # S grows: the packs make room
        for p in model.task_parameters("d"):
            p.normal_()
        s2, w2 = torch.tensor([[6, 7], [0, 1]]), torch.tensor([[0.4, 0.6], [0.5, 0.5]])
        out = model(ids.repeat(2, 1), slot_ids=s2, slot_weights=w2)
        held = list(model.order.slots)
        model.set_routing(s2[:1], w2[:1])  # row 1 leaves: its slots stay held, nothing is rewritten
        assert model.order.slots == held and set(held) == {0, 1, 6, 7}
        model.set_routing(None, None)
        assert model.order.slots == []
    torch.testing.assert_close(out[0], merged_copy(model, [6, 7], [0.4, 0.6])(input_ids=ids).logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], before[0], atol=1e-5, rtol=1e-4)


def test_slots_changed_in_place_are_not_served_stale():
    """A training step (in-place update) between two inference forwards over the same slots."""
    model = all7_model()
    s, w = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        model(ids, slot_ids=s, slot_weights=w)
        for p in model.task_parameters("a"):
            p.mul_(2)
        out = model(ids, slot_ids=s, slot_weights=w)
    torch.testing.assert_close(out[0], merged_copy(model, [0, 1], [0.5, 0.5])(input_ids=ids).logits[0], atol=1e-5, rtol=1e-4)
