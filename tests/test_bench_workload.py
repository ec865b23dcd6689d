"""Arrival processes, length distributions, tenants, priorities and conversations of tokenyard.bench."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenyard.bench.arrivals import arrival_times, gaps, parse_rate
from tokenyard.bench.workload import (
    LengthDist,
    assign_priorities,
    assign_tenants,
    chains,
    parse_floats,
    parse_priorities,
    synthetic,
    tenant_names,
)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_mean_rate_and_cv(burstiness):
    rate = 4.0
    g = gaps(40_000, rate, burstiness, np.random.default_rng(7))
    assert g.mean() == pytest.approx(1 / rate, rel=0.03)           # the rate does not depend on burstiness
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_poisson_is_burstiness_one_and_seeded():
    a = arrival_times(1000, 10.0, 1.0, np.random.default_rng(3))
    b = arrival_times(1000, 10.0, 1.0, np.random.default_rng(3))
    assert a == b and a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    assert a[-1] / 999 == pytest.approx(0.1, rel=0.1)
    assert a != arrival_times(1000, 10.0, 1.0, np.random.default_rng(4))


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5, parse_rate("inf")) == [0.0] * 5
    assert arrival_times(0, 1.0) == []


@pytest.mark.parametrize("bad", ["0", "-1", "fast", "nan"])
def test_bad_rates(bad):
    with pytest.raises(ValueError, match="--request-rate"):
        parse_rate(bad)
    with pytest.raises(ValueError, match="--burstiness"):
        gaps(3, 1.0, 0.0)


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert LengthDist.parse("128", "--input-len").sample(4, rng) == [128] * 4
    u = LengthDist.parse("64:512", "--input-len").sample(5000, rng)
    assert min(u) >= 64 and max(u) <= 512 and np.mean(u) == pytest.approx(288, rel=0.03)
    z = LengthDist.parse("10:1000", "--input-len", "zipf", 1.2).sample(5000, rng)
    assert min(z) >= 10 and max(z) <= 1000
    # Zipf puts most mass on the short end: P(10) = 1 / H(991, 1.2), about a fifth
    expected = 1 / sum(k ** -1.2 for k in range(1, 992))
    assert np.mean(np.asarray(z) == 10) == pytest.approx(expected, abs=0.02)
    assert np.median(z) < np.mean(z) < 505


@pytest.mark.parametrize("text", ["0", "5:4", "a:b", "1:2:3", "-3"])
def test_bad_lengths(text):
    with pytest.raises(ValueError, match="--input-len"):
        LengthDist.parse(text, "--input-len")


def test_synthetic_is_seeded_and_rate_keeps_lengths():
    d_in, d_out = LengthDist.parse("8:64", "x"), LengthDist.parse("4:16", "y")
    a = synthetic(50, d_in, d_out, 5.0, seed=1)
    b = synthetic(50, d_in, d_out, 5.0, seed=1)
    c = synthetic(50, d_in, d_out, 50.0, seed=1)
    assert [(s.input_len, s.output_len, s.arrival_s) for s in a] == [(s.input_len, s.output_len, s.arrival_s)
                                                                     for s in b]
    assert [(s.input_len, s.output_len) for s in a] == [(s.input_len, s.output_len) for s in c]
    # same pattern stretched: ten times the rate, a tenth of each arrival time
    assert [s.arrival_s / 10 for s in a] == pytest.approx([s.arrival_s for s in c])


def test_multi_turn_conversations():
    specs = synthetic(7, LengthDist(10, 10), LengthDist(5, 5), 2.0, multi_turn=3, seed=0)
    groups = chains(specs)
    assert [[(s.conversation, s.turn) for s in g] for g in groups] == [
        [(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)], [(2, 0)]]
    assert all(s.arrival_s is None for s in specs if s.turn > 0)
    assert [g[0].arrival_s for g in groups] == sorted(g[0].arrival_s for g in groups)


def test_tenants_and_priorities():
    specs = synthetic(3000, LengthDist(10, 10), LengthDist(5, 5), float("inf"), seed=0)
    tenants = tenant_names(3)
    assign_tenants(specs, tenants, parse_floats("1,1,2", "--tenant-weights", 3), np.random.default_rng(0))
    share = {t: sum(s.tenant == t for s in specs) / len(specs) for t in tenants}
    assert share["tenant-2"] == pytest.approx(0.5, abs=0.03) and share["tenant-0"] == pytest.approx(0.25, abs=0.03)

    assign_priorities(specs, parse_priorities("0,1,2"), "request", tenants, np.random.default_rng(0))
    assert {s.priority for s in specs} == {0, 1, 2}
    assign_priorities(specs, [5, 7], "tenant", tenants, np.random.default_rng(0))
    assert all(s.priority == [5, 7, 5][tenants.index(s.tenant)] for s in specs)

    conv = synthetic(40, LengthDist(10, 10), LengthDist(5, 5), 1.0, multi_turn=4, seed=0)
    assign_tenants(conv, tenants, None, np.random.default_rng(1))
    assign_priorities(conv, [0, 1, 2, 3], "request", tenants, np.random.default_rng(1))
    for g in chains(conv):  # a conversation keeps one tenant and one priority
        assert len({s.tenant for s in g}) == 1 and len({s.priority for s in g}) == 1


def test_bad_tenant_and_priority_lists():
    with pytest.raises(ValueError, match="2 value"):
        parse_floats("1,2", "--tenant-weights", 3)
    with pytest.raises(ValueError, match="positive"):
        parse_floats("1,0,2", "--tenant-weights", 3)
    with pytest.raises(ValueError, match="--priorities"):
        parse_priorities("0,high")
