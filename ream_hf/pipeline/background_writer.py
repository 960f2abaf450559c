"""`BackgroundWriter`: threads that write files while the compute thread goes on, with a bound on the bytes
waiting for the disk and commits that run only after everything submitted before them."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

WRITER_PENDING_BYTES = 2 * 2**30  # BackgroundWriter's default bound on host copies waiting for the disk


class BackgroundWriter:
    """Threads that write files while the compute thread goes on, so a GPU never waits for the disk. Writes run
    in parallel (`workers`), except those submitted with `after_all=True` (a commit), which start once everything
    submitted before them is done. At most `max_pending_bytes` of submitted data wait at once (a submit beyond
    that waits for the oldest). A failed write is raised by the next `submit` or `flush` (the first failure, e.g.
    the OSError of a full disk, whichever write noticed it), and no later commit runs: nothing may be recorded as
    done after something it depends on failed."""

    def __init__(self, max_pending_bytes: int = WRITER_PENDING_BYTES, workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ream-writer")
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()
        self._pending_bytes = 0
        self._error: BaseException | None = None  # the first failure
        self._lock = threading.Lock()
        self.max_pending_bytes = max_pending_bytes
        self.busy_seconds = 0.0  # the writes' own time, summed over threads
        self.waited_seconds = 0.0  # the submitting thread's time blocked on the bound and in flush

    def _run(self, task: Callable[[], Any], earlier: list[Future]) -> Any:
        try:
            for future in earlier:  # submitted (so dequeued by a worker) before this one: no deadlock
                future.result()
            if self._error is not None:
                raise RuntimeError("skipped: an earlier background write failed")
            started = time.perf_counter()
            try:
                return task()
            finally:
                with self._lock:
                    self.busy_seconds += time.perf_counter() - started
        except BaseException as error:
            with self._lock:
                self._error = self._error or error
            raise

    def submit(self, task: Callable[[], Any], nbytes: int = 0, after_all: bool = False) -> Future:
        self._retire(lambda: self._pending and self._pending_bytes + nbytes > self.max_pending_bytes)
        earlier = [future for future, _ in self._pending] if after_all else []
        future = self._pool.submit(self._run, task, earlier)
        self._pending.append((future, nbytes))
        self._pending_bytes += nbytes
        return future

    def flush(self) -> None:
        """Wait for every submitted write."""
        self._retire(lambda: self._pending)

    def _retire(self, keep_waiting: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            self._retire_pending(keep_waiting)
        finally:
            self.waited_seconds += time.perf_counter() - started

    def _retire_pending(self, keep_waiting: Callable[[], Any]) -> None:
        while self._pending and (self._pending[0][0].done() or keep_waiting()):
            future, nbytes = self._pending[0]
            try:
                future.result()
            except BaseException:
                if self._error is not None:  # set before any future fails: the cause, not a write skipped for it
                    raise self._error from None
                raise
            finally:
                self._pending.popleft()
                self._pending_bytes -= nbytes

    def drain(self) -> None:
        """Wait for every submitted write without raising their failures: for a run ending on an error of its own,
        so that nothing writes into the work folder after it (a commit submitted before the error still lands)."""
        started = time.perf_counter()
        wait([future for future, _ in self._pending])
        self._pending.clear()
        self._pending_bytes = 0
        self.waited_seconds += time.perf_counter() - started

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
