"""Runtime closure graphs as Nix reports them. Pure; imports errors only.

Accepts every shape Nix gives for the same facts:
- ``exportReferencesGraph`` with ``__structuredAttrs`` and Nix 2.8's
  ``nix path-info --json --recursive``: a list of ``{"path", "references", "narSize", ...}``;
- newer Nix's ``path-info --json``: an object keyed by store path;
- our own file format: ``{"roots": [...], "graph": <either of the above>}``.
Self-references are dropped (Nix lists them; they carry no layering information).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from niximage_core.errors import InvalidInput


@dataclass(frozen=True)
class StorePath:
    path: str
    references: tuple[str, ...]
    """Other store paths this one refers to, sorted, without itself."""
    nar_size: int
    nar_hash: str = ""
    """The NAR's sha256 as Nix wrote it (SRI, ``sha256:<base32>`` or hex); "" if unknown."""

    @property
    def name(self) -> str:
        """``/nix/store/<hash>-name-1.0`` → ``name-1.0`` (popularity data is keyed this way)."""
        base = self.path.rsplit("/", 1)[-1]
        return base.split("-", 1)[1] if "-" in base else base


@dataclass(frozen=True)
class ClosureGraph:
    roots: tuple[str, ...]
    """The requested packages' top-level store paths, sorted."""
    nodes: Mapping[str, StorePath]
    """Every path of the runtime closure, by path."""

    def __post_init__(self) -> None:
        for root in self.roots:
            if root not in self.nodes:
                raise InvalidInput(f"closure graph: root {root} is not in the graph")
        for node in self.nodes.values():
            for ref in node.references:
                if ref not in self.nodes:
                    raise InvalidInput(f"closure graph: {node.path} refers to unknown {ref}")

    @property
    def total_nar_size(self) -> int:
        return sum(node.nar_size for node in self.nodes.values())

    def referrers(self) -> dict[str, list[str]]:
        """Path → sorted paths that refer to it."""
        result: dict[str, list[str]] = {path: [] for path in self.nodes}
        for node in sorted(self.nodes.values(), key=lambda n: n.path):
            for ref in node.references:
                result[ref].append(node.path)
        return result

    def closure_of(self, paths: Iterable[str]) -> set[str]:
        """Every path reachable from ``paths`` (inclusive)."""
        seen: set[str] = set()
        stack = list(paths)
        while stack:
            path = stack.pop()
            if path not in seen:
                seen.add(path)
                stack.extend(self.nodes[path].references)
        return seen

    def to_json(self) -> dict[str, Any]:
        """Our file format (also what ``niximage layers`` reads)."""
        return {
            "roots": list(self.roots),
            "graph": [
                {
                    "path": node.path,
                    "references": list(node.references),
                    "narSize": node.nar_size,
                }
                for node in sorted(self.nodes.values(), key=lambda n: n.path)
            ],
        }


def parse_entries(raw: Any) -> dict[str, StorePath]:
    """Graph entries in list form (Nix 2.8) or object form (newer Nix)."""
    if isinstance(raw, Mapping):
        if not all(isinstance(info, Mapping | None) for info in raw.values()):
            raise InvalidInput("closure graph: expected an object of store path → info")
        items = [{**info, "path": path} for path, info in raw.items() if info is not None]
    elif isinstance(raw, list):
        items = raw
    else:
        raise InvalidInput("closure graph: expected a list or an object of store paths")
    nodes: dict[str, StorePath] = {}
    for item in items:
        try:
            path = str(item["path"])
            refs = tuple(sorted({str(r) for r in item.get("references", ()) if r != path}))
            nar_hash = str(item.get("narHash") or "")
            nodes[path] = StorePath(path, refs, int(item["narSize"]), nar_hash)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"closure graph: malformed entry {str(item)[:200]}") from exc
    return nodes


def parse_graph(data: Mapping[str, Any], roots: Iterable[str] | None = None) -> ClosureGraph:
    """Parse ``{"roots": [...], "graph": ...}``; ``roots`` overrides the file's roots."""
    if "graph" not in data:
        raise InvalidInput("closure graph: missing 'graph'")
    nodes = parse_entries(data["graph"])
    chosen = list(roots if roots is not None else data.get("roots", ()))
    return ClosureGraph(tuple(sorted(set(chosen))), nodes)
