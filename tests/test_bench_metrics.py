"""tokenyard.bench.metrics on hand-made timings: every expected number here is worked out by hand."""

from __future__ import annotations

import pytest

from tokenyard.bench import metrics
from tokenyard.bench.records import RequestRecord


def rec(index=0, *, send=0.0, ttft=0.1, tokens=None, latency=1.0, out=None, prompt=10, tenant=None, error=None,
        sent=True, input_len=10, output_len=4) -> RequestRecord:
    r = RequestRecord(index, input_len, output_len, tenant=tenant)
    r.sent, r.send_s = sent, (send if sent else None)
    r.ttft_s, r.latency_s = ttft, latency
    r.token_s = list(tokens) if tokens is not None else []
    r.output_tokens = out if out is not None else len(r.token_s)
    r.prompt_tokens = prompt
    if error:
        r.fail(error, f"{error} happened")
    return r


def test_distribution_percentiles_interpolate():
    d = metrics.distribution([40, 10, 30, 20])
    assert d["mean"] == pytest.approx(25)
    assert d["median"] == pytest.approx(25)
    assert d["p90"] == pytest.approx(37)      # 10 + 0.9 * 3 * 10
    assert d["p99"] == pytest.approx(39.7)
    assert d["p999"] == pytest.approx(39.97)
    assert metrics.distribution([0.5], scale=1e3) == {k: pytest.approx(500) for k in
                                                      ("mean", "median", "p90", "p99", "p999")}


def test_empty_sample_is_none_not_zero():
    assert metrics.distribution([]) == {"mean": None, "median": None, "p90": None, "p99": None, "p999": None}


def test_tpot_and_itl():
    r = rec(ttft=0.1, tokens=[0.1, 0.3, 0.6, 1.0], latency=1.0, out=10)
    assert metrics.tpot_s(r) == pytest.approx(0.1)          # (1.0 - 0.1) / (10 - 1)
    assert metrics.itl_s(r) == pytest.approx([0.2, 0.3, 0.4])
    assert metrics.tpot_s(rec(tokens=[0.1], out=1)) is None  # one token: no time per output token
    assert metrics.tpot_s(rec(tokens=[0.1, 0.2], error="http_500")) is None


def test_latency_summary_uses_successful_requests_only():
    ok1 = rec(0, ttft=0.1, tokens=[0.1, 0.2, 0.4], latency=0.4, out=3)
    ok2 = rec(1, ttft=0.3, tokens=[0.3, 0.4, 0.5], latency=0.5, out=3)
    bad = rec(2, ttft=9.0, tokens=[9.0, 9.5], latency=10.0, error="timeout")
    s = metrics.latency_summary([ok1, ok2, bad])
    assert s["ttft_ms"]["mean"] == pytest.approx(200)
    assert s["e2e_ms"]["median"] == pytest.approx(450)
    assert s["tpot_ms"]["mean"] == pytest.approx((150 + 100) / 2)   # (400-100)/2 and (500-300)/2
    assert s["itl_ms"]["mean"] == pytest.approx(125)                 # gaps 100, 200, 100, 100 ms


def test_throughput_goodput_and_summary():
    rs = [
        rec(0, send=0.0, ttft=0.1, tokens=[0.1, 0.2, 0.3], latency=0.3, out=3, prompt=5),       # meets both
        rec(1, send=0.5, ttft=0.3, tokens=[0.3, 0.4, 0.5], latency=0.5, out=3, prompt=7),       # TTFT too slow
        rec(2, send=1.0, ttft=0.1, tokens=[0.1, 0.5, 1.0], latency=1.0, out=3, prompt=9),       # TPOT too slow
        rec(3, send=1.2, ttft=0.1, latency=0.8, error="http_503"),                             # failed
        rec(4, sent=False),                                                                       # never sent
    ]
    slo = metrics.parse_slo(["ttft:200", "tpot:150"])
    assert slo == {"ttft": 200.0, "tpot": 150.0}
    assert [metrics.meets_slo(r, slo) for r in rs] == [True, False, False, False, False]
    assert metrics.duration_s(rs) == pytest.approx(2.0)     # the last end: 1.0 + 1.0 (and 1.2 + 0.8)
    s = metrics.summary(rs, slo)
    assert (s["completed"], s["failed"], s["not_sent"]) == (3, 1, 1)
    assert s["duration_s"] == pytest.approx(2.0)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx((21 + 9) / 2)
    assert s["goodput"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(1 / 4)
    assert s["failures"] == {"http_503": 1}
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[key]) == {"mean", "median", "p90", "p99", "p999"}
    assert "goodput" not in metrics.summary(rs)
    assert metrics.goodput(rs, {"e2e": 600}, 2.0) == pytest.approx(1.0)   # requests 0 and 1


