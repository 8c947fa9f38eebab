"""Thread pools owned by the process, made on first use. Imports nothing of ours.

A forked child has none of its parent's threads, so a pool inherited from the parent would
never run anything: each process gets its own, keyed by pid.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[tuple[int, str], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def process_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """This process's pool called ``name`` (its threads are named after it); ``threads``
    counts only when it is made."""
    with _lock:
        key = (os.getpid(), name)
        pool = _pools.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=name)
            _pools[key] = pool
        return pool
