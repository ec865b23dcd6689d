"""KV in flight, block groups and the host prefix cache, on the scheduler and KV bookkeeping alone (no model)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenyard.kv.block_pool import BlockPool
from tokenyard.kv.manager import KVCacheManager, to_segments
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig

TOKEN = 7


def _sched(blocks: int = 12, host: int = 32, budget: int = 64, overlap: bool = True, seqs: int = 8,
           policy: str = "priority", groups: bool = True) -> Scheduler:
    kv = KVCacheManager(blocks, 4, host, True, block_groups=groups)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, scheduling_policy=policy,
                                     preemption_mode="swap", swap_overlap=overlap), kv)


def _step(sched: Scheduler, land: bool = True):
    out = sched.schedule()
    sched.check_output(out)
    landed = [t.transfer_id for t in out.transfers if not t.blocking] if land else []
    sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample}, landed)
    sched.check_invariants()
    return out


def _runs(block_ids: list[int]) -> int:
    """How many runs of consecutive ids ``block_ids`` falls into (1 = fully contiguous)."""
    return sum(1 for i, b in enumerate(block_ids) if i == 0 or b != block_ids[i - 1] + 1)


def _prompt(n: int, base: int = 3) -> list[int]:
    return [base + i % 40 for i in range(n)]


# --------------------------------------------------------------------------- block pool: groups
def test_allocation_extends_a_run_and_prefers_contiguous_free_space():
    pool = BlockPool(16)
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2]
    b = pool.allocate(2)
    pool.free(a[1:2])                       # a hole of one block at 1
    c = pool.allocate(3)                    # no run after the hole: the first run of 3 that exists
    assert [x.block_id for x in c] == [5, 6, 7]
    d = pool.allocate(2, after=7)           # extends c's run
    assert [x.block_id for x in d] == [8, 9]
    assert _runs([x.block_id for x in c + d]) == 1
    pool.check()
    assert b


def test_clean_blocks_are_taken_before_prefix_cache_blocks_are_evicted():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.cache(blocks[0], b"h0", (b"root", (1,)))
    pool.free(blocks)
    got = pool.allocate(2)                  # two clean blocks exist (2, 3) and one uncached freed one (1)
    assert pool.get_cached_block(b"h0") is blocks[0] and blocks[0] not in got
    pool.check()
    more = pool.allocate(2)                 # now the cached block must go
    assert blocks[0] in more and pool.get_cached_block(b"h0") is None and pool.num_evictions == 1
    pool.check()


def test_segments_merge_runs_on_both_sides_only_with_groups():
    pairs = [(4, 10), (5, 11), (6, 12), (9, 13), (10, 20)]
    assert to_segments(pairs, merge=True) == [(4, 10, 3), (9, 13, 1), (10, 20, 1)]
    assert to_segments(pairs, merge=False) == [(s, d, 1) for s, d in pairs]


# --------------------------------------------------------------------------- request states
def _swapped_out(sched: Scheduler, victim: str = "low") -> None:
    sched.add_request(Request("low", _prompt(14), 20, priority=5, arrival_time=0.0))
    _step(sched)
    _step(sched)
    sched.add_request(Request("hi", _prompt(30, base=50), 4, priority=0, arrival_time=1.0))


def test_swap_in_overlaps_the_step_and_the_request_computes_once_it_lands():
    sched = _sched(blocks=10)
    _swapped_out(sched)
    out = _step(sched)
    low = sched.requests["low"]
    assert "low" in out.preempted and low.status is RequestStatus.SWAPPED
    swap_out = [t for t in out.transfers if t.to_host]
    assert swap_out and swap_out[0].blocking, "the step needed low's blocks now: its copy ran before the forward"
    while low.status is RequestStatus.SWAPPED:
        out = sched.schedule()
        sched.check_output(out)
        sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample})   # nothing lands
        sched.check_invariants()
    assert low.status is RequestStatus.SWAPPING_IN
    swap_in = [t for t in out.transfers if not t.to_host]
    assert swap_in and not swap_in[0].blocking and "low" not in {c.request_id for c in out.chunks}
    out = _step(sched, land=False)          # still in flight: not scheduled, blocks pinned
    assert low.status is RequestStatus.SWAPPING_IN and "low" not in {c.request_id for c in out.chunks}
    sched.complete_transfers([swap_in[0].transfer_id])
    assert low.status is RequestStatus.RUNNING
    out = _step(sched)
    assert "low" in {c.request_id for c in out.chunks}


@pytest.mark.parametrize("state", [RequestStatus.SWAPPING_IN, RequestStatus.SWAPPING_OUT])
def test_abort_during_a_transfer_frees_everything_once_it_lands(state):
    sched = _sched(blocks=10, seqs=1 if state is RequestStatus.SWAPPING_OUT else 8)
    kv = sched.kv
    if state is RequestStatus.SWAPPING_OUT:
        # One seat: hi takes low's seat, not its blocks, so low's swap-out needs no forcing and stays in flight.
        sched.add_request(Request("low", _prompt(6), 30, priority=5, arrival_time=0.0))
        _step(sched)
        sched.add_request(Request("hi", _prompt(6, base=50), 4, priority=0, arrival_time=1.0))
        out = _step(sched, land=False)
    else:
        _swapped_out(sched)
        _step(sched)
        while sched.requests["low"].status is not RequestStatus.SWAPPING_IN:
            out = _step(sched, land=False)
    low = sched.requests["low"]
    assert low.status is state
    tid = next(iter(sched.in_flight))
    pinned = kv.transfers[tid]
    sched.abort_requests(["low"])
    sched.check_invariants()
    assert low.status is RequestStatus.FINISHED_ABORTED
    assert all(b.ref_cnt > 0 for b in pinned.device + pinned.host), "blocks under copy stay pinned after abort"
    sched.complete_transfers([tid])
    sched.check_invariants()
    while sched.has_unfinished_requests():
        _step(sched)
    assert kv.num_used_blocks == 0 and kv.host_pool.num_used_blocks == 0 and not kv.transfers
    assert out is not None


def test_a_seat_only_preemption_keeps_the_swap_out_in_flight_until_blocks_are_needed():
    sched = _sched(blocks=10, seqs=1)
    sched.add_request(Request("low", _prompt(6), 30, priority=5, arrival_time=0.0))
    _step(sched)
    sched.add_request(Request("hi", _prompt(6, base=50), 30, priority=0, arrival_time=1.0))
    out = _step(sched, land=False)
    low = sched.requests["low"]
    assert low.status is RequestStatus.SWAPPING_OUT and not [t for t in out.transfers if t.to_host][0].blocking
    tid = next(iter(sched.in_flight))
    forced = False
    for _ in range(40):                     # hi grows until it needs low's pinned blocks: then they are forced
        out = _step(sched, land=False)
        if tid in out.wait_for:
            forced = True
            break
    assert forced and low.status is RequestStatus.SWAPPED and tid not in sched.kv.transfers


# --------------------------------------------------------------------------- the host tier as a prefix cache
def test_second_swap_out_copies_only_blocks_the_host_lacks():
    sched = _sched(blocks=10, overlap=False)
    kv = sched.kv
    _swapped_out(sched)
    _step(sched)
    low = sched.requests["low"]
    assert low.status is RequestStatus.SWAPPED
    first = kv.swap_out_blocks
    for _ in range(40):
        if low.status is RequestStatus.RUNNING and "hi" not in sched.requests:
            break
        _step(sched)
    assert low.status is RequestStatus.RUNNING
    for _ in range(6):
        _step(sched)                          # low decodes a few tokens past its swapped-in blocks
    sched.add_request(Request("hi2", _prompt(30, base=60), 4, priority=0, arrival_time=2.0))
    out = _step(sched)
    assert "low" in out.preempted
    reused = kv.swap_out_reused_blocks
    assert reused >= 3, "low's full blocks were still on the host"
    assert kv.swap_out_blocks - first == len(kv.host_blocks["low"]) - reused


def test_a_later_turn_loads_its_prefix_from_the_host_instead_of_recomputing():
    sched = _sched(blocks=10, overlap=True)
    kv = sched.kv
    _swapped_out(sched)
    _step(sched)
    assert sched.requests["low"].status is RequestStatus.SWAPPED
    while "hi" in sched.requests:
        _step(sched)
    assert sched.requests["low"].status is RequestStatus.SWAPPED
    kv.pool.reset_prefix_cache()               # low's blocks are gone from the device's prefix cache
    turn2 = _prompt(14) + [9, 9, 9]            # the same conversation, one turn on
    sched.add_request(Request("turn2", turn2, 4, priority=0, arrival_time=3.0))
    out = _step(sched)
    t2 = sched.requests["turn2"]
    assert kv.host_prefix_hits == 12 and t2.num_cached_tokens == 12
    assert any(not t.to_host and t.request_id == "turn2" for t in out.transfers)
    assert t2.status is RequestStatus.RUNNING   # landed at the end of that step
    out = _step(sched)
    chunk = next(c for c in out.chunks if c.request_id == "turn2")
    assert chunk.start_pos == 12, "only the tokens after the host hit are computed"


def test_fragmented_free_space_is_taken_longest_runs_first():
    pool = BlockPool(10)
    blocks = pool.allocate(10)
    pool.free([blocks[i] for i in (1, 4, 5, 6, 8, 9)])
    got = pool.allocate(5)
    assert [b.block_id for b in got] == [4, 5, 6, 8, 9] and _runs([b.block_id for b in got]) == 2
    pool.check()


def test_the_pool_and_manager_checks_catch_corruption():
    from tokenyard.invariants import InvariantError

    kv = KVCacheManager(64, 4, 8, True)
    assert kv.allocate_slots("a", 10)
    kv.check_invariants()
    kv.pool.blocks[40].ref_cnt = 1                  # referenced, yet in the free map
    with pytest.raises(InvariantError, match="block 40"):
        kv.check_invariants()
    kv.pool.blocks[40].ref_cnt = 0
    kv.pool.blocks[0].ref_cnt += 1                  # a reference nobody owns
    with pytest.raises(InvariantError, match="owners"):
        kv.check_invariants()
    kv.pool.blocks[0].ref_cnt -= 1
    kv.pool._clean[50] = 0                          # a free block in no free list
    with pytest.raises(InvariantError):
        kv.check_invariants()
    kv.pool._clean[50] = 1
    kv.check_invariants()
    t = kv.swap_out("a", list(range(10)), 10)
    kv.host_pool.blocks[t.host[0].block_id].ref_cnt -= 1   # an in-flight copy's block looks less held
    with pytest.raises(InvariantError):
        kv.check_invariants()


def test_swap_in_shares_the_prefix_another_request_keeps_on_the_device():
    sched = _sched(blocks=14, overlap=False)
    kv = sched.kv
    shared = _prompt(12)
    sched.add_request(Request("low", shared + [60, 61, 62], 20, priority=5, arrival_time=0.0))
    _step(sched)
    sched.add_request(Request("twin", shared + [70, 71], 20, priority=1, arrival_time=0.5))
    _step(sched)
    twin_blocks = kv.block_ids("twin")
    sched.add_request(Request("hi", _prompt(36, base=50), 4, priority=0, arrival_time=1.0))
    out = _step(sched)
    assert "low" in out.preempted and sched.requests["low"].status is RequestStatus.SWAPPED
    assert sched.requests["twin"].status is RequestStatus.RUNNING
    copied_before = kv.swap_in_blocks
    low = sched.requests["low"]
    for _ in range(40):
        if low.status is RequestStatus.RUNNING:
            break
        _step(sched)
    assert low.status is RequestStatus.RUNNING
    assert kv.block_ids("low")[:3] == twin_blocks[:3], "the shared prefix blocks are shared again, not copied"
    assert kv.swap_in_blocks - copied_before == 1, "only low's own (partial) block was copied back"


def test_host_prefix_hits_stay_pinned_while_the_admission_preempts():
    """Review finding: a new request's host prefix hits were free cached blocks while its admission preempted a
    victim by swap; the victim's swap-out could take them and the load then copied the victim's KV in as the
    request's prefix. They are pinned now, and check_invariants would see a load whose source lost its hash."""
    kv = KVCacheManager(6, 4, 5, True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, scheduling_policy="priority",
                                      preemption_mode="swap", swap_overlap=True), kv)
    p = list(range(100, 109))
    sched.add_request(Request("P", p, 10, priority=5, arrival_time=0.0))
    _step(sched)
    sched.add_request(Request("H", list(range(200, 220)), 1, priority=0, arrival_time=1.0))
    _step(sched)                                  # P swapped out: its first two blocks now on the host, hashed
    sched.abort_requests(["P"])
    _step(sched)
    sched.add_request(Request("V", list(range(300, 319)), 4, priority=5, arrival_time=2.0))
    _step(sched)                                  # V fills the device
    sched.add_request(Request("Q", p[:8] + [1, 2, 3], 5, priority=0, arrival_time=3.0))
    out = sched.schedule()                        # Q finds P's blocks on the host and preempts V
    sched.check_invariants()
    load = next(t for t in out.transfers if t.request_id == "Q")
    assert "V" in out.preempted and load.num_blocks_copied == 2
    for h in load.host:
        assert h.content[1] in (tuple(p[:4]), tuple(p[4:8])), "the host blocks Q loads hold P's prefix"
    v_host = {b.block_id for b in kv.host_blocks.get("V", [])}
    assert not v_host & {h.block_id for h in load.host}, "V's swap-out did not take Q's pinned host hits"


