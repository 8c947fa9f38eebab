"""Resolve a git reference to a commit with ``git ls-remote`` (spec.follow's adapter).

Imports tracking and errors. No clone and no checkout: one round trip that lists the
remote's refs. git never prompts (no terminal, ``GIT_TERMINAL_PROMPT=0``) and is killed
after a timeout, so a hanging server costs one timer tick, not the operator.
"""

from __future__ import annotations

import os
import re
import subprocess

from niximage_core.errors import InvalidInput
from niximage_operator.tracking import Reference

_LINE = re.compile(r"([0-9a-f]{40})\t(\S+)")


class RevisionUnresolved(InvalidInput):
    """The reference does not resolve (no such ref, an unreachable or unknown repository)."""

    kind = "RevisionUnresolved"


def resolve(reference: Reference, timeout: float = 30.0) -> str:
    """The commit ``reference`` names now; raises ``RevisionUnresolved`` saying why."""
    argv = ["git", "ls-remote", "--", reference.url, reference.ref]
    if reference.ref != "HEAD":
        # A tag's own commit (``tag^{}``) as well as the tag object.
        argv.append(f"{reference.ref}^{{}}")
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false"},
        )
    except FileNotFoundError:
        raise RevisionUnresolved("git is not installed in the operator's image") from None
    except subprocess.TimeoutExpired:
        raise RevisionUnresolved(
            f"git ls-remote {reference.url} timed out after {timeout:g} s"
        ) from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RevisionUnresolved(f"git ls-remote {reference.url} failed: {why}")
    found = choose(proc.stdout, reference.ref)
    if found is None:
        raise RevisionUnresolved(f"{reference.url} has no ref {reference.ref!r}")
    return found


def choose(listing: str, ref: str) -> str | None:
    """The commit of ``ref`` in ``git ls-remote`` output: a peeled tag (``^{}``) first, then
    the exact name, a branch, a tag, and any ref ending in it. Pure."""
    refs = {m.group(2): m.group(1) for m in _LINE.finditer(listing)}
    for name in (f"{ref}^{{}}", ref, f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}",
                 f"refs/tags/{ref}"):  # fmt: skip
        if name in refs:
            return refs[name]
    ending = sorted(name for name in refs if name.endswith(f"/{ref}"))
    return refs[ending[0]] if ending else None
