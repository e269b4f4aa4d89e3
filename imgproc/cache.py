"""Objects made from files once per process and shared by the workflow's job threads."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar


class _Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=_Sized)


class FileCache(Generic[T]):
    """Values made from a file, kept while the file's size and modification time are unchanged.

    The workflow's batch jobs run as threads of one process and share such a cache (master
    frames, alignment references); it holds at most ``max_bytes`` (the values' ``nbytes``),
    dropping the least recently used value first, but always the newest one.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._values: OrderedDict[tuple, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: Hashable, path: str, make: Callable[[], T]) -> T:
        """The value of ``kind`` for the file at ``path``, made by ``make()`` unless cached."""
        stat = os.stat(path)
        key = (kind, path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = make()  # outside the lock: two threads may both make it once, never wait on each other
        with self._lock:
            self._values[key] = value
            while len(self._values) > 1 and sum(v.nbytes for v in self._values.values()) > self.max_bytes:
                self._values.popitem(last=False)
        return value
