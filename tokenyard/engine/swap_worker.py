"""Runs KV transfers off the step's critical path.

The scheduler hands out transfers that it does not need finished before the next forward pass (a swap-in
whose request computes only once the copy has landed; a swap-out whose device blocks stay pinned until then).
This worker copies them while the model runs and reports which are done; the scheduler learns of them through
the step's result, and only then lets the blocks go or the request run.

- On CPU: one thread working through a FIFO queue. torch releases the GIL inside ``copy_``, so the copy runs
  beside the forward pass (on 2 cores the two share cores and memory bandwidth; see the README's numbers).
- On CUDA: copies are queued on a side stream from pinned host memory with ``non_blocking=True`` and an event
  per transfer; a transfer is done when its event is.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

import torch

from tokenyard.engine.kv_store import KVStore, Segment


class SwapWorker:
    def __init__(self, store: KVStore) -> None:
        self.store = store
        self._cuda = store.device.type == "cuda"
        self._pending: dict[int, object] = {}   # transfer id -> CUDA event (CUDA) or None (CPU, queued)
        self._done: list[int] = []
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._jobs: queue.SimpleQueue[tuple[int, list[Segment], bool]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if self._cuda:
            self._stream = torch.cuda.Stream(device=store.device)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, transfer_id: int, segments: list[Segment], to_host: bool) -> None:
        if self._cuda:
            compute = torch.cuda.current_stream(self.store.device)
            with torch.cuda.stream(self._stream):
                self._stream.wait_stream(compute)   # a swap-out reads what earlier kernels wrote
                self.store.copy(segments, to_host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._pending[transfer_id] = event
            return
        if self._thread is None:   # a daemon: it idles on the queue until the process exits
            self._thread = threading.Thread(target=self._run, name="tokenyard-swap", daemon=True)
            self._thread.start()
        self._pending[transfer_id] = None
        self._jobs.put((transfer_id, segments, to_host))

    def poll(self, block: bool = False) -> list[int]:
        """Transfers finished since the last poll. ``block``: wait until at least one is (if any is pending)."""
        if self._cuda:
            done = [tid for tid, ev in self._pending.items() if ev.query()]
            if block and not done and self._pending:
                tid, ev = next(iter(self._pending.items()))
                ev.synchronize()
                done = [tid]
        else:
            with self._cond:
                if block:
                    self._cond.wait_for(lambda: self._done or self._error is not None or not self._pending)
                self._raise_if_failed()
                done, self._done = self._done, []
        for tid in done:
            self._pending.pop(tid, None)
        return done

    def wait(self, transfer_ids: Iterable[int]) -> None:
        """Block until these transfers have landed (they still come out of the next ``poll``)."""
        ids = [t for t in transfer_ids if t in self._pending]
        if not ids:
            return
        if self._cuda:
            for t in ids:
                self._pending[t].synchronize()
            return
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or all(t in self._done for t in ids))
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"KV swap copy failed: {self._error!r}") from self._error

    def _run(self) -> None:
        while True:
            tid, segments, to_host = self._jobs.get()
            try:
                self.store.copy(segments, to_host)
            except BaseException as e:  # noqa: BLE001 - reported to the engine loop on its next poll
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._done.append(tid)
                self._cond.notify_all()
