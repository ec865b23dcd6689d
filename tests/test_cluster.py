"""Many instances on a real local Ray: exact outputs across instances, live migration at any point of a decode,
aborts at every handshake stage, drain by migration, and ``kill -9`` of an instance losing no request."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable

import httpx
import pytest

ray = pytest.importorskip("ray")

from tests.conftest import make_tiny_model  # noqa: E402
from tests.reference import hf_greedy  # noqa: E402
from tests.servers import Server  # noqa: E402
from tokenyard import SamplingParams  # noqa: E402
from tokenyard.cluster.runtime.frontend import ClusterConfig, ClusterEngine  # noqa: E402
from tokenyard.config import EngineConfig  # noqa: E402

# Decoding on the tiny model takes about a millisecond a step: requests must be long to still be running when a
# test migrates or kills their instance.
LONG = 1200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-4k"), "llama", max_positions=4096)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cluster(model_dir, n: int = 2, **kw) -> ClusterEngine:
    kw.setdefault("dispatch", "round-robin")
    kw.setdefault("migration", False)
    eng = ClusterEngine(EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=1200, num_threads=1,
                                     check_invariants=True), ClusterConfig(num_instances=n, **kw))
    eng.start()
    return eng


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(5, 30))] for _ in range(n)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def _run(eng: ClusterEngine, prompts, params, at: dict[int, Callable[[str], None]] | None = None,
               abort_after: dict[int, int] | None = None) -> tuple[list[list[int]], list[str | None]]:
    """Stream every request; ``at[i](request_id)`` runs (in a thread) once request i has 20 tokens; request i in
    ``abort_after`` is dropped by its client after that many tokens."""
    streams = await eng.add_requests([(p, params) for p in prompts])
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)

    async def consume(i, s):
        fired = False
        async for o in s:
            tokens[i].extend(o.token_ids)
            reasons[i] = o.finish_reason
            if at and i in at and not fired and len(tokens[i]) >= 20:
                fired = True
                await asyncio.to_thread(at[i], s.request_id)
            if abort_after and i in abort_after and len(tokens[i]) >= abort_after[i]:
                s.abort()
                reasons[i] = "abort"
                return

    await asyncio.wait_for(asyncio.gather(*(consume(i, s) for i, s in enumerate(streams))), timeout=300)
    return tokens, reasons


def _idle_and_clean(eng: ClusterEngine) -> None:
    """Every live instance ends with no request, no reservation and no block in use; invariants hold."""
    deadline = time.monotonic() + 30
    while True:
        checks = [ray.get(i.actor.check.remote()) for i in eng._instances.values() if i.state in ("running",
                                                                                               "draining")]
        if all(c == {"used_blocks": 0, "reservations": 0, "requests": 0, "detached": 0} for c in checks):
            return
        assert time.monotonic() < deadline, checks
        time.sleep(0.1)


def _other(eng: ClusterEngine, request_id: str) -> str:
    src = eng._reqs[request_id].instance
    return next(i for i, inst in eng._instances.items() if i != src and inst.state == "running")


def test_requests_spread_over_instances_are_exact(model_dir):
    eng = _cluster(model_dir, 2)
    try:
        prompts = _prompts(6)
        tokens, reasons = asyncio.run(_run(eng, prompts, _greedy(24)))
        for p, t in zip(prompts, tokens):
            assert t == hf_greedy(model_dir, p, 24)
        assert reasons == ["length"] * 6
        assert all(i.stats.get("generated_tokens", 0) > 0 for i in eng._instances.values()), "both served"
        _idle_and_clean(eng)
    finally:
        eng.close()


def test_live_migration_mid_decode_is_exact(model_dir):
    """Each request moves to the other instance while it decodes (after 20 tokens); one moves twice."""
    eng = _cluster(model_dir, 2)
    results = []

    def move(rid: str, times: int = 1) -> None:
        for _ in range(times):
            res = eng.migrate_request(rid, _other(eng, rid))
            assert res is not None and res.committed, res
            results.append(res)

    try:
        prompts = _prompts(3, seed=1)
        tokens, _ = asyncio.run(_run(eng, prompts, _greedy(LONG),
                                     at={0: lambda rid: move(rid, 2), 1: move, 2: move}))
        for p, t in zip(prompts, tokens):
            assert t == hf_greedy(model_dir, p, LONG)
        assert len(results) == 4 and all(r.phases[-2:] == ["committed", "released"] for r in results)
        assert all(r.blocks_staged > 0 and r.stages >= 1 for r in results), "KV was copied while decoding"
        assert eng.stats()["migrations"] == 4
        _idle_and_clean(eng)
    finally:
        eng.close()


@pytest.mark.parametrize("phase", ["stage", "freeze", "commit"])
def test_migration_aborted_at_each_stage_frees_both_sides(model_dir, phase):
    eng = _cluster(model_dir, 2)
    seen = []

    def move(rid: str) -> None:
        res = eng.migrate_request(rid, _other(eng, rid), check=lambda p: p != phase)
        seen.append(res)

    try:
        prompts = _prompts(2, seed=2)
        tokens, _ = asyncio.run(_run(eng, prompts, _greedy(300), at={0: move}))
        assert len(seen) == 1 and not seen[0].committed and seen[0].reason == f"stopped before {phase}"
        if phase == "commit":
            assert seen[0].phases[-2:] == ["aborted", "resumed"]
        for p, t in zip(prompts, tokens):
            assert t == hf_greedy(model_dir, p, 300)
        assert eng.stats()["migrations_aborted"] == 1
        _idle_and_clean(eng)
    finally:
        eng.close()


def test_aborts_and_migrations_leave_no_block_in_use(model_dir):
    eng = _cluster(model_dir, 2)

    def move(rid: str) -> None:
        eng.migrate_request(rid, _other(eng, rid))

    try:
        prompts = _prompts(6, seed=3)
        _, reasons = asyncio.run(_run(eng, prompts, _greedy(LONG), at={0: move, 1: move, 2: move, 3: move},
                                      abort_after={1: 60, 4: 30, 5: 1}))
        assert reasons == ["length", "abort", "length", "length", "abort", "abort"]
        _idle_and_clean(eng)
        assert not eng._reqs and eng.stats()["num_pending"] == 0
    finally:
        eng.close()


def test_drain_by_migration_loses_no_request(model_dir):
    eng = _cluster(model_dir, 2)

    def drain(_: str) -> None:
        eng.drain_instance("i0")

    try:
        prompts = _prompts(4, seed=4)
        tokens, reasons = asyncio.run(_run(eng, prompts, _greedy(LONG), at={0: drain}))
        for p, t in zip(prompts, tokens):
            assert t == hf_greedy(model_dir, p, LONG)
        deadline = time.monotonic() + 30
        while eng._instances["i0"].state != "stopped":
            assert time.monotonic() < deadline, eng.instances()
            time.sleep(0.05)
        assert eng.stats()["migrations"] >= 1 and eng.stats()["num_instances"] == 1
        _idle_and_clean(eng)
    finally:
        eng.close()


def test_kill_9_of_an_instance_loses_no_request(model_dir):
    """SIGKILL one of three instances mid-run: its requests resume elsewhere from prompt + streamed tokens; the
    client sees every token once (greedy: the same tokens as an undisturbed run)."""
    eng = _cluster(model_dir, 3)
    victim = eng._instances["i0"]

    def kill(_: str) -> None:
        os.kill(victim.info["pid"], signal.SIGKILL)

    try:
        prompts = _prompts(6, seed=5)
        tokens, reasons = asyncio.run(_run(eng, prompts, _greedy(600), at={0: kill}))
        assert reasons == ["length"] * 6
        for p, t in zip(prompts, tokens):
            assert t == hf_greedy(model_dir, p, 600)
        assert victim.state == "dead" and eng.stats()["resumed_after_failure"] >= 1
        states = {i["id"]: i["state"] for i in eng.instances()}
        assert states == {"i0": "dead", "i1": "running", "i2": "running"}
        per_instance = eng._instances["i1"].stats["kv_blocks_total"]
        assert eng.stats()["kv_blocks_total"] == 2 * per_instance, "a lost instance's pool is not counted"
        assert eng.stats()["generated_tokens"] >= 6 * 600, "its running counts still are"
        _idle_and_clean(eng)
        # The endpoint keeps serving on what is left.
        tokens, _ = asyncio.run(_run(eng, prompts[:2], _greedy(8)))
        assert tokens[0] == hf_greedy(model_dir, prompts[0], 8)
    finally:
        eng.close()


def test_server_with_instances_answers_the_openai_client(model_dir, tmp_path):
    from openai import OpenAI

    ray.shutdown()   # the server starts its own Ray
    srv = Server(["--model", str(model_dir), "--instances", "2", "--block-size", "4", "--dispatch", "freeness"],
                 tmp_path / "server.log", ready_timeout=180)
    try:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        prompt = _prompts(1, seed=6)[0]
        out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=10,
                                        temperature=0)
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 10
        health = httpx.get(f"{srv.url}/health").json()
        assert health["status"] == "ok" and [i["state"] for i in health["instances"]] == ["running", "running"]
        m = srv.metrics()
        assert m["tokenyard_num_instances"] == 2
        deadline = time.monotonic() + 10   # per-tenant service, summed over the instances (reported every 0.5 s)
        while not any(k.startswith("tokenyard_tenant_service_total") and v > 0 for k, v in m.items()):
            assert time.monotonic() < deadline, m
            time.sleep(0.2)
            m = srv.metrics()
    finally:
        assert srv.stop() == 0
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


def test_autoscaler_starts_an_instance_under_pressure_and_drains_one_when_idle(model_dir):
    from tokenyard.cluster.rebalance import AutoScaler

    # A band no load is inside: always "too tight" -> scale out to the maximum.
    eng = _cluster(model_dir, 1, autoscale=AutoScaler(low=1e9, high=2e9, min_instances=1, max_instances=2,
                                                     patience=1))
    try:
        deadline = time.monotonic() + 120
        while eng.stats()["num_instances"] < 2:
            assert time.monotonic() < deadline, eng.instances()
            time.sleep(0.1)
        assert len(eng.instance_start_s) == 2 and all(s > 0 for s in eng.instance_start_s)
        prompts = _prompts(4, seed=8)
        tokens, _ = asyncio.run(_run(eng, prompts, _greedy(16)))
        assert all(t == hf_greedy(model_dir, p, 16) for p, t in zip(prompts, tokens))
    finally:
        eng.close()
    # Always "too idle" -> drain down to the minimum, by migration, losing nothing.
    eng = _cluster(model_dir, 2, autoscale=AutoScaler(low=-2e9, high=-1e9, min_instances=1, max_instances=2,
                                                     patience=1))
    try:
        prompts = _prompts(3, seed=9)
        tokens, _ = asyncio.run(_run(eng, prompts, _greedy(300)))
        assert all(t == hf_greedy(model_dir, p, 300) for p, t in zip(prompts, tokens))
        deadline = time.monotonic() + 60
        while sorted(i["state"] for i in eng.instances()) != ["running", "stopped"]:
            assert time.monotonic() < deadline, eng.instances()
            time.sleep(0.1)
        _idle_and_clean(eng)
    finally:
        eng.close()


def test_an_abort_that_overtakes_its_add_drops_the_request(model_dir):
    """Ray runs a threaded actor's calls in any order: an abort may arrive before the add it follows."""
    from tokenyard.cluster.runtime.instance import AddItem, InstanceWorker

    w = InstanceWorker("solo", EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=64, num_threads=1))
    try:
        w.abort(["early"])
        assert w.add([AddItem("early", [5, 6, 7], _greedy(4)), AddItem("other", [5, 6, 7], _greedy(4))], 1) == [None,
                                                                                                              None]
        deadline = time.monotonic() + 30
        seen = set()
        while len(seen) < 1 or w.check()["requests"]:
            seen |= {e.request_id for e in w.poll(0.2).events}
            assert time.monotonic() < deadline
        assert seen == {"other"}, "the aborted request never ran"
        assert w.check() == {"used_blocks": 0, "reservations": 0, "requests": 0, "detached": 0}
    finally:
        w.shutdown()


def test_freeze_hands_over_the_requests_unpolled_events(model_dir):
    from tokenyard.cluster.runtime.instance import AddItem, InstanceWorker

    w = InstanceWorker("solo", EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=400, num_threads=1))
    try:
        assert w.add([AddItem("r", list(range(5, 20)), _greedy(LONG))], 1) == [None]
        deadline = time.monotonic() + 30
        while not w._events:   # it ran a step whose event nobody polled yet
            assert time.monotonic() < deadline
            time.sleep(0.001)
        head, _ = w.freeze("r", 0, None)
        snapshot, first, n, events = head
        assert events and all(e.request_id == "r" for e in events)
        assert [e.position for e in events] == list(range(events[0].position, len(snapshot.output_token_ids)))
        assert all(e.request_id != "r" for e in w.poll(0).events), "handed over, not reported twice"
        assert w.resume("r")
    finally:
        w.shutdown()
