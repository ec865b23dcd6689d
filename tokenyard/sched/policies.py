"""Scheduling policies by name: ``fcfs``, ``priority``, ``vtc``, ``vtc+priority``."""

from __future__ import annotations

from tokenyard.sched.accounting import ServiceLedger
from tokenyard.sched.ordered import FCFSPolicy, PriorityPolicy
from tokenyard.sched.policy import SchedulingPolicy
from tokenyard.sched.vtc import VTCPolicy, VTCPriorityPolicy

POLICIES: dict[str, type[SchedulingPolicy]] = {
    cls.name: cls for cls in (FCFSPolicy, PriorityPolicy, VTCPolicy, VTCPriorityPolicy)
}
POLICY_NAMES = tuple(POLICIES)


def check_policy_name(name: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"scheduling_policy must be one of {', '.join(POLICY_NAMES)}; got {name!r}")


def uses_priority(name: str) -> bool:
    check_policy_name(name)
    return POLICIES[name].uses_priority


PRIORITY_POLICIES = tuple(n for n, cls in POLICIES.items() if cls.uses_priority)


def make_policy(name: str, ledger: ServiceLedger | None = None) -> SchedulingPolicy:
    check_policy_name(name)
    return POLICIES[name](ledger)
