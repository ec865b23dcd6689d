"""Showing results: a progress bar while running, a rich table at the end, the JSON file, and a PNG plot."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokenyard.bench.metrics import ServiceTimeline
from tokenyard.bench.records import RequestRecord


# --------------------------------------------------------------------------- progress
class RunProgress:
    """A rich progress bar on stderr (only when stderr is a terminal): requests ended, and how many are in flight."""

    def __init__(self, total: int, label: str = "requests", enabled: bool | None = None) -> None:
        console = Console(stderr=True)
        self.enabled = console.is_terminal if enabled is None else enabled
        self.ok = self.failed = self.in_flight = 0
        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("in flight {task.fields[in_flight]}  ok {task.fields[ok]}  "
                                      "failed {task.fields[failed]}"), TimeElapsedColumn(),
                           console=console, disable=not self.enabled, transient=False)
        self._task = self._p.add_task(label, total=total, ok=0, failed=0, in_flight=0)

    def __enter__(self) -> RunProgress:
        self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._p.__exit__(*exc)

    def sent(self, rec: RequestRecord) -> None:
        self.in_flight += 1
        self._p.update(self._task, in_flight=self.in_flight)

    def done(self, rec: RequestRecord) -> None:
        if rec.ok:
            self.ok += 1
        else:
            self.failed += 1
        if rec.sent:
            self.in_flight = max(self.in_flight - 1, 0)
        self._p.update(self._task, advance=1, ok=self.ok, failed=self.failed, in_flight=self.in_flight)


# --------------------------------------------------------------------------- table
def _fmt(v: float | int | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:,.{digits}f}"


def print_summary(summary: dict, title: str, by_tenant: dict | None = None, fairness: dict | None = None,
                  by_priority: dict | None = None, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or file: wide enough that the tables do not wrap
            console = Console(width=120)
    console.print(title, style="bold", highlight=False, markup=False)
    t = Table(show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("successful requests", _fmt(summary["completed"]))
    t.add_row("failed requests", _fmt(summary["failed"]))
    if summary.get("not_sent"):
        t.add_row("not sent", _fmt(summary["not_sent"]))
    for kind, n in summary["failures"].items():
        t.add_row(f"  {kind}", _fmt(n))
    t.add_row("duration (s)", _fmt(summary["duration_s"]))
    t.add_row("input tokens (completed requests)", _fmt(summary["total_input_tokens"]))
    if summary.get("sent_input_tokens", 0) != summary["total_input_tokens"]:
        t.add_row("input tokens (all sent)", _fmt(summary["sent_input_tokens"]))
    t.add_row("output tokens", _fmt(summary["total_output_tokens"]))
    t.add_row("request throughput (req/s)", _fmt(summary["request_throughput"], 3))
    t.add_row("output token throughput (tok/s)", _fmt(summary["output_throughput"]))
    t.add_row("total token throughput (tok/s)", _fmt(summary["total_token_throughput"]))
    if "goodput" in summary:
        slo = " ".join(f"{k}<={v:g}ms" for k, v in summary["slo_ms"].items())
        t.add_row(f"goodput (req/s, {slo})", _fmt(summary["goodput"], 3))
        att = summary.get("slo_attainment")
        t.add_row("SLO attainment", "-" if att is None else f"{100 * att:.1f} %")
    console.print(t)

    lat = Table(title="latency (ms)", title_justify="left")
    lat.add_column("metric")
    for name in ("mean", "median", "p90", "p99", "p99.9"):
        lat.add_column(name, justify="right")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        d = summary[key]
        lat.add_row(name, *(_fmt(d[k]) for k in ("mean", "median", "p90", "p99", "p999")))
    console.print(lat)

    for groups, what in ((by_tenant, "tenant"), (by_priority, "priority")):
        if not groups or len(groups) < 2:
            continue
        g = Table(title=f"per {what}", title_justify="left")
        cols = [what, "sent", "ok", "output tok", "TTFT median", "TTFT p99", "E2E median"]
        if what == "tenant" and fairness:
            cols.append("service")
        for c in cols:
            g.add_column(c, justify="left" if c == what else "right")
        for name, s in groups.items():
            row = [name, _fmt(s["sent"]), _fmt(s["completed"]), _fmt(s["output_tokens"]),
                   _fmt(s["ttft_ms"]["median"]), _fmt(s["ttft_ms"]["p99"]), _fmt(s["e2e_ms"]["median"])]
            if what == "tenant" and fairness:
                row.append(_fmt(fairness["totals"].get(name), 0))
            g.add_row(*row)
        console.print(g)
    if fairness and fairness.get("max_difference") is not None:
        console.print(f"max service difference among backlogged tenants: {fairness['max_difference']:,.0f} "
                      f"(at {fairness['max_difference_at_s']:.2f} s; w_p={fairness['w_p']:g}, "
                      f"w_q={fairness['w_q']:g})")


# --------------------------------------------------------------------------- JSON
def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "host": platform.node()}


def _clean(x):
    """JSON-safe: Paths as strings, inf/nan floats as strings (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_json(path: str | Path, report: dict) -> Path:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    body = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), **report}
    p.write_text(json.dumps(_clean(body), indent=1) + "\n")
    return p


def first_errors(records: Sequence[RequestRecord]) -> dict[str, str]:
    """One example message per failure kind."""
    out: dict[str, str] = {}
    for r in records:
        if r.error_kind and r.error_kind not in out:
            out[r.error_kind] = r.error or ""
    return out


# --------------------------------------------------------------------------- plot
def plot(path: str | Path, records: Sequence[RequestRecord], title: str,
         timeline: ServiceTimeline | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tokenyard.bench.metrics import tpot_s

    ok = [r for r in records if r.ok]
    series = {
        "TTFT (ms)": [1e3 * r.ttft_s for r in ok if r.ttft_s is not None],
        "TPOT (ms)": [1e3 * x for x in map(tpot_s, ok) if x is not None],
        "E2E (ms)": [1e3 * r.latency_s for r in ok],
    }
    rows = 2 if timeline is not None and len(timeline.service) > 1 else 1
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        if values:
            v = np.sort(values)
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"CDF of {name.split()[0]}")
    if rows == 2:
        ax_s, ax_d, ax_off = axes[1]
        for tenant, s in timeline.service.items():
            ax_s.plot(timeline.times, s, label=tenant, drawstyle="steps-post")
        ax_s.set_xlabel("time (s)")
        ax_s.set_ylabel("cumulative weighted service")
        ax_s.set_title("service per tenant")
        ax_s.legend(fontsize="small")
        ax_s.grid(alpha=0.3)
        d = [np.nan if x is None else x for x in timeline.difference]
        ax_d.plot(timeline.times, d, drawstyle="steps-post", color="tab:red")
        ax_d.set_xlabel("time (s)")
        ax_d.set_ylabel("max - min service (backlogged tenants)")
        ax_d.set_title("service difference")
        ax_d.grid(alpha=0.3)
        ax_off.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
