"""Scheduling policies: the order in which requests are served and preempted."""

from __future__ import annotations

from dataclasses import dataclass

from tokenyard.sched.request import Request


@dataclass(frozen=True)
class Policy:
    name: str
    # A waiting request may preempt a less urgent running one.
    preempts_for_waiting: bool
    # Swapped and waiting requests are admitted in one policy order (else swapped ones first).
    merge_swapped_and_waiting: bool

    def key(self, req: Request, seq: int) -> tuple:
        """Smaller key = served first, preempted last."""
        if self.name == "priority":
            return (req.priority, req.arrival_time, seq)
        return (req.arrival_time, seq)


POLICIES = {
    "fcfs": Policy("fcfs", preempts_for_waiting=False, merge_swapped_and_waiting=False),
    "priority": Policy("priority", preempts_for_waiting=True, merge_swapped_and_waiting=True),
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"scheduling_policy must be one of {sorted(POLICIES)}, got {name!r}") from None
