"""Guards for the repository layout (docs/architecture.md#components): the component folders
are source roots, not packages, so the standard library's ``operator`` always wins; and no
module of the product imports itself back through others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

from testsupport import SOURCE_ROOTS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "core": "niximage_core",
    "builder": "niximage_builder",
    "registry": "niximage_registry",
    "operator": "niximage_operator",
    "cli": "niximage_cli",
}


def test_component_folders_are_not_packages() -> None:
    assert set(PACKAGES) == set(SOURCE_ROOTS)
    for folder, package in PACKAGES.items():
        assert not (ROOT / folder / "__init__.py").exists()
        assert (ROOT / folder / package / "__init__.py").is_file()


def import_circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in graph.modules:
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle_among_the_products_modules() -> None:
    graph = grimp.build_graph(*PACKAGES.values(), exclude_type_checking_imports=True)
    assert len(graph.modules) > 50
    assert import_circles(graph) == []


def test_stdlib_operator_wins_from_repo_root() -> None:
    # -S skips .pth files, so nothing (like an editable-install finder) preloads the stdlib
    # module and hides a shadowing package in the working directory.
    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import operator; operator.itemgetter; print(operator.__file__)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert not Path(out).resolve().is_relative_to(ROOT), out


def test_plain_python_from_repo_root_gets_stdlib_operator() -> None:
    subprocess.run(
        [sys.executable, "-c", "import operator; operator.itemgetter"], cwd=ROOT, check=True
    )
