"""Prometheus metrics: latency histograms and request counts observed here, engine state read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenyard.sched.accounting import EVICTED

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)

# engine.stats() key -> (metric name, help)
_GAUGES = {
    "num_running": ("tokenyard_num_requests_running", "Requests holding KV blocks and scheduled each step."),
    "num_waiting": ("tokenyard_num_requests_waiting", "Requests queued in the scheduler."),
    "num_swapped": ("tokenyard_num_requests_swapped", "Requests whose KV lives in host swap space."),
    "kv_blocks_used": ("tokenyard_kv_blocks_used", "Device KV blocks in use."),
    "kv_blocks_free": ("tokenyard_kv_blocks_free", "Device KV blocks free."),
    "kv_blocks_total": ("tokenyard_kv_blocks_total", "Device KV blocks in the pool."),
    "num_swapping": ("tokenyard_num_requests_swapping", "Requests whose KV is being copied between device and host."),
}
_COUNTERS = {
    "num_preemptions": ("tokenyard_preemptions", "Requests preempted (swap or recompute)."),
    "prefix_cache_queries": ("tokenyard_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("tokenyard_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache."),
    "host_prefix_hit_tokens": ("tokenyard_host_prefix_hit_tokens",
                               "Prompt tokens whose KV was loaded from the host tier instead of recomputed."),
    "swap_out_bytes": ("tokenyard_swap_out_bytes", "KV bytes copied from the device to the host."),
    "swap_in_bytes": ("tokenyard_swap_in_bytes", "KV bytes copied from the host to the device."),
    "swap_copies": ("tokenyard_swap_copies", "KV copy operations issued (one per contiguous run of blocks)."),
    "swap_out_reused_blocks": ("tokenyard_swap_out_reused_blocks",
                               "Blocks a swap-out did not copy because the host already held them."),
    "prompt_tokens": ("tokenyard_prompt_tokens", "Prompt tokens of accepted requests."),
    "generated_tokens": ("tokenyard_generation_tokens", "Tokens generated."),
}

# Only for a cluster (``tokenyard serve --instances N``).
_CLUSTER_GAUGES = {
    "num_instances": ("tokenyard_num_instances", "Engine instances up (running or draining)."),
    "instance_start_seconds": ("tokenyard_instance_start_seconds",
                               "Seconds the most recently started instance took to come up (scale-out cost)."),
}
_CLUSTER_COUNTERS = {
    "migrations": ("tokenyard_migrations", "Running requests live-migrated to another instance."),
    "migrations_aborted": ("tokenyard_migrations_aborted", "Live migrations given up (the request stayed)."),
    "resumed_after_failure": ("tokenyard_requests_resumed_after_failure",
                              "Requests resumed on another instance after theirs was lost."),
    "instances_started": ("tokenyard_instances_started", "Engine instances started (at start-up and scale-out)."),
}


class _EngineCollector(Collector):
    """Reads the engine's own cumulative counts at scrape time, so they are never double kept."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats()
        for key, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=s.get(key, 0))
        yield GaugeMetricFamily("tokenyard_num_requests_pending", "Requests not yet given their first token "
                                "(bounded by --max-waiting).", value=s.get("num_pending", 0))
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=s.get(key, 0))
        if "num_instances" in s:
            for key, (name, doc) in _CLUSTER_GAUGES.items():
                yield GaugeMetricFamily(name, doc, value=s[key])
            for key, (name, doc) in _CLUSTER_COUNTERS.items():
                yield CounterMetricFamily(name, doc, value=s.get(key, 0))


class TenantLabels:
    """Bounded ``tenant`` label values: the client picks the tenant (``user``), so only ``max_tenants`` of them
    get a label of their own, handed out once and never taken back; every other tenant is ``other``. So each
    series only ever grows (a top-N recomputed per scrape would move counts between series). Values are made
    printable UTF-8 (a lone surrogate in ``user`` must not break every later scrape)."""

    OTHER = "other"

    def __init__(self, max_tenants: int) -> None:
        self.max_tenants = max_tenants
        self.given: set[str] = set()

    def label(self, tenant: str) -> str:
        if tenant in self.given:
            return _printable(tenant)
        if len(self.given) < self.max_tenants and tenant != EVICTED:
            self.given.add(tenant)
            return _printable(tenant)
        return self.OTHER


def _printable(text: str) -> str:
    return text[:64].encode("utf-8", "backslashreplace").decode("utf-8")


class _TenantCollector(Collector):
    """Per-tenant VTC service and virtual counter; labels from :class:`TenantLabels`, the most served first."""

    def __init__(self, tenant_stats: Callable[[], dict[str, tuple[float, float]]], labels: TenantLabels) -> None:
        self.tenant_stats = tenant_stats
        self.labels = labels

    def collect(self) -> Iterator:
        stats = self.tenant_stats()
        service = CounterMetricFamily("tokenyard_tenant_service", "VTC service given to a tenant: w_p per prompt "
                                      "token + w_q per output token (other: all unlabelled tenants).",
                                      labels=["tenant"])
        counter = GaugeMetricFamily("tokenyard_tenant_virtual_counter", "A tenant's VTC virtual counter: service "
                                    "divided by its weight, plus lifts.", labels=["tenant"])
        other = None
        for tenant in sorted(stats, key=lambda t: -stats[t][0]):
            svc, ctr = stats[tenant]
            name = self.labels.label(tenant)
            if name == TenantLabels.OTHER:
                other = (other or 0.0) + svc
            else:
                service.add_metric([name], svc)
                counter.add_metric([name], ctr)
        if other is not None:
            service.add_metric([TenantLabels.OTHER], other)
        yield service
        yield counter


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]],
                 tenant_stats: Callable[[], dict[str, tuple[float, float]]] | None = None,
                 max_tenants: int = 20) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("tokenyard_time_to_first_token_seconds", "Time from request arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("tokenyard_inter_token_latency_seconds", "Time between two tokens of one request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tokenyard_e2e_request_latency_seconds", "Time from request arrival to its end.",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.requests = Counter("tokenyard_requests", "Finished engine requests (one per choice).",
                                ["tenant", "finish_reason"], registry=self.registry)
        self.tenant_labels = TenantLabels(max_tenants)
        self.registry.register(_EngineCollector(stats))
        if tenant_stats is not None:
            self.registry.register(_TenantCollector(tenant_stats, self.tenant_labels))

    def tracker(self, tenant: str, arrival: float) -> RequestTracker:
        return RequestTracker(self, tenant, arrival)


class RequestTracker:
    """Latency bookkeeping of one engine request, fed each delta as it reaches the server."""

    def __init__(self, metrics: ServerMetrics, tenant: str, arrival: float) -> None:
        self.m, self.tenant, self.arrival = metrics, tenant, arrival
        self.last: float | None = None
        self.done = False

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
        else:
            self.m.itl.observe((now - self.last) / n)
        self.last = now

    def on_finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.monotonic() - self.arrival)
        self.m.requests.labels(tenant=self.m.tenant_labels.label(self.tenant), finish_reason=reason).inc()