def test_a_forced_swap_out_does_not_jump_into_the_queue_mid_step():
    """Found re-reading the change (hypothesis, 4000 examples): forcing an in-flight swap-out while admitting a
    less urgent head queued the forced request at once; it was admitted right after and preempted a running
    request more urgent than the head that had just been admitted (a priority inversion). Forced requests are
    queued once the step is decided now."""
    kv = KVCacheManager(5, 8, 1, False, block_groups=False, host_cache=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=7, max_num_seqs=3, scheduling_policy="priority",
                                      preemption_mode="swap", swap_overlap=True), kv)

    def step():   # nothing lands on its own: copies are slow here
        out = sched.schedule()
        sched.check_output(out)
        key = sched.policy.urgency
        for rid, urgency in sched.last_preempted.items():
            assert all(not urgency < key(kept) for kept in sched.running), f"{rid} preempted before a less urgent one"
        sched.update_from_output(out, {c.request_id: TOKEN for c in out.chunks if c.sample})
        sched.check_invariants()
        return out

    def add(rid, plen, max_tokens, priority, t):
        sched.add_request(Request(rid, _prompt(plen, base=10 * int(rid[1:])), max_tokens, priority=priority,
                                  arrival_time=t))

    add("r0", 1, 1, 0, 0.0)
    add("r1", 23, 3, 0, 0.0)
    for _ in range(4):
        step()
    add("r2", 9, 1, 0, 4.0)
    step()
    add("r3", 2, 1, 2, 5.0)
    add("r4", 28, 2, 1, 5.0)
    forced = False
    for _ in range(6):
        forced |= bool(step().wait_for)
    assert forced, "the scenario must force r2's in-flight swap-out"


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(1, 5), st.booleans(), st.booleans()), min_size=1, max_size=30),
       after=st.one_of(st.none(), st.integers(0, 23)))
