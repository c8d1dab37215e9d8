"""The README's Mermaid drawing of the asset graph is the graph the definitions declare."""

import re
from pathlib import Path

import dagster as dg

README = Path(__file__).resolve().parents[1] / "README.md"
EDGE = re.compile(r"(\w+)\s*-->\s*(\w+)")
NODE = re.compile(r"\w+")


def mermaid_graph(markdown: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Nodes and (upstream, downstream) edges of the flowchart under "## The asset graph"."""
    section = markdown.split("\n## The asset graph\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```mermaid\nflowchart LR\n(.*?)```", section, re.DOTALL)
    assert block, "no ```mermaid flowchart LR block in the section"
    nodes, edges = set(), set()
    for line in block.group(1).splitlines():
        line = line.strip()
        if not line or line.startswith("%%"):
            continue
        if edge := EDGE.fullmatch(line):
            edges.add(edge.groups())
            nodes.update(edge.groups())
        else:
            assert NODE.fullmatch(line), f"a line the test cannot read: {line!r}"
            nodes.add(line)
    return nodes, edges


def declared_graph(defs: dg.Definitions) -> tuple[set[str], set[tuple[str, str]]]:
    """Nodes and (upstream, downstream) edges of every asset in the definitions."""
    specs = defs.resolve_all_asset_specs()
    edges = {
        (dep.asset_key.to_user_string(), s.key.to_user_string()) for s in specs for dep in s.deps
    }
    nodes = {s.key.to_user_string() for s in specs} | {up for up, _ in edges}
    return nodes, edges


def test_the_readme_draws_every_asset_and_every_dependency_of_the_definitions(defs):
    drawn_nodes, drawn_edges = mermaid_graph(README.read_text())
    nodes, edges = declared_graph(defs)
    assert drawn_edges == edges, (
        f"missing from the README: {sorted(edges - drawn_edges)}; "
        f"not in the code: {sorted(drawn_edges - edges)}"
    )
    assert drawn_nodes == nodes, (
        f"missing from the README: {sorted(nodes - drawn_nodes)}; "
        f"not in the code: {sorted(drawn_nodes - nodes)}"
    )
