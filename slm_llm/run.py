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

from slm_llm.config import Config
from slm_llm.utils.io import sha256_file, write_json, write_text


class RunError(RuntimeError):
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
             suite_tasks: list[str] | None = None) -> dict[str, Any]:
        """Create the run, or check that an existing one was made with the same base and order.

        ``order`` lists the training stages (the tasks; ["multitask"] for that baseline),
        ``suite_tasks`` the tasks evaluated (defaults to ``order``).
        """
        if self.exists():
            m = self.manifest()
            self.check_base(base_model)
            if m["config_hash"] != cfg.hash():
                raise RunError(
                    f"{self.manifest_path}: config hash {m['config_hash']} != {cfg.hash()}; the model or jare "
                    "settings changed since this run started. Use a new run_dir."
                )
            if m["order"][: len(order)] != order[: len(m["order"])]:
                raise RunError(f"{self.manifest_path}: task order {m['order']} differs from {order}")
            if len(order) > len(m["order"]):  # the run continues on new tasks
                m["order"] = order
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
            "suite_tasks": suite_tasks or order,
            "status": "running",
            "tasks": {},
        }
        self._write(m)
        return m

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

    def update(self, **fields: Any) -> None:
        m = self.manifest()
        m.update(fields)
        self._write(m)

    def _write(self, m: dict[str, Any]) -> None:
        write_json(self.manifest_path, m)
