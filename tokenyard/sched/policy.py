"""The turn-level policy interface: whose request goes first, and who is preempted. Pure Python, no torch.

A policy owns the queued requests (waiting ones and swapped-out ones, in one queue: they compete in the
policy's order) and answers the scheduler's questions:

- ``peek()``: the queued request to admit next. The scheduler either admits it (and ``remove``s it) or stops
  admitting for this step, so a large request at the head is not starved by smaller ones behind it.
- ``urgency(req)``: a key, smaller = more urgent, comparable between queued and running requests and fixed for
  the length of a step. The victim of a preemption is the running request with the largest key.
- ``may_preempt(candidate, victim)``: whether a queued request may take a running one's place when it does not
  fit (only ever asked when the victim is less urgent than the candidate).
- ``charge``/``refund``: accounting for work scheduled in a step (refunded when that work is rolled back).
- ``set_priority``: a priority changed at runtime; the queue is re-ordered, the change counts from the next step.

``make_policy`` in ``tokenyard.sched.policies`` builds one by name.
"""

from __future__ import annotations

import bisect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

from tokenyard.invariants import InvariantError
from tokenyard.sched.accounting import Charge, ServiceLedger
from tokenyard.sched.request import Request


def remove_sorted(items: list[Request], req: Request, key: Callable[[Request], tuple], where: str) -> None:
    """Remove ``req`` from ``items`` (sorted by ``key``) in O(log n) to find it. A request that is not where its
    key puts it had its key changed behind the policy's back (not through set_priority): the list is unsorted."""
    i = bisect.bisect_left(items, key(req), key=key)
    if i >= len(items) or items[i] is not req:
        raise InvariantError(f"request {req.request_id} is not where its key puts it in {where} (out of order)")
    del items[i]


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    uses_priority: ClassVar[bool] = False   # does a request's priority change anything under this policy?

    def __init__(self, ledger: ServiceLedger | None = None) -> None:
        self.ledger = ledger or ServiceLedger()
        self._seq: dict[str, int] = {}
        self._counter = itertools.count()

    # ----------------------------------------------------------------- membership
    def register(self, req: Request) -> None:
        """A new request: give it its tie-breaking arrival sequence number."""
        self._seq[req.request_id] = next(self._counter)
        self.ledger.enter(req.tenant)

    def forget(self, req: Request) -> None:
        """The request finished (it is no longer queued)."""
        if self._seq.pop(req.request_id, None) is not None:
            self.ledger.leave(req.tenant)
        self.ledger.forget(req)

    def seq(self, req: Request) -> int:
        return self._seq[req.request_id]

    # ----------------------------------------------------------------- the queue
    @abstractmethod
    def push(self, req: Request, *, arrival: bool = False) -> None:
        """Queue a request (``arrival``: it is new, not coming back from a preemption)."""

    @abstractmethod
    def remove(self, req: Request) -> None:
        """Take a queued request out (admitted, aborted, or finished)."""

    @abstractmethod
    def peek(self) -> Request | None:
        """The queued request to admit next, or None when nothing is queued."""

    @abstractmethod
    def queued(self) -> Iterator[Request]:
        """Every queued request (in no particular order)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, req: Request) -> bool: ...

    # ----------------------------------------------------------------- turn decisions
    @abstractmethod
    def urgency(self, req: Request) -> tuple:
        """Smaller = more urgent. Fixed for the length of a step; unique per request (ends in its seq)."""

    def may_preempt(self, candidate: Request, victim: Request) -> bool:
        """May queued ``candidate`` preempt running ``victim`` (which is less urgent) to get in?"""
        return False

    def set_priority(self, req: Request, priority: int) -> None:
        queued = req in self
        if queued:
            self.remove(req)
        req.priority = priority
        if queued:
            self.push(req)

    # ----------------------------------------------------------------- accounting
    def begin_step(self) -> None:
        """Called once before each step's decisions (VTC freezes its counters for victim keys here)."""
        return None

    def charge(self, req: Request, start: int, num_tokens: int, sample: bool) -> Charge | None:
        return self.ledger.charge(req, start, num_tokens, sample)

    def refund(self, req: Request, charge: Charge | None) -> None:
        self.ledger.refund(req, charge)

    # ----------------------------------------------------------------- checks
    @abstractmethod
    def check(self) -> None:
        """Raise InvariantError if the queue's own structures disagree (e.g. out of order)."""
