"""One writer thread beside the simulation: calls run in order, the caller runs ahead, bounded.

The main thread (which drives the GPU) queues writer calls (open a container, store an image,
finish a container) and goes on simulating; :meth:`WriteQueue.throttle` caps how many images
may wait, so memory stays bounded.  After a call fails, later calls are skipped and the failure
is raised in the main thread at its next call.  Without a thread (``threaded=False``) each call
runs at once in the caller's thread: the serial path, same calls, same files.

Example::

    queue = WriteQueue(threaded=True)
    queue.call(writer.__enter__)
    for i, image in enumerate(images):
        queue.throttle(3)                                   # at most 2 images still waiting
        queue.call(writer.store, writer.prepare_image(i, image, 1.3), image=True)
    queue.call(writer.__exit__, None, None, None)
    queue.drain()
    queue.close()
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["WriteQueue"]


class WriteQueue:
    """Calls run in order in one writer thread (``threaded``) or at once in the caller's.

    Attributes:
        wait_seconds: time the caller spent blocked on the writer (throttle and drain).
    """

    def __init__(self, threaded: bool) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spread-write") if threaded else None
        self._pending: deque[tuple[Future, bool]] = deque()  # (future, is an image)
        self._failed = False
        self.wait_seconds = 0.0

    @property
    def threaded(self) -> bool:
        return self._executor is not None

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._failed:
            return None
        try:
            return fn(*args)
        except BaseException:
            self._failed = True
            raise

    def call(self, fn: Callable[..., Any], *args: Any, image: bool = False) -> None:
        """Run ``fn(*args)`` after every earlier call (at once, without a writer thread).

        Arguments:
            image: the call stores an image (counted by :meth:`throttle`).
        """
        if self._executor is None:
            fn(*args)
            return
        self._collect()
        self._pending.append((self._executor.submit(self._guarded, fn, *args), image))

    def _collect(self) -> None:
        """Drop finished calls from the front; raise the first failure."""
        while self._pending and self._pending[0][0].done():
            self._pending.popleft()[0].result()

    def throttle(self, images: int) -> None:
        """Wait until fewer than ``images`` image calls are pending."""
        t0 = time.perf_counter()
        self._collect()
        while sum(is_image for _, is_image in self._pending) >= images:
            self._pending.popleft()[0].result()
        self.wait_seconds += time.perf_counter() - t0

    def drain(self) -> None:
        """Wait for every call (raising the first failure)."""
        t0 = time.perf_counter()
        while self._pending:
            self._pending.popleft()[0].result()
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the writer thread: calls not started are dropped, a running one is waited for."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