def test_one_block_is_taken_where_the_run_search_would_take_it(ops, after):
    """``allocate_one`` (a decode crossing a block boundary) chooses the block the general run search chooses for
    one block, from any mix of clean, cached and taken blocks, and leaves the pool in the same state."""
    pool = BlockPool(24)
    held: list = []
    for i, (n, cache, free) in enumerate(ops):   # random allocations, registrations and frees
        if n <= pool.num_free_blocks:
            got = pool.allocate(n, held[-1].block_id if held and i % 2 else None)
            if cache:
                pool.cache(got[0], f"h{i}".encode(), (b"", (i,)))
            held.extend(got)
        if free and held:
            pool.free(held[: len(held) // 2][::-1])
            del held[: len(held) // 2]
    if not pool.num_free_blocks:
        return
    twin = copy.deepcopy(pool)
    one = pool.allocate_one(after)
    ran = twin._allocate_runs(1, after)
    assert [one.block_id] == [b.block_id for b in ran]
    assert (pool._free, pool._clean, list(pool._cached_free), sorted(pool._cached), pool.num_evictions) == \
        (twin._free, twin._clean, list(twin._cached_free), sorted(twin._cached), twin.num_evictions)
    pool.check()


def test_one_block_evicts_the_least_recently_freed_cached_block_when_none_is_clean():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache(b, f"h{i}".encode(), (b"", (i,)))
    pool.free([blocks[1], blocks[2], blocks[0]])
    twin = copy.deepcopy(pool)
    assert pool.allocate_one(after=0).block_id == 1 == twin._allocate_runs(1, 0)[0].block_id   # 1 follows 0
    assert pool.allocate_one().block_id == 2 and pool.num_evictions == 2   # no clean block: the oldest cached
    pool.check()
