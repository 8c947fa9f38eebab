"""What changed between two images: packages added, removed and changed in their closures,
the bytes, and the layers a node holding the old image pulls for the new one. Pure.

Read from each image's SBOM (the CycloneDX document ``niximage_builder.sbom`` writes: a
component per store path, its name and version, and the properties below) and its
manifest's layers. Packages are matched by name: a store path in both images is unchanged;
a name with one store path on each side is *changed* (a new version, or the same version
rebuilt because something it refers to changed, as Nix does); anything else is added or
removed. Imports units only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from niximage_core.units import format_bytes

SBOM_TYPE = "application/vnd.cyclonedx+json"
"""The media type (and ``artifactType``) of the SBOMs niximage writes and reads."""
PROPERTY_STORE_PATH = "nix:storePath"
PROPERTY_NAR_SIZE = "nix:narSize"


@dataclass(frozen=True, order=True)
class Package:
    name: str
    version: str
    path: str
    nar_size: int


@dataclass(frozen=True)
class Change:
    old: Package
    new: Package

    @property
    def rebuilt(self) -> bool:
        """Same version, new store path: a dependency changed."""
        return self.old.version == self.new.version


@dataclass(frozen=True)
class Layers:
    reused: int
    new: int
    new_bytes: int
    """Compressed bytes of the new layers: what a node holding the old image pulls."""


@dataclass(frozen=True)
class ClosureDiff:
    added: list[Package] = field(default_factory=list)
    removed: list[Package] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    layers: Layers | None = None

    @property
    def bytes_added(self) -> int:
        """NAR bytes of store paths only the new image has (changed ones included)."""
        return sum(p.nar_size for p in self.added) + sum(c.new.nar_size for c in self.changed)

    @property
    def bytes_removed(self) -> int:
        return sum(p.nar_size for p in self.removed) + sum(c.old.nar_size for c in self.changed)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "added": [_package_json(p) for p in self.added],
            "removed": [_package_json(p) for p in self.removed],
            "changed": [
                {
                    "name": c.new.name,
                    "oldVersion": c.old.version,
                    "newVersion": c.new.version,
                    "oldPath": c.old.path,
                    "newPath": c.new.path,
                }
                for c in self.changed
            ],
            "bytesAdded": self.bytes_added,
            "bytesRemoved": self.bytes_removed,
        }
        if self.layers is not None:
            doc["layers"] = {
                "reused": self.layers.reused,
                "new": self.layers.new,
                "newBytes": self.layers.new_bytes,
            }
        return doc

    def summary(self, limit: int = 5) -> str:
        """One line (an Event's message): the changes by name, then the counts."""
        if self.empty:
            parts = ["closure unchanged"]
        else:
            named = [_change_text(c) for c in self.changed]
            named += [f"+{p.name} {p.version}".rstrip() for p in self.added]
            named += [f"-{p.name} {p.version}".rstrip() for p in self.removed]
            more = f" and {len(named) - limit} more" if len(named) > limit else ""
            parts = [", ".join(named[:limit]) + more]
            parts.append(
                f"{format_bytes(self.bytes_added)} added, {format_bytes(self.bytes_removed)} "
                "removed"
            )
        if self.layers is not None:
            parts.append(
                f"{self.layers.reused} layers reused, {self.layers.new} new "
                f"({format_bytes(self.layers.new_bytes)} to pull)"
            )
        return "; ".join(parts)

    def render(self) -> str:
        """The table ``niximage diff`` prints on a terminal."""
        rows = [("", "package", "old", "new")]
        rows += [("~", c.new.name, c.old.version or "-", _new_version(c)) for c in self.changed]
        rows += [("+", p.name, "", p.version or "-") for p in self.added]
        rows += [("-", p.name, p.version or "-", "") for p in self.removed]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        if self.empty:
            lines = ["closure unchanged"]
        lines.append(
            f"store paths: {format_bytes(self.bytes_added)} added, "
            f"{format_bytes(self.bytes_removed)} removed"
        )
        if self.layers is not None:
            lines.append(
                f"layers: {self.layers.reused} reused, {self.layers.new} new, "
                f"{format_bytes(self.layers.new_bytes)} to pull"
            )
        return "\n".join(lines)


def _package_json(package: Package) -> dict[str, Any]:
    return {
        "name": package.name,
        "version": package.version,
        "path": package.path,
        "narSize": package.nar_size,
    }


def _new_version(change: Change) -> str:
    return (change.new.version or "-") + (" (rebuilt)" if change.rebuilt else "")


def _change_text(change: Change) -> str:
    if change.rebuilt:
        return f"{change.new.name} {change.new.version} rebuilt".replace("  ", " ")
    return f"{change.new.name} {change.old.version or '?'} → {change.new.version or '?'}"


def packages(sbom: Mapping[str, Any]) -> dict[str, Package]:
    """The store paths an SBOM lists, by path (components without one are skipped)."""
    found: dict[str, Package] = {}
    for component in sbom.get("components") or ():
        if not isinstance(component, Mapping):
            continue
        properties = {
            str(p.get("name")): str(p.get("value"))
            for p in component.get("properties") or ()
            if isinstance(p, Mapping)
        }
        path = properties.get(PROPERTY_STORE_PATH)
        if not path:
            continue
        try:
            size = int(properties.get(PROPERTY_NAR_SIZE, "0"))
        except ValueError:
            size = 0
        found[path] = Package(
            str(component.get("name", "")), str(component.get("version") or ""), path, size
        )
    return found


def diff(
    old_sbom: Mapping[str, Any],
    new_sbom: Mapping[str, Any],
    old_layers: Sequence[Mapping[str, Any]] | None = None,
    new_layers: Sequence[Mapping[str, Any]] | None = None,
) -> ClosureDiff:
    """The change from the old image to the new one; ``*_layers`` are the manifests' layer
    descriptors (``digest``, ``size``), for the layer counts."""
    old, new = packages(old_sbom), packages(new_sbom)
    gone = {path: p for path, p in old.items() if path not in new}
    came = {path: p for path, p in new.items() if path not in old}
    by_name_old = _by_name(gone.values())
    by_name_new = _by_name(came.values())
    changed = []
    for name in sorted(by_name_old.keys() & by_name_new.keys()):
        if len(by_name_old[name]) == 1 and len(by_name_new[name]) == 1:
            change = Change(by_name_old[name][0], by_name_new[name][0])
            changed.append(change)
            del gone[change.old.path], came[change.new.path]
    layers = None
    if old_layers is not None and new_layers is not None:
        held = {str(d.get("digest")) for d in old_layers}
        fresh = [d for d in new_layers if str(d.get("digest")) not in held]
        layers = Layers(
            reused=len(new_layers) - len(fresh),
            new=len(fresh),
            new_bytes=sum(int(d.get("size") or 0) for d in fresh),
        )
    # Rebuilt-only changes last: the new versions are the news.
    changed.sort(key=lambda c: (c.rebuilt, c.new.name))
    return ClosureDiff(sorted(came.values()), sorted(gone.values()), changed, layers)


def _by_name(found: Any) -> dict[str, list[Package]]:
    grouped: dict[str, list[Package]] = {}
    for package in found:
        grouped.setdefault(package.name, []).append(package)
    return grouped
