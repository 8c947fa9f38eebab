"""The test hook of garbage collection's protocol: ``checkpoint(name, **info)`` marks a
decision point (in gc, in builds, in the storage backends' gc primitives), and a test that
sets ``CHECKPOINT`` pauses threads there to force an ordering.

Imports nothing of the project, so that the storage backends can mark their points
without depending on gc. Set the hook here, ``checkpoints.CHECKPOINT``: nothing re-exports
it, since a copy elsewhere would not be the one ``checkpoint`` reads.
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
