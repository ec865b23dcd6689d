"""Turn-level scheduling, on the scheduler alone: no priority inversion, runtime priorities, VTC fair share."""

from __future__ import annotations

import pytest

from tokenyard.config import EngineConfig, parse_tenant_weights
from tokenyard.invariants import InvariantError
from tokenyard.kv.manager import KVCacheManager
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig

TOKEN = 7


def _sched(policy: str, blocks: int, block_size: int = 4, budget: int = 64, mode: str = "recompute",
           host: int = 0, **kw) -> Scheduler:
    kv = KVCacheManager(blocks, block_size, host, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, scheduling_policy=policy, preemption_mode=mode,
                                     **kw), kv)


def _step(sched: Scheduler):
    out = sched.schedule()
    sched.check_output(out)
    # Overlapped KV transfers land by the end of the step (as they do on CPU for these sizes).
    sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample},
                             [t.transfer_id for t in out.transfers if not t.blocking])
    sched.check_invariants()
    return out


def _req(rid: str, plen: int, max_tokens: int, t: float, priority: int = 0, tenant: str = "default") -> Request:
    return Request(rid, [3 + (i % 40) for i in range(plen)], max_tokens, priority=priority, tenant=tenant,
                   arrival_time=t)


# --------------------------------------------------------------------------- the two inversions the review found
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_urgent_request_mid_prefill_is_not_preempted_for_a_decoding_less_urgent_one(mode):
    """Review finding 1: the victim was picked only among requests not yet scheduled this step, so an urgent
    request mid-prefill was preempted (restarted from 0 in recompute mode) while a less urgent one decoded."""
    sched = _sched("priority", blocks=12, budget=8, mode=mode, host=64)
    sched.add_request(_req("low", 8, 30, t=0.0, priority=5))
    _step(sched)                                   # low: prefilled, now decoding
    sched.add_request(_req("urgent", 36, 4, t=1.0, priority=0))
    urgent = sched.requests["urgent"]
    low_preempted = False
    computed = 0
    while "urgent" in sched.requests and urgent.num_output_tokens == 0:
        out = _step(sched)
        assert "urgent" not in out.preempted, "the urgent request was preempted while a less urgent one kept blocks"
        assert urgent.num_computed_tokens >= computed, "the urgent request's prefill went backwards"
        computed = urgent.num_computed_tokens
        low_preempted |= "low" in out.preempted
    assert low_preempted, "the scenario must run out of blocks (the victim branch was not taken)"
    assert urgent.num_preemptions == 0


def test_rolled_back_victim_gives_back_its_budget_and_blocks():
    """The victim already got a decode chunk this step; preempting it removes that chunk, its budget and its
    new block, and the charge made for it."""
    sched = _sched("priority", blocks=6, block_size=4, budget=8)
    sched.add_request(_req("low", 4, 16, t=0.0, priority=5))
    _step(sched)                                   # low prefilled, decoding from now on
    sched.add_request(_req("hi", 16, 8, t=1.0, priority=1))
    low = sched.requests["low"]
    while "low" not in (out := sched.schedule()).preempted:
        sched.check_output(out)
        sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample})
        sched.check_invariants()
        assert low.status is RequestStatus.RUNNING
    sched.check_output(out)
    assert "low" not in {c.request_id for c in out.chunks}
    assert "low" in sched.last_preempted
    service_low = sched.ledger.service["default"]
    sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample})
    sched.check_invariants()                        # low holds no blocks, hi holds exactly its own
    assert low.status is RequestStatus.WAITING and low.num_computed_tokens == 0
    assert sched.ledger.service["default"] == service_low


