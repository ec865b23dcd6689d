"""Virtual Token Counter fair share (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24).

Each tenant has a counter (``ServiceLedger.counter``): the service it was given (``w_p`` per prompt token,
``w_q`` per output token) divided by its weight. Admission takes the oldest queued request of the tenant with
the smallest counter. A tenant with nothing queued that gets a new request has its counter lifted to the
smallest counter among the tenants with queued requests (or, when none has, to the counter of the last
tenant whose queue emptied), so time spent idle earns no credit. Two tenants that stay backlogged then
differ in service by at most ``2 * max(w_p * L_input, w_q * M)`` (L_input: the longest prompt, M: the
tokens the KV cache holds).

``vtc+priority`` keeps one such fair share per priority band: the most urgent band with queued requests
goes first, and a queued request may preempt a running request of a less urgent band. Plain ``vtc`` never
preempts for a queued request (counters cross every step; preempting on each crossing would thrash); a
victim for lack of blocks is the latest request of the tenant with the largest counter.

Victim keys use the counters as they were when the step began (recorded lazily, before a tenant's first
charge in the step), so one step's preemption decisions agree with each other even though the step charges.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from tokenyard.invariants import require
from tokenyard.sched.accounting import Charge, ServiceLedger
from tokenyard.sched.policy import SchedulingPolicy, remove_sorted
from tokenyard.sched.request import Request


class VTCPolicy(SchedulingPolicy):
    name = "vtc"
    banded = False

    def __init__(self, ledger: ServiceLedger | None = None) -> None:
        super().__init__(ledger)
        # band -> tenant -> that tenant's queued requests, oldest first
        self._bands: dict[int, dict[str, list[Request]]] = {}
        self._ids: set[str] = set()
        self._num_queued: dict[str, int] = {}   # tenants with queued requests -> how many
        self._last_left: str | None = None
        self._frozen: dict[str, float] = {}

    # ----------------------------------------------------------------- keys
    def _band(self, req: Request) -> int:
        return req.priority if self.banded else 0

    def _fifo(self, req: Request) -> tuple:
        return (req.arrival_time, self.seq(req))

    def urgency(self, req: Request) -> tuple:
        counter = self._frozen.get(req.tenant)
        if counter is None:
            counter = self.ledger.counter.get(req.tenant, 0.0)
        return (self._band(req), counter, req.arrival_time, self.seq(req))

    def may_preempt(self, candidate: Request, victim: Request) -> bool:
        return self.banded and candidate.priority < victim.priority

    def begin_step(self) -> None:
        self._frozen = {}   # filled lazily: a tenant's counter as it was before its first charge this step

    def charge(self, req: Request, start: int, num_tokens: int, sample: bool) -> Charge | None:
        if req.tenant not in self._frozen:
            self._frozen[req.tenant] = self.ledger.counter.get(req.tenant, 0.0)
        return super().charge(req, start, num_tokens, sample)

    # ----------------------------------------------------------------- the queue
    def push(self, req: Request, *, arrival: bool = False) -> None:
        require(req.request_id not in self._ids, f"request {req.request_id} queued twice")
        tenant = req.tenant
        if arrival and tenant not in self._num_queued:
            self._lift(tenant)
        fifo = self._bands.setdefault(self._band(req), {}).setdefault(tenant, [])
        bisect.insort(fifo, req, key=self._fifo)
        self._ids.add(req.request_id)
        self._num_queued[tenant] = self._num_queued.get(tenant, 0) + 1

    def _lift(self, tenant: str) -> None:
        counters = self.ledger.counter
        if self._num_queued:
            self.ledger.lift(tenant, min(counters[t] for t in self._num_queued))
        elif self._last_left is not None and self._last_left != tenant and self._last_left in counters:
            self.ledger.lift(tenant, counters[self._last_left])

    def remove(self, req: Request) -> None:
        band_key = self._band(req)
        band = self._bands.get(band_key, {})
        fifo = band.get(req.tenant, [])
        remove_sorted(fifo, req, self._fifo, f"the {self.name} queue")
        if not fifo:
            del band[req.tenant]
            if not band:
                del self._bands[band_key]
        self._ids.discard(req.request_id)
        left = self._num_queued[req.tenant] - 1
        if left:
            self._num_queued[req.tenant] = left
        else:
            del self._num_queued[req.tenant]
            self._last_left = req.tenant

    def peek(self) -> Request | None:
        if not self._bands:
            return None
        band = self._bands[min(self._bands)]
        counters = self.ledger.counter
        tenant = min(band, key=lambda t: (counters[t], self._fifo(band[t][0])))
        return band[tenant][0]

    def queued(self) -> Iterator[Request]:
        for band in self._bands.values():
            for fifo in band.values():
                yield from fifo

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, req: Request) -> bool:
        return req.request_id in self._ids

    def check(self) -> None:
        counts: dict[str, int] = {}
        ids: set[str] = set()
        for b, band in self._bands.items():
            require(band, f"empty band {b} kept in the {self.name} queue")
            for tenant, fifo in band.items():
                require(fifo, f"empty queue of tenant {tenant!r} kept")
                keys = [self._fifo(r) for r in fifo]
                require(keys == sorted(keys), f"tenant {tenant!r}'s queue is out of order")
                for r in fifo:
                    require(r.tenant == tenant and self._band(r) == b, f"request {r.request_id} in the wrong queue")
                    ids.add(r.request_id)
                counts[tenant] = counts.get(tenant, 0) + len(fifo)
        require(ids == self._ids, f"the {self.name} queue's id set disagrees with its queues")
        require(counts == self._num_queued, f"the {self.name} queue's per-tenant counts disagree")


class VTCPriorityPolicy(VTCPolicy):
    """Priority bands (lower first), VTC fair share inside a band; a better band preempts a worse one."""

    name = "vtc+priority"
    banded = True
    uses_priority = True
