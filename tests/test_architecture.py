"""The import graph follows ARCHITECTURE.md: no package imports one above it, not even in a function."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "slm_llm"


def layers() -> dict[str, int]:
    """Package -> its row in ARCHITECTURE.md's table (several packages may share a row)."""
    out = {}
    for line in (REPO / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"\| (\d+) \| (.+?) \|", line)
        if m:
            for name in re.findall(r"`(\w+)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """slm_llm packages imported anywhere in the module (top level or inside functions)."""
    rel = path.relative_to(PKG).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = list(rel[:-1])[: len(rel) - node.level]
                name = ".".join(["slm_llm", *base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            names = [name]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("slm_llm.")}
    return found


def test_no_package_imports_one_above_it():
    rank = layers()
    assert {"errors", "config", "run", "data", "jare", "dtkr", "train", "pipeline", "eval", "serve", "recipes",
            "cli"} <= set(rank)
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        own = path.relative_to(PKG).with_suffix("").parts[0]
        if own == "__init__":
            continue
        assert own in rank, f"{path.relative_to(REPO)}: package {own!r} is not in ARCHITECTURE.md"
        bad += [f"{path.relative_to(REPO)} ({own}, row {rank[own]}) imports {t} (row {rank[t]})"
                for t in imports_of(path) if t != own and rank[t] > rank[own]]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_inside_functions_and_relative_ones():
    src = "def f():\n    from slm_llm.eval.continual import evaluate_after_task\nfrom ..config import Config\n"
    assert imports_of(PKG / "train" / "probe.py", src) == {"eval", "config"}
