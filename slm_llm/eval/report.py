"""``eval/report.md`` and its plots, readable without running any code.

    eval/heatmap_<mode>.png      R per mode (stage x task), annotated
    eval/routing_confusion.png   true task x routed task after the last stage (slm runs)
    eval/methods.png             final per-task scores of each method (with a compare table)
    eval/loss.png                training loss per stage, from tasks/*/train_log.jsonl
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from slm_llm.eval.compare import headline, table_markdown  # noqa: E402
from slm_llm.eval.matrix import load_matrix, metrics_of, view_matrix  # noqa: E402
from slm_llm.run import RunDir, RunError  # noqa: E402
from slm_llm.utils.io import atomic_path, write_text  # noqa: E402


def write_report(run_dir: str | Path, compare: str | Path | None = None, lead_view: str | None = None) -> Path:
    """Write the plots and ``eval/report.md`` of a run; returns the report's path.

    Without ``compare``, a ``<prefix>-compare.json`` beside a ``<prefix>-<method>`` run is used.
    ``lead_view`` puts that query view first (default: the matrix's own first view).
    """
    run = RunDir(run_dir)
    manifest = run.manifest()
    m = load_matrix(run.eval_dir / "matrix.json")
    table = _load_table(run, compare)
    out = run.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Evaluation report: `{run.root.name}`", "",
             f"- method: **{manifest['method']}**, base model `{manifest['base_model']}`, suite `{manifest['suite']}`",
             f"- training stages: {', '.join(manifest['order'])} (status {manifest['status']})"]
    if m is None:
        lines += ["", "No `eval/matrix.json` yet: run `slm-llm eval --run " + str(run.root) + "`."]
    else:
        samples = ", ".join(f"{t} {n}" for t, n in m["samples"].items())
        views = list(m["views"])
        if lead_view is not None:
            if lead_view not in views:
                raise RunError(f"--query-view {lead_view}: the matrix has views {', '.join(views)}")
            views = [lead_view, *(v for v in views if v != lead_view)]
        lines += [f"- test samples per task: {samples}",
                  f"- query views: {', '.join(views)} (headline: **{views[0]}**; docs/evaluation.md)", "",
                  "Scores are points (0-100), strict scoring unless marked lenient. Definitions: docs/evaluation.md.",
                  "", "## Continual-learning metrics per query view", "", _views_md(metrics_of(m)), ""]
        for n, view in enumerate(views):
            flat = view_matrix(m, view)
            lines += [f"## The `{view}` view", ""]
            for mode, rows in flat["R"].items():
                png = f"heatmap_{mode}.png" if n == 0 else f"heatmap_{mode}_{view}.png"
                _heatmap(np.array([[np.nan if v is None else v for v in (r or [None] * len(m["tasks"]))] for r in rows],
                                  dtype=float), [f"{i}: {s}" for i, s in enumerate(m["stages"][: len(rows)])],
                         m["tasks"], f"R ({mode}, {view}): score after each stage", out / png, "viridis", vmax=100)
                lines += [f"### R, mode `{mode}`", "", _matrix_md(rows, m), "", f"![R {mode} {view}]({png})", ""]
            if any(v is not None for v in flat["base"]):
                lines += ["### Zero-shot base", "", _row_md(m["tasks"], flat["base"]), ""]
            conf = next((c for c in reversed(flat["routing_confusion"]) if c), None)
            if conf:
                acc = [a for a in flat["routing_accuracy"] if a is not None]
                png = "routing_confusion.png" if n == 0 else f"routing_confusion_{view}.png"
                _confusion(conf, m["tasks"], out / png)
                lines += ["### Routing", "", "Served by their own task's increments, per stage: " +
                          ", ".join(f"{a:.1f}" for a in acc)
                          + " (`<ood>`: flagged out of distribution, answered by the base).",
                          "", f"![routing confusion {view}]({png})", ""]
    if table is not None:
        _method_bars(table["tasks"], headline(table), out / "methods.png")
        lines += ["## Methods compared", "", table_markdown(table), "", "![methods](methods.png)", ""]
    if (out / "ifeval.md").exists():
        lines += ["## Instruction following (`slm-llm ifeval`)", "", (out / "ifeval.md").read_text(), ""]
    if _loss_plot(run, manifest["order"], out / "loss.png"):
        lines += ["## Training loss", "", "![loss](loss.png)", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def _load_table(run: RunDir, compare: str | Path | None) -> dict[str, Any] | None:
    if compare is not None:
        try:
            return json.loads(Path(compare).read_text())
        except FileNotFoundError:
            raise RunError(f"--compare {compare}: no such table") from None
    name = run.root.name
    if "-" in name:
        guess = run.root.parent / f"{name.rsplit('-', 1)[0]}-compare.json"
        if guess.exists():
            return json.loads(guess.read_text())
    return None


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _views_md(metrics: dict[str, Any]) -> str:
    lines = ["| view | mode | AP | AP (lenient) | BWT | forgetting | FWT | routing |", "|---|---|---|---|---|---|---|---|"]
    for view, entry in metrics.items():
        for mode, r in entry["strict"].items():
            lenient = entry["lenient"].get(mode, {}).get("ap")
            routing = entry["routing_accuracy"] if mode == "slm" else None
            cells = [_fmt(r["ap"]), _fmt(lenient), *(_fmt(r[k]) for k in ("bwt", "forgetting", "fwt")), _fmt(routing)]
            lines.append(f"| {view} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _matrix_md(rows, m) -> str:
    lines = ["| after stage | " + " | ".join(m["tasks"]) + " |", "|---|" + "---|" * len(m["tasks"])]
    for t, r in enumerate(rows):
        cells = r or [None] * len(m["tasks"])
        lines.append(f"| {t}: {m['stages'][t]} | " + " | ".join(_fmt(v) for v in cells) + " |")
    return "\n".join(lines)


def _row_md(tasks, row) -> str:
    return "| " + " | ".join(tasks) + " |\n|" + "---|" * len(tasks) + "\n| " + " | ".join(_fmt(v) for v in row) + " |"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _heatmap(a: np.ndarray, rows: list[str], cols: list[str], title: str, path: Path, cmap: str,
             vmax: float | None = None, fmt: str = "{:.1f}") -> None:
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(cols), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(a):
        if not np.isnan(v):
            high = (v / (vmax or np.nanmax(a) or 1)) > 0.6  # viridis is light at the top, Blues dark
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9,
                    color=("white" if high else "black") if cmap == "Blues" else ("black" if high else "white"))
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def _confusion(conf: dict[str, dict[str, int]], tasks: list[str], path: Path) -> None:
    true = [t for t in tasks if t in conf]
    routed = [t for t in tasks] + sorted({r for c in conf.values() for r in c} - set(tasks))
    a = np.array([[conf[t].get(r, 0) for r in routed] for t in true], dtype=float)
    _heatmap(a, true, routed, "Routing: true task (rows) x routed task", path, "Blues", fmt="{:.0f}")


def _method_bars(tasks: list[str], cells: dict[str, Any], path: Path) -> None:
    methods = list(cells)
    x = np.arange(len(tasks) + 1)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(x), 4))
    for k, method in enumerate(methods):
        r = cells[method]
        vals = [r["scores"][t] if r["scores"][t] is not None else 0.0 for t in tasks] + [r["ap"] or 0.0]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=method)
    ax.set_xticks(x, [*tasks, "AP"], rotation=20, ha="right")
    ax.set_ylabel("score (points)")
    ax.set_ylim(0, 100)
    ax.set_title("Final per-task scores by method")
    ax.legend(fontsize=8, ncol=min(5, len(methods)))
    _save(fig, path)


def _loss_plot(run: RunDir, stages: list[str], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    offset, any_ = 0, False
    for n, stage in enumerate(stages):
        log = run.root / "tasks" / f"{n}-{stage}" / "train_log.jsonl"
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        steps = [offset + r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], label=stage)
        offset, any_ = steps[-1], True
    if any_:
        ax.set_xlabel("optimizer step (stages back to back)")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss per stage")
        ax.legend(fontsize=8)
        _save(fig, path)
    plt.close(fig)
    return any_
