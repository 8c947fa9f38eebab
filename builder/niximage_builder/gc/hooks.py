"""The test hook: ``checkpoint(name, **info)`` marks a decision point of the protocol, and a
test that sets ``CHECKPOINT`` pauses threads there to force an ordering.

Imports nothing of the project. Set the hook here, ``gc.hooks.CHECKPOINT``: the package does
not re-export it, since a copy there would not be the one ``checkpoint`` reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Checkpoint = Callable[[str, Mapping[str, Any]], None]
CHECKPOINT: Checkpoint | None = None
"""Called at the protocol's decision points (tests pause threads here to force orderings)."""


def checkpoint(name: str, **info: Any) -> None:
    hook = CHECKPOINT
    if hook is not None:
        hook(name, info)