@pytest.mark.parametrize("bad", ["ttft", "ttft:", "ttft:abc", "foo:10", "tpot:-1", "ttft:0"])
def test_parse_slo_rejects(bad):
    with pytest.raises(ValueError, match="--slo"):
        metrics.parse_slo([bad])


def test_parse_slo_tbt_for_capacity():
    assert metrics.parse_slo(["tbt:50", "TTFT:1000"], allowed=("tbt", "ttft")) == {"tbt": 50.0, "ttft": 1000.0}
    with pytest.raises(ValueError):
        metrics.parse_slo(["tbt:50"])


def test_service_timeline_by_hand():
    events = [(1.0, "A", 10.0), (2.0, "B", 4.0), (3.0, "A", 2.0), (5.0, "B", 20.0)]
    intervals = [(0.0, 4.0, "A"), (1.5, 6.0, "B")]
    tl = metrics.service_timeline(events, intervals)
    assert tl.times == [0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0]
    # only A backlogged until 1.5; both until 4 (closed interval); then only B
    assert tl.difference == [None, None, 10.0, 6.0, 8.0, 8.0, None, None]
    assert (tl.max_difference, tl.max_difference_at) == (10.0, 1.5)
    assert tl.totals == {"A": 12.0, "B": 24.0}
    assert tl.service["B"] == [0, 0, 0, 4, 4, 4, 24, 24]

    weighted = metrics.service_timeline(events, intervals, weights={"A": 2.0})
    assert weighted.difference[2:6] == [5.0, 1.0, 2.0, 2.0]
    assert weighted.max_difference == 5.0


def test_service_events_from_records():
    r = rec(send=10.0, ttft=1.0, tokens=[1.0, 1.5], latency=2.0, out=3, prompt=3, tenant="A")
    ev = metrics.service_events([r], w_p=1.0, w_q=2.0)
    # the prompt at the first token, one w_q per chunk, the token the usage reported beyond the chunks at the end
    assert ev == [(11.0, "A", 3.0), (11.0, "A", 2.0), (11.5, "A", 2.0), (12.0, "A", 2.0)]
    assert metrics.backlog_intervals([r]) == [(10.0, 12.0, "A")]


def test_fairness_two_tenants_and_downsampling():
    rs = [rec(i, send=0.1 * i, ttft=0.05, tokens=[0.05 + 0.01 * k for k in range(20)], latency=0.3, out=20,
              prompt=10, tenant="AB"[i % 2]) for i in range(40)]
    tl = metrics.fairness(rs, tenants=["A", "B"])
    assert tl.totals["A"] == tl.totals["B"] == 20 * (10 + 2 * 20)
    assert tl.max_difference is not None and tl.max_difference > 0
    small = tl.downsampled(50)
    assert len(small.times) <= 51 and small.max_difference == tl.max_difference
    assert tl.max_difference_at in small.times
    assert small.times == sorted(small.times)


def test_failures_and_groups():
    rs = [rec(0, tenant="A"), rec(1, tenant="B", error="connect"), rec(2, tenant="B", error="connect"),
          rec(3, tenant="A", error="http_400")]
    assert metrics.failures(rs) == {"connect": 2, "http_400": 1}
    g = metrics.by_group(rs, "tenant")
    assert g["A"]["sent"] == 2 and g["A"]["completed"] == 1 and g["B"]["completed"] == 0
    assert g["B"]["ttft_ms"]["median"] is None


def test_progress_counts_requests_in_flight_and_summary_counts_sent_input():
    from tokenyard.bench.report import RunProgress

    recs = [RequestRecord(i, 10, 4) for i in range(3)]
    prog = RunProgress(3, enabled=False)
    for r in recs:
        r.sent = True
        prog.sent(r)
    recs[0].send_s, recs[0].latency_s, recs[0].prompt_tokens = 0.0, 1.0, 10
    prog.done(recs[0])
    assert (prog.in_flight, prog.ok) == (2, 1)
    s = metrics.summary(recs)   # the other two never finished (an interrupted run)
    assert s["total_input_tokens"] == 10 and s["sent_input_tokens"] == 30
