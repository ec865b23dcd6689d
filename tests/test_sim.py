"""The simulator: collapsed decode spans are exactly stepping, the cost models, the event loop's timing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenyard.bench.workload import RequestSpec
from tokenyard.sched.scheduler import SchedulerConfig
from tokenyard.sim.cost import (
    DEVICES,
    MODELS,
    CostModel,
    ProfiledCost,
    RooflineCost,
    StepShape,
    VidurCost,
    decode_features,
    default_vidur_profiles,
    fit_linear,
    hat_basis,
    load_cost_model,
)
from tokenyard.sim.simulator import SimConfig, Simulator


class ToyCost(CostModel):
    """Linear, with coefficients that make float sums round (so a closed form would differ from stepping)."""

    name = "toy"
    block_size = 4

    def __init__(self, num_kv_blocks: int = 64) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.swap_s_per_block = 0.0003
        self.swap_s_per_copy = 0.0001
        self.migration_s_per_block = 0.0007
        self.migration_s_per_stage = 0.001

    def decode_time(self, num_seqs: int, context: int) -> float:
        return 0.0071 + 0.00013 * num_seqs + 1.7e-6 * context

    def mixed_time(self, s: StepShape) -> float:
        return 0.011 + 0.00021 * s.num_tokens + 0.00013 * s.num_seqs + 1.7e-6 * s.decode_context \
            + 3.1e-8 * s.prefill_attn


def _records(specs, sched: SchedulerConfig, cfg: SimConfig, cost: CostModel):
    sim = Simulator(sched, cost, cfg)
    res = sim.run(specs)
    ledgers = [(dict(i.sched.ledger.service), dict(i.sched.ledger.counter)) for i in sim.instances]
    return res, [(r.index, r.send_s, r.ttft_s, r.latency_s, tuple(r.token_s), r.finish_reason, r.error_kind)
                 for r in res.records] + [ledgers]


def _both(specs, sched, cfg_kw, cost_factory):
    """Collapsed spans with arrivals routed up front where possible, against every step through the scheduler
    with every arrival capping every instance's run (the plainest simulation)."""
    out = {}
    for collapse in (True, False):
        cfg = SimConfig(collapse=collapse, check_invariants=True, eager_routing=collapse, **cfg_kw)
        out[collapse] = _records(specs, sched, cfg, cost_factory())
    return out


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 40))
    multi = draw(st.booleans())
    specs = []
    t = 0.0
    conv = 0
    i = 0
    while i < n:
        t += draw(st.floats(0.0, 0.2))
        turns = draw(st.integers(1, 3)) if multi else 1
        for k in range(min(turns, n - i)):
            specs.append(RequestSpec(i, draw(st.integers(1, 40)), draw(st.integers(1, 30)),
                                     t if k == 0 else None, tenant=f"t{draw(st.integers(0, 2))}",
                                     priority=draw(st.integers(0, 2)), conversation=conv if turns > 1 else None,
                                     turn=k))
            i += 1
        conv += 1
    return specs


