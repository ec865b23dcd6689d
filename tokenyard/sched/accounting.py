"""Per-tenant service accounting (VTC's cost model). Pure Python, no torch.

Service is ``w_p`` per prompt token and ``w_q`` per output token. A tenant's *virtual counter* is its
service divided by its weight, plus whatever VTC's lift added; every policy keeps the ledger (so
``/metrics`` shows per-tenant service under ``fcfs`` too), only ``vtc`` orders requests by it.

When is a request charged? Its whole prompt at its first admission (as in the VTC paper, so a tenant's
counter reflects work it has been given, not only work already done), and ``w_q`` for each chunk that will
sample an output token. A request recomputed after a preemption is not charged again for its prompt, and its
old output tokens are never re-sampled, so nothing is charged twice. Charges made while scheduling a step
are refunded if that step's work for the request is rolled back (it was picked as a preemption victim).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from tokenyard.sched.request import Request


class Charge(NamedTuple):
    """What one scheduled chunk cost its tenant, enough to undo it exactly."""

    tenant: str
    cost: float
    prompt_before: int  # the request's charged prompt tokens before this charge


# What a decode's charge returns: ``w_q`` to its request's tenant, the prompt charged already (the common case
# needs no object of its own; ``refund`` knows what it stands for).
DECODE_CHARGE = Charge("", 0.0, -1)

EVICTED = "(evicted)"   # tenant_stats() key for the summed service of tenants forgotten while idle


class ServiceLedger:
    """Service and virtual counter per tenant. Tenants come from a free-form API field, so the ledger keeps at
    most ``max_tenants``: past that, the idle tenants (no live request) with the smallest counters are forgotten
    (their service is kept in one sum for the metrics). VTC loses nothing by it: a tenant that comes back is
    lifted to the backlogged tenants' counters anyway; one that had been served more than them is forgiven."""

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0, tenant_weights: Mapping[str, float] | None = None,
                 max_tenants: int = 10_000) -> None:
        if not (w_p >= 0 and w_q >= 0 and w_p + w_q > 0):
            raise ValueError(f"vtc_w_p and vtc_w_q must be >= 0 and not both 0, got {w_p} and {w_q}")
        weights = dict(tenant_weights or {})
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and w > 0):
                raise ValueError(f"tenant weight of {name!r} must be a positive number, got {w!r}")
        self.w_p = float(w_p)
        self.w_q = float(w_q)
        self.tenant_weights = weights
        self.service: dict[str, float] = {}   # weighted tokens served, w_p * prompt + w_q * output
        self.counter: dict[str, float] = {}   # virtual counter: service / weight, plus lifts
        self._prompt_charged: dict[str, int] = {}
        self.live: dict[str, int] = {}        # tenants with unfinished requests -> how many
        self.max_tenants = max_tenants
        self.evicted_service = 0.0

    def enter(self, tenant: str) -> None:
        """A request of ``tenant`` arrived."""
        self.ensure(tenant)
        self.live[tenant] = self.live.get(tenant, 0) + 1
        if len(self.counter) > self.max_tenants:
            self._forget_idle_tenants()

    def leave(self, tenant: str) -> None:
        """A request of ``tenant`` finished."""
        left = self.live.get(tenant, 0) - 1
        if left > 0:
            self.live[tenant] = left
        else:
            self.live.pop(tenant, None)

    def _forget_idle_tenants(self) -> None:
        idle = sorted((t for t in self.counter if t not in self.live), key=self.counter.__getitem__)
        for t in idle[: max(len(self.counter) - self.max_tenants * 3 // 4, 0)]:
            self.evicted_service += self.service.pop(t)
            del self.counter[t]

    def tenant_stats(self) -> dict[str, tuple[float, float]]:
        """Per tenant (service, virtual counter); forgotten tenants' service summed under ``EVICTED``."""
        out = {t: (self.service[t], self.counter[t]) for t in self.service}
        if self.evicted_service:
            out[EVICTED] = (self.evicted_service, 0.0)
        return out

    def weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, 1.0)

    def ensure(self, tenant: str) -> None:
        if tenant not in self.counter:
            self.counter[tenant] = 0.0
            self.service[tenant] = 0.0

    def charge(self, req: Request, start: int, num_tokens: int, sample: bool) -> Charge | None:
        """Charge the tenant for a chunk scheduled this step; returns what to pass to :meth:`refund`."""
        before = self._prompt_charged.get(req.request_id, 0)
        new_prompt = req.num_prompt_tokens - before
        if new_prompt > 0:
            cost = self.w_p * new_prompt + (self.w_q if sample else 0.0)
            self._prompt_charged[req.request_id] = before + new_prompt
        elif sample:
            cost = self.w_q   # the common case: a decode
        else:
            return None
        tenant = req.tenant
        if tenant not in self.counter:
            self.ensure(tenant)
        self.service[tenant] += cost
        self.counter[tenant] += cost / self.tenant_weights.get(tenant, 1.0)
        return DECODE_CHARGE if new_prompt <= 0 else Charge(tenant, cost, before)

    def refund(self, req: Request, charge: Charge | None) -> None:
        if charge is None:
            return
        if charge is DECODE_CHARGE:
            tenant, cost = req.tenant, self.w_q
        else:
            tenant, cost = charge.tenant, charge.cost
            self._prompt_charged[req.request_id] = charge.prompt_before
        self.service[tenant] -= cost
        self.counter[tenant] -= cost / self.weight(tenant)

    def lift(self, tenant: str, floor: float) -> None:
        """VTC: raise an idle tenant's counter so it earns no credit for having been idle."""
        self.ensure(tenant)
        if self.counter[tenant] < floor:
            self.counter[tenant] = floor

    def adopt(self, req: Request) -> None:
        """A request migrated in from another instance, which charged its prompt: not charged for it again."""
        self._prompt_charged[req.request_id] = req.num_prompt_tokens

    def forget(self, req: Request) -> None:
        self._prompt_charged.pop(req.request_id, None)
