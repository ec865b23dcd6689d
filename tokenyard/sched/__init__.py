"""Scheduling decisions (pure Python, no torch): requests, policies, the token-budget step."""

from tokenyard.invariants import InvariantError
from tokenyard.sched.accounting import ServiceLedger
from tokenyard.sched.output import ScheduledChunk, SchedulerOutput
from tokenyard.sched.policies import POLICY_NAMES, make_policy
from tokenyard.sched.policy import SchedulingPolicy
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig

__all__ = [
    "InvariantError", "POLICY_NAMES", "Request", "RequestStatus", "ScheduledChunk", "Scheduler", "SchedulerConfig",
    "SchedulerOutput", "SchedulingPolicy", "ServiceLedger", "make_policy",
]