@settings(max_examples=int(os.environ.get("TOKENYARD_SIM_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=workloads(), policy=st.sampled_from(["fcfs", "priority", "vtc", "vtc+priority"]),
       mode=st.sampled_from(["recompute", "swap-sync", "swap-overlap"]), blocks=st.integers(24, 80),
       budget=st.sampled_from([8, 16, 64]), seqs=st.sampled_from([2, 4, 16]), caching=st.booleans(),
       instances=st.integers(1, 3), dispatch=st.sampled_from(["round-robin", "least-loaded", "freeness"]),
       migration=st.booleans(), churn=st.sampled_from([None, 0.05]), scale=st.booleans())
def test_collapsed_spans_give_exactly_the_timings_of_stepping(specs, policy, mode, blocks, budget, seqs, caching,
                                                              instances, dispatch, migration, churn, scale):
    sched = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, scheduling_policy=policy,
                            preemption_mode="recompute" if mode == "recompute" else "swap",
                            swap_overlap=mode == "swap-overlap", tenant_weights={"t1": 3.0})
    kw = dict(num_instances=instances, dispatch=dispatch, migration=migration and instances > 1,
              interval_s=0.03, migration_low=6.0, migration_gap=2.0, num_host_blocks=60 if mode != "recompute" else 0,
              enable_prefix_caching=caching, max_model_len=80, priority_churn_s=churn,
              autoscale=(1, 3) if scale else None, instance_start_s=0.05)
    out = _both(specs, sched, kw, lambda: ToyCost(blocks))
    (res_c, a), (res_s, b) = out[True], out[False]
    assert a == b
    assert res_c.steps == res_s.steps
    assert res_c.migrations == res_s.migrations and res_c.scale_events == res_s.scale_events
    assert res_s.span_steps == 0


# A workload the property test found (hypothesis, 3,000 examples) where the simulation never ended: an instance
# whose only request was swapped out at a block boundary, with exactly its blocks free (the rest reserved for an
# incoming migration), swapped it in and, the copy landed, could not get a block for its next token, preempted it,
# and again, each round in no time (reused host copies): (input, output, arrival, tenant, priority, conversation, turn).
_SELF_PREEMPTION_ROWS = [
    (16, 30, 0.08431641415332447, 0, 0, 0, 0), (40, 15, None, 0, 0, 0, 1), (16, 4, 0.24829387751141305, 0, 0, 1, 0),
    (16, 12, None, 0, 0, 1, 1), (32, 11, 0.37361162387453684, 0, 0, 2, 0), (36, 21, None, 0, 0, 2, 1),
    (15, 2, 0.48280281464510666, 0, 0, 3, 0), (39, 17, None, 0, 0, 3, 1),
    (23, 29, 0.48280281464510666, 0, 0, None, 0), (25, 20, 0.5866720370705587, 0, 0, None, 0),
    (36, 1, 0.6439317680731449, 0, 0, 6, 0), (37, 7, None, 0, 0, 6, 1), (13, 4, 0.6439317680731449, 0, 0, None, 0),
    (26, 13, 0.7779248413714486, 0, 0, 8, 0), (34, 30, None, 0, 0, 8, 1), (21, 22, 0.8537558281769496, 0, 0, 9, 0),
    (14, 11, None, 0, 0, 9, 1), (23, 18, 0.9411122890473013, 0, 0, 10, 0), (27, 11, None, 0, 0, 10, 1),
    (29, 25, None, 0, 0, 10, 2), (25, 17, 1.0927593161058573, 0, 0, 11, 0), (12, 2, None, 0, 0, 11, 1),
    (39, 2, 1.1558934726243615, 0, 2, 12, 0), (2, 7, None, 0, 0, 12, 1), (5, 27, 1.1737228328976648, 0, 0, 13, 0),
    (19, 29, None, 0, 0, 13, 1), (39, 19, 1.2580392470509891, 0, 0, 14, 0), (25, 11, None, 0, 0, 14, 1),
    (33, 8, None, 0, 0, 14, 2), (21, 6, 1.310813656851356, 0, 0, None, 0), (7, 23, 1.310813656851356, 2, 0, 16, 0),
    (19, 3, None, 0, 0, 16, 1), (21, 17, 1.4755830068589926, 0, 0, None, 0),
    (31, 28, 1.6686120274817147, 0, 0, 18, 0), (16, 14, None, 0, 0, 18, 1), (1, 1, 1.6686120274817147, 0, 0, 19, 0),
    (1, 1, None, 0, 0, 19, 1), (1, 1, 1.6686120274817147, 0, 0, None, 0),
]


def test_a_swapped_request_is_not_admitted_without_room_for_its_next_token():
    specs = [RequestSpec(i, a, b, t, tenant=f"t{te}", priority=p, conversation=c, turn=k)
             for i, (a, b, t, te, p, c, k) in enumerate(_SELF_PREEMPTION_ROWS)]
    sched = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=2, scheduling_policy="vtc+priority",
                            preemption_mode="swap", swap_overlap=True, tenant_weights={"t1": 3.0})
    kw = dict(num_instances=3, dispatch="least-loaded", migration=True, interval_s=0.03, migration_low=6.0,
              migration_gap=2.0, num_host_blocks=60, enable_prefix_caching=True, max_model_len=80,
              priority_churn_s=0.05)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the simulation did not end (self-preemption loop)"))
    signal.alarm(120)   # it looped forever before the fix: fail instead of hanging the suite
    try:
        out = _both(specs, sched, kw, lambda: ToyCost(24))
    finally:
        signal.alarm(0)
    (res_c, a), (res_s, b) = out[True], out[False]
    assert a == b and res_c.steps == res_s.steps < 2000
    assert all(r.finish_reason == "length" or r.error_kind == "http_400" for r in res_c.records)   # all served


