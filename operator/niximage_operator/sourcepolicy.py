"""Which package sources tenants may build from: the operator's allow-list. Pure.

Imports the core's sources and errors. A builder evaluates whatever Nix code its source
holds, so the platform team decides which sources those are. A rule is a package source's
text form with shell-style wildcards (``*``, ``?``) and one placeholder,
``{commit}``, for a 40-hex commit:

- ``nixpkgs:{commit}``: any nixpkgs commit (the default, with the operator's own sources);
- ``nixpkgs:nixos-24.05``: that channel (builds follow it, unpinned, or with spec.follow);
- ``git:https://git.example/platform/*#{commit}``: that host's repositories, at commits;
- ``path:/opt/pkgs``: a directory the builders hold (matched without its NAR hash).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from niximage_core.errors import InvalidInput
from niximage_core.sources import GitSource, NixpkgsSource, PathSource

Source = PathSource | NixpkgsSource | GitSource
COMMIT_PLACEHOLDER = "{commit}"
DEFAULT_RULES = ("nixpkgs:{commit}",)
"""Besides the operator's own sources (its default and offered paths), always allowed."""
_RULE = re.compile(r"(path|nixpkgs|git):[^\s]{1,2000}")


class SourceNotAllowed(InvalidInput):
    """A NixImage asks for a package source the operator's policy does not allow."""

    kind = "SourceNotAllowed"


@dataclass(frozen=True)
class SourcePolicy:
    rules: tuple[str, ...]
    """As configured, for messages."""
    _patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def configure(cls, rules: Iterable[str], own: Iterable[Source] = ()) -> SourcePolicy:
        """The rules, then the operator's own sources (always allowed); ``InvalidInput``
        naming a malformed rule."""
        given = [rule.strip() for rule in rules if rule.strip()] or list(DEFAULT_RULES)
        for rule in given:
            if not _RULE.fullmatch(rule):
                raise InvalidInput(
                    f"allowed source rule {rule[:200]!r} is not <kind>:<pattern> with kind "
                    "path, nixpkgs or git"
                )
        every = list(dict.fromkeys([*given, *(_text(source) for source in own)]))
        return cls(tuple(every), tuple(_compile(rule) for rule in every))

    def check(self, source: Source) -> None:
        """Raise ``SourceNotAllowed`` unless a rule matches ``source``."""
        text = _text(source)
        if not any(pattern.fullmatch(text) for pattern in self._patterns):
            raise SourceNotAllowed(
                f"package source {text} is not allowed: the operator allows "
                f"{', '.join(self.rules)} (NIXIMAGE_OPERATOR_ALLOWED_SOURCES, chart value "
                "packageSource.allowed)"
            )


def _text(source: Source) -> str:
    """What rules match: the text form, a path without its NAR hash."""
    return f"path:{source.path}" if isinstance(source, PathSource) else str(source)


def _compile(rule: str) -> re.Pattern[str]:
    """``*`` any run of characters, ``?`` one, ``{commit}`` 40 hex; the rest literally."""
    wild = {"*": ".*", "?": "."}
    globs = [
        "".join(wild.get(c, re.escape(c)) for c in part) for part in rule.split(COMMIT_PLACEHOLDER)
    ]
    return re.compile("[0-9a-f]{40}".join(globs), re.DOTALL)
