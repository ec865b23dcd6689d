"""Which instance a new request goes to. Pure Python (the simulator runs the same policies).

- ``round-robin``: in turn, blind to load.
- ``least-loaded``: the fewest requests (running, queued, and dispatched but not yet reported).
- ``freeness``: Llumnix: the highest freeness (see :mod:`tokenyard.cluster.load`).
- ``prefix``: the instance that last served the same prompt prefix (its prefix cache likely holds it), unless
  that instance is loaded well beyond the least-loaded one (a hot prefix must not pile onto one instance); then,
  and for new prefixes, ``freeness``.

Instances being drained are never chosen.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tokenyard.cluster.load import InstanceLoad, freeness


@dataclass
class DispatchInfo:
    request_id: str
    num_prompt_tokens: int
    prefix_key: int | None = None   # a hash of the prompt's first tokens (prefix affinity)
    priority: int = 0


class NoInstanceError(RuntimeError):
    """No instance can take a request (all of them dead or being drained)."""


class DispatchPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, priority_headroom: int = 0) -> None:
        self.priority_headroom = priority_headroom

    def choose(self, loads: Sequence[InstanceLoad], req: DispatchInfo) -> str:
        live = [x for x in loads if not x.draining]
        if not live:
            raise NoInstanceError("no instance is available to take the request")
        return self._choose(live, req)

    @abstractmethod
    def _choose(self, loads: Sequence[InstanceLoad], req: DispatchInfo) -> str: ...

    def _freest(self, loads: Sequence[InstanceLoad]) -> str:
        return max(loads, key=lambda x: (freeness(x, self.priority_headroom, dispatch=True),
                                         -x.num_requests)).instance_id


class RoundRobin(DispatchPolicy):
    name = "round-robin"

    def __init__(self, priority_headroom: int = 0) -> None:
        super().__init__(priority_headroom)
        self._turn = itertools.count()
        self._ids: list[str] = []       # the instances last seen, and in id order
        self._ordered: list[str] = []

    def _choose(self, loads: Sequence[InstanceLoad], req: DispatchInfo) -> str:
        ids = [x.instance_id for x in loads]
        if ids != self._ids:   # sorted again only when the instances change
            self._ids, self._ordered = ids, sorted(ids)
        return self._ordered[next(self._turn) % len(ids)]


class LeastLoaded(DispatchPolicy):
    name = "least-loaded"

    def _choose(self, loads: Sequence[InstanceLoad], req: DispatchInfo) -> str:
        return min(loads, key=lambda x: (x.num_requests, x.used_blocks + x.pending_blocks)).instance_id


class Freeness(DispatchPolicy):
    name = "freeness"

    def _choose(self, loads: Sequence[InstanceLoad], req: DispatchInfo) -> str:
        return self._freest(loads)


class PrefixAffinity(DispatchPolicy):
    name = "prefix"

    def __init__(self, priority_headroom: int = 0, max_extra_requests: int = 4, max_prefixes: int = 100_000) -> None:
        super().__init__(priority_headroom)
        self.max_extra_requests = max_extra_requests
        self.max_prefixes = max_prefixes
        self._home: OrderedDict[int, str] = OrderedDict()   # prefix key -> instance that last served it (LRU)
        self.num_affinity_hits = 0

    def _choose(self, loads: Sequence[InstanceLoad], req: DispatchInfo) -> str:
        by_id = {x.instance_id: x for x in loads}
        home = self._home.get(req.prefix_key) if req.prefix_key is not None else None
        least = min(x.num_requests for x in loads)
        if home in by_id and by_id[home].num_requests <= least + self.max_extra_requests:
            choice = home
            self.num_affinity_hits += 1
        else:
            choice = self._freest(loads)
        if req.prefix_key is not None:
            self._home[req.prefix_key] = choice
            self._home.move_to_end(req.prefix_key)
            if len(self._home) > self.max_prefixes:
                self._home.popitem(last=False)
        return choice


DISPATCH_POLICIES: dict[str, type[DispatchPolicy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, Freeness, PrefixAffinity)
}


def make_dispatch(name: str, priority_headroom: int = 0) -> DispatchPolicy:
    try:
        return DISPATCH_POLICIES[name](priority_headroom)
    except KeyError:
        raise ValueError(f"dispatch policy {name!r} is not one of {sorted(DISPATCH_POLICIES)}") from None
