"""One-slot hand-off between threads: the latest item wins.

Nothing queues between grab and screen. A producer overwrites the slot; a consumer either peeks at the newest item or
waits for one newer than the last it saw. An item that is overwritten before any consumer took it counts as dropped.
"""
from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Thread-safe single-item buffer with a sequence number."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._seq = 0
        self._taken = True
        self.dropped = 0
        self.closed = False

    @property
    def seq(self) -> int:
        return self._seq

    def put(self, item: T) -> None:
        with self._cond:
            if not self._taken:
                self.dropped += 1
            self._item = item
            self._seq += 1
            self._taken = False
            self._cond.notify_all()

    def peek(self) -> tuple[int, T | None]:
        """The newest item and its sequence number, without waiting (the item stays in the slot)."""
        with self._cond:
            return self._seq, self._item

    def get_newer(self, seq: int, timeout: float | None = None, *, take: bool = True) -> tuple[int, T | None]:
        """Wait until an item newer than ``seq`` arrives (or ``timeout``/close).

        ``take=True`` marks the item consumed (the slot's main consumer, whose misses count as drops); a side consumer
        that may skip items by design (the AI worker) passes ``take=False``. On timeout or close the returned sequence
        number is not newer than ``seq``.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq or self.closed, timeout)
            if take and self._seq > seq:
                self._taken = True
            return self._seq, self._item

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
