"""Which running requests to move, and where (Llumnix's migration policy); when to add or drain an instance.
Pure Python.

Migration pairs the least free instances with the freest ones. A source is an instance being drained, or one
whose freeness fell below ``low`` (its queue head cannot start, or its requests are about to run out of
blocks); a destination is one whose freeness is at least ``gap`` above the source's. From a source it moves the
least urgent running request first and, among those, the one with the fewest blocks (the cheapest copy).

Auto-scaling keeps the average freeness in a band: below ``low`` for a while, add an instance; above ``high``
with more than ``min_instances``, drain the instance with the fewest requests (its requests migrate away, then
it stops).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tokenyard.cluster.load import InstanceLoad, freeness


@dataclass(frozen=True)
class Move:
    src: str
    dst: str
    request_id: str
    num_blocks: int


def plan_migrations(loads: Sequence[InstanceLoad], *, low: float = 4.0, gap: float = 8.0,
                    priority_headroom: int = 0, busy: Collection[str] = (),
                    max_moves: int = 1) -> list[Move]:
    """Up to ``max_moves`` moves, one per source/destination pair; ``busy``: requests already migrating."""
    free = {x.instance_id: freeness(x, priority_headroom) for x in loads}
    srcs = sorted((x for x in loads if x.running and (x.draining or free[x.instance_id] < low)),
                  key=lambda x: free[x.instance_id])
    dsts = sorted((x for x in loads if not x.draining), key=lambda x: free[x.instance_id], reverse=True)
    moves: list[Move] = []
    used: set[str] = set()
    for src in srcs:
        if len(moves) >= max_moves:
            break
        cands = [r for r in src.running if r.request_id not in busy]
        if not cands:
            continue
        req = max(cands, key=lambda r: (r.priority, -r.num_blocks))
        for dst in dsts:
            if dst.instance_id in used or dst.instance_id == src.instance_id:
                continue
            f_src, f_dst = free[src.instance_id], free[dst.instance_id]
            room = dst.num_blocks - dst.used_blocks - dst.pending_blocks - dst.head_demand_blocks
            if (math.isinf(f_src) or f_dst - f_src >= gap) and room >= req.num_blocks + 1:
                moves.append(Move(src.instance_id, dst.instance_id, req.request_id, req.num_blocks))
                used.update((src.instance_id, dst.instance_id))
                break
    return moves


@dataclass
class AutoScaler:
    low: float = 2.0
    high: float = 64.0
    min_instances: int = 1
    max_instances: int = 4
    patience: int = 3            # decisions in a row outside the band before acting

    def __post_init__(self) -> None:
        if not (self.low < self.high and 1 <= self.min_instances <= self.max_instances):
            raise ValueError("autoscaling needs low < high and 1 <= min_instances <= max_instances")
        self._below = self._above = 0

    def decide(self, loads: Sequence[InstanceLoad], starting: int = 0) -> tuple[int, str | None]:
        """``(+1, None)`` to start an instance, ``(-1, instance)`` to drain one, else ``(0, None)``. ``starting``:
        instances being started (counted, so a slow start does not start more)."""
        live = [x for x in loads if not x.draining]
        if not live:
            return 0, None
        avg = sum(freeness(x) for x in live) / len(live)
        self._below = self._below + 1 if avg < self.low else 0
        self._above = self._above + 1 if avg > self.high and not any(x.num_waiting for x in live) else 0
        n = len(live) + starting
        if self._below >= self.patience and n < self.max_instances and not starting:
            self._below = 0
            return 1, None
        if self._above >= self.patience and n > self.min_instances and not starting:
            self._above = 0
            return -1, min(live, key=lambda x: (x.num_requests, x.used_blocks)).instance_id
        return 0, None
