"""Scheduling decisions (pure Python, no torch): requests, policies, the token-budget step."""

from tokenyard.sched.output import ScheduledChunk, SchedulerOutput
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig

__all__ = ["Request", "RequestStatus", "ScheduledChunk", "Scheduler", "SchedulerConfig", "SchedulerOutput"]