@pytest.mark.parametrize("overlap", [False, True])
def test_urgent_swapped_request_preempts_a_less_urgent_running_one(overlap):
    """Review finding 2: only waiting[0] could preempt, so an urgent *swapped* request sat in swapped while a
    less urgent one decoded alone. Here the urgent one became urgent at runtime while swapped out."""
    sched = _sched("priority", blocks=10, block_size=4, budget=16, mode="swap", host=64, swap_overlap=overlap)
    sched.add_request(_req("a", 14, 20, t=0.0, priority=3))
    sched.add_request(_req("b", 14, 20, t=1.0, priority=3))
    for _ in range(40):
        out = _step(sched)
        if "b" in out.preempted:
            break
    b = sched.requests["b"]
    assert b.status is RequestStatus.SWAPPED, "b (the later arrival) must have been swapped out for lack of blocks"
    assert sched.set_priority("b", 0)
    out = sched.schedule()                          # within one step
    assert "a" in out.preempted and out.swap_in
    if overlap:   # b's copy overlaps this step; it computes from the next one
        assert b.status is RequestStatus.SWAPPING_IN and "b" not in {c.request_id for c in out.chunks}
        sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample},
                                 [t.transfer_id for t in out.transfers if not t.blocking])
        assert b.status is RequestStatus.RUNNING
        out = _step(sched)
    else:
        sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample})
    assert b.status is RequestStatus.RUNNING and "b" in {c.request_id for c in out.chunks}


# --------------------------------------------------------------------------- priorities changed at runtime
def test_raising_a_waiting_requests_priority_takes_effect_next_step():
    sched = _sched("priority", blocks=8, block_size=4, budget=64)
    sched.add_request(_req("run", 20, 12, t=0.0, priority=3))
    _step(sched)
    sched.add_request(_req("wait", 12, 4, t=1.0, priority=5))    # does not fit, less urgent: waits
    out = _step(sched)
    assert sched.requests["wait"].status is RequestStatus.WAITING and not out.preempted
    assert sched.set_priority("wait", 0)
    out = _step(sched)
    assert out.preempted == ["run"] and sched.requests["wait"].status is RequestStatus.RUNNING


def test_no_preemption_that_would_not_make_room():
    """A queued request preempts only if the victims it may take would free enough blocks: preempting the one
    less urgent request it may displace, without room enough, would only waste that request's work."""
    sched = _sched("priority", blocks=10, block_size=4, budget=64)
    sched.add_request(_req("big", 28, 4, t=0.0, priority=1))      # 7 blocks, more urgent than the newcomer
    sched.add_request(_req("small", 4, 8, t=1.0, priority=5))     # 1 block, less urgent
    _step(sched)
    sched.add_request(_req("mid", 16, 4, t=2.0, priority=3))      # needs 4 blocks; only 2 free + small's 1
    out = _step(sched)
    assert not out.preempted and sched.requests["small"].status is RequestStatus.RUNNING
    assert sched.requests["mid"].status is RequestStatus.WAITING


def test_preemption_plan_counts_a_prefix_block_shared_by_victims():
    """Two less urgent requests share a prompt's blocks: preempting both frees them, so the urgent request
    (which shares nothing) gets in instead of waiting behind them."""
    kv = KVCacheManager(10, 4, 0, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, scheduling_policy="priority"), kv)
    shared = list(range(100, 124))
    sched.add_request(Request("v1", shared, 12, priority=5, arrival_time=1.0))
    _step(sched)
    sched.add_request(Request("v2", shared, 12, priority=5, arrival_time=2.0))
    _step(sched)
    _step(sched)
    assert any(b.ref_cnt == 2 for b in kv.pool.blocks), "the scenario needs blocks shared by both victims"
    sched.add_request(Request("urgent", list(range(200, 224)), 5, priority=0, arrival_time=3.0))
    out = _step(sched)
    assert sorted(out.preempted) == ["v1", "v2"]
    assert sched.requests["urgent"].status is RequestStatus.RUNNING


