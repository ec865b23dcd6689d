"""Azure LLM inference trace CSVs (TIMESTAMP, ContextTokens, GeneratedTokens) -> timed request lengths.

Parsing stops at the first malformed row with an error naming the file and line, and keeps the rows read
before it, so a caller can still replay (and report on) the part that was good.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRow:
    line: int               # 1-based line in the file
    time_s: float           # seconds (POSIX time for ISO timestamps)
    context_tokens: int
    generated_tokens: int


class TraceError(ValueError):
    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"trace {where}: {message}")
        self.path, self.line = path, line


@dataclass
class TraceParse:
    rows: list[TraceRow] = field(default_factory=list)
    error: TraceError | None = None   # set when parsing stopped early; rows holds what came before


def _timestamp(text: str) -> float:
    text = text.strip()
    try:
        return float(text)  # plain seconds
    except ValueError:
        pass
    dt = datetime.fromisoformat(text)  # ValueError names the text
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)   # the Azure traces are UTC without an offset
    return dt.timestamp()


def _count(text: str, name: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{name} {text.strip()!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{name} {value} is below {minimum}")
    return value


def parse_trace(path: str | Path, limit: int | None = None) -> TraceParse:
    """Read at most ``limit`` data rows. Never raises for bad content: the error comes back in ``.error``."""
    path = Path(path)
    out = TraceParse()
    try:
        # Undecodable bytes become U+FFFD, so the row holding them fails to parse with its own line number.
        f = open(path, newline="", encoding="utf-8-sig", errors="replace")
    except OSError as e:
        out.error = TraceError(path, None, f"cannot open: {e.strerror or e}")
        return out
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                out.error = TraceError(path, None, "the file is empty")
                return out
            names = [h.strip().lower() for h in header]
            missing = [c for c in COLUMNS if c.lower() not in names]
            if missing:
                out.error = TraceError(path, 1, f"header lacks column(s) {', '.join(missing)} "
                                                f"(expected {','.join(COLUMNS)}; got {','.join(header)})")
                return out
            idx = [names.index(c.lower()) for c in COLUMNS]
            last: TraceRow | None = None
            for fields in reader:
                line = reader.line_num
                if limit is not None and len(out.rows) >= limit:
                    break
                if not fields or all(not x.strip() for x in fields):
                    continue
                if len(fields) != len(header):
                    raise TraceError(path, line, f"expected {len(header)} fields, got {len(fields)}: "
                                                 f"{','.join(fields)[:80]!r}")
                try:
                    t = _timestamp(fields[idx[0]])
                    row = TraceRow(line, t, _count(fields[idx[1]], "ContextTokens", 1),
                                   _count(fields[idx[2]], "GeneratedTokens", 0))
                except ValueError as e:
                    raise TraceError(path, line, str(e)) from None
                if not math.isfinite(row.time_s):
                    raise TraceError(path, line, f"timestamp {fields[idx[0]]!r} is not finite")
                if last is not None and row.time_s < last.time_s:
                    raise TraceError(path, line, f"timestamp goes backwards (earlier than line {last.line})")
                out.rows.append(row)
                last = row
        except TraceError as e:
            out.error = e
        except csv.Error as e:
            out.error = TraceError(path, reader.line_num or None, f"not a readable CSV file ({e})")
    return out


@dataclass(frozen=True)
class TracedRequest:
    arrival_s: float
    input_len: int
    output_len: int
    line: int


def scale_length(n: int, scale: float, maximum: int | None) -> int:
    """round(n * scale), at least 1 token and at most ``maximum``."""
    v = max(1, round(n * scale))
    return min(v, maximum) if maximum is not None else v


def trace_requests(rows: list[TraceRow], time_scale: float = 1.0, length_scale: float = 1.0,
                   max_input_len: int | None = None, max_output_len: int | None = None) -> list[TracedRequest]:
    """Arrivals relative to the first row, gaps multiplied by ``time_scale`` (10 = ten times slower)."""
    if not time_scale > 0:
        raise ValueError(f"--trace-time-scale: must be positive, got {time_scale}")
    if not length_scale > 0:
        raise ValueError(f"--trace-length-scale: must be positive, got {length_scale}")
    if not rows:
        return []
    t0 = rows[0].time_s
    return [TracedRequest((r.time_s - t0) * time_scale, scale_length(r.context_tokens, length_scale, max_input_len),
                          scale_length(r.generated_tokens, length_scale, max_output_len), r.line) for r in rows]