def _trace_like(n: int, seed: int = 0) -> list[RequestSpec]:
    import random

    rng = random.Random(seed)
    t = 0.0
    specs = []
    for i in range(n):
        t += rng.expovariate(3.0)
        specs.append(RequestSpec(i, rng.randint(8, 120), rng.randint(20, 200), t, tenant=f"t{i % 4}",
                                 priority=i % 3))
    return specs


@pytest.mark.parametrize("policy", ["fcfs", "priority", "vtc"])
@pytest.mark.parametrize("blocks", [400, 90])   # plenty, and short (preemptions, a blocked queue head)
def test_spans_are_taken_and_exact_on_a_long_workload(policy, blocks):
    specs = _trace_like(120)
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=32, scheduling_policy=policy)
    out = _both(specs, sched, dict(max_model_len=400), lambda: ToyCost(blocks))
    (res_c, a), (_, b) = out[True], out[False]
    assert a == b
    preemptions = sum(i["preemptions"] for i in res_c.instances)
    if blocks == 400:
        assert preemptions == 0
        assert res_c.span_steps > res_c.steps // 2, "the spans this test is about were not taken"
    else:
        assert preemptions > 0 and res_c.span_steps > 0


@pytest.mark.parametrize("policy", ["fcfs", "vtc"])
@pytest.mark.parametrize("blocks", [400, 90])
def test_routing_up_front_changes_nothing_but_the_number_of_spans(policy, blocks):
    """Round-robin reads no instance state, so arrivals can be routed before the run and each instance capped only
    at its own arrivals: the same records, steps and ledgers, in fewer, longer spans."""
    specs = _trace_like(150, seed=3)
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=32, scheduling_policy=policy)
    out = {}
    for eager in (True, False):
        cfg = SimConfig(num_instances=3, dispatch="round-robin", max_model_len=400, eager_routing=eager,
                        check_invariants=True)
        out[eager] = _records(specs, sched, cfg, ToyCost(blocks))
    (res_e, a), (res_c, b) = out[True], out[False]
    assert a == b and res_e.steps == res_c.steps
    spans = [sum(i["spans"] for i in r.instances) for r in (res_e, res_c)]
    assert 0 < spans[0] < spans[1], spans   # the up-front routing was taken and let spans run longer


def test_span_with_a_blocked_queue_head_and_a_preempted_prefix_in_the_cache():
    """fcfs under memory pressure: the queue head (a preempted request whose blocks sit in the prefix cache) waits
    through decode spans; spans that could evict its hits are not taken."""
    specs = [RequestSpec(i, 60, 150, 0.01 * i) for i in range(12)]
    sched = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=12)
    out = _both(specs, sched, dict(max_model_len=400), lambda: ToyCost(60))
    (res_c, a), (_, b) = out[True], out[False]
    assert a == b
    assert res_c.span_steps > 0