def test_ledger_forgets_idle_tenants_past_its_cap():
    kv = KVCacheManager(64, 4, 0, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, scheduling_policy="vtc"), kv)
    sched.ledger.max_tenants = 8
    for i in range(40):
        sched.add_request(_req(f"r{i}", 4, 1, t=float(i), tenant=f"user-{i}"))
        _step(sched)                                   # each finishes at once: its tenant goes idle
    assert len(sched.ledger.counter) <= 8
    stats = sched.ledger.tenant_stats()
    assert sum(svc for svc, _ in stats.values()) == 40 * (4 * 1.0 + 1 * 2.0)   # nothing lost from the totals
    sched.add_request(_req("back", 4, 1, t=99.0, tenant="user-0"))             # a forgotten tenant returns
    _step(sched)
    sched.check_invariants()


def test_lowering_a_running_requests_priority_makes_it_the_victim():
    sched = _sched("priority", blocks=8, block_size=4, budget=64)
    sched.add_request(_req("x", 10, 20, t=0.0, priority=1))
    sched.add_request(_req("y", 10, 20, t=1.0, priority=1))
    _step(sched)
    assert sched.set_priority("x", 9)               # x is now the least urgent
    for _ in range(30):
        out = _step(sched)
        if out.preempted:
            assert out.preempted == ["x"]
            return
    raise AssertionError("the scenario never ran out of blocks")


def test_set_priority_of_unknown_or_finished_request_is_false():
    sched = _sched("fcfs", blocks=8)
    assert not sched.set_priority("nope", 1)
    sched.add_request(_req("r", 4, 1, t=0.0))
    _step(sched)
    assert "r" not in sched.requests and not sched.set_priority("r", 1)


def test_fcfs_never_preempts_for_a_queued_request():
    sched = _sched("fcfs", blocks=8, block_size=4, budget=64)
    sched.add_request(_req("first", 20, 12, t=0.0, priority=9))
    _step(sched)
    sched.add_request(_req("second", 12, 4, t=1.0, priority=0))
    out = _step(sched)
    assert not out.preempted and sched.requests["second"].status is RequestStatus.WAITING


def test_out_of_order_queue_is_an_invariant_error_not_an_assert():
    sched = _sched("priority", blocks=8)
    sched.add_request(_req("a", 4, 4, t=0.0, priority=1))
    sched.add_request(_req("b", 4, 4, t=1.0, priority=2))
    sched.requests["b"].priority = 0              # behind the policy's back, not through set_priority
    with pytest.raises(InvariantError, match="out of order"):
        sched.check_invariants()


# --------------------------------------------------------------------------- VTC
def _backlogged_service(policy: str, weights: dict[str, float], n_each: int = 40) -> dict[str, float]:
    """Two tenants with identical requests, all queued at once; service while both are still backlogged."""
    sched = _sched(policy, blocks=40, block_size=4, budget=32, tenant_weights=weights, max_num_seqs=4)
    for i in range(n_each):
        for tenant in ("a", "b"):
            sched.add_request(_req(f"{tenant}{i}", 12, 8, t=float(i), tenant=tenant))
    while all(any(r.tenant == t for r in sched.policy.queued()) for t in ("a", "b")):
        _step(sched)
    return dict(sched.ledger.service)


def test_vtc_weights_two_to_one_give_two_to_one_service():
    service = _backlogged_service("vtc", {"a": 2.0, "b": 1.0})
    assert 1.8 <= service["a"] / service["b"] <= 2.2, service
    fcfs = _backlogged_service("fcfs", {"a": 2.0, "b": 1.0})
    assert 0.8 <= fcfs["a"] / fcfs["b"] <= 1.25, fcfs     # fcfs ignores weights


