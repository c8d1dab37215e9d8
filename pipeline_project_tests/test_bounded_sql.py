"""No query holds a whole batch in memory: the guard for what test_scale.py cannot see.

Two 10M-row runs failed in queries whose state grows with the batch and cannot spill to disk:
`quantile_cont` over every confidence of the batch (50M values) and `list(...)` of the top-N
list of every profile. A scaled-down run does not catch them: at 20k rows DuckDB's fixed needs
are above 32 MB (measured: the pipeline ran out of memory at 16, 24 and 32 MB), and a state of
~50 bytes per row only passes such a limit above a million rows, too long for the suite. So the
guard reads the SQL itself: every holistic aggregate (its state holds every value it is given)
in the project's SQL must be listed below with why its input is bounded; a new one fails the
suite until it is bounded (approx_quantile, reservoir_quantile, a sample, a small group) and
listed.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline_project"

# Aggregates whose state holds every input value (DuckDB cannot spill them). approx_quantile
# (a t-digest), reservoir_quantile, arg_min/arg_max, count, sum... keep a bounded state.
HOLISTIC = re.compile(
    r"\b(quantile_cont|quantile_disc|quantile|median|mode|list|array_agg|string_agg|histogram"
    r"|group_concat|listagg)\s*\(",
    re.IGNORECASE,
)
_SQL = re.compile(r"\b(SELECT|FROM|GROUP BY)\b", re.IGNORECASE)

# (module, the function or constant holding the SQL, the aggregate) -> why its input is bounded
BOUNDED = {
    ("core/catalog.py", "_VOCABULARY_SQL", "string_agg"): "the catalog's products, not a batch",
    ("core/catalog.py", "CATALOG_DIGEST_SQL", "string_agg"): "the catalog's products",
    ("core/profiles.py", "profiles_sql", "list"): "per customer: their categories, top 2 kept",
    ("core/profiles.py", "_cuts_sql", "quantile_disc"): "a seeded sample of PROFILE_SAMPLE lines",
    ("core/recommendation_quality.py", "_EVALUATION_SQL", "list"): (
        "per sampled customer: their held-out products"
    ),
}


def holistic_aggregates(source: str) -> list[tuple[str, str, int]]:
    """(holder, aggregate, line) of every holistic aggregate in the SQL of a Python module: its
    string constants that read like SQL, and the literal parts of its f-strings; the holder is
    the enclosing function, or the module constant the SQL is assigned to."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        in_fstring = isinstance(parents.get(node), ast.JoinedStr)
        if not (in_fstring or _SQL.search(node.value)):
            continue
        for match in HOLISTIC.finditer(node.value):
            found.append((_holder(node, parents), match.group(1).lower(), node.lineno))
    return found


def _holder(node: ast.AST, parents: dict) -> str:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node.name
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
    return "<module>"


def test_every_holistic_aggregate_in_the_sql_is_bounded_and_says_why():
    found = {
        (str(path.relative_to(PACKAGE)), holder, aggregate): line
        for path in sorted(PACKAGE.rglob("*.py"))
        for holder, aggregate, line in holistic_aggregates(path.read_text())
    }
    unlisted = {key: line for key, line in found.items() if key not in BOUNDED}
    assert not unlisted, (
        f"holistic aggregates whose input may be a whole batch: {unlisted}; bound them"
        " (approx_quantile, a sample, a small group) and list them in BOUNDED with why"
    )
    assert set(BOUNDED) <= set(found), f"listed but gone: {set(BOUNDED) - set(found)}"


def test_the_guard_catches_the_two_queries_that_failed_at_10m_rows():
    """The queries as they were (git: d1eae14 and 9cae0d3 removed them), and their bounded
    forms."""
    quantiles = """
def confidence_figures(conn, batch_id):
    return conn.execute(
        "SELECT quantile_cont(confidence, [0.05, 0.25, 0.5, 0.75, 0.95]), avg(confidence)"
        " FROM recommendations WHERE batch_id = ?", [batch_id]).fetchone()
"""
    lists = '''
_LISTS_SQL = f"""
WITH lists AS (
    SELECT p.text_hash, list(r.product_id ORDER BY r.rank) AS products
    FROM {PROFILES} AS p JOIN recommendations AS r USING (line_no) GROUP BY p.text_hash)
SELECT count(DISTINCT products) FROM lists
"""
'''
    assert holistic_aggregates(quantiles) == [("confidence_figures", "quantile_cont", 4)]
    assert holistic_aggregates(lists) == [("_LISTS_SQL", "list", 2)]
    bounded = quantiles.replace("quantile_cont", "approx_quantile")
    assert holistic_aggregates(bounded) == []
    # a Python list() or statistics.median() is not SQL
    assert holistic_aggregates("values = list(rows)\nmiddle = median(values)\n") == []
