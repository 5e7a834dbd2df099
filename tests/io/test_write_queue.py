"""WriteQueue: calls in order in one thread, throttled by images, failures raised in the caller."""

from __future__ import annotations

import threading

import pytest

from spread_dials.io.write_queue import WriteQueue


def test_write_queue_order_throttle_and_failure():
    seen = []
    gate = threading.Event()
    queue = WriteQueue(threaded=True)
    queue.call(gate.wait)
    for i in range(3):
        queue.call(seen.append, i, image=True)
    assert seen == []
    gate.set()
    queue.throttle(1)  # at most 0 images pending afterwards
    assert seen == [0, 1, 2]
    queue.call(lambda: 1 / 0)
    queue.call(seen.append, 99, image=True)  # skipped after the failure
    with pytest.raises(ZeroDivisionError):
        queue.drain()
    assert seen == [0, 1, 2] and queue.wait_seconds >= 0
    queue.close()
    serial = WriteQueue(threaded=False)
    serial.call(seen.append, 5, image=True)
    assert seen[-1] == 5