def test_one_request_timed_step_by_step_by_the_cost_model():
    cost = ToyCost(100)
    sched = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4)
    res = Simulator(sched, cost, SimConfig(max_model_len=100)).run([RequestSpec(0, 20, 5, 1.5)])
    r = res.records[0]
    # Prefill: chunks of 8, 8, 4 tokens (the last one samples); then 4 decodes.
    t = 1.5
    for start, q in ((0, 8), (8, 8), (16, 4)):
        t = t + cost.mixed_time(StepShape(q, 1, 0, 0, q * start + q * (q + 1) // 2, start + q))
    want = [t]
    for k in range(4):
        t = t + cost.decode_time(1, 21 + k)
        want.append(t)
    assert r.ok and r.output_tokens == 5 and r.finish_reason == "length"
    assert r.send_s == 1.5
    assert [1.5 + x for x in r.token_s] == pytest.approx(want, rel=0, abs=1e-12)
    assert r.ttft_s == pytest.approx(want[0] - 1.5)


def test_requests_that_cannot_fit_fail_like_the_server_answers_them():
    sched = SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4)
    specs = [RequestSpec(0, 70, 20, 0.0), RequestSpec(1, 10, 10, 0.0), RequestSpec(2, 30, 30, 0.1)]
    res = Simulator(sched, ToyCost(8), SimConfig(max_model_len=80)).run(specs)
    kinds = [r.error_kind for r in res.records]
    assert kinds == ["http_400", None, "http_400"]   # over the context window; over the KV pool (8 x 4 tokens)
    assert res.records[1].ok


def test_multi_turn_reuses_the_conversation_prefix():
    specs = [RequestSpec(0, 40, 10, 0.0, conversation=0, turn=0), RequestSpec(1, 8, 10, None, conversation=0, turn=1)]
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4)
    sim = Simulator(sched, ToyCost(100), SimConfig(max_model_len=200))
    res = sim.run(specs)
    first, second = res.records
    assert second.send_s == pytest.approx(first.end_s)
    assert second.prompt_tokens == 40 + 10 + 8
    assert sim.instances[0].kv.prefix_hits >= 48   # the first turn's full blocks (12 of 4 tokens)


def test_migration_moves_requests_off_a_crowded_instance():
    # Round-robin puts every long request on the two instances alike; one instance gets all the short ones.
    specs = []
    for i in range(24):
        specs.append(RequestSpec(i, 40, 120 if i % 2 == 0 else 4, 0.001 * i))
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16)
    kw = dict(num_instances=2, dispatch="round-robin", interval_s=0.02, migration_low=3.0, migration_gap=1.0,
              max_model_len=400, check_invariants=True)
    moved = Simulator(sched, ToyCost(120), SimConfig(migration=True, **kw))
    res = moved.run(specs)
    assert res.migrations > 0
    assert all(r.ok and r.output_tokens == r.output_len for r in res.records)
    # Nothing leaks: every block of both instances is back.
    for inst in moved.instances:
        assert inst.kv.num_used_blocks == 0 and not inst.kv.reservations


# --------------------------------------------------------------------------- cost models
def test_fit_linear_recovers_the_coefficients_of_a_linear_cost():
    rows, ys = [], []
    for n in range(1, 40, 3):
        for ctx in (10, 400, 3000):
            rows.append([1.0, n, n * ctx])
            ys.append(0.004 + 0.0002 * n + 3e-8 * n * ctx)
    coef, err = fit_linear(rows, ys)
    assert coef == pytest.approx([0.004, 0.0002, 3e-8], rel=1e-6)
    assert err < 1e-9


def test_piecewise_features_interpolate_and_extrapolate():
    knots = [1.0, 4.0, 16.0]
    assert hat_basis(1, knots) == [1.0, 0.0, 0.0]
    assert hat_basis(10, knots) == pytest.approx([0.0, 0.5, 0.5])
    assert hat_basis(28, knots) == pytest.approx([0.0, -1.0, 2.0])   # the last segment continued
    # A fitted piecewise function of the batch plus a context term is recovered exactly.
    f = {1: 0.005, 4: 0.008, 16: 0.02}
    shapes = [(n, c) for n in (1, 2, 4, 8, 16) for c in (10 * n, 300 * n)]

    def truth(n, c):
        lo = max(k for k in f if k <= n)
        hi = min(k for k in f if k >= n)
        base = f[lo] if lo == hi else f[lo] + (f[hi] - f[lo]) * (n - lo) / (hi - lo)
        return base + 2e-6 * c

    coef, err = fit_linear([decode_features(n, c, knots) for n, c in shapes], [truth(n, c) for n, c in shapes])
    assert coef == pytest.approx([0.005, 0.008, 0.02, 2e-6], rel=1e-6)


