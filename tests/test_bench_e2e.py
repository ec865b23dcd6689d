"""``tokenyard bench`` against a real tokenyard server process (a tiny random model), and without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.servers import Server, free_port
from tokenyard.cli import main

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("bench-logs") / "server.log"
    srv = Server(["--model", str(tiny_llama_dir), "--num-kv-blocks", "128", "--max-num-seqs", "16",
                  "--scheduling-policy", "priority"], log)
    yield srv.url
    srv.stop()


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenyard.cli", "bench", *args], capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_serve_completions_real_server(server, tiny_llama_dir, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    r = bench_cli("serve", "--base-url", server, "--tokenizer", str(tiny_llama_dir), "--num-prompts", "10",
                  "--request-rate", "40", "--input-len", "16:48", "--output-len", "12", "--max-concurrency", "4",
                  "--tenants", "2", "--priorities", "0,1", "--slo", "ttft:60000", "tpot:60000", "--seed", "3",
                  "--label", "smoke", "--result-json", str(out_json), "--plot", str(out_png))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "TTFT" in r.stdout and "successful requests" in r.stdout
    report = json.loads(out_json.read_text())
    s = report["summary"]
    assert (s["completed"], s["failed"], s["failures"]) == (10, 0, {})
    assert report["label"] == "smoke" and report["server"]["model"] == tiny_llama_dir.name
    reqs = report["requests"]
    assert len(reqs) == 10
    for q in reqs:
        assert q["ok"] and q["output_tokens"] == q["output_len"] == 12
        assert q["prompt_tokens"] == q["input_len"] and 16 <= q["input_len"] <= 48
        assert 0 < q["ttft_s"] <= q["latency_s"] and all(g >= 0 for g in q["itl_s"])
        assert q["tenant"] in ("tenant-0", "tenant-1") and q["priority"] in (0, 1)
    assert s["total_output_tokens"] == 120
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[key]
        assert set(d) == {"mean", "median", "p90", "p99", "p999"}
        assert 0 <= d["median"] <= d["p90"] <= d["p99"] <= d["p999"]
    assert s["ttft_ms"]["median"] <= s["e2e_ms"]["median"]
    last_end = max(q["send_s"] + q["latency_s"] for q in reqs)
    assert s["duration_s"] == pytest.approx(last_end, abs=1e-5)
    assert s["request_throughput"] == pytest.approx(10 / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(12 * s["request_throughput"])
    assert s["total_token_throughput"] > s["output_throughput"]
    assert s["goodput"] == pytest.approx(s["request_throughput"])   # every request met the loose SLOs
    assert report["fairness"]["max_difference"] is not None
    assert set(report["fairness"]["totals"]) == {"tenant-0", "tenant-1"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_multi_turn_real_server(server, tiny_llama_dir, tmp_path, capsys):
    out_json = tmp_path / "mt.json"
    rc = main(["bench", "serve", "--base-url", server, "--tokenizer", str(tiny_llama_dir), "--num-prompts", "6",
               "--multi-turn", "3", "--input-len", "10", "--output-len", "8", "--warmup", "0",
               "--result-json", str(out_json)])
    assert rc == 0, capsys.readouterr()
    report = json.loads(out_json.read_text())
    assert report["server"]["endpoint"] == "chat" and report["summary"]["completed"] == 6
    by_conv: dict[int, list[dict]] = {}
    for q in report["requests"]:
        assert q["output_tokens"] == 8
        by_conv.setdefault(q["conversation"], []).append(q)
    assert sorted(by_conv) == [0, 1]
    for turns in by_conv.values():
        turns.sort(key=lambda q: q["turn"])
        # each turn's prompt holds the previous prompt, its answer and new text; sent after it ended
        for a, b in zip(turns, turns[1:]):
            assert b["prompt_tokens"] >= a["prompt_tokens"] + 8 + 10
            assert b["send_s"] >= a["send_s"] + a["latency_s"]


def test_trace_replay_with_a_malformed_row(server, tiny_llama_dir, tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:46.7805900,91,16\n"
                     "2023-11-16 18:15:46.8805900,12x,16\n"
                     "2023-11-16 18:15:46.9805900,50,16\n")
    out_json = tmp_path / "t.json"
    rc = main(["bench", "serve", "--base-url", server, "--tokenizer", str(tiny_llama_dir), "--trace", str(trace),
               "--trace-time-scale", "2", "--trace-length-scale", "0.5", "--max-input-len", "100",
               "--max-output-len", "20", "--warmup", "0", "--result-json", str(out_json)])
    err = capsys.readouterr().err
    assert rc == 0
    assert f"{trace}:4" in err and "replaying the 2 rows before it" in err
    report = json.loads(out_json.read_text())
    assert f"{trace}:4" in report["workload"]["trace_error"]
    reqs = report["requests"]
    assert [(q["input_len"], q["output_len"]) for q in reqs] == [(100, 20), (46, 8)]   # scaled, clamped
    assert [q["output_tokens"] for q in reqs] == [20, 8]
    assert reqs[1]["scheduled_s"] == pytest.approx(0.2)


def test_server_errors_give_a_partial_report(server, tiny_llama_dir, tmp_path, capsys):
    out_json = tmp_path / "e.json"
    # the tiny model's context is 256 tokens: every request is refused with a 400
    rc = main(["bench", "serve", "--base-url", server, "--tokenizer", str(tiny_llama_dir), "--num-prompts", "3",
               "--input-len", "250", "--output-len", "10", "--warmup", "0", "--result-json", str(out_json)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "3 of 3 requests failed (http_400: 3)" in err and "maximum context length" in err
    assert "Traceback" not in err
    s = json.loads(out_json.read_text())["summary"]
    assert (s["completed"], s["failed"], s["failures"]) == (0, 3, {"http_400": 3})
    assert s["ttft_ms"]["median"] is None


def test_capacity_real_server(server, tiny_llama_dir, tmp_path, capsys):
    out_json = tmp_path / "cap.json"
    rc = main(["bench", "capacity", "--base-url", server, "--tokenizer", str(tiny_llama_dir), "--slo", "tbt:60000",
               "ttft:60000", "--min-rate", "5", "--max-rate", "50", "--probes", "3", "--num-prompts", "4",
               "--input-len", "16", "--output-len", "4", "--warmup", "0", "--result-json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "probe 1/3: 5 req/s" in out and "probe 2/3: 50 req/s" in out
    assert "capacity: at least 50 req/s" in out
    report = json.loads(out_json.read_text())
    assert report["capacity"] == 50 and [p["passed"] for p in report["probes"]] == [True, True]

    rc = main(["bench", "capacity", "--base-url", server, "--tokenizer", str(tiny_llama_dir), "--slo", "tbt:0.001",
               "--min-rate", "5", "--max-rate", "50", "--probes", "3", "--num-prompts", "3", "--input-len", "16",
               "--output-len", "4", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "capacity: below --min-rate 5 req/s" in out and "probe 2/3" not in out


def test_unreachable_server(tmp_path):
    out_json = tmp_path / "u.json"
    port = free_port()  # nothing listens there
    r = bench_cli("serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "3",
                  "--result-json", str(out_json))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith(f"tokenyard bench: cannot connect to http://127.0.0.1:{port}")
    assert lines[1].startswith("tokenyard bench: wrote")
    assert "Traceback" not in r.stderr
    report = json.loads(out_json.read_text())
    assert report["error"].startswith("cannot connect") and report["summary"]["completed"] == 0


def test_bad_flags_are_one_line_errors(capsys):
    for argv, words in ((["--input-len", "0"], "--input-len"), (["--request-rate", "-2"], "--request-rate"),
                        (["--slo", "ttft"], "--slo"), (["--tenants", "2", "--tenant-weights", "1"], "1 value(s)")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "serve", "--base-url", "http://127.0.0.1:9", *argv])
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_the_documented_cli_shape_parses():
    from tokenyard.cli import build_parser

    a = build_parser().parse_args([
        "bench", "serve", "--base-url", "http://h:1", "--model", "m", "--endpoint", "chat", "--num-prompts", "5",
        "--request-rate", "inf", "--burstiness", "0.5", "--max-concurrency", "3", "--input-len", "8:16",
        "--output-len", "4", "--no-ignore-eos", "--tokenizer", "/t", "--seed", "2", "--slo", "ttft:10", "tpot:5",
        "--trace", "x.csv", "--trace-time-scale", "10", "--trace-length-scale", "0.1", "--max-input-len", "64",
        "--max-output-len", "32", "--tenants", "2", "--priorities", "0,1,2", "--multi-turn", "2",
        "--result-json", "r.json", "--plot", "p.png", "--label", "L"])
    assert (a.bench_command, a.num_prompts, a.request_rate, a.ignore_eos, a.slo) == (
        "serve", 5, "inf", False, ["ttft:10", "tpot:5"])
    b = build_parser().parse_args(["bench", "capacity", "--slo", "tbt:50", "ttft:500"])
    assert b.bench_command == "capacity" and b.ignore_eos
    assert build_parser().parse_args(["serve", "--port", "1"]).command == "serve"   # the rest is intact
