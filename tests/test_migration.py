"""Live migration between two engines in one process: exact tokens wherever it happens, nothing leaked when aborted.

The same protocol driver (``tokenyard.cluster.migration.migrate``) runs between Ray actors in the cluster; here
the endpoints are called directly, so every phase can be hit deterministically.
"""

from __future__ import annotations

import random

import pytest

from tests.reference import hf_greedy
from tokenyard import SamplingParams
from tokenyard.cluster.migration import migrate
from tokenyard.config import EngineConfig
from tokenyard.engine.llm_engine import LLMEngine
from tokenyard.engine.migration import MigrationEndpoint

MAX_NEW = 14


def _engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("check_invariants", True)
    kw.setdefault("num_kv_blocks", 64)
    return LLMEngine(EngineConfig(model=str(model_dir), **kw))


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(5, 17))] for _ in range(n)]


def _drain(engines: list[LLMEngine], tokens: dict[str, list[int]]) -> None:
    for _ in range(500):
        busy = False
        for e in engines:
            if e.has_unfinished_requests():
                busy = True
                for ev in e.step_events():
                    tokens.setdefault(ev.request_id, []).append(ev.token_id)
        if not busy:
            return
    raise AssertionError("engines did not finish")


def _clean(*engines: LLMEngine) -> None:
    for e in engines:
        assert not e.has_unfinished_requests() and not e.scheduler.detached
        assert e.kv.num_used_blocks == 0 and not e.kv.reservations
        e.scheduler.check_invariants()


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("at_step", [1, 2, 3, 6, 9, 12])
def test_migration_at_any_point_of_a_decode_is_exact(tiny_llama_dir, at_step):
    """Requests migrate after ``at_step`` steps (one while its prompt is still in prefill chunks), keep decoding
    on the source during the copy stages, and finish on the destination with exactly the greedy tokens."""
    a = _engine(tiny_llama_dir, max_num_batched_tokens=8)
    b = _engine(tiny_llama_dir, max_num_batched_tokens=8)
    prompts = _prompts(3, seed=at_step)
    ids = [a.add_request(p, GREEDY, track_output=False) for p in prompts]
    tokens: dict[str, list[int]] = {}

    def step_source() -> None:
        for ev in a.step_events():
            tokens.setdefault(ev.request_id, []).append(ev.token_id)

    for _ in range(at_step):
        step_source()
    moved = [rid for rid in ids if rid in a.scheduler.requests and a.scheduler.requests[rid] in a.scheduler.running]
    assert moved, "some request is running at that point"
    src, dst = MigrationEndpoint(a), MigrationEndpoint(b)
    committed = 0
    for rid in moved:
        # Steps 1 and 3: one block per stage (the bulk goes in many stages while the source keeps decoding).
        res = migrate(src, dst, rid, f"m-{rid}", num_blocks=2, between_stages=step_source,
                      stage_bytes=1 if at_step in (1, 3) else 16 << 20)
        if not res.committed:   # it finished on the source while its blocks were being copied
            assert "stopped running" in res.reason and rid not in a.scheduler.requests, res.reason
            continue
        committed += 1
        assert res.phases[-2:] == ["committed", "released"] and res.stages >= 2
        if at_step in (1, 3):
            assert res.stages > res.blocks_staged >= 2, "one block per stage"
        assert rid in b.scheduler.requests and rid not in a.scheduler.requests
    assert committed
    _drain([a, b], tokens)
    for rid, prompt in zip(ids, prompts):
        assert tokens[rid] == hf_greedy(tiny_llama_dir, prompt, MAX_NEW), rid
    _clean(a, b)