def _profile_data(**over) -> dict:
    data = {"kind": "tokenyard-profile", "version": 2, "block_size": 16, "num_kv_blocks": 1000,
            "decode": {"knots": [1, 8], "values": [0.005, 0.012], "per_context_token": 1e-6},
            "mixed": {"knots": [8, 512], "values": [0.02, 0.5], "per_seq": 0.001, "per_decode_context_token": 1e-6,
                      "per_prefill_attn_pair": 1e-9, "per_prefill_context_token": 0.0},
            "copies": {"swap_s_per_block": 0.0001}}
    data.update(over)
    return data


def test_profiled_cost_reads_a_profile_file(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps(_profile_data()))
    cm = load_cost_model(str(p))
    assert isinstance(cm, ProfiledCost) and cm.num_kv_blocks == 1000
    assert cm.decode_time(1, 100) == pytest.approx(0.005 + 0.0001)
    assert cm.decode_time(4, 100) == pytest.approx(0.005 + 0.007 * 3 / 7 + 0.0001)
    assert cm.step_time(StepShape(4, 4, 4, 100, 0, 0)) == cm.decode_time(4, 100)
    s = StepShape(260, 2, 1, 50, 259 * 260 // 2, 259)
    assert cm.step_time(s) == pytest.approx(0.02 + 0.48 * 252 / 504 + 0.002 + 50e-6 + 259 * 260 / 2 * 1e-9)
    assert cm.swap_time(10, 1) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="block size"):
        load_cost_model(str(p), block_size=32)
    p.write_text(json.dumps(_profile_data(version=1)))
    with pytest.raises(ValueError, match="version"):
        load_cost_model(str(p))
    p.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_cost_model(str(p))
    with pytest.raises(ValueError, match="no such profile"):
        load_cost_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="device"):
        load_cost_model("roofline:tpu:llama-2-7b")


