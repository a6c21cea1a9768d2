"""Latest frame wins: the one-slot buffer and the grabber under a slow consumer."""
from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sonomaly.stream.frame import Frame, now_ns
from sonomaly.stream.grabber import Grabber
from sonomaly.stream.slot import LatestSlot


class CountingSource:
    """A generated source delivering frames as fast as asked (``interval_s`` apart)."""

    uri = "test:counting"
    fps = None

    def __init__(self, n: int, interval_s: float = 0.0) -> None:
        self.n, self.interval_s, self.i = n, interval_s, 0
        self.closed = threading.Event()

    def open(self) -> None:
        pass

    def read(self):
        if self.i >= self.n or self.closed.is_set():
            return None
        if self.interval_s:
            time.sleep(self.interval_s)
        f = Frame(self.i, now_ns(), np.full((8, 8, 3), self.i % 256, np.uint8), {"fps": None})
        self.i += 1
        return f

    def close(self) -> None:
        self.closed.set()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["put", "take"]), max_size=60))
def test_slot_counts_every_overwritten_item_as_dropped(ops):
    slot: LatestSlot[int] = LatestSlot()
    seq = 0
    puts = takes = 0
    pending = False
    expected_drops = 0
    for op in ops:
        if op == "put":
            if pending:
                expected_drops += 1
            puts += 1
            slot.put(puts)
            pending = True
        else:
            new_seq, item = slot.get_newer(seq, timeout=0)
            if pending:
                assert new_seq > seq and item == puts  # always the newest
                takes += 1
                pending = False
            else:
                assert new_seq == seq
            seq = new_seq
    assert slot.dropped == expected_drops
    assert takes + slot.dropped + (1 if pending else 0) == puts


def test_side_consumer_does_not_count_as_taking():
    slot: LatestSlot[int] = LatestSlot()
    slot.put(1)
    seq, item = slot.get_newer(0, timeout=0, take=False)
    assert (seq, item) == (1, 1)
    slot.put(2)
    assert slot.dropped == 1  # the main consumer never saw item 1


def test_get_newer_wakes_on_close():
    slot: LatestSlot[int] = LatestSlot()
    t = threading.Timer(0.05, slot.close)
    t.start()
    t0 = time.monotonic()
    seq, item = slot.get_newer(0, timeout=5)
    assert seq == 0 and item is None and time.monotonic() - t0 < 1


def test_grabber_keeps_only_the_newest_frame_under_a_slow_consumer():
    src = CountingSource(n=400, interval_s=0.001)
    g = Grabber(src).start()
    seen = []
    seq = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not g.ended:
        seq, frame = g.slot.get_newer(seq, timeout=0.2)
        if frame is not None:
            seen.append(frame.id)
            # the consumer got the newest frame there was: nothing older waits in a queue
            assert frame.id >= src.i - 2
            assert "grab" in frame.stages
        time.sleep(0.02)  # slow consumer: 50 fps against a ~1000 fps source
    g.stop()
    assert g.ended and g.frames_in == 400
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    # every frame was either taken or counted as dropped (the last may still sit in the slot)
    assert len(seen) + g.dropped in (400, 399)
    assert g.dropped > 300


def test_grabber_survives_a_source_that_raises():
    class Flaky(CountingSource):
        def read(self):
            if self.i == 3:
                self.i += 1
                raise OSError("device hiccup")
            return super().read()

    g = Grabber(Flaky(n=10), retry_s=0.01).start()
    deadline = time.monotonic() + 3
    while not g.ended and time.monotonic() < deadline:
        time.sleep(0.01)
    g.stop()
    assert g.ended and g.errors == 1 and "device hiccup" in g.last_error and g.frames_in == 9
