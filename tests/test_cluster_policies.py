"""Dispatch, migration and auto-scaling policies (pure Python), checked as properties over random cluster loads."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenyard.cluster.dispatch import DISPATCH_POLICIES, DispatchInfo, NoInstanceError, make_dispatch
from tokenyard.cluster.load import InstanceLoad, RequestLoad, freeness
from tokenyard.cluster.rebalance import AutoScaler, plan_migrations


@st.composite
def instance_loads(draw, min_size: int = 1) -> list[InstanceLoad]:
    n = draw(st.integers(min_size, 6))
    out = []
    for i in range(n):
        total = draw(st.integers(8, 200))
        running = []
        used = 0
        for j in range(draw(st.integers(0, 8))):
            b = draw(st.integers(1, 20))
            if used + b > total:
                break
            used += b
            running.append(RequestLoad(f"r{i}-{j}", b, draw(st.integers(-2, 2)), b * 16))
        out.append(InstanceLoad(
            f"i{i}", total, 16, used_blocks=used, num_running=len(running), num_waiting=draw(st.integers(0, 4)),
            head_demand_blocks=draw(st.integers(0, 40)), waiting_blocks=draw(st.integers(0, 80)), running=running,
            urgent_running=sum(r.priority < 0 for r in running), pending_requests=draw(st.integers(0, 2)),
            pending_blocks=draw(st.integers(0, 10)), draining=draw(st.booleans()) if i else False,
        ))
    return out


def test_freeness_follows_llumnix():
    x = InstanceLoad("a", 100, 16, used_blocks=40, num_running=4, head_demand_blocks=10, waiting_blocks=30,
                     urgent_running=1)
    assert freeness(x) == (100 - 50) / 4, "migration: the queue head's demand"
    assert freeness(x, dispatch=True) == (100 - 70) / 4, "dispatch: every queued request's demand"
    assert freeness(x, priority_headroom=6) == (100 - 56) / 4
    x.draining = True
    assert freeness(x) == -math.inf


@settings(max_examples=300, deadline=None)
@given(instance_loads(), st.sampled_from(sorted(DISPATCH_POLICIES)), st.integers(0, 3))
def test_dispatch_picks_a_live_instance_by_its_rule(loads, name, key):
    policy = make_dispatch(name)
    live = [x for x in loads if not x.draining]
    choice = policy.choose(loads, DispatchInfo("r", 64, prefix_key=key))
    assert choice in {x.instance_id for x in live}, "never a draining instance"
    chosen = next(x for x in loads if x.instance_id == choice)
    if name == "least-loaded":
        assert chosen.num_requests == min(x.num_requests for x in live)
    if name == "freeness":
        assert freeness(chosen, dispatch=True) == max(freeness(x, dispatch=True) for x in live)


def test_round_robin_cycles_and_no_instance_is_an_error():
    policy = make_dispatch("round-robin")
    loads = [InstanceLoad(f"i{i}", 10, 16) for i in range(3)]
    assert [policy.choose(loads, DispatchInfo("r", 1)) for _ in range(6)] == ["i0", "i1", "i2"] * 2
    with pytest.raises(NoInstanceError):
        policy.choose([InstanceLoad("i0", 10, 16, draining=True)], DispatchInfo("r", 1))
    with pytest.raises(ValueError, match="not one of"):
        make_dispatch("random")


def test_prefix_affinity_sticks_until_the_load_guard_trips():
    policy = make_dispatch("prefix")
    a, b = InstanceLoad("a", 100, 16), InstanceLoad("b", 100, 16, used_blocks=10, num_running=1)
    first = policy.choose([a, b], DispatchInfo("r1", 64, prefix_key=7))
    assert first == "a"    # the freest, for a new prefix
    b.used_blocks = 0      # now b is as free; the prefix still goes home to a
    a.num_running = 3
    assert policy.choose([a, b], DispatchInfo("r2", 64, prefix_key=7)) == "a"
    assert policy.num_affinity_hits == 1
    a.num_running = 10     # a is loaded well beyond b: the guard sends the hot prefix elsewhere
    assert policy.choose([a, b], DispatchInfo("r3", 64, prefix_key=7)) == "b"


@settings(max_examples=300, deadline=None)
@given(instance_loads(min_size=2), st.sets(st.sampled_from([f"r{i}-{j}" for i in range(6) for j in range(8)])))
def test_migration_moves_from_less_free_to_freer_and_the_least_urgent_request(loads, busy):
    moves = plan_migrations(loads, low=4.0, gap=8.0, busy=busy, max_moves=3)
    by_id = {x.instance_id: x for x in loads}
    ends = [m.src for m in moves] + [m.dst for m in moves]
    assert len(ends) == len(set(ends)), "an instance is in at most one move per round"
    for m in moves:
        src, dst = by_id[m.src], by_id[m.dst]
        assert not dst.draining and m.request_id not in busy
        assert src.draining or freeness(src) < 4.0
        assert src.draining or freeness(dst) - freeness(src) >= 8.0
        assert dst.num_blocks - dst.used_blocks - dst.pending_blocks - dst.head_demand_blocks > m.num_blocks
        moved = next(r for r in src.running if r.request_id == m.request_id)
        others = [r for r in src.running if r.request_id not in busy]
        assert moved.priority == max(r.priority for r in others), "the least urgent goes first"


def test_a_draining_instance_is_always_a_source():
    d = InstanceLoad("d", 100, 16, used_blocks=5, num_running=1, running=[RequestLoad("x", 5, 0, 70)],
                     draining=True)
    e = InstanceLoad("e", 100, 16)
    assert [(m.src, m.dst, m.request_id) for m in plan_migrations([d, e])] == [("d", "e", "x")]


def test_autoscaler_keeps_freeness_in_its_band():
    s = AutoScaler(low=2.0, high=50.0, min_instances=1, max_instances=3, patience=2)
    tight = [InstanceLoad("a", 10, 16, used_blocks=10, num_running=5, num_waiting=3)]
    assert s.decide(tight) == (0, None)
    assert s.decide(tight) == (1, None), "below the band twice: scale out"
    assert s.decide(tight, starting=1) == (0, None), "not again while one is starting"
    idle = [InstanceLoad("a", 1000, 16), InstanceLoad("b", 1000, 16, num_running=1, used_blocks=3)]
    assert s.decide(idle) == (0, None)
    assert s.decide(idle) == (-1, "a"), "above the band twice: drain the least loaded"
    with pytest.raises(ValueError):
        AutoScaler(low=5, high=1)
