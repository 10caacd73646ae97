"""
The package's shape: dependencies point one way.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import twisted_closewatch

PACKAGE = "twisted_closewatch"


def importGraph() -> dict[str, set[str]]:
    """
    Every module of the package and the package modules it imports, those
    under C{if TYPE_CHECKING:} and inside functions included.
    """
    root = Path(twisted_closewatch.__file__).parent
    modules = {path.stem for path in root.glob("*.py") if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        tree = ast.parse((root / f"{name}.py").read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == PACKAGE:
                    imported.update(a.name for a in node.names if a.name in modules)
                elif node.module.startswith(PACKAGE + "."):
                    imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE + "."):
                        imported.add(alias.name.split(".")[1])
        graph[name] = imported - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


class ImportTests(SynchronousTestCase):
    def test_noCircle(self) -> None:
        """
        No module of the package imports, directly or not, one that imports
        it back: not even for type checking.
        """
        self.assertEqual(cycles(importGraph()), [])

    def test_circleFound(self) -> None:
        self.assertEqual(cycles({"a": {"b"}, "b": {"a"}}), [["a", "b", "a"]])

    def test_relayDoesNotKnowTheFactory(self) -> None:
        self.assertNotIn("factory", importGraph()["relay"])