@pytest.mark.parametrize("phase", ["stage", "freeze", "commit", "refused", "commit-refused"])
def test_aborted_migration_frees_both_sides_and_the_request_runs_on(tiny_llama_dir, phase):
    a = _engine(tiny_llama_dir)
    b = _engine(tiny_llama_dir, max_num_seqs=1 if phase == "refused" else 8)
    prompts = _prompts(2, seed=7)
    ids = [a.add_request(p, GREEDY, track_output=False) for p in prompts]
    tokens: dict[str, list[int]] = {}
    for _ in range(4):
        for ev in a.step_events():
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
    if phase == "refused":   # the destination's only seat is taken
        b.add_request(_prompts(1, seed=99)[0], GREEDY, request_id="other", track_output=False)
        b.step_events()
    if phase == "commit-refused":   # the request's id is live on the destination already
        b.add_request(_prompts(1, seed=98)[0], GREEDY, request_id=ids[0], track_output=False)
    stop_at = {"stage": "stage", "freeze": "freeze", "commit": "commit"}.get(phase)
    res = migrate(MigrationEndpoint(a), MigrationEndpoint(b), ids[0], "m", num_blocks=3,
                  check=lambda p: p != stop_at)
    assert not res.committed
    assert res.phases[-1] in ("refused", "aborted", "resumed")
    if phase in ("commit", "commit-refused"):
        assert res.phases[-2:] == ["aborted", "resumed"], "the frozen request resumed on the source"
    assert not b.kv.reservations and ids[0] in a.scheduler.requests and not a.scheduler.detached
    a.scheduler.check_invariants()
    b.scheduler.check_invariants()
    extra: dict[str, list[int]] = {}
    _drain([a], extra)   # the source alone: the destination may run a request of the same id
    _drain([b], {})
    for rid, prompt in zip(ids, prompts):
        assert tokens[rid] + extra[rid] == hf_greedy(tiny_llama_dir, prompt, MAX_NEW)
    _clean(a, b)


def test_migration_gives_up_when_the_request_finishes_on_the_source(tiny_llama_dir):
    a, b = _engine(tiny_llama_dir), _engine(tiny_llama_dir)
    rid = a.add_request(_prompts(1)[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                        track_output=False)
    a.step_events()

    def finish_it() -> None:
        while a.has_unfinished_requests():
            a.step_events()

    res = migrate(MigrationEndpoint(a), MigrationEndpoint(b), rid, "m", 2, between_stages=finish_it)
    assert not res.committed and "stopped running" in res.reason
    _clean(a, b)


def test_seeded_sampling_continues_exactly_after_a_migration(tiny_llama_dir):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True,
                            repetition_penalty=1.3, presence_penalty=0.4)
    prompt = _prompts(1, seed=3)[0]
    ref = _engine(tiny_llama_dir)
    want: dict[str, list[int]] = {}
    rid = ref.add_request(prompt, params, track_output=False)
    _drain([ref], want)
    a, b = _engine(tiny_llama_dir), _engine(tiny_llama_dir)
    a.add_request(prompt, params, request_id=rid, track_output=False)
    got: dict[str, list[int]] = {}
    for _ in range(5):
        for ev in a.step_events():
            got.setdefault(ev.request_id, []).append(ev.token_id)
    assert migrate(MigrationEndpoint(a), MigrationEndpoint(b), rid, "m", 4).committed
    _drain([a, b], got)
    assert got[rid] == want[rid]
    _clean(a, b)


def test_a_frozen_request_keeps_its_seat(tiny_llama_dir):
    """While frozen for a migration's last stage a request still holds its seat: if the commit fails it runs here
    again, and max_num_seqs must still hold."""
    a = _engine(tiny_llama_dir, max_num_seqs=2)
    prompts = _prompts(3, seed=11)
    ids = [a.add_request(p, GREEDY, track_output=False) for p in prompts]
    tokens: dict[str, list[int]] = {}
    for _ in range(3):
        for ev in a.step_events():
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
    running = [r.request_id for r in a.scheduler.running]
    assert running == ids[:2]
    head, _ = MigrationEndpoint(a).freeze(ids[0], 0)
    assert head is not None and a.scheduler.detached
    for ev in a.step_events():
        tokens.setdefault(ev.request_id, []).append(ev.token_id)
    assert a.scheduler.requests[ids[2]].status.value == "waiting", "the frozen request's seat stayed taken"
    assert MigrationEndpoint(a).resume(ids[0])
    a.scheduler.check_invariants()
    _drain([a], tokens)
    for rid, prompt in zip(ids, prompts):
        assert tokens[rid] == hf_greedy(tiny_llama_dir, prompt, MAX_NEW)
    _clean(a)