def test_roofline_decode_is_bound_by_reading_the_weights():
    cm = RooflineCost(MODELS["llama-2-7b"], DEVICES["h100"], overhead_s=0.0)
    w = MODELS["llama-2-7b"].weight_bytes
    assert cm.decode_time(1, 1) == pytest.approx(w / (3.35e12 * 0.7), rel=1e-3)
    # A 4k-token prefill is compute bound: ~2 * params * tokens FLOPs.
    s = StepShape(4096, 1, 0, 0, 4096 * 4097 // 2, 4096)
    assert cm.step_time(s) > cm.decode_time(256, 256 * 1000)
    assert cm.num_kv_blocks > 1000


vidur_dir = default_vidur_profiles()


@pytest.mark.skipif(not (vidur_dir / "compute").is_dir(), reason="Vidur profiles are in ../shared (not in a clone)")
def test_vidur_cost_interpolates_the_measured_operators():
    import csv

    cm = load_cost_model("vidur:h100:llama-2-7b", overhead_s=0.0)
    assert isinstance(cm, VidurCost)
    path = vidur_dir / "compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv"
    rows = [r for r in csv.DictReader(open(path)) if r["num_tensor_parallel_workers"] == "1"]
    r = next(r for r in rows if r["num_tokens"] == "512")
    per_layer = sum(float(r[f"time_stats.{op}.median"]) for op in VidurCost.PER_LAYER)
    assert cm.layers_time(512) == pytest.approx(1e-3 * (32 * per_layer + float(r["time_stats.emb.median"])))
    lo, hi = sorted((cm.layers_time(504), cm.layers_time(512)))   # measured points, not always monotonic
    assert lo <= cm.layers_time(508) <= hi
    assert 0.005 < cm.decode_time(1, 100) < 0.05   # a 7B decode on an H100: milliseconds


def test_simulate_cli_writes_the_bench_report(tmp_path):
    trace = tmp_path / "t.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(30):
        lines.append(f"2023-11-16 18:15:{10 + i // 2:02d}.{(i % 2) * 5}000000,{50 + 7 * i},{5 + i}")
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "tokenyard.cli", "simulate", "--trace", str(trace), "--instances", "2",
           "--dispatch", "freeness", "--migration", "--cost-model", "roofline:a100:llama-2-7b",
           "--result-json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rep = json.loads(out.read_text())
    assert rep["summary"]["completed"] == 30
    assert len(rep["requests"]) == 30 and rep["requests"][0]["ttft_s"] > 0
    assert rep["simulation"]["instances"] == 2 and rep["simulation"]["requests_per_wall_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "tokenyard.cli", "simulate", "--trace", str(trace),
                          "--cost-model", "roofline:tpu:x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "device 'tpu'" in bad.stderr


def test_simulator_imports_no_torch():
    code = ("import sys; import tokenyard.sim.simulator, tokenyard.sim.cli; "
            "print('TORCH' if 'torch' in sys.modules else 'CLEAN')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "CLEAN"


def test_simulate_capacity_search(tmp_path):
    out = tmp_path / "cap.json"
    cmd = [sys.executable, "-m", "tokenyard.cli", "simulate", "--capacity", "--slo", "tbt:60", "ttft:500",
           "--cost-model", "roofline:h100:llama-2-7b", "--input-len", "512:2048", "--output-len", "32:128",
           "--num-prompts", "400", "--probes", "5", "--result-json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rep = json.loads(out.read_text())
    assert len(rep["probes"]) == 5 and rep["probes"][0]["rate"] == 0.1 and rep["probes"][1]["rate"] == 64.0
    assert rep["capacity"] is not None and rep["bound"] == "bracketed"
    passed = [x["rate"] for x in rep["probes"] if x["passed"]]
    failed = [x["rate"] for x in rep["probes"] if not x["passed"]]
    assert max(passed) == rep["capacity"] < min(failed)
    bad = subprocess.run([sys.executable, "-m", "tokenyard.cli", "simulate", "--capacity", "--slo", "ttft:100",
                          "--cost-model", "roofline:h100:llama-2-7b"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tbt" in bad.stderr


def test_autoscaling_starts_instances_under_a_burst_and_drains_them_after():
    # A burst of long requests, then a trickle: the scaler adds instances, then drains back to the minimum.
    specs = [RequestSpec(i, 40, 150, 0.002 * i) for i in range(60)]
    specs += [RequestSpec(60 + i, 10, 5, 8.0 + 0.5 * i) for i in range(30)]
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16)
    kw = dict(num_instances=1, autoscale=(1, 4), instance_start_s=0.2, dispatch="freeness", migration=True,
              interval_s=0.05, max_model_len=400)
    out = _both(specs, sched, kw, lambda: ToyCost(120))
    (res, a), (res_s, b) = out[True], out[False]
    assert a == b and res.scale_events == res_s.scale_events
    kinds = [k for _, k, _ in res.scale_events]
    assert kinds.count("start") >= 1 and kinds.count("stop") == kinds.count("start")
    assert all(r.ok and r.output_tokens == r.output_len for r in res.records)
    # Up to 4 instances for a while, back to 1: fewer instance-seconds than 4 for the whole run.
    assert res.instance_seconds < 4 * res.duration_s
    started = {i for _, k, i in res.scale_events if k == "start"}
    assert started and all(x["tokens"] > 0 for x in res.instances if x["instance"] in started)
    with pytest.raises(ValueError, match="autoscale"):
        SimConfig(num_instances=5, autoscale=(1, 4))


def test_a_span_right_after_a_swap_in_registers_its_blocks_when_stepping_would():
    """Found by the property test: a request swapped back in has full blocks its new owner has not registered
    yet; stepping registers them at its first decode, and so must a span starting there (registered later, the
    pool's cached blocks, then the block ids handed out, then the swap copies' count and times differ)."""
    lens = [(1, 10, 0.0), (26, 5, 0.0), (26, 7, 0.0), (1, 11, 0.046875), (11, 2, 0.171875), (1, 16, 0.171875),
            (1, 1, 0.171875), (1, 7, 0.171875)] + [(1, 1, 0.171875)] * 19
    specs = [RequestSpec(i, p, d, t, tenant="t0", priority=0) for i, (p, d, t) in enumerate(lens)]
    sched = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=2, scheduling_policy="priority",
                            preemption_mode="swap", swap_overlap=True)
    kw = dict(num_host_blocks=60, max_model_len=80, priority_churn_s=0.05)
    out = _both(specs, sched, kw, lambda: ToyCost(24))
    (res, a), (_, b) = out[True], out[False]
    assert a == b
    assert res.span_steps > 0 and sum(i["preemptions"] for i in res.instances) > 0


def _loop_ends(cm: CostModel, t: float, n: int, context: int, k: int, limit: float) -> list[float]:
    out = []
    while len(out) < k and t < limit:
        t = t + cm.decode_time(n, context)
        out.append(t)
        context += n
    return out


@settings(max_examples=300, deadline=None)
@given(model=st.sampled_from(["profile", "roofline", "roofline-70b", "vidur"]), t=st.floats(0.0, 1e5),
       n=st.integers(1, 300), context=st.integers(1, 10**6), k=st.integers(1, 3000),
       limit_steps=st.one_of(st.none(), st.floats(0.0, 4000.0)))
def test_decode_span_times_as_arrays_are_the_loop_s_floats(model, t, n, context, k, limit_steps):
    """A long span's step times come from NumPy arrays: bit for bit the floats of adding one step at a time."""
    import tokenyard.sim.cost as cost_mod

    if model == "profile":
        cm = ProfiledCost(_profile_data(decode={"knots": [1, 8, 64, 256], "values": [0.0051, 0.0123, 0.031, 0.087],
                                                "per_context_token": 1.37e-7}))
    elif model == "vidur":
        if not (vidur_dir / "compute").is_dir():
            return   # the profiles are in ../shared, not in a clone
        cm = load_cost_model("vidur:h100:llama-2-7b")
    else:
        cm = RooflineCost(MODELS["llama-2-70b" if model.endswith("70b") else "llama-2-7b"], DEVICES["h100"],
                           num_kv_blocks=1000)
    limit = float("inf") if limit_steps is None else t + limit_steps * cm.decode_time(n, context)
    calls = []
    array_form = cm._decode_steps
    cm._decode_steps = lambda n_, contexts: calls.append(len(contexts)) or array_form(n_, contexts)
    got = cm.decode_ends(t, n, context, k, limit)
    assert got == _loop_ends(cm, t, n, context, k, limit)
    assert all(type(x) is float for x in got)
    if k >= cost_mod.ARRAY_SPAN and t < limit:   # the array form is what ran
        assert calls and all(c >= cost_mod.ARRAY_SPAN for c in calls)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=3), c=st.floats(1e-9, 10.0),
       times=st.integers(0, 500), last=st.integers(0, 8))
def test_repeated_additions_with_numpy_are_the_loop_s_floats(x, c, times, last):
    from tokenyard.sim.instance import repeat_add

    last = min(last, times)
    cs = [c * (i + 1) for i in range(len(x))]
    before, after = [], []
    for x0, c0 in zip(x, cs):
        want = [x0]
        for _ in range(times):
            want.append(want[-1] + c0)
        before.append(want[times - last])
        after.append(want[times])
    assert repeat_add(tuple(x), tuple(cs), times, last) == (tuple(before), tuple(after))


@pytest.mark.parametrize("collapse", [True, False])
def test_without_token_times_the_first_and_last_token_times_are_kept(collapse):
    """``--no-token-times`` keeps each request's first and last token times (TTFT, end to end), the very floats a
    run that keeps every token time gives. A prompt whose last token runs as a 1-token chunk samples its first
    token inside a span (budget 64, prompts up to 120: some end that way): the span must keep that time."""
    specs = _trace_like(80, seed=5)
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=32)
    runs = {}
    for tokens in (True, False):
        cfg = SimConfig(max_model_len=400, collapse=collapse, record_tokens=tokens, check_invariants=True)
        runs[tokens] = Simulator(sched, ToyCost(400), cfg).run(specs)
    full, short = runs[True], runs[False]
    assert full.steps == short.steps and (full.span_steps > 0) == collapse
    for a, b in zip(full.records, short.records):
        assert (a.ttft_s, a.latency_s) == (b.ttft_s, b.latency_s)
        assert b.token_s == ([a.token_s[0], a.token_s[-1]] if len(a.token_s) > 1 else a.token_s)
