"""`tokenyard profile`: the real engine's steps timed and fitted into a cost model the simulator reads."""

from __future__ import annotations

import json

from tokenyard.bench.workload import RequestSpec
from tokenyard.config import EngineConfig
from tokenyard.engine.profiler import Probes, profile
from tokenyard.sched.scheduler import SchedulerConfig
from tokenyard.sim.cost import ProfiledCost, StepShape, load_cost_model
from tokenyard.sim.simulator import SimConfig, Simulator


def test_profile_of_a_tiny_model_feeds_the_simulator(tiny_llama_dir, tmp_path):
    cfg = EngineConfig(model=str(tiny_llama_dir), max_num_batched_tokens=32, max_num_seqs=8, block_size=4,
                       num_kv_blocks=400, dtype="float32")
    out = tmp_path / "profile.json"
    probes = Probes(decode_batches=(1, 2, 4, 8), decode_contexts=(8, 40), prefill_lengths=(4, 16, 32, 64),
                    prefill_background=(0, 2), max_probe_tokens=200)
    lines: list[str] = []
    data = profile(cfg, out, repeats=3, log=lines.append, probes=probes)
    assert any("decode: 4 requests at 40 tokens" in x for x in lines)
    assert not any("decode: 8 requests at 40 tokens" in x for x in lines)   # over max_probe_tokens
    assert any("decode: 8 requests at 8 tokens" in x for x in lines)
    saved = json.loads(out.read_text())
    assert saved["version"] == 2 and saved["num_kv_blocks"] == 400 and saved["block_size"] == 4
    assert saved["decode"]["knots"] == [1.0, 2.0, 4.0, 8.0]
    assert saved["mixed"]["knots"] == [4.0, 16.0, 32.0]
    assert data["fit"]["decode_shapes"] >= 5 and data["fit"]["mixed_shapes"] >= 6
    assert saved["copies"]["migration_s_per_block"] > 0
    cm = load_cost_model(str(out), block_size=4)
    assert isinstance(cm, ProfiledCost)
    # Every fitted step time is positive and larger steps cost more.
    assert 0 < cm.decode_time(1, 8) < cm.decode_time(8, 8 * 40)
    assert 0 < cm.step_time(StepShape(4, 1, 0, 0, 10, 4)) < cm.step_time(StepShape(32, 1, 0, 0, 528, 32))
    # Measured step times are matched by the fit within reason (tiny steps on a shared CPU are noisy).
    assert data["fit"]["decode_mean_rel_error"] < 0.5 and data["fit"]["mixed_mean_rel_error"] < 0.5
    res = Simulator(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8), cm, SimConfig(max_model_len=200)) \
        .run([RequestSpec(i, 20, 10, 0.01 * i) for i in range(6)])
    assert all(r.ok for r in res.records)


def test_step_log_of_a_serving_engine_fits_a_profile(tiny_llama_dir, tmp_path):
    from tokenyard.entrypoints.llm import LLM
    from tokenyard.sampling_params import SamplingParams
    from tokenyard.sim.steplog import profile_from_step_log, read_step_log

    log = tmp_path / "steps.jsonl"
    llm = LLM(model=str(tiny_llama_dir), max_num_batched_tokens=16, max_num_seqs=8, block_size=4, num_kv_blocks=200,
              dtype="float32", step_log=str(log))
    for n in (1, 3, 8):
        llm.generate([[5 + i] * (6 + 3 * i) for i in range(n)], SamplingParams(max_tokens=30, ignore_eos=True))
    header, steps = read_step_log(log)
    assert header["num_kv_blocks"] == 200 and header["max_num_batched_tokens"] == 16
    assert len(steps) == llm.engine.num_steps
    assert all(cost > 0 for _, cost in steps)
    assert {s.num_seqs for s, _ in steps if s.decode_only} >= {1, 3, 8}
    data = profile_from_step_log([log])
    assert data["block_size"] == 4 and data["source"].startswith("step log")
    cm = load_cost_model(str(_write(tmp_path / "p.json", data)), block_size=4)
    assert 0 < cm.decode_time(1, 10) and 0 < cm.step_time(StepShape(16, 2, 1, 10, 60, 12))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1, "s": 0.1, "shape": [1, 1, 1, 1, 0, 0]}\n')
    import pytest

    with pytest.raises(ValueError, match="header"):
        read_step_log(bad)


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_profile_times_swap_copies_even_without_swap_space(tiny_llama_dir, tmp_path):
    """The engine runs with recompute preemption (no host blocks); the profile still measures swap speed."""
    from tokenyard.engine.llm_engine import LLMEngine
    from tokenyard.engine.profiler import Profiler

    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), block_size=4, num_kv_blocks=100, dtype="float32"))
    assert engine.runner.store.host_kv.shape[0] == 0
    copies = Profiler(engine, log=lambda m: None).copies()
    assert copies["swap_s_per_block"] > 0 and copies["swap_s_per_copy"] >= 0
    assert copies["migration_s_per_block"] > 0


def test_profile_flags_that_do_not_go_together_are_refused():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "tokenyard.cli", "profile", "--copies-from", "p.json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--from-step-log" in p.stderr
