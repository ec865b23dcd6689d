"""``fcfs`` and ``priority``: one queue kept sorted by a key that changes only through ``set_priority``."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from tokenyard.invariants import require
from tokenyard.sched.accounting import ServiceLedger
from tokenyard.sched.policy import SchedulingPolicy, remove_sorted
from tokenyard.sched.request import Request


class _SortedQueuePolicy(SchedulingPolicy):
    def __init__(self, ledger: ServiceLedger | None = None) -> None:
        super().__init__(ledger)
        self._queue: list[Request] = []
        self._ids: set[str] = set()

    def push(self, req: Request, *, arrival: bool = False) -> None:
        require(req.request_id not in self._ids, f"request {req.request_id} queued twice")
        bisect.insort(self._queue, req, key=self.urgency)
        self._ids.add(req.request_id)

    def remove(self, req: Request) -> None:
        remove_sorted(self._queue, req, self.urgency, f"the {self.name} queue")
        self._ids.discard(req.request_id)

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def queued(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, req: Request) -> bool:
        return req.request_id in self._ids

    def check(self) -> None:
        keys = [self.urgency(r) for r in self._queue]
        require(keys == sorted(keys), f"the {self.name} queue is out of order")
        require(self._ids == {r.request_id for r in self._queue}, f"the {self.name} queue's id set disagrees")


class FCFSPolicy(_SortedQueuePolicy):
    """First come, first served; the latest arrival is preempted first; nothing queued preempts."""

    name = "fcfs"

    def urgency(self, req: Request) -> tuple:
        return (req.arrival_time, self.seq(req))


class PriorityPolicy(_SortedQueuePolicy):
    """Lower ``priority`` first, then arrival. A queued request preempts a running one of a worse priority."""

    name = "priority"
    uses_priority = True

    def urgency(self, req: Request) -> tuple:
        return (req.priority, req.arrival_time, self.seq(req))

    def may_preempt(self, candidate: Request, victim: Request) -> bool:
        return candidate.priority < victim.priority
