"""The run folder contract (DESIGN.md, "Run directory").

    runs/<name>/
      run.yaml  manifest.json  tasks/<n>-<task>/  router/  eval/

The manifest records the base model and config hash, the encoder, the task order,
each task's status and the sha256 of every artifact. Loading a run checks the base
model, so an increment is never applied to a model it was not trained on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slm_llm.config import Config, yaml_error
from slm_llm.errors import SlmError
from slm_llm.utils.io import sha256_file, write_json, write_text


# What a run's artifacts depend on: resuming or extending a run with another value is refused.
# (data.tasks / data.order may grow: a run continues on new tasks.)
FROZEN_KEYS = (
    "model", "jare", "dtkr", "train.method", "train.lr", "train.epochs", "train.max_steps", "train.seed",
    "train.weight_decay", "train.warmup_ratio", "train.min_lr_ratio", "train.olora_lambda", "train.olora_l2",
    "data.suite", "data.template", "data.max_length", "data.truncation", "data.max_train_samples", "data.seed",
    "data.phrasing", "data.input_only_share", "data.wordings", "data.heldout_share", "data.phrasing_seed",
    "data.dev_samples", "data.eval_split",
)
FREE_KEYS = ("model.cache_dir", "model.gradient_checkpointing", "dtkr.encode_batch_size", "dtkr.index_device")


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every FROZEN_KEYS leaf that differs (a key missing on
    either side, e.g. from an older version, is not a change)."""
    out = []
    for key in FROZEN_KEYS:
        a, b = _lookup(before, key), _lookup(after, key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [(f"{key}.{k}", a[k], b[k]) for k in sorted(set(a) & set(b))
                    if a[k] != b[k] and f"{key}.{k}" not in FREE_KEYS]
        elif a is not _MISSING and b is not _MISSING and a != b:
            out.append((key, a, b))
    return out


_MISSING = object()


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


class RunError(SlmError, RuntimeError):
    """The run folder is missing, incomplete or made for another base model."""


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def router_dir(self) -> Path:
        return self.root / "router"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def task_dir(self, task: str) -> Path:
        m = self.manifest()
        if task not in m["order"]:
            raise RunError(f"{self.manifest_path}: task {task!r} is not in this run (tasks: {', '.join(m['order'])})")
        return self.root / "tasks" / f"{m['order'].index(task)}-{task}"

    # ---- manifest --------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise RunError(f"{self.root} is not a run folder: {self.manifest_path} is missing") from None
        except json.JSONDecodeError as e:
            raise RunError(f"{self.manifest_path}: invalid JSON at line {e.lineno}: {e.msg}") from None

    def init(self, cfg: Config, base_model: str, encoder: str, order: list[str],
             suite_tasks: list[str] | None = None, phrasings: dict[str, dict] | None = None) -> dict[str, Any]:
        """Create the run, or check that an existing one continues with the same settings.

        ``order`` lists the training stages (the tasks; ["multitask"] for that baseline),
        ``suite_tasks`` the tasks evaluated (defaults to ``order``), ``phrasings`` each task's
        recorded split of its phrasing pool. A run may continue on new tasks (a longer
        order); any other change to what its artifacts depend on is refused, naming the key.
        """
        suite_tasks = suite_tasks or order
        if self.exists():
            m = self.manifest()
            self.check_base(base_model)
            if m["config_hash"] != cfg.hash():
                raise RunError(
                    f"{self.manifest_path}: config hash {m['config_hash']} != {cfg.hash()}; the model or jare "
                    "settings changed since this run started. Use a new run_dir."
                )
            changed = changed_keys(self.config_dict(), cfg.to_dict())
            if changed:
                raise RunError(f"{self.manifest_path}: this run was started with other settings: "
                               + "; ".join(f"{k} was {a!r}, now {b!r}" for k, a, b in changed)
                               + ". Resume with the run's own settings (run.yaml), or use a new run_dir.")
            if m["order"][: len(order)] != order[: len(m["order"])]:
                raise RunError(f"{self.manifest_path}: task order {m['order']} differs from {order}")
            if m["suite_tasks"][: len(suite_tasks)] != suite_tasks[: len(m["suite_tasks"])]:
                raise RunError(f"{self.manifest_path}: evaluated tasks {m['suite_tasks']} differ from {suite_tasks}")
            for task, split in (phrasings or {}).items():
                if task in m.get("phrasings", {}) and m["phrasings"][task] != split:
                    raise RunError(f"{self.manifest_path}: phrasings.{task}: the suite's phrasing pool or its split "
                                   "changed since this task was recorded; use a new run_dir")
            if len(order) > len(m["order"]) or len(suite_tasks) > len(m["suite_tasks"]):  # continues on new tasks
                m["order"] = order if len(order) > len(m["order"]) else m["order"]
                m["suite_tasks"] = suite_tasks if len(suite_tasks) > len(m["suite_tasks"]) else m["suite_tasks"]
                m.setdefault("phrasings", {}).update({t: p for t, p in (phrasings or {}).items()
                                                      if t not in m["phrasings"]})
                write_text(self.root / "run.yaml", cfg.to_yaml())
                self._write(m)
            return m
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.root / "run.yaml", cfg.to_yaml())
        m = {
            "base_model": base_model,
            "config_hash": cfg.hash(),
            "encoder": encoder,
            "method": cfg.train.method,
            "jare": {"rank": cfg.jare.rank, "slots_per_task": cfg.jare.slots_per_task, "targets": cfg.jare.targets},
            "suite": cfg.data.suite,
            "order": order,
            "suite_tasks": suite_tasks,
            "phrasings": phrasings or {},
            "status": "running",
            "tasks": {},
        }
        self._write(m)
        return m

    def config_dict(self) -> dict[str, Any]:
        """The run's resolved config as written at its start (run.yaml)."""
        import yaml

        try:
            return yaml.safe_load((self.root / "run.yaml").read_text()) or {}
        except FileNotFoundError:
            raise RunError(f"{self.root}: run.yaml is missing") from None
        except yaml.YAMLError as e:
            raise RunError(yaml_error(self.root / "run.yaml", e)) from None

    def check_base(self, base_model: str) -> None:
        have = self.manifest()["base_model"]
        if have != base_model:
            raise RunError(f"{self.manifest_path}: run was trained on base model {have!r}, not {base_model!r}")

    def done_tasks(self) -> list[str]:
        m = self.manifest()
        return [t for t in m["order"] if m["tasks"].get(t, {}).get("status") == "done"]

    def mark_task_done(self, task: str, info: dict[str, Any]) -> None:
        """Record ``task`` as done with the sha256 of every file in its folder (ckpt/ excluded)."""
        m = self.manifest()
        tdir = self.task_dir(task)
        artifacts = {
            str(p.relative_to(self.root)): sha256_file(p)
            for p in sorted(tdir.rglob("*"))
            if p.is_file() and "ckpt" not in p.relative_to(tdir).parts
        }
        m["tasks"][task] = {"status": "done", "index": m["order"].index(task), "artifacts": artifacts, **info}
        if all(m["tasks"].get(t, {}).get("status") == "done" for t in m["order"]):
            m["status"] = "done"
        self._write(m)

    def record_task_files(self, task: str, key: str, folder: Path) -> None:
        """Record ``{relative path: sha256}`` of every file under ``folder`` as ``tasks[task][key]``
        (e.g. the exported adapter), so a stale or tampered artifact can be detected."""
        m = self.manifest()
        if task not in m["tasks"]:
            raise RunError(f"{self.manifest_path}: task {task!r} has no manifest entry")
        m["tasks"][task][key] = {str(p.relative_to(self.root)): sha256_file(p)
                                 for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        self._write(m)

    def update_tasks(self, fields: dict[str, dict[str, Any]]) -> None:
        """Merge ``{task: {key: value}}`` into those tasks' manifest entries."""
        m = self.manifest()
        for task, info in fields.items():
            if task not in m["tasks"]:
                raise RunError(f"{self.manifest_path}: task {task!r} has no manifest entry")
            m["tasks"][task].update(info)
        self._write(m)

    def update(self, **fields: Any) -> None:
        m = self.manifest()
        m.update(fields)
        self._write(m)

    def _write(self, m: dict[str, Any]) -> None:
        write_json(self.manifest_path, m)
