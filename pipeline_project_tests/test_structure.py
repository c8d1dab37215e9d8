"""The layout holds: a core without Dagster, one owner per shared table, short asset bodies."""

import ast
import importlib
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest

import pipeline_project

PACKAGE = Path(pipeline_project.__file__).parent
SHARED_TABLES = ("embedding_cache", "dead_letter")
# The only modules whose SQL may name the shared tables: their owners and the DDL.
SHARED_TABLE_OWNERS = {"core/embedding_cache.py", "core/dead_letters.py", "tables.py"}
# A table name right after FROM, JOIN, INTO, UPDATE or TABLE [IF [NOT] EXISTS].
SQL_ON_SHARED_TABLE = re.compile(
    r"\b(?:from|join|into|update|table(?:\s+if(?:\s+not)?\s+exists)?)\s+(?:\w+\.)?\"?"
    rf"({'|'.join(SHARED_TABLES)})\b",
    re.IGNORECASE,
)
MAX_ASSET_BODY_LINES = 50

IMPORT_CORE = """
import importlib, json, pkgutil, sys
import pipeline_project.core as core
imported = []
first_with_dagster = core.__name__ if "dagster" in sys.modules else None
for module in pkgutil.walk_packages(core.__path__, core.__name__ + "."):
    importlib.import_module(module.name)
    imported.append(module.name)
    if first_with_dagster is None and "dagster" in sys.modules:
        first_with_dagster = module.name
print(json.dumps({"imported": imported, "first_with_dagster": first_with_dagster,
                  "dagster": "dagster" in sys.modules}))
"""


def test_the_core_and_every_module_under_it_import_without_dagster():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_CORE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "pipeline_project.core.inference" in report["imported"]
    assert report["dagster"] is False, f"{report['first_with_dagster']} imports dagster"


def table_constants() -> dict[str, str]:
    """tables.py's names for the shared tables (EMBEDDING_CACHE -> "embedding_cache")."""
    tree = ast.parse((PACKAGE / "tables.py").read_text())
    return {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and node.value.value in SHARED_TABLES
    }


def string_text(node: ast.expr, constants: dict[str, str]) -> str | None:
    """The text of a string expression (a literal, an f-string, a + of them); a name of a shared
    table from tables.py reads as the table, any other value as {}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        return constants.get(name)
    if isinstance(node, ast.FormattedValue):
        return string_text(node.value, constants) or "{}"
    if isinstance(node, ast.JoinedStr):
        return "".join(string_text(value, constants) or "{}" for value in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = string_text(node.left, constants), string_text(node.right, constants)
        if left is not None or right is not None:
            return (left or "{}") + (right or "{}")
    return None


def docstrings(tree: ast.Module) -> set[int]:
    scopes = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, scopes))]
    return {
        id(n.body[0].value)
        for n in nodes
        if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
    }


def sql_on_shared_tables(path: Path, constants: dict[str, str]) -> list[str]:
    """`line: table` for each string expression in the file that is SQL on a shared table."""
    tree = ast.parse(path.read_text())
    skip = docstrings(tree)
    found = set()  # a part of an f-string or of a + is also visited on its own: a set
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.Constant | ast.JoinedStr | ast.BinOp):
            continue
        text = string_text(node, constants)
        if text and (match := SQL_ON_SHARED_TABLE.search(text)):
            found.add((node.lineno, match.group(1)))
    return [f"{line}: {table}" for line, table in sorted(found)]


def test_only_the_owners_of_the_shared_tables_hold_sql_on_them():
    constants = table_constants()
    assert set(constants.values()) == set(SHARED_TABLES)
    offenders = {
        str(path.relative_to(PACKAGE)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if (found := sql_on_shared_tables(path, constants))
    }
    outside = {name: found for name, found in offenders.items() if name not in SHARED_TABLE_OWNERS}
    assert not outside, "SQL on a shared table outside its owner:\n" + "\n".join(
        f"{name} (line: table) {', '.join(found)}" for name, found in outside.items()
    )


def body_lines(fn) -> tuple[int, str]:
    """Lines from `def` to the function's last line (decorators left out), and where it is."""
    lines, first = inspect.getsourcelines(fn)
    [node] = ast.parse(textwrap.dedent("".join(lines))).body
    where = f"{Path(inspect.getsourcefile(fn)).relative_to(PACKAGE)}:{first}"
    return node.end_lineno - node.lineno + 1, where


def test_no_asset_body_is_longer_than_50_lines(defs):
    asset_fns = {
        assets_def.op.compute_fn.decorated_fn
        for key in defs.resolve_all_asset_keys()
        if isinstance(assets_def := defs.resolve_assets_def(key), dg.AssetsDefinition)
    }
    assert len(asset_fns) >= 10  # a multi-asset is one function
    too_long = sorted(
        f"{fn.__name__} ({where}): {length} lines"
        for fn in asset_fns
        for length, where in [body_lines(fn)]
        if length > MAX_ASSET_BODY_LINES
    )
    assert not too_long, "\n".join(too_long)


def test_replay_dead_letters_is_no_longer_than_50_lines():
    inference = importlib.import_module("pipeline_project.assets.inference")
    if not hasattr(inference, "replay_dead_letters"):
        pytest.skip("replay_dead_letters is gone from assets/inference.py")
    length, where = body_lines(inference.replay_dead_letters)
    assert length <= MAX_ASSET_BODY_LINES, f"{where}: {length} lines"
