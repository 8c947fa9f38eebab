"""The user documentation (docs/) stays true to the code as the code changes.

Conventions the docs follow, and these tests check:

- docs/niximage-reference.md names every field of the CRD's spec and status by its full
  path in backticks (`spec.packageSource.channel`); ``[]`` stands for the items of a list
  (`status.conditions[].reason`);
- every condition reason the operator can set is named in backticks in the reference and
  is a heading of docs/troubleshooting.md; the reasons come from the operator's code;
- every top-level chart value is named in backticks in docs/install-helm.md;
- every ``niximage`` subcommand is shown in docs/one-machine.md or docs/README.md;
- every relative link (and its #anchor, GitHub style) in docs/*.md and README.md resolves.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

import niximage_cli as cli
from niximage_operator import conditions, observations

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
OPERATOR = ROOT / "operator" / "niximage_operator"
CRD = ROOT / "crds" / "niximage.yaml"
VALUES = ROOT / "charts" / "niximage" / "values.yaml"

REASON_ARGUMENT = {"BuildFailure": 0, "_pair": 1, "Condition": 2}
"""Where a reason is an argument in the operator: ``BuildFailure(reason, …)``,
``_pair(ready, reason, …)`` and ``Condition(type, status, reason, …)``."""
REASON_GRAMMAR = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")  # the CRD's pattern
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REFERENCE_LINK = re.compile(r"^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def prose(markdown: str) -> str:
    """Markdown without fenced code blocks (their `#` lines are not headings)."""
    return FENCE.sub("", markdown)


def schema_paths(schema: Mapping[str, Any], prefix: str) -> Iterator[str]:
    for name, child in (schema.get("properties") or {}).items():
        path = f"{prefix}.{name}"
        yield path
        yield from schema_paths(child, path)
        items = child.get("items") or {}
        if items.get("properties"):
            yield from schema_paths(items, f"{path}[]")


def crd_paths() -> list[str]:
    crd = yaml.safe_load(CRD.read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    return [path for top in ("spec", "status") for path in schema_paths(root[top], top)]


def literal_reasons() -> set[str]:
    """Reasons written out where the operator makes failures and conditions."""
    found: set[str] = set()
    for source in sorted(OPERATOR.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            index = REASON_ARGUMENT.get(node.func.id)
            if index is None:
                continue
            given = node.args[index : index + 1] + [
                k.value for k in node.keywords if k.arg == "reason"
            ]
            found |= {a.value for a in given if isinstance(a, ast.Constant)}
    return found


def operator_reasons() -> set[str]:
    """Every reason the operator can put on a condition."""
    return literal_reasons() | set(observations.REASONS) | set(conditions.GOOD_REASONS)


def subcommands() -> list[str]:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(commands.choices)


def slugs(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    seen: Counter[str] = Counter()
    anchors = set()
    for heading in HEADING.findall(prose(markdown)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def test_every_crd_field_is_in_the_reference() -> None:
    paths = crd_paths()
    assert "status.conditions[].reason" in paths  # the walk reaches list items
    text = doc("niximage-reference.md")
    missing = [path for path in paths if f"`{path}`" not in text]
    assert not missing, f"docs/niximage-reference.md does not describe {missing}"


def test_every_reason_is_in_the_reference_and_has_a_troubleshooting_section() -> None:
    reasons = operator_reasons()
    assert literal_reasons(), "no reasons found in the operator's code: has it changed shape?"
    assert all(REASON_GRAMMAR.fullmatch(reason) for reason in reasons), reasons
    reference = doc("niximage-reference.md")
    headings = {h.strip("` ") for h in HEADING.findall(prose(doc("troubleshooting.md")))}
    missing = sorted(r for r in reasons if f"`{r}`" not in reference)
    assert not missing, f"docs/niximage-reference.md does not describe reasons {missing}"
    missing = sorted(reasons - headings)
    assert not missing, f"docs/troubleshooting.md has no section for reasons {missing}"


def test_every_top_level_chart_value_is_in_the_helm_guide() -> None:
    values = yaml.safe_load(VALUES.read_text())
    text = doc("install-helm.md")
    missing = [key for key in values if not re.search(rf"`{re.escape(key)}[`.]", text)]
    assert not missing, f"docs/install-helm.md does not mention values {missing}"


def test_every_subcommand_is_shown() -> None:
    text = doc("one-machine.md") + doc("README.md")
    missing = [name for name in subcommands() if not re.search(rf"\bniximage {name}\b", text)]
    assert not missing, f"docs/one-machine.md and docs/README.md do not show {missing}"


def test_relative_links_resolve() -> None:
    pages = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
    assert len(pages) > 1
    broken = []
    for page in pages:
        text = prose(page.read_text())
        for target in INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in slugs(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
