"""The input side of :func:`jgoat.fit`: batches produced and placed on the device ahead of the step that needs them.

:class:`Prefetcher` runs ``batches(step)`` and the device placement (``jax.device_put`` to the default device, or
:func:`jgoat.sharding.place_batch` on a mesh) for the next `depth` steps in one background thread, in step order,
while the jitted step runs. The loop takes them in order and records how long it waited for each
(:attr:`Prefetcher.waits`): in steady state, with the step slower than the input work, that wait is ~0.

Why a thread and memory-mapped arrays rather than grain (or ``datasets`` streaming):

- jgoat's batches are already a pure function of the step index (:func:`jgoat.data.batch_indices` over arrays; the
  image task decodes per batch), which is what makes a SIGKILL-resume bit-identical. A prefetcher that calls that
  same function ahead of time keeps the property for free: a resumed run prefetches from its resume step.
  Grain would re-express the sampler, the shuffle and the checkpointed iterator position in its own terms: one
  more source of truth for the order, and a new dependency, for no gain here.
- The host RAM of the data is bounded by the tokenised arrays living on disk (:mod:`jgoat.data` caches them as
  uncompressed ``.npz`` read as ``np.memmap``): a batch reads its own rows, the page cache holds the rest, so RSS
  does not grow with the dataset (BENCHMARKS.md, "Input pipeline").
- The work per batch is a row gather from the mapped arrays (~1 ms) or, for images, a decode and resize (PIL
  decodes outside the GIL) plus a host→device copy; one thread hides it behind the step (measured: the loop's wait
  per step 0.04 ms with prefetching, against 0.9 ms for token rows and 120-160 ms for 8 JPEGs without). Grain's
  worker processes would pay off where per-example Python work outgrows a step, which is not the case here.

The thread is a daemon and is always joined: :meth:`Prefetcher.close` (the context manager's exit) stops it on
any exit of the loop, normal or not (an exception, ``KeyboardInterrupt``, :class:`jgoat.errors.NonFiniteError`).
An exception raised while producing the batch of step s is raised again, the same object, when the loop asks for
step s, so the error a bad batch gives is the one the synchronous loop gave, at the same step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_POLL_S = 0.05  # how often a blocked producer checks whether it was stopped


class Prefetcher:
    """``(host_batch, device_batch)`` of steps ``start, start + 1, ...`` (up to `stop`), `depth` of them produced
    ahead by a background thread; ``depth=0``: produced on demand in the caller's thread (no thread at all).

    `produce(step)` is the host batch of a step; `place(host_batch)` puts it on the device(s). Use as a context
    manager (or call :meth:`close`) so the thread is stopped and joined whatever happens in the loop.
    """

    def __init__(self, produce: Callable[[int], Any], place: Callable[[Any], Any], start: int, stop: int, *,
                 depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._produce, self._place, self._next, self._stop_step, self.depth = produce, place, start, stop, depth
        self.waits: list[float] = []  # seconds the loop waited for each batch it took
        self._thread: threading.Thread | None = None
        if depth:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._stopped = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(start,), name="jgoat-prefetch", daemon=True)
            self._thread.start()

    def _one(self, step: int) -> tuple[Any, Any]:
        host = self._produce(step)
        return host, self._place(host)

    def _run(self, start: int) -> None:
        for step in range(start, self._stop_step):
            try:
                item = (self._one(step), None)
            except BaseException as err:  # noqa: BLE001  (handed to the loop, which raises it at this step)
                item = (None, err)
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._stopped.is_set() or item[1] is not None:
                return

    def next(self) -> tuple[Any, Any]:
        """The next step's ``(host_batch, device_batch)``; raises what producing it raised."""
        step, self._next = self._next, self._next + 1
        if step >= self._stop_step:
            raise IndexError(f"step {step} is past the last prefetched step {self._stop_step - 1}")
        t0 = time.perf_counter()
        if not self.depth:
            try:
                return self._one(step)
            finally:
                self.waits.append(time.perf_counter() - t0)
        item, err = self._queue.get()  # one producer, a FIFO queue: the order is the step order
        self.waits.append(time.perf_counter() - t0)
        if err is not None:
            raise err
        return item

    def close(self) -> None:
        """Stop the producer and wait for it (it finishes at most the batch it is producing)."""
        if self._thread is None:
            return
        self._stopped.set()
        while self._thread.is_alive():
            try:  # make room so a producer blocked on a full queue sees the stop
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
