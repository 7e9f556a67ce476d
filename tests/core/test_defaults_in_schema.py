"""Defaults live in config/schema.yaml only (issue 13, item 4).

The package takes the validated config (``rerankflow.config.load_config`` fills the schema's defaults
for callers outside Snakemake); it never holds a default of its own for a setting the schema defines.
This test walks the schema's leaf keys and reads the package's source (``ast``) for the three ways a
second default creeps in:

1. ``section.get("<key>", <literal>)`` — a fallback for a config value;
2. a function parameter or a class field named like a schema key with a literal default;
3. a dict literal that maps three or more schema keys to literals (a ``DEFAULTS`` table).

``None`` is not a default (it means "not given": the caller must pass the config's value or the
function derives it from other settings); neither is a parameter whose name a schema key shares by
accident, which is listed in ``ALLOWED`` with the reason.
"""

from __future__ import annotations

import ast

import yaml

from conftest import REPO

PACKAGE = REPO / "rerankflow"

# (module path relative to rerankflow/, name) -> why a literal default there is not a second source of a setting.
ALLOWED: dict[tuple[str, str], str] = {
    ("sdg/prompts.py", "multi_hop"): "QUERY_TYPE_HELP: the prompt's help text per query type, not the weights of sdg.llm.query_types",
    ("testing.py", "seed"): "tiny_bert's seed initialises a random test model's weights; it is not the workflow's seed",
}


def schema_leaf_keys() -> set[str]:
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text(encoding="utf-8"))
    keys: set[str] = set()

    def walk(node):
        for name, sub in (node.get("properties") or {}).items():
            if sub.get("properties"):
                walk(sub)
            else:
                keys.add(name)

    walk(schema)
    return keys


def _is_literal(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is not None
    if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
        return True
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_is_literal(e) or (isinstance(e, ast.Constant)) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(v is not None and _is_literal(v) for v in node.values)
    return False


def find_literal_defaults(tree: ast.AST, keys: set[str]) -> list[tuple[int, str, str]]:
    """(line, name, what) for every literal default of a schema key found in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys \
                and _is_literal(node.args[1]):
            found.append((node.lineno, node.args[0].value, f".get({node.args[0].value!r}, {ast.unparse(node.args[1])})"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            pos = args.posonlyargs + args.args
            for arg, default in zip(pos[len(pos) - len(args.defaults):], args.defaults):
                if arg.arg in keys and _is_literal(default):
                    found.append((node.lineno, arg.arg, f"{node.name}({arg.arg}={ast.unparse(default)})"))
            for arg, default in zip(args.kwonlyargs, args.kw_defaults):
                if default is not None and arg.arg in keys and _is_literal(default):
                    found.append((node.lineno, arg.arg, f"{node.name}(*, {arg.arg}={ast.unparse(default)})"))
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                        and stmt.target.id in keys and stmt.value is not None and _is_literal(stmt.value):
                    found.append((stmt.lineno, stmt.target.id, f"{node.name}.{stmt.target.id} = {ast.unparse(stmt.value)}"))
        elif isinstance(node, ast.Dict):
            named = [k.value for k, v in zip(node.keys, node.values)
                     if isinstance(k, ast.Constant) and k.value in keys and _is_literal(v)]
            if len(named) >= 3:
                found.append((node.lineno, named[0], f"dict literal of defaults for {', '.join(named)}"))
    return found


def test_scanner_sees_each_kind_of_second_default():
    keys = {"max_length", "quantize", "batch_size", "port"}
    src = '''
def f(cfg, max_length=512):
    return cfg.get("quantize", "none")
class S:
    port: int = 8000
D = {"max_length": 512, "quantize": "none", "batch_size": 16}
def ok(cfg, max_length=None, other=3):
    return cfg.get("quantize"), cfg["batch_size"]
'''
    found = find_literal_defaults(ast.parse(src), keys)
    assert sorted(name for _line, name, _what in found) == ["max_length", "max_length", "port", "quantize"]


def test_no_python_module_holds_a_default_for_a_schema_key():
    keys = schema_leaf_keys()
    assert {"max_length", "quantize", "top_k", "learning_rate"} <= keys
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, name, what in find_literal_defaults(ast.parse(path.read_text(encoding="utf-8")), keys):
            if (rel, name) in ALLOWED:
                continue
            problems.append(f"rerankflow/{rel}:{line}: {what}")
    assert not problems, "defaults belong in config/schema.yaml only:\n  " + "\n  ".join(problems)


def test_allowed_exceptions_still_exist_and_say_why():
    keys = schema_leaf_keys()
    for (rel, name), why in ALLOWED.items():
        assert len(why) > 20, (rel, name)
        found = find_literal_defaults(ast.parse((PACKAGE / rel).read_text(encoding="utf-8")), keys)
        assert any(n == name for _l, n, _w in found), f"ALLOWED entry {rel}:{name} no longer needed"
