"""``niximage plan``: the resolved spec, build key and closure of an image. Pure formatting
over a realised closure; the Nix work happens in ``nixcli``."""

from __future__ import annotations

from typing import Any

from niximage_builder.closure import ClosureGraph
from niximage_core.imagespec import ImageSpec


def plan_document(spec: ImageSpec, graph: ClosureGraph) -> dict[str, Any]:
    """What ``plan --json`` prints: spec, build key, every store path with its referrers."""
    referrers = graph.referrers()
    return {
        "spec": spec.model_dump(mode="json"),
        "buildKey": spec.build_key(),
        "roots": list(graph.roots),
        "closure": [
            {
                "path": node.path,
                "narSize": node.nar_size,
                "references": list(node.references),
                "referencedBy": referrers[node.path],
            }
            for node in sorted(graph.nodes.values(), key=lambda n: n.path)
        ],
        "totalSize": graph.total_nar_size,
    }


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def plan_table(doc: dict[str, Any]) -> str:
    """A readable table: one row per store path, largest first."""
    spec = doc["spec"]
    lines = [
        f"packages:   {' '.join(spec['packages'])}",
        f"arch:       {spec['arch']}",
        f"source:     {spec['source']}",
        f"build key:  {doc['buildKey']}",
        "",
        f"{'SIZE':>10}  {'STORE PATH':<70}  REFERENCED BY",
    ]
    roots = set(doc["roots"])
    for entry in sorted(doc["closure"], key=lambda e: (-e["narSize"], e["path"])):
        users = [p.rsplit("/", 1)[-1].split("-", 1)[-1] for p in entry["referencedBy"]]
        who = ", ".join(users) if users else ""
        if entry["path"] in roots:
            who = "(requested)" + (", " + who if who else "")
        lines.append(f"{human_size(entry['narSize']):>10}  {entry['path']:<70}  {who}")
    lines.append(f"{human_size(doc['totalSize']):>10}  total, {len(doc['closure'])} store paths")
    return "\n".join(lines)
