"""How widely used a store path is across a package set. Pure, except :func:`load`, which
reads the file; imports errors only.

The data is Nixery's ``popcount`` output: a flat JSON object ``{"name-version": count}`` where
``count`` is the number of store paths in a whole channel whose references include that path
(a path's reference to itself counts too, and entries with count 1 are left out). So for a
path named ``openssl-3.0.12``, ``count`` is its number of referrers, plus one if it refers to
itself: ``count - 1 <= referrers <= count``. A name the data lacks has at most one referrer.

Only the manifest order uses it (most shared layers first), so wrong or stale data can cost
layer reuse in Docker's ChainID sense but never changes which paths share a layer. (Grouping a
path with its referrer because the data lacks it, i.e. has at most one referrer, was measured
and dropped: a file from another channel lacks almost everything.)

Counts are keyed by name *with* version, so a file only fits the channel revision it was
computed for. The next revision bumps some versions and every exact key for them misses. We
therefore fall back to the name without its version (``pname``, plus the output suffix such
as ``-lib``, which changes popularity a lot: ``gcc-12.3.0`` is a compiler nobody refers to at
run time, ``gcc-12.3.0-lib`` is referred to by a large part of the channel). The fallback
takes the highest count of any version in the file: a package family that many paths used
in one version is likely to be as used in the next. ``benchmarks/layering.py
--revision-bump`` measures both lookups on a channel where a third of the versions moved on:
by exact name, the order is worse than with no data at all; with the fallback, as good as
with data of the right revision.

``cacert`` and ``iana-etc`` are added to every image (as Nixery does), so they rank above
everything in the data whatever the data says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from niximage_core.errors import InvalidInput

ALWAYS_INCLUDED = ("cacert", "nss-cacert", "iana-etc")
"""Package names (pname) that every image gets, hence the most shared of all."""

_VERSION_START = re.compile(r"-(?=[0-9])")
_OUTPUT_SUFFIX = re.compile(r"-([a-zA-Z]+)$")


def store_name(path: str) -> str:
    """``/nix/store/<hash>-name-1.0`` → ``name-1.0`` (what popcount keys by)."""
    base = path.rsplit("/", 1)[-1]
    return base.split("-", 1)[1] if "-" in base else base


def pname_key(name: str) -> str:
    """``gcc-12.3.0-lib`` → ``gcc-lib``; ``python3-3.11.6`` → ``python3``.

    Splits like Nix's ``builtins.parseDrvName`` (the version starts at the first dash that is
    followed by a digit) and keeps a trailing all-letter output name (``lib``, ``bin``,
    ``libgcc``), because different outputs of one package are used very differently.
    """
    parts = _VERSION_START.split(name, maxsplit=1)
    if len(parts) == 1:
        return name
    pname, version = parts
    output = _OUTPUT_SUFFIX.search(version)
    return f"{pname}-{output.group(1)}" if output else pname


@dataclass(frozen=True)
class Popularity:
    """Channel-wide reference counts, looked up by store path name."""

    counts: Mapping[str, int]
    """``name-version`` → count, as popcount writes it."""
    by_pname: Mapping[str, int] = field(default_factory=dict)
    """``pname[-output]`` → the highest count of any version (see :func:`pname_key`)."""
    match_pname: bool = True
    """Fall back to ``by_pname`` when the exact name is missing."""

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], match_pname: bool = True) -> Popularity:
        by_pname: dict[str, int] = {}
        for name, count in sorted(counts.items()):
            key = pname_key(name)
            by_pname[key] = max(by_pname.get(key, 0), count)
        return cls(dict(counts), by_pname, match_pname)

    @classmethod
    def empty(cls) -> Popularity:
        """No data (``plan_layers`` treats it as ``None``)."""
        return cls.from_counts({})

    @property
    def top(self) -> int:
        """A count above every count in the data (what the always-included packages get)."""
        return max(self.counts.values(), default=1) + 1

    def count(self, name: str) -> int:
        """The popcount of ``name``; 1 (popcount's dropped value) when the data lacks it."""
        if pname_key(name) in ALWAYS_INCLUDED:
            return self.top
        if name in self.counts:
            return self.counts[name]
        if self.match_pname:
            return self.by_pname.get(pname_key(name), 1)
        return 1

    def count_of_path(self, path: str) -> int:
        """:meth:`count` of a store path (by its name without the hash)."""
        return self.count(store_name(path))


def parse_popularity(data: Any, match_pname: bool = True) -> Popularity:
    """Validate popcount JSON (``{"name-version": count}``)."""
    if not isinstance(data, Mapping):
        raise InvalidInput("popularity: expected a JSON object of name → count")
    counts: dict[str, int] = {}
    for name, count in data.items():
        if not isinstance(name, str) or isinstance(count, bool) or not isinstance(count, int):
            raise InvalidInput(f"popularity: malformed entry {name!r}: {count!r}")
        if count < 0:
            raise InvalidInput(f"popularity: negative count for {name!r}")
        counts[name] = count
    return Popularity.from_counts(counts, match_pname)


def load(file: str | Path, match_pname: bool = True) -> Popularity:
    """Read and validate a popcount file (``niximage build|layers --popularity FILE``)."""
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"popularity: cannot read {file}: {exc}") from exc
    return parse_popularity(data, match_pname)