def test_vtc_serves_a_light_tenant_ahead_of_a_heavy_backlog():
    sched = _sched("vtc", blocks=64, block_size=4, budget=32, max_num_seqs=2)
    for i in range(20):
        sched.add_request(_req(f"heavy{i}", 12, 8, t=float(i), tenant="heavy"))
    for _ in range(6):
        _step(sched)
    sched.add_request(_req("light", 12, 8, t=100.0, tenant="light"))
    light = sched.requests["light"]
    # Lifted to the heavy tenant's counter on arrival, so it earns no credit but waits for one admission at most.
    assert sched.ledger.counter["light"] == sched.ledger.counter["heavy"]
    steps = 0
    while light.status is RequestStatus.WAITING:
        _step(sched)
        steps += 1
    assert steps <= 8, f"the light tenant waited {steps} steps behind the heavy backlog"
    fcfs = _sched("fcfs", blocks=64, block_size=4, budget=32, max_num_seqs=2)
    for i in range(20):
        fcfs.add_request(_req(f"heavy{i}", 12, 8, t=float(i), tenant="heavy"))
    fcfs.add_request(_req("light", 12, 8, t=100.0, tenant="light"))
    fcfs_steps = 0
    while fcfs.requests["light"].status is RequestStatus.WAITING:
        _step(fcfs)
        fcfs_steps += 1
    assert fcfs_steps > 4 * steps


def test_vtc_does_not_charge_recomputation_twice():
    sched = _sched("vtc", blocks=9, block_size=4, budget=64)
    sched.add_request(_req("a", 10, 14, t=0.0, tenant="x"))
    sched.add_request(_req("b", 10, 14, t=1.0, tenant="y"))
    while sched.has_unfinished_requests():
        _step(sched)
    assert sched.num_preemptions > 0, "the scenario must preempt (recompute)"
    for tenant in ("x", "y"):   # exactly w_p * prompt + w_q * output, whatever was recomputed
        assert sched.ledger.service[tenant] == 1.0 * 10 + 2.0 * 14


def test_vtc_priority_bands_first_then_fair_share():
    sched = _sched("vtc+priority", blocks=64, block_size=4, budget=12, max_num_seqs=1)
    sched.add_request(_req("bulk", 12, 4, t=0.0, priority=5, tenant="t1"))
    sched.add_request(_req("urgent", 12, 4, t=1.0, priority=0, tenant="t2"))
    out = _step(sched)
    assert [c.request_id for c in out.chunks] == ["urgent"]


def test_tenant_weights_parse_pairs_files_and_json(tmp_path):
    assert parse_tenant_weights("alice=2, bob=0.5") == {"alice": 2.0, "bob": 0.5}
    f = tmp_path / "w.txt"
    f.write_text("# weights\nalice=3\nbob=1,carol=2\n")
    assert parse_tenant_weights(str(f)) == {"alice": 3.0, "bob": 1.0, "carol": 2.0}
    j = tmp_path / "w.json"
    j.write_text('{"alice": 4}')
    assert parse_tenant_weights(str(j)) == {"alice": 4.0}
    for bad in ("alice=0", "alice=-1", "alice=x", "alice=1,alice=2", "=3", str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="tenant_weights"):
            parse_tenant_weights(bad)
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lottery")
    with pytest.raises(ValueError, match="vtc_w_q"):
        EngineConfig(vtc_w_q=-1.0)


def test_admission_sizes_its_chunk_before_preempting():
    """Found re-reading the change: the admission recomputed its chunk after preempting, and a victim's rolled-back
    decode had returned budget, so it asked for one more block than it had made room for (InvariantError)."""
    kv = KVCacheManager(9, 1, 32, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=6, scheduling_policy="priority"), kv)
    reqs = [(0, Request("r0", [5, 6], 6, priority=3, arrival_time=0.0)),
            (1, Request("r1", [27, 28], 7, priority=3, arrival_time=1.0)),
            (2, Request("r2", [34, 35, 36, 37, 38], 4, priority=3, arrival_time=2.0)),
            (3, Request("r3", [41, 42, 43, 44, 45], 3, priority=0, arrival_time=3.0))]
    preempted = 0
    for step in range(30):
        for at, req in reqs:
            if at == step:
                sched.add_request(req)
        out = _step(sched)
        preempted += len(out.preempted)
        if not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests() and preempted > 0
