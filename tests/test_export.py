"""Export of a task's JARe slots as a PEFT LoRA adapter: the math, the format, and parity through peft."""
import json

import pytest
import torch

from slm_llm.jare.export import AdapterError, check_adapter, lora_factors


def test_lora_factors_equal_the_weighted_sum_of_slot_increments():
    P, r, d_in, d_out, scale = 3, 2, 5, 4, 0.5
    A, B = torch.randn(P, r, d_in), torch.randn(P, d_out, r)
    w = [0.2, 0.3, 0.5]
    (A2, B2), = lora_factors({"l.A": A, "l.B": B}, w, scale).values()
    assert A2.shape == (P * r, d_in) and B2.shape == (d_out, P * r)
    want = scale * sum(w[i] * B[i] @ A[i] for i in range(P))
    torch.testing.assert_close(B2 @ A2, want)


def test_lora_factors_refuse_wrong_weight_count():
    with pytest.raises(AdapterError, match="2 slots but 3 mean weights"):
        lora_factors({"l.A": torch.zeros(2, 1, 3), "l.B": torch.zeros(2, 3, 1)}, [0.3, 0.3, 0.4], 1.0)


@pytest.mark.slow
def test_exported_adapter_through_peft_matches_jare_with_mean_weights(served_run):
    from peft import PeftModel

    from slm_llm.config import load_config
    from slm_llm.jare import JareModel
    from slm_llm.models import load_base_model
    from slm_llm.run import RunDir
    from slm_llm.utils.io import sha256_file

    run = RunDir(served_run)
    cfg = load_config(run.root / "run.yaml")
    m = run.manifest()
    jare_base, _ = load_base_model(cfg.model)
    jare = JareModel(jare_base, cfg.jare)
    for t in m["order"]:
        jare.load_task(t, run.task_dir(t) / "increments.safetensors")
    ids = torch.randint(0, 49152, (2, 12))
    mask = torch.ones_like(ids)
    outputs = {}
    for task in m["order"]:
        adapter = run.task_dir(task) / "adapter"
        conf = json.loads((adapter / "adapter_config.json").read_text())
        P, r = cfg.jare.slots_per_task, cfg.jare.rank
        assert conf["r"] == conf["lora_alpha"] == P * r and conf["modules_to_save"] is None
        assert conf["base_model_name_or_path"] == str((run.root / "base").resolve())
        assert check_adapter(adapter, m["base_model"])["task"] == task
        recorded = m["tasks"][task]["adapter"]
        assert {k.split("/")[-1] for k in recorded} >= {"adapter_config.json", "adapter_model.safetensors"}
        assert all(sha256_file(run.root / k) == h for k, h in recorded.items())

        base, _ = load_base_model(cfg.model)
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids, attention_mask=mask).logits
        w = torch.tensor(m["tasks"][task]["mean_weights"]).expand(2, P)
        slots = torch.tensor(list(jare.slot_range(task))).expand(2, P)
        jare_logits = jare(ids, mask, slot_ids=slots, slot_weights=w)
        torch.testing.assert_close(peft_logits, jare_logits, atol=1e-4, rtol=1e-4)
        outputs[task] = peft_logits
    base_logits = jare(ids, mask)
    for task, logits in outputs.items():  # the adapters do something, and not the same thing
        assert (logits - base_logits).abs().max() > 1e-3
    assert (outputs[m["order"][0]] - outputs[m["order"][1]]).abs().max() > 1e-3
    assert not list((run.root / "tasks").glob("*/.adapter*"))  # no temp folder left behind


def test_check_adapter_refuses_another_base_model(tmp_path):
    (tmp_path / "slm_adapter.json").write_text(json.dumps({"base_model": "tiny-llama-h64", "task": "a"}))
    with pytest.raises(AdapterError, match="exported for base model 'tiny-llama-h64'.*'smollm2-135m-instruct'"):
        check_adapter(tmp_path, "smollm2-135m-instruct")
    with pytest.raises(AdapterError, match="not an slm_llm adapter"):
        check_adapter(tmp_path / "missing", "x")
