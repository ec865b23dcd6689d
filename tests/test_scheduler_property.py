"""Property-based tests of the scheduler and KV bookkeeping alone: no model, random workloads."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokenyard.kv.manager import KVCacheManager
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig


def _fake_token(rng: random.Random) -> int:
    return rng.randrange(3, 50)  # small vocab so prefixes repeat and the prefix cache is exercised


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    num_blocks = draw(st.integers(4, 64))
    budget = draw(st.integers(1, 96))
    n_req = draw(st.integers(1, 14))
    reqs = []
    for _i in range(n_req):
        max_len = num_blocks * block_size  # every request must be able to fit alone
        plen = draw(st.integers(1, max(1, min(60, max_len - 1))))
        max_tokens = draw(st.integers(1, max(1, min(20, max_len - plen))))
        reqs.append(dict(
            arrive=draw(st.integers(0, 30)), plen=plen, max_tokens=max_tokens,
            priority=draw(st.integers(0, 3)), abort_at=draw(st.one_of(st.none(), st.integers(0, 60))),
            shared=draw(st.booleans()),
        ))
    return dict(
        block_size=block_size, num_blocks=num_blocks, budget=budget, reqs=reqs,
        max_num_seqs=draw(st.integers(1, 16)),
        policy=draw(st.sampled_from(["fcfs", "priority", "vtc", "vtc+priority"])),
        mode=draw(st.sampled_from(["recompute", "swap"])),
        host_blocks=draw(st.integers(0, 64)),
        caching=draw(st.booleans()),
        overlap=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _drive(w: dict, decisions: list | None = None, all_decodes_at_once: bool = True):
    """Run workload ``w`` to the end, checking the invariants after every step; ``decisions`` collects every
    step's output. ``all_decodes_at_once=False`` turns the scheduler's fast decode path off."""
    rng = random.Random(w["seed"])
    kv = KVCacheManager(w["num_blocks"], w["block_size"], w["host_blocks"], w["caching"])
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=w["budget"], max_num_seqs=w["max_num_seqs"],
                        scheduling_policy=w["policy"], preemption_mode=w["mode"], swap_overlap=w["overlap"]),
        kv,
    )
    if not all_decodes_at_once:
        sched._schedule_decodes = lambda st, decodes: False
    in_flight: list[int] = []
    shared_prefix = [_fake_token(rng) for _ in range(64)]
    pending = sorted(enumerate(w["reqs"]), key=lambda x: x[1]["arrive"])
    live: dict[str, Request] = {}
    finished: dict[str, RequestStatus] = {}
    step = 0
    while pending or sched.has_unfinished_requests() or sched.has_transfers_in_flight():
        while pending and pending[0][1]["arrive"] <= step:
            i, spec = pending.pop(0)
            base = shared_prefix if spec["shared"] else [_fake_token(rng) for _ in range(64)]
            prompt = (base + [_fake_token(rng) for _ in range(64)])[: spec["plen"]]
            req = Request(f"r{i}", prompt, spec["max_tokens"], priority=spec["priority"], arrival_time=float(step))
            sched.add_request(req)
            live[req.request_id] = req
        for rid, req in list(live.items()):
            spec = w["reqs"][int(rid[1:])]
            if spec["abort_at"] is not None and spec["abort_at"] == step and not req.status.finished:
                sched.abort_requests([rid])
        out = sched.schedule()
        sched.check_output(out)
        if decisions is not None:
            decisions.append(([(c.request_id, c.start_pos, tuple(c.token_ids), tuple(c.block_ids), c.sample)
                               for c in out.chunks], list(out.preempted), list(out.finished), list(out.wait_for),
                              [(t.request_id, t.to_host, tuple(t.segments), t.blocking) for t in out.transfers]))
        sampled = {c.request_id: _fake_token(rng) for c in out.chunks if c.sample}
        # Overlapped transfers land one to three steps later, in any order.
        in_flight += [t.transfer_id for t in out.transfers if not t.blocking]
        landed = [t for t in in_flight if rng.random() < 0.5]
        in_flight = [t for t in in_flight if t not in landed]
        sched.update_from_output(out, sampled, landed)
        sched.check_invariants()
        for rid, req in list(live.items()):
            if req.status.finished:
                finished[rid] = req.status
                del live[rid]
        step += 1
        assert step < 5000, "scheduler made no progress"
    return sched, kv, finished


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_invariants_and_finish(w):
    sched, kv, finished = _drive(w)
    event(f"preempted: {sched.num_preemptions > 0}")
    event(f"swapped: {kv.host_pool.num_blocks > 0 and w['mode'] == 'swap' and sched.num_preemptions > 0}")
    event(f"prefix hits: {kv.prefix_hits > 0}")
    assert len(finished) == len(w["reqs"])
    for rid, status in finished.items():
        req_spec = w["reqs"][int(rid[1:])]
        if status is RequestStatus.FINISHED_LENGTH:
            pass
        else:
            assert status is RequestStatus.FINISHED_ABORTED, (rid, status, req_spec)
    assert kv.num_used_blocks == 0
    assert kv.host_pool.num_free_blocks == w["host_blocks"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_all_decodes_at_once_decide_what_one_at_a_time_decides(w):
    """The fast decode path (every decode at once when none can fall short) makes the general path's decisions:
    the same chunks, block ids, preemptions and transfers at every step, the same ledger."""
    fast: list = []
    sched, _, finished = _drive(w, fast)
    general: list = []
    sched_g, _, finished_g = _drive(w, general, all_decodes_at_once=False)
    assert fast == general
    assert finished == finished_g
    assert sched.ledger.tenant_stats() == sched_g.ledger.tenant_stats()
    event(f"preempted: {sched.num_preemptions > 0}")


def test_the_fast_decode_path_is_taken_and_falls_back_when_blocks_run_short():
    kv = KVCacheManager(4, 2, 0, False)   # 8 tokens of KV: two 3-token prompts, then one block left each
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, preemption_mode="recompute"), kv)
    calls = []
    real = sched._schedule_decodes
    sched._schedule_decodes = lambda st, decodes: calls.append(real(st, decodes)) or calls[-1]
    for i in range(2):
        sched.add_request(Request(f"r{i}", [3, 4, 5], 5, arrival_time=float(i)))
    for _ in range(4):
        out = sched.schedule()
        sched.update_from_output(out, {c.request_id: 7 for c in out.chunks if c.sample})
        sched.check_invariants()
    # step 1: prefills (no decodes: the fast path has nothing to do); then the two decode at once in the four
    # blocks; at their fifth token each needs a block with none free: the general path preempts one
    assert calls[:3] == [True, True, False] and sched.num_preemptions == 1


def test_decodes_are_scheduled_before_prefill_chunks():
    kv = KVCacheManager(64, 4, 0, False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), kv)
    sched.add_request(Request("a", list(range(3, 6)), 10, arrival_time=0.0))
    sched.update_from_output(out := sched.schedule(), {"a": 7})
    assert out.chunks[0].num_tokens == 3
    sched.add_request(Request("b", list(range(3, 40)), 10, arrival_time=1.0))
    out = sched.schedule()
    assert [(c.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]
    sched.check_output(out)


def test_prefix_hit_never_covers_last_prompt_token():
    kv = KVCacheManager(64, 4, 0, True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    prompt = list(range(3, 19))  # 16 tokens = 4 full blocks
    sched.add_request(Request("a", prompt, 1, arrival_time=0.0))
    sched.update_from_output(sched.schedule(), {"a": 5})
    sched.add_request(Request("b", prompt, 1, arrival_time=1.0))
    out = sched.schedule()
    assert out.chunks[0].start_pos == 12 and out.chunks[0].num_tokens == 4
    sched.update_from_output(out, {"b": 5})
    sched.check_invariants()


def test_request_larger_than_pool_is_rejected_without_state_change():
    kv = KVCacheManager(4, 4, 0, True)
    sched = Scheduler(SchedulerConfig(), kv)
    try:
        sched.add_request(Request("big", list(range(3, 20)), 10))
    except ValueError as e:
        assert "KV cache" in str(e)
    else:
        raise AssertionError("expected ValueError")
    assert not sched.has_unfinished_requests()
    sched.check_invariants()


def test_cache_salt_scopes_prefix_hits():
    kv = KVCacheManager(64, 4, 0, True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    prompt = list(range(3, 19))
    sched.add_request(Request("a", prompt, 1, arrival_time=0.0, cache_salt="tenant-a"))
    sched.update_from_output(sched.schedule(), {"a": 5})
    starts = {}
    for rid, salt in (("other-salt", "tenant-b"), ("no-salt", None), ("same-salt", "tenant-a")):
        sched.add_request(Request(rid, prompt, 1, arrival_time=1.0, cache_salt=salt))
        out = sched.schedule()
        starts[rid] = out.chunks[0].start_pos
        sched.update_from_output(out, {rid: 5})
        sched.check_invariants()
    assert starts == {"other-salt": 0, "no-salt": 0, "same-salt": 12}


def test_block_hashes_are_128_bit_digests_that_chain():
    from tokenyard.kv.hashing import extend_block_hashes, hash_block, root_hash

    a, b = [], []
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    extend_block_hashes(b, [9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert all(isinstance(h, bytes) and len(h) == 16 for h in a)
    assert a[1] != b[1], "the second block's hash covers the first block too"
    assert a == [hash_block(root_hash(None), [1, 2, 3, 4]), hash_block(a[0], [5, 6, 7, 8])]
    c = []
    extend_block_hashes(c, [1, 2, 3, 4, 5], 4)   # one full block now, the second later: the same chain
    extend_block_hashes(c, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert c == a
    assert root_hash("x") != root_hash(None) == root_hash("")


def test_a_hash_collision_cannot_serve_another_prompts_kv(monkeypatch):
    """Make every block hash collide: a hit is still taken only when the cached block's content (parent
    hash and tokens) is the request's own, so a different prompt gets no hit and the same prompt still does."""
    from tokenyard.kv import hashing

    monkeypatch.setattr(hashing, "hash_bytes", lambda parent, data: b"\0" * 16)
    kv = KVCacheManager(64, 4, 0, True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    sched.add_request(Request("a", list(range(3, 19)), 1, arrival_time=0.0))
    sched.update_from_output(sched.schedule(), {"a": 5})
    starts = {}
    for rid, prompt in (("other", list(range(40, 56))), ("same", list(range(3, 19)))):
        sched.add_request(Request(rid, prompt, 1, arrival_time=1.0))
        out = sched.schedule()
        starts[rid] = out.chunks[0].start_pos
        sched.update_from_output(out, {rid: 5})
        sched.check_invariants()
    assert starts == {"other": 0, "same": 4}   # all four blocks share one hash: only the first is registered


def test_prefix_lookups_are_counted_once_per_admission_not_per_retry():
    kv = KVCacheManager(6, 4, 0, True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    sched.add_request(Request("big", list(range(3, 19)), 8, arrival_time=0.0))     # 4 blocks, grows to 6
    sched.update_from_output(sched.schedule(), {"big": 5})
    sched.add_request(Request("blocked", list(range(40, 52)), 4, arrival_time=1.0))   # 3 blocks: must wait
    for _ in range(5):
        out = sched.schedule()
        sched.update_from_output(out, {c.request_id: 5 for c in out.chunks if c.sample})
    assert sched.requests["blocked"].status is RequestStatus.WAITING
    assert kv.prefix_queries == 16          # only the admitted request's lookup, not the blocked one's retries


def test_the_scheduler_stamps_time_from_its_injected_clock():
    """No wall clock inside sched/: a simulator's virtual clock is the only time a scheduler it drives sees."""
    now = [100.0]
    kv = KVCacheManager(64, 4, 0, False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=4), kv, clock=lambda: now[0])
    sched.add_request(Request("a", list(range(3, 12)), 4, arrival_time=99.0))
    sched.add_request(Request("b", list(range(3, 6)), 4, arrival_time=99.5))
    first_step_of = {}
    for t in (100.0, 150.0, 250.0):   # a's prompt takes the whole 4-token budget twice, then b gets its turn
        now[0] = t
        out = sched.schedule()
        for c in out.chunks:
            first_step_of.setdefault(c.request_id, t)
        sched.update_from_output(out, {c.request_id: 7 for c in out.chunks if c.sample})
    assert first_step_of == {"a": 100.0, "b": 250.0}
    assert sched.requests["a"].first_scheduled_time == 100.0
    assert sched.requests["b"].first_scheduled_time == 250.0
